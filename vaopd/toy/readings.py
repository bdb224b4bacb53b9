"""Teacher-forced measurements at the digit readings of the reference responses.

Every detail question's reference response (its SFT target) is fed to the teacher and the student
under teacher forcing, with the clean and with the pixelated image (the loss's ablation). At the
two reading positions (the tokens after " are" and the next " and", ``vaopd.toy.digits``) the
prefix is the reference response up to that token: the scaffold before the readings and, at the
second position, the correct first reading. There, with ``pS`` and ``pT`` the next-token
distributions (temperature 1, over the tokenizer's vocabulary) and ``d`` the digit drawn:

- ``kl``: the full reverse KL ``sum_v pS(v) (log pS(v) - log pT(v))``, the loss's per-token KL at
  that position (clean image);
- ``student_va`` / ``teacher_va``: the VA of ``d``, ``max(log p(d | clean) - log p(d | pixelated), 0)``,
  for each model: how much its reading of the digit rests on the detail pixelation removes;
- ``student_p_true``: ``pS(d)`` with the clean image;
- readings: ``samples`` draws from ``pS`` at the rollout temperature and top-p; a draw is correct
  when it is ``d``. ``reading_accuracy`` is the fraction of correct draws.

The KL at a position depends on the prefix only, not on what the student then reads, so
``kl_correct`` / ``kl_wrong`` average each position's KL over the draws there that were correct /
wrong (a position counts once per draw): the KL where the student reads right and where it reads
wrong. Reported pooled over both positions (``all``) and for the first reading alone (``first``,
whose prefix is pure scaffold).

``loss_weight_probe`` looks at the objective instead: on the student's own rollouts (groups of
siblings, at the rollout temperature and top-p) it computes each objective's per-token loss
coefficients with the fused loss itself and reports the share of the loss weight that lands on
the digit readings, split into right and wrong readings.
"""
from __future__ import annotations

import math

import torch

from vaopd.ablate import ablate
from vaopd.kernels import LossSpec, va_opd_loss
from vaopd.rollout import HFGenerate, encode_prompts, prompt_pixels
from vaopd.scoring import response_hidden, teacher_hidden
from vaopd.toy.analysis import generation_ids, rollout_batches
from vaopd.toy.digits import reading_digits, reading_positions
from vaopd.toy.sft import response_tokens

__all__ = ["sample_top_p", "reading_probe", "OBJECTIVES", "objective_spec", "loss_weight_probe"]

# The objectives compared: OPD and VA-OPD with each visual-advantage estimator
# ("va_opd" alone is the paper's, the sampled VA).
OBJECTIVES = ("opd", "va_opd", "va_opd:two_sided", "va_opd:distribution")


def objective_spec(label: str, **settings) -> LossSpec:
    """The ``LossSpec`` of an objective label: ``opd``, ``va_opd`` or ``va_opd:<LossSpec.va>``."""
    method, _, va = label.partition(":")
    return LossSpec(method=method, va=va or "sampled", **settings)


def sample_top_p(logp: torch.Tensor, temperature: float, top_p: float, samples: int,
                 generator: torch.Generator) -> torch.Tensor:
    """``[N, samples]`` token ids drawn from ``softmax(logp / temperature)`` cut to its top-p nucleus.

    The nucleus is the smallest set of most likely tokens whose probability reaches ``top_p`` (as
    in Hugging Face sampling), renormalised.
    """
    probs = torch.softmax(logp.double() / temperature, -1)
    sorted_probs, order = probs.sort(-1, descending=True)
    # Keep a token when the mass before it is still below top_p (the first token always stays).
    keep = (sorted_probs.cumsum(-1) - sorted_probs) < top_p
    nucleus = torch.zeros_like(probs).scatter(-1, order, sorted_probs * keep)
    return torch.multinomial(nucleus, samples, replacement=True, generator=generator)


