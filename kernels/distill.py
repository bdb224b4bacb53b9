"""The distillation engine: ``sum(coef * KL(pS || pT))`` over token rows with its gradients formed
in the forward pass, and ``fused_linear_reverse_kl``, its public face.

No ``[tokens x vocab]`` tensor is ever allocated. Work runs over chunks of at most ``C`` token
rows, with two reusable logits buffers in the input dtype: ``G [C, V]`` (student logits, then
their gradient) and ``T [C/2, V]`` (teacher logits, half a chunk at a time).

Per chunk, one pass (``distill_forward``):

1. With an ablated view: its teacher logits (into ``G`` while it is free), and the row op
   ``lse_gather`` gives the sampled-token log-probs. With ``view_kl`` (the ``distribution``
   visual advantage) the two teacher views' logits sit side by side instead, so the row op
   ``reverse_kl_`` gives ``KL(pT(. | clean) || pT(. | ablated))`` and both sampled-token log-probs
   from the products the pass makes anyway (``teacher_views``): no extra product.
2. Student logits into ``G``; clean-teacher logits into ``T`` half a chunk at a time; the row op
   ``reverse_kl_`` gives each row's KL, the student's and the teacher's sampled-token log-probs
   in one sweep and overwrites ``G`` with ``dKL/ds`` in a second sweep. (With the sampled
   estimate: the teacher's ``lse_gather`` instead, and the policy-gradient ``logprob_grad_`` over
   the student logits.)
3. The chunk's coefficients, from whatever the chunk's rows need (the ``coefficients`` callback:
   a caller that knows them up front returns a slice; VA-OPD computes them from the chunk's
   teacher log-probs, ``va_opd.py``).
4. Input gradient ``coef * (G @ W_S)`` and weight gradient ``G^T @ (coef * H_S)`` into an fp32
   accumulator, each only when wanted.

The gradients are complete when the forward returns; backward only scales them
(``PrecomputedGradients``).

Why the LM-head products stay in cuBLAS: they are most of the time (``2 N V D`` FLOPs each) and
cuBLAS runs them at 680 to 780 TFLOP/s on an H100 on 1K to 2K-row chunks; the rest is
memory-bound row work that one Triton kernel per chunk does in one or two reads of the logits,
near the card's bandwidth (bench/RESULTS.md). Fusing the products into Triton would mean writing
a GEMM that beats cuBLAS for a small share of the time.

Coefficients are applied to rows of ``[C, D]`` tensors rather than to the logits gradient, so a
bf16/fp16 gradient buffer holds ``pS (log pS - log pT - KL)`` at its natural scale and small
coefficients (``1 / (K L P)``) never underflow it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .checks import check_linear, resolve_vocab_size
from .chunks import accumulate_fp32, chunk_rows, even_chunks, logits, row_ops, wanted

# coefficients(chunk index, rows, teacher log-probs of the rows or None, ablated log-probs or
# None, KL between the teacher's views or None) -> fp32 [rows] coefficients of the rows' KL in the loss.
Coefficients = Callable[[int, slice, "torch.Tensor | None", "torch.Tensor | None", "torch.Tensor | None"], torch.Tensor]


@dataclass
class DistillRows:
    """Per-row results of ``distill_forward`` (``[N]`` fp32 unless noted)."""

    kl: torch.Tensor  # reverse KL, or the sampled estimate log pS(y) - log pT(y)
    coef: torch.Tensor
    student_logp: torch.Tensor | None  # None without tokens
    teacher_logp: torch.Tensor | None  # None without tokens
    ablated_logp: torch.Tensor | None  # None without an ablated view
    view_kl: torch.Tensor | None  # KL(pT(.|clean) || pT(.|ablated)); None unless asked for
    grad_hidden: torch.Tensor | None  # [N, D_S]: fp32 for fp16 inputs, else their dtype
    grad_weight: torch.Tensor | None  # [V_S, D_S] fp32

    @property
    def loss(self) -> torch.Tensor:
        """``sum(coef * kl)``: the fp32 scalar whose gradients ``grad_hidden``/``grad_weight`` are."""
        return torch.dot(self.coef, self.kl)


def _lse_gather_rows(hidden, weight, tokens, rows, buffer, lse, logp, ops):
    """``lse_gather`` of ``hidden[rows] @ weight.T``, ``buffer``'s rows at a time."""
    step = buffer.shape[0]
    for start in range(rows.start, rows.stop, step):
        r = slice(start, min(start + step, rows.stop))
        ops.lse_gather(logits(hidden[r], weight, buffer), tokens[r], lse[r], logp[r])


