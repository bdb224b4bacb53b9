"""One optimizer step (``train_step``) and the optional per-token rollout log.

1. take the step's ``P`` prompts (a seeded permutation per epoch: the order depends only on the
   seed and the step, which is what makes ``--resume`` exact);
2. sample ``K`` responses per prompt from the student (the rollout engine, ``vaopd.rollout``);
3. per micro-batch of whole sibling groups: run the frozen teacher's body once on a doubled
   batch (clean image rows, then ablated image rows) for final hidden states only; run the
   student's body with gradients; hand both hidden states and the LM-head weights to
   ``vaopd.kernels.va_opd_loss`` and backpropagate;
4. clip, AdamW, cosine schedule; skip the update if anything is non-finite.

Gradient accumulation. The VA-OPD weights need complete sibling groups (the z-score is over a
prompt's K responses) and the loss divides by the prompt count of the optimizer step. So each
micro-batch holds whole groups (``train.micro_batch_prompts`` prompts, all their responses); the
weights computed inside a micro-batch are then exactly those of the full batch, and every
micro-batch divides by the step's total ``P`` (``num_prompts=P``). The summed micro-batch
gradients equal one big batch's gradient, with no cross-micro-batch pass.

Length buckets (``train.length_buckets``, single process). A micro-batch is as wide as its longest
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

import torch
import torch.distributed as dist

from vaopd.ablate import ablate
from vaopd.build import Setup
from vaopd.config import Config
from vaopd.data import step_indices
from vaopd.distributed import clip_grad_norm, generate_slots, reduce_sums, rollout_seed, slot_layout
from vaopd.inspect import write_rollouts
from vaopd.kernels import LossSpec, fused_linear_logprobs, va_opd_loss
from vaopd.metrics import token_stats
from vaopd.models import base_model
from vaopd.rollout import PromptBatch, encode_prompts, prompt_pixels
from vaopd.runs import run_dir_of
from vaopd.scoring import scoring_inputs, teacher_hidden

__all__ = ["Timer", "train_step", "log_rollouts", "refresh_rollout", "release_rollout"]


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


def refresh_rollout(s: Setup) -> None:
    """Bring the rollout engine's weights to the student's current ones, before sampling.

    An engine with its own copy of the weights (vLLM: ``load_weights``) takes the student's
    tensors in memory, under torchrun gathered from the shards one at a time on every rank. The
    HF engine samples from the student itself, or under torchrun from the unsharded replica.
    """
    load = getattr(s.rollout, "load_weights", None)
    if load is not None:
        load(s.parallel.full_weights() if s.parallel else base_model(s.student).state_dict().items())
    elif s.parallel is not None:
        s.parallel.sync_replica()


def release_rollout(s: Setup) -> None:
    """Let an engine that can (vLLM in sleep mode: ``release``) free its memory for training."""
    release = getattr(s.rollout, "release", None)
    if release is not None:
        release()


def without_pad_columns(prompts: PromptBatch) -> PromptBatch:
    """``prompts`` without the left-padding columns that none of its rows needs.

    ``encode_prompts`` pads every prompt of the step to the step's longest; a micro-batch only
    needs its own longest. Positions count valid tokens only, so the scores are unchanged.
    """
    cut = prompts.input_ids.shape[1] - int(prompts.attention_mask.sum(1).max())
    return replace(prompts, input_ids=prompts.input_ids[:, cut:], attention_mask=prompts.attention_mask[:, cut:],
                   mm_token_type_ids=prompts.mm_token_type_ids[:, cut:])


@torch.no_grad()
def log_rollouts(cfg: Config, s: Setup, step: int, records, prompts: PromptBatch, tokens, mask) -> None:
    """Append per-token data of the step's first rollouts to ``rollouts.jsonl`` (``log.rollouts_every``).

    Teacher and student log-probs of each sampled token with the clean and the ablated image
    (the ablation the loss uses, computed here for OPD too), so ``vaopd.inspect`` can show the
    teacher's VA and high group beside the student's own visual reliance. Runs before the
    optimizer step: the student is still the policy that sampled these tokens.
    """
    K, l = cfg.rollout.samples_per_prompt, cfg.loss
    rows = torch.arange(min(cfg.log.rollouts_per_log, tokens.shape[0]))
    owners = (rows // K).tolist()
    images = [ablate(records[i].image, l.ablation, seed=cfg.train.seed * 1_000_003 + step * cfg.train.prompts_per_step + i,
                     pixelate_factor=l.pixelate_factor, blur_radius=l.blur_radius, noise_std=l.noise_std,
                     patch_size=l.patch_size, patch_fraction=l.patch_fraction) for i in owners]
    m_prompts = prompts.select(owners)
    grid = m_prompts.image_grid_thw
    ablated = prompt_pixels(images, s.image_processor, grid).to(s.device)
    m_prompts = m_prompts.to(s.device)
    m_tokens, m_mask = tokens[rows].to(s.device), mask[rows].to(s.device)
    lp = m_prompts.input_ids.shape[1]

    def logp(hidden, weight):  # fused: no [tokens x vocab] logits, even for diagnostics
        return fused_linear_logprobs(hidden.to(weight.dtype), weight, torch.where(m_mask, m_tokens, 0), s.vocab_size)[0]

    t_clean, t_abl = teacher_hidden(s.teacher, m_prompts, ablated, m_tokens, m_mask)
    t_weight = s.teacher.get_output_embeddings().weight
    model = base_model(s.student)
    was_training = s.student.training
    s.student.eval()
    s_clean = model.model(**scoring_inputs(m_prompts, m_tokens, m_mask)).last_hidden_state[:, lp - 1:]
    s_abl = model.model(**scoring_inputs(m_prompts.with_pixels(ablated), m_tokens, m_mask)).last_hidden_state[:, lp - 1:]
    s.student.train(was_training)
    s_weight = model.get_output_embeddings().weight
    write_rollouts(run_dir_of(cfg) / "rollouts.jsonl", step=step + 1, method=cfg.loss.method, tokenizer=s.tokenizer,
                   tokens=m_tokens, mask=m_mask, prompt_ids=owners, records=[records[i] for i in owners],
                   high_fraction=l.high_fraction, teacher_logp=logp(t_clean, t_weight), teacher_ablated_logp=logp(t_abl, t_weight),
                   student_logp=logp(s_clean, s_weight), student_ablated_logp=logp(s_abl, s_weight))


def train_step(cfg: Config, s: Setup, optimizer, scheduler, step: int, timer: Timer | None = None) -> dict:
    """Run optimizer step ``step`` (0-based) and return its metrics (``skipped`` if non-finite).

    ``timer``: pass one to keep the phase times (and CUDA peaks) of a step that raises.
    """
    P, K = cfg.train.prompts_per_step, cfg.rollout.samples_per_prompt
    timer = timer or Timer(s.device)
    start = time.perf_counter()
    autocast = torch.autocast(s.device.type, dtype=torch.bfloat16) if s.bf16 else nullcontext()
    records = [s.train_data.records[i] for i in step_indices(step, P, len(s.train_data), cfg.train.seed)]
    prompts = encode_prompts([r.question + cfg.data.instruction for r in records], [r.image for r in records],
                             s.tokenizer, s.image_processor)
    mb = cfg.train.micro_batch_prompts or P
    par = s.parallel
    # Global slots (prompt * K + sample) of each micro-batch: all of them on one process, this
    # rank's share under torchrun (vaopd.distributed: groups may continue on a neighbour rank).
    if par is None:
        with timer("rollout"), autocast:
            refresh_rollout(s)
            tokens, mask = s.rollout.generate(prompts, K)
            release_rollout(s)
        groups = list(range(P))
        if cfg.train.length_buckets and mb < P:  # see "Length buckets" above
            longest = mask.sum(1).view(P, K).max(1).values.tolist()
            groups.sort(key=lambda g: longest[g])
        parts = [[g * K + i for g in groups[first:first + mb] for i in range(K)] for first in range(0, P, mb)]
    else:
        parts = [list(m[par.env.rank]) for m in slot_layout(P, K, mb, par.env.world_size)]
        with timer("rollout"), autocast:
            refresh_rollout(s)
            torch.manual_seed(rollout_seed(cfg.train.seed, step, par.env.rank))
            tokens, mask = generate_slots(s.rollout, prompts, [j for part in parts for j in part], K)
            release_rollout(s)
    # Rows of tokens/mask are this process's slots in ascending order (all of them on one process).
    row_of = {j: r for r, j in enumerate(sorted(j for part in parts for j in part))}
    ablated = None
    if cfg.loss.method == "va_opd":
        l = cfg.loss
        images = [ablate(r.image, l.ablation, seed=cfg.train.seed * 1_000_003 + step * P + i, pixelate_factor=l.pixelate_factor,
                         blur_radius=l.blur_radius, noise_std=l.noise_std, patch_size=l.patch_size,
                         patch_fraction=l.patch_fraction) for i, r in enumerate(records)]
        ablated = prompts.with_pixels(prompt_pixels(images, s.image_processor, prompts.image_grid_thw))

    body = base_model(s.student).model
    s_weight = base_model(s.student).get_output_embeddings().weight
    teacher = s.teacher if par is None or par.teacher is None else par.teacher
    compute_dtype = torch.bfloat16 if s.bf16 else torch.float32
    spec = LossSpec(method=cfg.loss.method, kl_estimator=cfg.loss.kl_estimator, weight_temperature=cfg.loss.weight_temperature,
                    high_fraction=cfg.loss.high_fraction, high_weight=cfg.loss.high_weight, va=cfg.loss.va)
    loss_options = dict(spec=spec, vocab_size=s.vocab_size, num_prompts=P, backend=cfg.loss.backend,
                        chunk_size=cfg.loss.chunk_size or None)
    truncated = ~(torch.isin(tokens, torch.tensor(s.eos_ids)) & mask.bool()).any(dim=1)  # no EOS among the valid tokens
    # Padding: rollout positions per valid response token, and scored (prompt + response)
    # positions per valid one in the teacher's and student's passes.
    sums: dict[str, float] = {"truncated": float(truncated.sum()), "rollout_positions": float(mask.numel()),
                              "scored_positions": 0.0, "scored_valid": 0.0}
    loss_total = 0.0
    for part in parts:
        owner = [j // K for j in part]  # the prompt (= sibling group id) of each row
        rows = torch.tensor([row_of[j] for j in part])
        m_mask = mask[rows]
        width = int(m_mask.sum(1).max())  # trim padding columns shared by the whole micro-batch
        m_tokens, m_mask = tokens[rows, :width].to(s.device), m_mask[:, :width].to(s.device)
        m_prompts = without_pad_columns(prompts.select(owner)).to(s.device)
        m_ablated = ablated.select(owner).pixel_values.to(s.device) if ablated is not None else None
        group_ids = torch.tensor(owner, device=s.device)
        with timer("teacher"):
            t_hidden, t_ablated = teacher_hidden(teacher, m_prompts, m_ablated, m_tokens, m_mask)
            # A sharded teacher's root stays gathered after its forward: this is the full weight.
            t_weight = base_model(s.teacher).get_output_embeddings().weight
        lp = m_prompts.input_ids.shape[1]
        sums["scored_positions"] += m_mask.numel() + m_prompts.attention_mask.numel()
        sums["scored_valid"] += float(m_mask.sum() + m_prompts.attention_mask.sum())
        with timer("student_forward"):
            with autocast:
                if par is None:
                    s_hidden = body(**scoring_inputs(m_prompts, m_tokens, m_mask)).last_hidden_state[:, lp - 1:]
                else:
                    s_hidden, s_weight = par.student(**scoring_inputs(m_prompts, m_tokens, m_mask))
                    s_hidden = s_hidden[:, lp - 1:]
            s_hidden, m_weight = s_hidden.to(compute_dtype), s_weight.to(compute_dtype)
        with timer("loss"):
            # The loss runs on detached leaves so that its own backward is timed apart from the
            # student's; their gradients then enter the student's graph in one backward pass.
            h_leaf = s_hidden.detach().requires_grad_()
            w_leaf = m_weight.detach().requires_grad_(m_weight.requires_grad)
            # Under torchrun a sibling group may continue on another rank: process_group makes the
            # loss gather the responses' mean VA so the weights are those of the whole micro-batch.
            loss, stats = va_opd_loss(
                h_leaf, w_leaf, t_hidden, t_ablated, t_weight, m_tokens, m_mask,
                group_ids, **loss_options, process_group=None if par is None else dist.group.WORLD)
            loss.backward()
        with timer("student_backward"):
            roots = [(s_hidden, h_leaf.grad)] + ([(m_weight, w_leaf.grad)] if m_weight.requires_grad else [])
            torch.autograd.backward([r for r, _ in roots], [g for _, g in roots])
            # Free this micro-batch's hidden states and gradients before the next teacher pass.
            del roots, h_leaf, w_leaf, s_hidden, m_weight, t_hidden, t_ablated
        if par is not None and par.teacher is not None:
            par.teacher.reshard()
        loss_total += float(loss.detach())
        for k, v in token_stats(stats, m_mask, cfg.loss.high_fraction).items():
            sums[k] = max(sums.get(k, 0.0), v) if k == "va_max" else sums.get(k, 0.0) + v
    if par is not None:  # the step's totals over all ranks: every rank takes the same decisions
        sums["loss"] = loss_total
        sums = reduce_sums(sums, s.device)
        loss_total = sums["loss"]

    # Single process only: under torchrun a rank's rows are not the step's first rollouts.
    if cfg.log.rollouts_every and par is None and step % cfg.log.rollouts_every == 0:
        log_rollouts(cfg, s, step, records, prompts, tokens, mask)
    with timer("optimizer"):
        params = [p for p in s.student.parameters() if p.requires_grad]
        clip = cfg.optim.grad_clip or math.inf
        if par is None:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, clip))
        else:
            grad_norm = clip_grad_norm(params, clip)
        skipped = not (math.isfinite(loss_total) and math.isfinite(grad_norm))
        lr = optimizer.param_groups[0]["lr"]
        if not skipped:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
    elapsed = time.perf_counter() - start
    va = cfg.loss.method == "va_opd"
    return {
        "step": step + 1, "loss": loss_total, "kl": sums["kl_sum"] / sums["tokens"],
        "va": sums["va_sum"] / sums["tokens"] if va else None, "va_estimator": cfg.loss.va if va else None,
        "va_high_share": (sums["va_high"] / sums["va_sum"] if sums["va_sum"] > 0 else 0.0) if va else None,
        "va_max": sums["va_max"] if va else None,
        "response_len": sums["tokens"] / sums["responses"],
        "truncated": sums["truncated"] / sums["responses"],
        "rollout_padding": sums["rollout_positions"] / sums["tokens"],
        "scoring_padding": sums["scored_positions"] / sums["scored_valid"],
        "tokens_per_s": sums["tokens"] / elapsed, "grad_norm": grad_norm, "lr": lr, "skipped": skipped,
        "time": elapsed, **{f"time_{k}": v for k, v in timer.times.items()},
        "records": [r.id for r in records],
    }
