"""One optimizer step (``train_step``), read top to bottom; its parts are named objects.

The parts: the execution strategy (``Setup.strategy``, ``vaopd.strategy``: one process or FSDP2
under torchrun; it samples, reduces and clips), the rollout engine (``Setup.rollout``), the scorer
(``Setup.scorer``, ``vaopd.scoring``: teacher and student hidden states), the fused loss
(``va_opd_loss``) and the optimizer. The trainer (``vaopd.trainer``) runs the steps.

1. take the step's ``P`` prompts (a seeded permutation per epoch: the order depends only on the
   seed and the step, which is what makes ``--resume`` exact);
2. sample ``K`` responses per prompt from the student (the rollout engine, ``vaopd.rollout``);
3. per micro-batch of whole sibling groups: run the frozen teacher's body once on a doubled
   batch (clean image rows, then ablated image rows; two packed rows with
   ``train.packed_scoring``) for final hidden states only; run the student's body with
   gradients; hand both hidden states and the LM-head weights to ``vaopd.kernels.va_opd_loss``
   and backpropagate;
4. clip, AdamW, cosine schedule.

Non-finite numbers. A step whose rollout (sampling failed on non-finite weights), teacher hidden
states, loss or gradient norm is non-finite makes no update: the record says ``skipped`` and names
the phase (``non_finite``); the trainer counts such steps (``train.max_bad_steps``). Every rank
takes the same decision (the checks are reduced over the ranks).

Gradient accumulation. The VA-OPD weights need complete sibling groups (the z-score is over a
prompt's K responses) and the loss divides by the prompt count of the optimizer step. So each
micro-batch holds whole groups (``train.micro_batch_prompts`` prompts, all their responses); the
weights computed inside a micro-batch are then exactly those of the full batch, and every
micro-batch divides by the step's total ``P`` (``num_prompts=P``). The summed micro-batch
gradients equal one big batch's gradient, with no cross-micro-batch pass.

Length buckets (``train.length_buckets``, single process: ``SingleProcess.sample``). A micro-batch is as wide as its longest
response, so after the rollout the groups are ordered by their longest response and micro-batches
take consecutive groups of that order: short groups are no longer padded to a long neighbour's
width. Only which whole groups share a micro-batch changes, so the invariants above still hold.
Under torchrun the slots of each micro-batch are fixed before sampling (``slot_layout``). Each
micro-batch's prompts also drop the left-padding columns none of its rows needs
(``without_pad_columns``).

Phases (``Timer``): rollout, teacher, student_forward, loss (the fused loss's forward and backward,
on detached hidden states and head weight), student_backward (the body's backward from those
gradients), optimizer.
"""
from __future__ import annotations

import math
import time
from contextlib import contextmanager, nullcontext
from dataclasses import replace
from typing import Callable

import torch

from vaopd.build import Setup
from vaopd.config import Config
from vaopd.data import step_indices
from vaopd.kernels import va_opd_loss
from vaopd.metrics import add_sums, token_stats
from vaopd.rollout import PromptBatch, encode_prompts
from vaopd.scoring import ablated_view
from vaopd.strategy import NonFiniteRollout, Sampled, all_finite

__all__ = ["Timer", "RolloutHook", "train_step", "without_pad_columns"]

# ``on_rollout(step, records, prompts, sampled)``: called with the step's records, prompts and this
# process's rollouts before the optimizer step (the student is still the policy that sampled
# them); ``vaopd.rollout_log``.
RolloutHook = Callable[[int, list, PromptBatch, Sampled], None]


class Timer:
    """Wall time per phase; synchronises CUDA so GPU work is charged to its phase.

    On CUDA also the peak allocated bytes of each phase (``peaks``). ``failed`` names the phase an
    exception (an out-of-memory error, say) left, so a caller can report where a step broke.
    """

    def __init__(self, device: torch.device):
        self.device, self.times, self.peaks, self.failed = device, {}, {}, None

    @contextmanager
    def __call__(self, name: str):
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        start = self._now()
        try:
            yield
        except BaseException:
            self.failed = name
            raise
        finally:
            self.times[name] = self.times.get(name, 0.0) + self._now() - start
            if cuda:
                self.peaks[name] = max(self.peaks.get(name, 0), torch.cuda.max_memory_allocated(self.device))

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()