def teacher_views(clean_hidden, ablated_hidden, weight, tokens, rows, buffer, view_kl, clean_logp, ablated_logp, ops):
    """Per row of ``rows``: ``KL(pT(. | clean) || pT(. | ablated))`` into ``view_kl`` and each view's
    sampled-token log-prob into ``clean_logp`` / ``ablated_logp`` (``[N]`` fp32).

    The two views' logits (``hidden @ weight.T``, ``weight`` already cut to the vocabulary) go
    side by side into the two halves of ``buffer`` (``[2m, V]``, ``m >= 1``), ``m`` rows at a time:
    one LM-head product per view, as for their log-probs alone. The row op is ``reverse_kl_`` with
    the clean view in the student's place.
    """
    half = buffer.shape[0] // 2
    for start in range(rows.start, rows.stop, half):
        r = slice(start, min(start + half, rows.stop))
        clean = logits(clean_hidden[r], weight, buffer[:half])
        ablated = logits(ablated_hidden[r], weight, buffer[half: 2 * half])
        ops.reverse_kl_(clean, ablated, tokens[r], view_kl[r], clean_logp[r], False, ablated_logp[r])


def _scaled_rows(hidden: torch.Tensor, coef: torch.Tensor) -> tuple[torch.Tensor, float]:
    """``(rows, alpha)`` with ``alpha * rows == coef * hidden``, rows in ``hidden``'s dtype.

    Coefficients such as ``1 / (K L P)`` can sit below fp16's normal range: fp16 rows are scaled
    by ``coef / max(coef)``, in ``(0, 1]``, and ``max(coef)`` is applied in fp32 (one host sync).
    bf16 has fp32's range and needs no sync.
    """
    if hidden.dtype != torch.float16:
        return (hidden * coef[:, None]).to(hidden.dtype), 1.0
    top = float(coef.max()) if coef.numel() else 1.0
    top = top if top > 0 else 1.0
    return (hidden * (coef / top)[:, None]).to(hidden.dtype), top


