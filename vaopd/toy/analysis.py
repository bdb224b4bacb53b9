"""Measurements for the toy comparison: accuracy per question kind and visual profiles of rollouts.

A *visual profile* samples the student's own responses to test questions and scores every
sampled token four times, under teacher forcing: teacher and student, each with the clean and
with the pixelated image. From that:

- the teacher's VA (``max(log pT clean - log pT pixelated, 0)``) and how concentrated it is: the
  share of a response's VA carried by its top ``high_fraction`` tokens (the VA-OPD high group), and
  the fraction of tokens needed to reach 80 % of it;
- the student's visual reliance: mean ``log pS clean - log pS pixelated`` per token, over all
  tokens and over the teacher's high-group tokens. A student that reads the digits loses
  probability on them when they are pixelated.
"""
from __future__ import annotations

import math

import torch

from vaopd.ablate import ablate
from vaopd.eval import evaluate
from vaopd.kernels import fused_linear_logprobs
from vaopd.objective import high_group
from vaopd.rollout import HFGenerate, banned_token_ids, encode_prompts, prompt_pixels
from vaopd.models import eos_token_ids
from vaopd.scoring import response_hidden

__all__ = ["accuracy_by_kind", "token_logps", "visual_profile"]


def generation_ids(model, tokenizer) -> tuple[list[int], list[int]]:
    """The EOS ids and the ids sampling must never produce (special tokens, LM-head padding rows)."""
    eos = eos_token_ids(model, tokenizer)
    return eos, banned_token_ids(tokenizer, model.get_output_embeddings().weight.shape[0], eos)


def rollout_batches(backend, records, tokenizer, image_processor, *, samples: int, seed: int, batch_prompts: int,
                    instruction: str = "", pixelate_factor: float = 0.1):
    """Sample ``samples`` rollouts per record, ``batch_prompts`` records at a time, under ``seed``
    (the caller's RNG state is restored afterwards). Yields per batch: the records, ``tokens`` and
    ``mask`` ``[rows, T]``, each row's record index in the batch, the prompts repeated per row, and
    the pixelated image's pixel values repeated per row."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for start in range(0, len(records), batch_prompts):
            chunk = records[start:start + batch_prompts]
            prompts = encode_prompts([r.question + instruction for r in chunk], [r.image for r in chunk], tokenizer,
                                     image_processor)
            ablated = prompt_pixels([ablate(r.image, "pixelate", pixelate_factor=pixelate_factor) for r in chunk],
                                    image_processor, prompts.image_grid_thw)
            tokens, mask = backend.generate(prompts, samples)
            yield (chunk, tokens, mask, torch.arange(len(chunk)).repeat_interleave(samples), prompts.repeat(samples),
                   prompts.with_pixels(ablated).repeat(samples).pixel_values)


def accuracy_by_kind(model, tokenizer, image_processor, records, kinds: dict[str, str], *, samples: int,
                     temperature: float, max_new_tokens: int, seed: int, instruction: str = "") -> dict[str, float]:
    """``vaopd.eval.evaluate`` accuracy separately for each question kind (``kinds``: record id -> kind)."""
    eos, banned = generation_ids(model, tokenizer)
    out = {}
    for kind in sorted(set(kinds.values())):
        subset = [r for r in records if kinds[r.id] == kind]
        out[kind] = evaluate(model, tokenizer, image_processor, subset, eos_ids=eos, banned_ids=banned, samples=samples,
                             temperature=temperature, top_p=1.0, max_new_tokens=max_new_tokens, batch_prompts=64,
                             instruction=instruction, seed=seed)["accuracy"]
    return out


@torch.no_grad()
def token_logps(model, prompts, ablated_pixels, tokens, mask, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``[B, T]`` log-probs of ``tokens`` with the prompts' clean images and with ``ablated_pixels``."""
    weight = model.get_output_embeddings().weight
    safe_tokens = torch.where(mask.bool(), tokens, 0)
    out = []
    for batch in (prompts, prompts.with_pixels(ablated_pixels)):
        hidden = response_hidden(model, batch, tokens, mask)
        out.append(fused_linear_logprobs(hidden.to(weight.dtype), weight, safe_tokens, vocab_size)[0])
    return out[0], out[1]


def _concentration(va: torch.Tensor, mask: torch.Tensor, high: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per response with some VA: the high group's share of it, and the fraction of tokens holding 80 %."""
    shares, fractions = [], []
    for row in range(va.shape[0]):
        values = va[row][mask[row]]
        total = float(values.sum())
        if total <= 0:
            continue
        shares.append(float(va[row][high[row]].sum()) / total)
        cumulative = torch.cumsum(values.sort(descending=True).values, 0)
        fractions.append((int((cumulative < 0.8 * total).sum()) + 1) / values.numel())
    return shares, fractions


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else math.nan


@torch.no_grad()
def visual_profile(student, teacher, tokenizer, image_processor, records, kinds: dict[str, str], *, samples: int,
                   temperature: float, max_new_tokens: int, seed: int, high_fraction: float = 0.2,
                   pixelate_factor: float = 0.1, instruction: str = "", batch_prompts: int = 32) -> dict[str, dict]:
    """The teacher's VA concentration and the student's visual reliance on the student's rollouts, per kind."""
    student.eval()
    eos, banned = generation_ids(student, tokenizer)
    backend = HFGenerate(student, eos_ids=eos, pad_id=tokenizer.pad_token_id, banned_ids=banned,
                         temperature=temperature, top_p=1.0, max_new_tokens=max_new_tokens)
    vocab = len(tokenizer)
    acc: dict[str, dict[str, list[float]]] = {}
    for chunk, tokens, mask, rows, batch, abl in rollout_batches(
            backend, records, tokenizer, image_processor, samples=samples, seed=seed, batch_prompts=batch_prompts,
            instruction=instruction, pixelate_factor=pixelate_factor):
        t_clean, t_abl = token_logps(teacher, batch, abl, tokens, mask, vocab)
        s_clean, s_abl = token_logps(student, batch, abl, tokens, mask, vocab)
        va = torch.where(mask, (t_clean - t_abl).clamp_min(0), 0.0)
        high = high_group(va, mask, high_fraction)
        reliance = s_clean - s_abl
        for kind in set(kinds[r.id] for r in chunk):
            sel = torch.tensor([kinds[chunk[int(i)].id] == kind for i in rows])
            m, h = mask[sel], high[sel]
            stats = acc.setdefault(kind, {k: [] for k in ("va", "high_tokens", "share", "frac80", "rel", "rel_high", "tokens", "responses")})
            shares, fractions = _concentration(va[sel], m, h)
            stats["share"] += shares
            stats["frac80"] += fractions
            stats["va"].append(float(va[sel][m].sum()))
            stats["rel"].append(float(reliance[sel][m].sum()))
            stats["rel_high"].append(float(reliance[sel][h].sum()))
            stats["high_tokens"].append(float(h.sum()))
            stats["responses"].append(float(sel.sum()))
            stats["tokens"].append(float(m.sum()))
    out = {}
    for kind, s in sorted(acc.items()):
        tokens = sum(s["tokens"])
        out[kind] = {
            "teacher_va_per_token": sum(s["va"]) / tokens,
            "teacher_high_share": _mean(s["share"]),
            "teacher_frac_tokens_80pct": _mean(s["frac80"]),
            "student_reliance_per_token": sum(s["rel"]) / tokens,
            "student_reliance_high_tokens": sum(s["rel_high"]) / max(1.0, sum(s["high_tokens"])),
            "responses": int(sum(s["responses"])),
            "tokens": int(tokens),
        }
    return out