def _reading_logps(model, prompts, tokens, mask, rows, positions, vocab: int) -> torch.Tensor:
    """``[N, vocab]`` float64 next-token log-probs at ``(rows[i], positions[i])`` of the responses."""
    hidden = response_hidden(model, prompts, tokens, mask)
    weight = model.get_output_embeddings().weight[:vocab]
    logits = hidden[rows, positions].to(weight.dtype) @ weight.T
    return torch.log_softmax(logits.double(), -1)


def _group_stats(kl, s_va, t_va, p_true, correct) -> dict[str, float]:
    """Means over positions, and the KL split by the draws' correctness (``correct``: ``[N, samples]``)."""
    draws_kl = kl[:, None].expand_as(correct)

    def mean(x: torch.Tensor) -> float:
        return float(x.mean()) if x.numel() else math.nan

    return {
        "positions": int(kl.numel()), "reading_accuracy": mean(correct.double()), "student_p_true": mean(p_true),
        "student_va": mean(s_va), "teacher_va": mean(t_va), "kl": mean(kl),
        "kl_correct": mean(draws_kl[correct]), "kl_wrong": mean(draws_kl[~correct]),
        "draws_correct": int(correct.sum()), "draws_wrong": int((~correct).sum()),
    }


@torch.no_grad()
def reading_probe(student, teacher, tokenizer, image_processor, records, rows: dict[str, dict], *, samples: int,
                  temperature: float, top_p: float, seed: int, pixelate_factor: float = 0.1, instruction: str = "",
                  batch_prompts: int = 32) -> dict[str, dict[str, float]]:
    """The measurements of the module doc over the detail ``records`` (``rows``: id -> split row with kind, response)."""
    student.eval()
    teacher.eval()
    detail = [r for r in records if rows[r.id]["kind"] == "detail"]
    vocab = len(tokenizer)
    generator = torch.Generator().manual_seed(seed)
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in ("kl", "s_va", "t_va", "p_true", "correct", "first")}
    for start in range(0, len(detail), batch_prompts):
        chunk = detail[start:start + batch_prompts]
        prompts = encode_prompts([r.question + instruction for r in chunk], [r.image for r in chunk], tokenizer,
                                 image_processor)
        ablated = prompts.with_pixels(prompt_pixels(
            [ablate(r.image, "pixelate", pixelate_factor=pixelate_factor) for r in chunk], image_processor,
            prompts.image_grid_thw))
        tokens, mask = response_tokens(tokenizer, [rows[r.id]["response"] for r in chunk])
        where = [(row, k, pos) for row in range(len(chunk))
                 for k, pos in enumerate(reading_positions([tokenizer.decode([int(t)]) for t in tokens[row][mask[row]]]))]
        if not where:
            continue
        rows_idx = torch.tensor([w[0] for w in where])
        pos_idx = torch.tensor([w[2] for w in where])
        truth = tokens[rows_idx, pos_idx][:, None]
        s_clean, s_abl, t_clean, t_abl = (_reading_logps(model, batch, tokens, mask, rows_idx, pos_idx, vocab)
                                          for model in (student, teacher) for batch in (prompts, ablated))
        parts["kl"].append((s_clean.exp() * (s_clean - t_clean)).sum(-1))
        parts["s_va"].append((s_clean.gather(1, truth) - s_abl.gather(1, truth)).clamp_min(0)[:, 0])
        parts["t_va"].append((t_clean.gather(1, truth) - t_abl.gather(1, truth)).clamp_min(0)[:, 0])
        parts["p_true"].append(s_clean.gather(1, truth)[:, 0].exp())
        parts["correct"].append(sample_top_p(s_clean, temperature, top_p, samples, generator) == truth)
        parts["first"].append(torch.tensor([w[1] == 0 for w in where]))
    if not parts["kl"]:
        return {}
    cat = {k: torch.cat(v) for k, v in parts.items()}
    first = cat.pop("first")
    return {"all": _group_stats(**cat), "first": _group_stats(**{k: v[first] for k, v in cat.items()})}