def distill_forward(
    student_hidden, student_weight, teacher_hidden, teacher_weight, tokens, chunks, coefficients: Coefficients,
    *, vocab, chunk, ops, need_hidden, need_weight, ablated_hidden=None, teacher_logp=None, sampled=False, view_kl=False,
) -> DistillRows:
    """``sum(coef * KL)`` over token rows and, as wanted, its gradients, chunk by chunk.

    Args:
        student_hidden: ``[N, D_S]``; teacher_hidden, ablated_hidden: ``[N, D_T]`` (ablated optional).
        student_weight: ``[V_S, D_S]``; teacher_weight: ``[V_T, D_T]``; rows past ``vocab`` ignored.
        tokens: ``[N]`` int64 or None (only for the full KL without log-prob outputs).
        chunks: ``(start, end)`` row ranges covering ``[0, N)`` in order, each at most ``chunk`` rows;
            each chunk's coefficients are asked for once, after its teacher log-probs are known.
        coefficients: the per-chunk callback (``Coefficients``).
        teacher_logp: ``[N]`` fp32 teacher log-probs already known (two-phase path), or None.
        sampled: the sampled estimate ``log pS(y) - log pT(y)`` as a detached advantage (policy
            gradient) instead of the full reverse KL; needs ``tokens``.
        need_hidden, need_weight: which gradients to form. Without either, no gradient product
            runs and no ``[V, D_S]`` accumulator is allocated.
        view_kl: also each row's ``KL(pT(. | clean) || pT(. | ablated))`` (``DistillRows.view_kl``,
            and the callback's fifth argument); needs ``ablated_hidden`` and ``tokens`` and no
            ``teacher_logp``.

    LM-head products: one per teacher view not given (clean, ablated), one for the student, one
    per wanted gradient, with or without ``view_kl``. Buffers: ``[C, V]`` of the student's dtype
    and ``[C/2, V]`` of the teacher's (not needed, with the sampled estimate, when the teacher's
    dtype is the student's); with ``view_kl`` and the full KL, the teacher buffer holds the two
    views for ``C/4`` rows at a time.
    """
    if view_kl and (ablated_hidden is None or tokens is None or teacher_logp is not None):
        raise ValueError("view_kl needs ablated_hidden and tokens, and the clean teacher's logits (no teacher_logp)")
    n = student_hidden.shape[0]
    device = student_hidden.device
    ws, wt = student_weight[:vocab], teacher_weight[:vocab]
    need_grad = need_hidden or need_weight
    has_tok = tokens is not None

    def rows_f32():
        return torch.empty(n, dtype=torch.float32, device=device)

    kl, coef, lse = rows_f32(), rows_f32(), rows_f32()
    s_logp = rows_f32() if has_tok else None
    write_t_logp = has_tok and teacher_logp is None
    t_logp = rows_f32() if write_t_logp else teacher_logp
    a_logp = rows_f32() if ablated_hidden is not None else None
    v_kl = rows_f32() if view_kl else None
    # The gradients wait for backward's upstream gradient (a loss scale, say) in a format that
    # can hold them: fp16 would flush realistic values (~1e-7) to zero before the scale could
    # help, so fp16 inputs get an fp32 hidden-state gradient; bf16 has fp32's range.
    grad_dtype = torch.float32 if student_hidden.dtype == torch.float16 else student_hidden.dtype
    grad_hidden = torch.empty(student_hidden.shape, dtype=grad_dtype, device=device) if need_hidden else None
    grad_weight = torch.zeros(student_weight.shape, dtype=torch.float32, device=device) if need_weight else None

    longest = max((end - start for start, end in chunks), default=0)
    # Teacher rows per full-KL row op; with view_kl both views share the teacher buffer.
    sub = max(1, min(chunk // (4 if view_kl else 2), longest))
    g_buffer = student_hidden.new_empty(max(longest, 2) if view_kl else longest, vocab)
    # Teacher-only logits (the ablated view; the clean view for the sampled estimate) go into the
    # student buffer while it is free, when the dtypes allow: whole-chunk products.
    shared = teacher_hidden.dtype == student_hidden.dtype
    needs_t_buffer = not sampled or (not shared and (ablated_hidden is not None or write_t_logp))
    t_buffer = teacher_hidden.new_empty(2 * sub if view_kl else sub, vocab) if needs_t_buffer and longest else None
    zeros = torch.zeros(longest if sampled and need_grad else 0, dtype=torch.float32, device=device)

    for index, (start, end) in enumerate(chunks):
        rows = slice(start, end)
        g = g_buffer[: end - start]
        scratch = g if shared else t_buffer
        if view_kl and sampled:
            teacher_views(teacher_hidden, ablated_hidden, wt, tokens, rows, g_buffer if shared else t_buffer, v_kl, t_logp, a_logp, ops)
        elif ablated_hidden is not None and not view_kl:
            _lse_gather_rows(ablated_hidden, wt, tokens, rows, scratch, lse, a_logp, ops)
        if sampled and write_t_logp and not view_kl:
            _lse_gather_rows(teacher_hidden, wt, tokens, rows, scratch, lse, t_logp, ops)
        h = student_hidden[rows]
        torch.matmul(h, ws.T, out=g)
        if sampled:
            ops.lse_gather(g, tokens[rows], lse[rows], s_logp[rows])
            torch.sub(s_logp[rows], t_logp[rows], out=kl[rows])
        else:
            for sub_start in range(start, end, sub):
                r = slice(sub_start, min(sub_start + sub, end))
                if view_kl:  # both views side by side; the clean one stays for the student's KL
                    teacher_views(teacher_hidden, ablated_hidden, wt, tokens, r, t_buffer, v_kl, t_logp, a_logp, ops)
                ops.reverse_kl_(
                    g[r.start - start: r.stop - start], t_buffer[: r.stop - r.start] if view_kl else logits(teacher_hidden[r], wt, t_buffer),
                    tokens[r] if has_tok else None, kl[r], s_logp[r] if has_tok else None, need_grad,
                    t_logp[r] if write_t_logp and not view_kl else None,
                )
        c = coefficients(index, rows, None if t_logp is None else t_logp[rows], None if a_logp is None else a_logp[rows],
                         None if v_kl is None else v_kl[rows])
        coef[rows] = c
        if not need_grad:
            continue
        if sampled:
            # d/ds of k * log pS(y) with the advantage k = kl held fixed.
            ops.logprob_grad_(g, lse[rows], tokens[rows], kl[rows], zeros[: end - start])
        if need_hidden:
            torch.mul(torch.matmul(g, ws), c[:, None], out=grad_hidden[rows])
        if need_weight:
            scaled, alpha = _scaled_rows(h, c)
            accumulate_fp32(grad_weight[:vocab], g.T, scaled, alpha=alpha)
    return DistillRows(kl, coef, s_logp, t_logp, a_logp, v_kl, grad_hidden, grad_weight)


class PrecomputedGradients(torch.autograd.Function):
    """A scalar ``value`` whose gradients w.r.t. ``hidden`` and ``weight`` were formed with it.

    ``grads`` is a list ``[grad_hidden or None, grad_weight (fp32) or None]``. Backward scales them
    in place by the upstream gradient and casts them to the inputs' dtypes, once: a second
    backward or a differentiable backward (``create_graph=True``) raises ``RuntimeError``.
    """

    @staticmethod
    def forward(ctx, value, hidden, weight, grads):
        ctx.grads = grads
        ctx.dtypes = (hidden.dtype, weight.dtype)
        return value.detach().clone()

    @staticmethod
    def backward(ctx, g_value):
        if torch.is_grad_enabled():
            raise RuntimeError(
                "the fused loss does not support create_graph=True (double backward): its gradients are formed in "
                "the forward pass and are not themselves differentiable; use va_opd_loss_reference for higher-order gradients"
            )
        if ctx.grads is None:
            raise RuntimeError(
                "the fused loss hands over its precomputed gradients once: backward can run only once per forward "
                "(retain_graph=True and a second backward are not supported); call the loss again for another backward"
            )
        grad_hidden, grad_weight = ctx.grads
        ctx.grads = None  # free them, and scale in place: no second fp32 [V, D] copy at the peak
        if grad_hidden is not None and ctx.needs_input_grad[1]:
            grad_hidden = grad_hidden.mul_(g_value).to(ctx.dtypes[0])
        else:
            grad_hidden = None
        if grad_weight is not None and ctx.needs_input_grad[2]:
            grad_weight = grad_weight.mul_(g_value).to(ctx.dtypes[1])
        else:
            grad_weight = None
        return None, grad_hidden, grad_weight, None


def attach(result: DistillRows, hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The loss of ``result``, differentiable in ``hidden``/``weight`` when their gradients were formed."""
    loss = result.loss
    if result.grad_hidden is None and result.grad_weight is None:
        return loss
    return PrecomputedGradients.apply(loss, hidden, weight, [result.grad_hidden, result.grad_weight])


def fused_linear_reverse_kl(student_hidden, student_weight, teacher_hidden, teacher_weight, coef, vocab_size=None, *, backend="auto", chunk_size=None):
    """``sum(coef * KL(pS || pT))`` over tokens, with the full-vocabulary reverse KL per token.

    ``pS = softmax(student_hidden @ student_weight[:V].T)``, ``pT`` likewise for the teacher, over
    ``[0, vocab_size)``. Gradients reach ``student_hidden`` and ``student_weight`` only, and only
    those wanted: LM-head products are teacher and student logits plus one per input that
    requires grad (none under ``torch.no_grad()``). They are formed in the forward pass; backward
    may run once per call (a second backward or ``create_graph=True`` raises ``RuntimeError``).

    Args:
        student_hidden: ``[..., D_S]``; teacher_hidden: ``[..., D_T]`` (same leading shape).
        student_weight: ``[V_S, D_S]``; teacher_weight: ``[V_T, D_T]``.
        coef: ``[...]`` float per-token coefficients (e.g. ``mask / mask.sum()`` for a token mean);
            tokens with coefficient 0 still cost compute: drop them from the inputs instead.
        vocab_size: ``V``, both distributions over ``[0, V)``; default the common LM-head width.
        backend: ``"triton"`` (Triton row kernels; CUDA, or CPU under ``TRITON_INTERPRET=1``),
            ``"torch"`` (any device) or ``"auto"`` (Triton for CUDA tensors, torch otherwise).
        chunk_size: token rows per chunk (default 2048 on CUDA, 1024 on CPU); memory beyond the
            inputs and gradients is ``1.5 * chunk_size * vocab_size`` elements of the input dtype.

    Returns:
        ``(loss, kl)``: the fp32 scalar and the detached per-token KL ``[...]`` fp32.

    Example (distilling with a token-mean reverse KL)::

        coef = mask.float() / mask.sum()
        loss, kl = fused_linear_reverse_kl(h_student[mask], student.lm_head.weight,
                                           h_teacher[mask], teacher.lm_head.weight, coef[mask])
    """
    check_linear(student_hidden, student_weight, "student_hidden", "student_weight", None)
    check_linear(teacher_hidden, teacher_weight, "teacher_hidden", "teacher_weight", None)
    lead = student_hidden.shape[:-1]
    if teacher_hidden.shape[:-1] != lead or teacher_hidden.device != student_hidden.device:
        raise ValueError(f"teacher_hidden {tuple(teacher_hidden.shape)} must have the leading shape and device of student_hidden {tuple(student_hidden.shape)}")
    if not isinstance(coef, torch.Tensor) or not coef.dtype.is_floating_point or coef.shape != lead or coef.device != student_hidden.device:
        raise ValueError(f"coef must be a floating-point tensor of shape {list(lead)} on {student_hidden.device}")
    vocab = resolve_vocab_size(vocab_size, (student_weight.shape[0], "student_weight"), (teacher_weight.shape[0], "teacher_weight"))
    ops = row_ops(backend, student_hidden.device)
    chunk = chunk_rows(chunk_size, student_hidden.device)
    hidden = student_hidden.reshape(-1, student_hidden.shape[-1])
    need_hidden, need_weight = wanted(hidden, student_weight)
    coef_rows = coef.detach().reshape(-1).float().contiguous()
    n = hidden.shape[0]
    with torch.no_grad():
        result = distill_forward(
            hidden.detach(), student_weight.detach(), teacher_hidden.detach().reshape(-1, teacher_hidden.shape[-1]),
            teacher_weight.detach(), None, even_chunks(n, chunk), lambda i, rows, *_: coef_rows[rows],
            vocab=vocab, chunk=chunk, ops=ops, need_hidden=need_hidden, need_weight=need_weight,
        )
    return attach(result, hidden, student_weight), result.kl.view(lead)
