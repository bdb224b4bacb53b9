"""The rollout log (``log.rollouts_every``): per-token numbers of a step's first rollouts.

The trainer calls ``RolloutLog`` as the step's ``on_rollout`` hook at the logged steps; it
appends one JSON line per rollout to ``<run dir>/rollouts.jsonl``, which ``vaopd.inspect`` renders.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from vaopd.config import Config
from vaopd.eval import grade
from vaopd.kernels import fused_linear_logprobs
from vaopd.models import base_model
from vaopd.objective import high_group
from vaopd.rollout import PromptBatch
from vaopd.scoring import ablated_view, response_hidden, teacher_hidden
from vaopd.strategy import Sampled

__all__ = ["RolloutLog", "rollout_log_unavailable", "write_rollouts"]


def rollout_log_unavailable(cfg: Config, distributed: bool) -> str | None:
    """Why a run of ``cfg`` cannot keep the rollout log, or None.

    Under torchrun rank 0 logs alone, so it needs the whole teacher (``distributed.teacher:
    replica``) and an HF sampling replica (``rollout.engine: hf``). The log is a diagnostic: a run
    without it trains the same, so the trainer says so and goes on rather than refusing the run.
    """
    if distributed and (cfg.distributed.teacher != "replica" or cfg.rollout.engine != "hf"):
        return "under torchrun the rollout log needs distributed.teacher: replica and rollout.engine: hf"
    return None


class RolloutLog:
    """Hook ``(step, records, prompts, sampled)``: log this process's first ``log.rollouts_per_log`` rollouts.

    Teacher and student log-probs of each sampled token with the clean and the ablated image
    (the ablation the loss uses, computed here for OPD too), so ``vaopd.inspect`` can show the
    teacher's VA and high group beside the student's own visual reliance. The step calls it
    before the optimizer step, and the student's log-probs come from the model the rollout engine
    sampled from (``Strategy.sampling_model``): they are the policy's that sampled these tokens.

    On one process these are the step's first rollouts. Under torchrun only rank 0 logs, its own
    first rows (the step's first slots), on the unsharded sampling replica and a replicated teacher
    (``distributed.teacher: replica``), so no other rank takes part.
    """

    def __init__(self, cfg: Config, setup, path: Path):
        self.cfg, self.s, self.path = cfg, setup, Path(path)

    @torch.no_grad()
    def __call__(self, step: int, records: list, prompts: PromptBatch, sampled: Sampled) -> None:
        cfg, s = self.cfg, self.s
        K = cfg.rollout.samples_per_prompt
        slots = sorted(j for part in sampled.parts for j in part)  # the global slot of each row
        rows = torch.arange(min(cfg.log.rollouts_per_log, len(slots)))
        owners = [slots[r] // K for r in rows.tolist()]
        m_prompts = prompts.select(owners)
        ablated = ablated_view(cfg, [records[i] for i in owners], m_prompts, s.image_processor, step=step,
                               positions=owners).to(s.device)
        m_prompts = m_prompts.to(s.device)
        m_tokens, m_mask = sampled.tokens[rows].to(s.device), sampled.mask[rows].to(s.device)

        def logp(hidden, weight):  # fused: no [tokens x vocab] logits, even for diagnostics
            return fused_linear_logprobs(hidden.to(weight.dtype), weight, torch.where(m_mask, m_tokens, 0), s.vocab_size)[0]

        teacher = s.strategy.teacher.model
        t_clean, t_abl = teacher_hidden(teacher, m_prompts, ablated.pixel_values, m_tokens, m_mask)
        t_weight = teacher.get_output_embeddings().weight
        policy = s.strategy.sampling_model()
        model = base_model(policy)
        was_training = policy.training
        policy.eval()
        s_clean = response_hidden(model, m_prompts, m_tokens, m_mask)
        s_abl = response_hidden(model, ablated, m_tokens, m_mask)
        policy.train(was_training)
        s_weight = model.get_output_embeddings().weight
        write_rollouts(self.path, step=step + 1, method=cfg.loss.method, tokenizer=s.tokenizer, tokens=m_tokens,
                       mask=m_mask, prompt_ids=owners, records=[records[i] for i in owners],
                       high_fraction=cfg.loss.high_fraction, teacher_logp=logp(t_clean, t_weight),
                       teacher_ablated_logp=logp(t_abl, t_weight), student_logp=logp(s_clean, s_weight),
                       student_ablated_logp=logp(s_abl, s_weight))


def write_rollouts(path: Path, *, step: int, method: str, tokenizer, tokens: torch.Tensor, mask: torch.Tensor,
                   prompt_ids: list[int], records, high_fraction: float, teacher_logp: torch.Tensor,
                   teacher_ablated_logp: torch.Tensor, student_logp: torch.Tensor,
                   student_ablated_logp: torch.Tensor) -> None:
    """Append one JSON line per rollout (its valid tokens only) to ``path``.

    The high group is the one the loss uses (``ceil(high_fraction * L)`` largest teacher VA).
    """
    mask = mask.bool()
    va = (teacher_logp - teacher_ablated_logp).clamp_min(0)
    high = high_group(va, mask, high_fraction)
    with open(path, "a", encoding="utf-8") as f:
        for row in range(tokens.shape[0]):
            keep = mask[row]
            ids = tokens[row][keep].tolist()
            text = tokenizer.decode(ids, skip_special_tokens=True)

            def values(x: torch.Tensor) -> list[float]:
                return [round(float(v), 5) for v in x[row][keep]]

            f.write(json.dumps({
                "step": step, "method": method, "row": row, "prompt": prompt_ids[row], "id": records[row].id,
                "question": records[row].question, "answer": records[row].answer, "text": text,
                "correct": grade(text, records[row].answer),
                "tokens": [tokenizer.decode([i]) for i in ids],
                "teacher_logp": values(teacher_logp), "teacher_ablated_logp": values(teacher_ablated_logp),
                "teacher_va": values(va), "high": high[row][keep].tolist(),
                "student_logp": values(student_logp), "student_ablated_logp": values(student_ablated_logp),
                "student_va": values(student_logp - student_ablated_logp),
            }) + "\n")