def without_pad_columns(prompts: PromptBatch) -> PromptBatch:
    """``prompts`` without the left-padding columns that none of its rows needs.

    ``encode_prompts`` pads every prompt of the step to the step's longest; a micro-batch only
    needs its own longest. Positions count valid tokens only, so the scores are unchanged.
    """
    cut = prompts.input_ids.shape[1] - int(prompts.attention_mask.sum(1).max())
    return replace(prompts, input_ids=prompts.input_ids[:, cut:], attention_mask=prompts.attention_mask[:, cut:],
                   mm_token_type_ids=prompts.mm_token_type_ids[:, cut:])


def train_step(cfg: Config, s: Setup, optimizer, scheduler, step: int, timer: Timer | None = None,
               on_rollout: RolloutHook | None = None) -> dict:
    """Run optimizer step ``step`` (0-based) and return its metrics (``skipped`` if non-finite).

    ``timer``: pass one to keep the phase times (and CUDA peaks) of a step that raises.
    ``on_rollout``: a hook given this step's rollouts (the trainer's rollout log).
    """
    P, K = cfg.train.prompts_per_step, cfg.rollout.samples_per_prompt
    mb = cfg.train.micro_batch_prompts or P
    strategy = s.strategy
    timer = timer or Timer(s.device)
    start = time.perf_counter()
    autocast = torch.autocast(s.device.type, dtype=torch.bfloat16) if s.bf16 else nullcontext()
    compute_dtype = torch.bfloat16 if s.bf16 else torch.float32
    records = [s.train_data.records[i] for i in step_indices(step, P, len(s.train_data), cfg.train.seed)]
    prompts = encode_prompts([r.question + cfg.data.instruction for r in records], [r.image for r in records],
                             s.tokenizer, s.image_processor)
    non_finite = None  # the phase whose numbers were non-finite, if any
    sums: dict[str, float] = {}
    loss_total = 0.0

    try:
        with timer("rollout"), autocast:
            sampled = strategy.sample(s.rollout, prompts, k=K, micro_prompts=mb, step=step, seed=cfg.train.seed,
                                      length_buckets=cfg.train.length_buckets)
    except NonFiniteRollout:
        sampled, non_finite = None, "rollout"

    if sampled is not None:
        tokens, mask = sampled.tokens, sampled.mask
        ablated = (ablated_view(cfg, records, prompts, s.image_processor, step=step, positions=list(range(P)))
                   if cfg.loss.method == "va_opd" else None)
        truncated = ~(torch.isin(tokens, torch.tensor(s.eos_ids)) & mask.bool()).any(dim=1)  # no EOS among the valid tokens
        # Padding: rollout positions per valid response token, and scored (prompt + response)
        # positions per needed one in the teacher's and student's passes (1 when packed).
        sums = {"truncated": float(truncated.sum()), "rollout_positions": float(mask.numel()),
                "scored_positions": 0.0, "scored_valid": 0.0}
        for part in sampled.parts:
            owner = [j // K for j in part]  # the prompt (= sibling group id) of each row
            rows = sampled.rows(part)
            width = int(mask[rows].sum(1).max())  # trim padding columns shared by the whole micro-batch
            m_tokens, m_mask = tokens[rows, :width].to(s.device), mask[rows, :width].to(s.device)
            m_prompts = without_pad_columns(prompts.select(owner)).to(s.device)
            m_ablated = ablated.select(owner).pixel_values.to(s.device) if ablated is not None else None
            group_ids = torch.tensor(owner, device=s.device)
            with timer("teacher"):
                t_hidden, t_ablated, t_weight = s.scorer.teacher(m_prompts, m_ablated, m_tokens, m_mask)
                # Checked here, on every rank alike: the loss would raise on non-finite teacher scores.
                # A NaN or infinity anywhere in a position's state makes its fp32 sum non-finite.
                finite = all_finite(h.sum(-1, dtype=torch.float32)[m_mask] for h in (t_hidden, t_ablated) if h is not None)
            if strategy.any_rank(not finite):
                strategy.done_with_teacher()
                non_finite = "teacher"
                break
            computed, needed = s.scorer.padding(m_prompts, m_mask)
            sums["scored_positions"] += computed
            sums["scored_valid"] += needed
            with timer("student_forward"):
                with autocast:
                    s_hidden, s_weight = s.scorer.student(m_prompts, m_tokens, m_mask)
                s_hidden, s_weight = s_hidden.to(compute_dtype), s_weight.to(compute_dtype)
            with timer("loss"):
                # The loss runs on detached leaves so that its own backward is timed apart from the
                # student's; their gradients then enter the student's graph in one backward pass.
                h_leaf = s_hidden.detach().requires_grad_()
                w_leaf = s_weight.detach().requires_grad_(s_weight.requires_grad)
                # Under torchrun a sibling group may continue on another rank: the process group
                # makes the loss gather the responses' mean VA so the weights are the micro-batch's.
                loss, stats = va_opd_loss(
                    h_leaf, w_leaf, t_hidden, t_ablated, t_weight, m_tokens, m_mask, group_ids,
                    spec=cfg.loss.spec(), vocab_size=s.vocab_size, num_prompts=P, backend=cfg.loss.backend,
                    chunk_size=cfg.loss.chunk_size, process_group=strategy.process_group)
                loss.backward()
            with timer("student_backward"):
                roots = [(s_hidden, h_leaf.grad)] + ([(s_weight, w_leaf.grad)] if s_weight.requires_grad else [])
                torch.autograd.backward([r for r, _ in roots], [g for _, g in roots])
                # Free this micro-batch's hidden states and gradients before the next teacher pass.
                del roots, h_leaf, w_leaf, s_hidden, s_weight, t_hidden, t_ablated
            strategy.done_with_teacher()
            loss_total += float(loss.detach())
            add_sums(sums, token_stats(stats, m_mask, cfg.loss.high_fraction))
        sums["loss"] = loss_total
        sums = strategy.reduce_sums(sums)  # the step's totals: every rank takes the same decisions
        loss_total = sums.pop("loss")
        if on_rollout is not None:
            on_rollout(step, records, prompts, sampled)

    with timer("optimizer"):
        params = [p for p in s.student.parameters() if p.requires_grad]
        clip = cfg.optim.grad_clip or math.inf
        grad_norm = strategy.clip_grad_norm(params, clip) if non_finite is None else math.nan
        if non_finite is None and not math.isfinite(loss_total):
            non_finite = "loss"
        elif non_finite is None and not math.isfinite(grad_norm):
            non_finite = "gradient"
        lr = optimizer.param_groups[0]["lr"]
        if non_finite is None:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
    elapsed = time.perf_counter() - start
    return {
        "step": step + 1, "va_estimator": cfg.loss.va if cfg.loss.method == "va_opd" else None, **_step_metrics(sums, loss_total, va=cfg.loss.method == "va_opd", scored=non_finite not in ("rollout", "teacher")),
        "tokens_per_s": sums["tokens"] / elapsed if "tokens" in sums else math.nan, "grad_norm": grad_norm, "lr": lr,
        "skipped": non_finite is not None, "non_finite": non_finite,
        **_rollout_stats(s.rollout if sampled is not None else None),
        "time": elapsed, **{f"time_{k}": v for k, v in timer.times.items()},
        "records": [r.id for r in records],
    }


def _rollout_stats(rollout) -> dict:
    """The engine's figures of this step's rollout (``HFGenerate.stats``): ms per decode step and,
    with the compiled decode, graphs compiled during it (0 once shapes recur); None where the
    engine does not measure them or the rollout failed."""
    stats = getattr(rollout, "stats", None) or {}
    return {"decode_ms": stats.get("decode_ms"), "graphs_compiled": stats.get("graphs_compiled")}


def _step_metrics(sums: dict[str, float], loss: float, *, va: bool, scored: bool) -> dict:
    """The step's summary from its summed stats; NaN when the step stopped before it was scored."""
    if not scored:
        nan = math.nan
        return {"loss": nan, "kl": nan, "va": nan if va else None, "va_high_share": nan if va else None,
                "va_max": nan if va else None, "response_len": nan, "truncated": nan, "rollout_padding": nan,
                "scoring_padding": nan}
    return {
        "loss": loss, "kl": sums["kl_sum"] / sums["tokens"],
        "va": sums["va_sum"] / sums["tokens"] if va else None,
        "va_high_share": (sums["va_high"] / sums["va_sum"] if sums["va_sum"] > 0 else 0.0) if va else None,
        "va_max": sums["va_max"] if va else None,
        "response_len": sums["tokens"] / sums["responses"],
        "truncated": sums["truncated"] / sums["responses"],
        "rollout_padding": sums["rollout_positions"] / sums["tokens"],
        "scoring_padding": sums["scored_positions"] / sums["scored_valid"],
    }
