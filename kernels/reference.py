"""The executable spec of the VA-OPD loss: full fp32 logits, plain PyTorch autograd.

This is deliberately the slow, obvious implementation: it materialises ``[B, T, V]`` logits for the
student and both teacher views. Every fast path in ``vaopd.kernels`` is tested against it.
"""
from __future__ import annotations

import torch

from .checks import check_loss_inputs
from .objective import loss_coefficients, visual_advantage
from .spec import LossSpec


def va_opd_loss_reference(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_ablated_hidden: torch.Tensor | None,
    teacher_weight: torch.Tensor,
    tokens: torch.Tensor,
    mask: torch.Tensor,
    group_ids: torch.Tensor,
    *,
    spec: LossSpec = LossSpec(),
    vocab_size: int | None = None,
    num_prompts: int | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """VA-OPD (or OPD) loss from hidden states and LM-head weights.

    Args:
        student_hidden: ``[B, T, D_S]`` float; ``student_hidden[b, t]`` predicts ``tokens[b, t]``.
        student_weight: ``[V_S, D_S]`` student LM head (may carry padding rows past ``vocab_size``).
        teacher_hidden: ``[B, T, D_T]`` teacher states with the original image.
        teacher_ablated_hidden: ``[B, T, D_T]`` teacher states with the ablated image; may be None
            for ``spec.method="opd"``.
        teacher_weight: ``[V_T, D_T]`` teacher LM head.
        tokens: ``[B, T]`` int64 sampled token ids.
        mask: ``[B, T]`` boolean-like valid-token mask (fully masked rows contribute nothing).
        group_ids: ``[B]`` int64 sibling-group id per response (equal ids: samples of one prompt).
        spec: the objective's settings (``LossSpec``; ``LossSpec()`` is the paper's VA-OPD).
        vocab_size: normalise over ``[0, vocab_size)``; default the common LM-head width.
        num_prompts: ``P``, prompts in the optimizer step; default the distinct group ids of the
            rows that have valid tokens.

    ``va_opd_loss`` documents every argument at length; this function takes the same ones
    (without its ``backend``, ``chunk_size`` and ``process_group``) and returns the same.

    Returns:
        ``(loss, stats)``: the fp32 scalar ``sum(coef * kl) / P`` with gradients to
        ``student_hidden`` and ``student_weight`` only, and a dict of ``[B, T]`` fp32 detached
        tensors, zero outside ``mask``: ``kl``, ``va``, ``coef``, ``student_logp``,
        ``teacher_logp``, ``teacher_ablated_logp`` (NaN at valid tokens when no ablated view is given).
    """
    checked = check_loss_inputs(
        student_hidden, student_weight, teacher_hidden, teacher_ablated_hidden, teacher_weight,
        tokens, mask, group_ids, spec=spec, vocab_size=vocab_size, num_prompts=num_prompts,
    )
    mask, vocab = checked.mask, checked.vocab_size
    index = torch.where(mask, tokens.long(), 0).unsqueeze(-1)

    def log_probs(hidden, weight):
        return torch.log_softmax(hidden.float() @ weight[:vocab].float().T, dim=-1)

    student = log_probs(student_hidden, student_weight)
    with torch.no_grad():
        teacher = log_probs(teacher_hidden, teacher_weight)
        teacher_logp = teacher.gather(-1, index).squeeze(-1)
        if teacher_ablated_hidden is not None:
            ablated = log_probs(teacher_ablated_hidden, teacher_weight)
            ablated_logp = ablated.gather(-1, index).squeeze(-1)
            divergence = (teacher.exp() * (teacher - ablated)).sum(dim=-1)  # KL(pT(.|clean) || pT(.|ablated))
            va = visual_advantage(teacher_logp, ablated_logp, mask, spec.va, divergence)
        else:
            ablated_logp = torch.full_like(teacher_logp, float("nan"))
            va = torch.zeros_like(teacher_logp)
        coef = loss_coefficients(spec.method, va, mask, group_ids, spec.weight_temperature, spec.high_fraction, spec.high_weight)
    student_logp = student.gather(-1, index).squeeze(-1)

    if spec.kl_estimator == "full":
        kl = (student.exp() * (student - teacher)).sum(dim=-1)
        per_token = kl
    else:
        kl = student_logp.detach() - teacher_logp
        per_token = kl * (1.0 + student_logp - student_logp.detach())
    zero = torch.zeros((), device=kl.device)
    loss = torch.where(mask, coef * per_token, zero).sum() / checked.num_prompts

    def masked(x):
        return torch.where(mask, x.detach(), zero)

    stats = {
        "kl": masked(kl),
        "va": va,
        "coef": coef,
        "student_logp": masked(student_logp),
        "teacher_logp": masked(teacher_logp),
        "teacher_ablated_logp": masked(ablated_logp),
    }
    return loss, stats