@torch.no_grad()
def loss_weight_probe(student, teacher, tokenizer, image_processor, records, rows: dict[str, dict], *, samples: int,
                      temperature: float, top_p: float, max_new_tokens: int, seed: int, objectives=OBJECTIVES,
                      pixelate_factor: float = 0.1, high_fraction: float = 0.2, high_weight: float = 0.5,
                      weight_temperature: float = 1.0, instruction: str = "", batch_prompts: int = 16) -> dict[str, dict]:
    """Where each objective puts the loss weight on the student's rollouts of the detail ``records``.

    Each question gets ``samples`` sibling rollouts (one group, as in training); the fused loss
    (``va_opd_loss``, fp32, no gradient) gives every objective's coefficients ``c_t`` on them,
    each group's summing to 1. Per objective: ``wrong`` / ``right``, the share of the total
    weight ``sum c_t`` on the digit readings the student got wrong / right (``vaopd.toy.digits``
    positions), and ``per_wrong_token``, the mean ``c_t`` of a wrong reading relative to the mean
    ``c_t`` of all tokens (1 when a wrong reading gets an average token's weight). Also, once:
    ``readings`` and ``wrong_readings``, the counts, and ``tokens``.
    """
    student.eval()
    teacher.eval()
    detail = [r for r in records if rows[r.id]["kind"] == "detail"]
    vocab = len(tokenizer)
    eos, banned = generation_ids(student, tokenizer)
    backend = HFGenerate(student, eos_ids=eos, pad_id=tokenizer.pad_token_id, banned_ids=banned,
                         temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens)
    specs = {label: objective_spec(label, weight_temperature=weight_temperature, high_fraction=high_fraction,
                                   high_weight=high_weight) for label in objectives}
    sums = {label: {"wrong": 0.0, "right": 0.0, "total": 0.0} for label in objectives}
    counts = {"readings": 0, "wrong_readings": 0, "tokens": 0}
    s_weight = student.get_output_embeddings().weight
    t_weight = teacher.get_output_embeddings().weight
    for chunk, tokens, mask, owner, batch, abl in rollout_batches(
            backend, detail, tokenizer, image_processor, samples=samples, seed=seed, batch_prompts=batch_prompts,
            instruction=instruction, pixelate_factor=pixelate_factor):
        s_hidden = response_hidden(student, batch, tokens, mask)
        t_clean, t_abl = teacher_hidden(teacher, batch, abl, tokens, mask)
        # Each rollout's readings: +1 right, -1 wrong, 0 elsewhere.
        reading = torch.zeros(tokens.shape, dtype=torch.long)
        for b in range(tokens.shape[0]):
            valid = tokens[b][mask[b]].tolist()
            pieces = [tokenizer.decode([t]) for t in valid]
            for pos, digit in zip(reading_positions(pieces), reading_digits(rows[chunk[int(owner[b])].id]["response"])):
                reading[b, pos] = 1 if pieces[pos].strip() == digit else -1
        counts["readings"] += int((reading != 0).sum())
        counts["wrong_readings"] += int((reading < 0).sum())
        counts["tokens"] += int(mask.sum())
        for label, spec in specs.items():
            coef = va_opd_loss(s_hidden, s_weight, t_clean, t_abl, t_weight, tokens, mask, owner, spec=spec,
                               vocab_size=vocab, backend="torch")[1]["coef"]
            sums[label]["wrong"] += float(coef[reading < 0].sum())
            sums[label]["right"] += float(coef[reading > 0].sum())
            sums[label]["total"] += float(coef.sum())
    out: dict[str, dict] = {}
    for label, s in sums.items():
        mean_coef = s["total"] / max(1, counts["tokens"])
        out[label] = {"wrong": s["wrong"] / s["total"] if s["total"] else math.nan,
                      "right": s["right"] / s["total"] if s["total"] else math.nan,
                      "per_wrong_token": (s["wrong"] / counts["wrong_readings"] / mean_coef
                                          if counts["wrong_readings"] and mean_coef else math.nan)}
    out["counts"] = counts
    return out
