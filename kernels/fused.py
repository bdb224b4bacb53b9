"""The fused VA-OPD loss: chunked LM-head products, row ops in Triton (GPU) or torch (CPU).

No ``[tokens x vocab]`` tensor is ever allocated. Work runs over chunks of at most ``C`` valid
token rows, with two reusable logits buffers in the input dtype: ``G [C, V]`` (student logits,
then their gradient) and ``T [C/2, V]`` (teacher logits, half a chunk at a time).

Per chunk, one pass (``distill_forward``):

1. With an ablated view: its teacher logits (into ``G`` while it is free), and the row op
   ``lse_gather`` gives the sampled-token log-probs.
2. Student logits into ``G``; clean-teacher logits into ``T`` half a chunk at a time; the row op
   ``reverse_kl_`` gives each row's KL, the student's and the teacher's sampled-token log-probs
   in one sweep and overwrites ``G`` with ``dKL/ds`` in a second sweep. (With
   ``kl_estimator="sampled"``: the teacher's ``lse_gather`` instead, and the policy-gradient
   ``logprob_grad_`` over the student logits.)
3. The chunk's coefficients, from whatever the chunk's rows need (``coefficients`` callback).
4. Input gradient ``coef * (G @ W_S)`` and weight gradient ``G^T @ (coef * H_S)`` into an fp32
   accumulator, each only when wanted.

The gradients are complete when the forward returns; backward only scales them. That needs the
coefficients of a chunk before its step 4, which decides how ``va_opd_loss`` lays out the rows:

- **VA-OPD, one pass** (5 LM-head products): a response's coefficients depend only on its own
  tokens and its siblings' (plus the constant ``num_prompts``), so whole sibling groups are packed
  into each chunk and the chunk's coefficients come from its own teacher log-probs.
- **OPD** (4 products): ``1 / (K_g L_b P)`` is known from the mask before any logits.
- **VA-OPD, two phases** (fallback, 6 products with the full KL, 5 sampled): when one sibling
  group alone holds more valid tokens than a chunk, or with a ``process_group`` (siblings split
  over ranks): phase A computes both teacher views' log-probs for all rows, then the
  coefficients, then the pass above with them known (recomputing the clean teacher's logits).

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

import logging
import os
from dataclasses import dataclass
from types import ModuleType
from typing import Callable

import torch

from vaopd.objective import loss_coefficients, va_opd_coefficients_nosync, visual_advantage

from . import torch_ops
from .checks import check_linear, check_loss_inputs, check_tokens, resolve_vocab_size

log = logging.getLogger(__name__)

BACKENDS = ("auto", "triton", "torch")

# Token rows per chunk, C. Memory beyond the inputs and gradients is 1.5 C V elements of the input
# dtype: at the Qwen vocabulary in bf16, 2,048 rows are 890 MiB (under 1 GiB; 893 MiB measured on
# an H100 with the same two buffers in the former two-phase design, bench/RESULTS.md), and the
# products stay efficient (2,048-row chunks were 1 to 3% faster than 1,024 there). A sibling group must fit in a chunk
# for the one-pass VA-OPD path: 4 responses of 512 tokens do. On a CPU the buffers are fp32 (1,024
# rows at a 32K vocabulary: 188 MiB) and the torch row ops add about 16 MiB of temporaries: a
# fifth of the full-logits reference's memory at 2,048 tokens (tests/test_kernel_memory.py).
DEFAULT_CHUNK_GPU = 2048
DEFAULT_CHUNK_CPU = 1024


def _row_ops(backend: str, device: torch.device) -> ModuleType:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = "triton" if device.type == "cuda" else "torch"
    if backend == "torch":
        return torch_ops
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            f"backend='triton' needs CUDA tensors (got {device}); on a CPU use backend='torch', or set "
            "TRITON_INTERPRET=1 before importing vaopd.kernels to run the kernels in Triton's interpreter"
        )
    from . import triton_ops

    return triton_ops


def _chunk_rows(chunk_size: int | None, device: torch.device) -> int:
    if chunk_size is None:
        return DEFAULT_CHUNK_GPU if device.type == "cuda" else DEFAULT_CHUNK_CPU
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int (token rows per chunk), got {chunk_size!r}")
    return chunk_size


_OUT_DTYPE_ADDMM: dict[torch.device, bool] = {}


def _has_fp32_out_addmm(device: torch.device) -> bool:
    """Whether ``torch.addmm(..., out_dtype=float32)`` accumulates bf16 products into fp32 here."""
    if device not in _OUT_DTYPE_ADDMM:
        ok = False
        if device.type == "cuda":
            try:
                acc = torch.ones(2, 2, device=device)
                a = torch.full((2, 3), 0.5, dtype=torch.bfloat16, device=device)
                torch.addmm(acc, a, a.T, out_dtype=torch.float32, out=acc)
                ok = bool((acc == 1.75).all())
            except (RuntimeError, TypeError):
                ok = False
        _OUT_DTYPE_ADDMM[device] = ok
    return _OUT_DTYPE_ADDMM[device]


def _accumulate_fp32(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, alpha: float = 1.0) -> None:
    """``acc += alpha * a @ b`` with fp32 accumulation: cuBLAS's fp32 output where torch offers it,
    else an fp32 copy of the chunk operands (bounded by the chunk)."""
    if a.dtype == torch.float32:
        acc.addmm_(a, b, alpha=alpha)
    elif _has_fp32_out_addmm(a.device):
        torch.addmm(acc, a, b, alpha=alpha, out_dtype=torch.float32, out=acc)
    else:
        acc.addmm_(a.float(), b.float(), alpha=alpha)


def _logits(hidden: torch.Tensor, weight: torch.Tensor, buffer: torch.Tensor) -> torch.Tensor:
    out = buffer[: hidden.shape[0]]
    torch.matmul(hidden, weight.T, out=out)
    return out


def _finish_weight_grad(acc: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return acc if acc.dtype == weight.dtype else acc.to(weight.dtype)


# ----------------------------------------------------------------------------------------------
# Plain forward/backward functions over token chunks
# ----------------------------------------------------------------------------------------------


def linear_logprobs_forward(hidden, weight, tokens, vocab, chunk, ops):
    """Sampled-token log-probs and log-sum-exp of ``hidden @ weight[:vocab].T``, chunk by chunk.

    ``hidden [N, D]``, ``weight [V_w, D]``, ``tokens [N]`` int64. Returns ``(logp, lse)``, ``[N]`` fp32.
    """
    n = hidden.shape[0]
    logp = torch.empty(n, dtype=torch.float32, device=hidden.device)
    lse = torch.empty_like(logp)
    w = weight[:vocab]
    buffer = hidden.new_empty(min(chunk, n), vocab)
    for start in range(0, n, chunk):
        rows = slice(start, start + chunk)
        ops.lse_gather(_logits(hidden[rows], w, buffer), tokens[rows], lse[rows], logp[rows])
    return logp, lse


def linear_logprobs_backward(hidden, weight, tokens, lse, g_logp, g_lse, vocab, chunk, ops, need_hidden, need_weight):
    """Gradients of ``sum(g_logp * logp + g_lse * lse)`` w.r.t. ``hidden`` and ``weight``.

    Recomputes each chunk's logits and overwrites them with their gradient. Returns
    ``(grad_hidden [N, D] or None, grad_weight [V_w, D] or None)``.
    """
    n = hidden.shape[0]
    w = weight[:vocab]
    grad_hidden = torch.empty_like(hidden) if need_hidden else None
    grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
    buffer = hidden.new_empty(min(chunk, n), vocab)
    for start in range(0, n, chunk):
        rows = slice(start, start + chunk)
        g = _logits(hidden[rows], w, buffer)
        ops.logprob_grad_(g, lse[rows], tokens[rows], g_logp[rows], g_lse[rows])
        if need_hidden:
            torch.matmul(g, w, out=grad_hidden[rows])
        if need_weight:
            _accumulate_fp32(grad_weight[:vocab], g.T, hidden[rows])
    return grad_hidden, None if grad_weight is None else _finish_weight_grad(grad_weight, weight)


class LinearLogprobsFunction(torch.autograd.Function):
    """``fused_linear_logprobs`` with gradients: backward recomputes each chunk's logits."""

    @staticmethod
    def forward(ctx, hidden, weight, tokens, vocab, chunk, ops):
        logp, lse = linear_logprobs_forward(hidden, weight, tokens, vocab, chunk, ops)
        ctx.save_for_backward(hidden, weight, tokens, lse)
        ctx.vocab, ctx.chunk, ctx.ops = vocab, chunk, ops
        return logp, lse

    @staticmethod
    def backward(ctx, g_logp, g_lse):
        if torch.is_grad_enabled():
            raise RuntimeError(
                "fused_linear_logprobs does not support create_graph=True (double backward): its backward is not "
                "differentiable; compute log_softmax of the full logits where higher-order gradients are needed"
            )
        hidden, weight, tokens, lse = ctx.saved_tensors
        g_logp = torch.zeros_like(lse) if g_logp is None else g_logp.float().contiguous()
        g_lse = torch.zeros_like(lse) if g_lse is None else g_lse.float().contiguous()
        grad_hidden, grad_weight = linear_logprobs_backward(
            hidden, weight, tokens, lse, g_logp, g_lse, ctx.vocab, ctx.chunk, ctx.ops,
            ctx.needs_input_grad[0], ctx.needs_input_grad[1],
        )
        return grad_hidden, grad_weight, None, None, None, None


# ----------------------------------------------------------------------------------------------
# The distillation pass: reverse KL (or its sampled estimate) with forward-time gradients
# ----------------------------------------------------------------------------------------------

# coefficients(chunk index, rows, teacher log-probs of the rows or None, ablated log-probs or
# None) -> fp32 [rows] coefficients of the rows' KL in the loss.
Coefficients = Callable[[int, slice, "torch.Tensor | None", "torch.Tensor | None"], torch.Tensor]


@dataclass
class DistillRows:
    """Per-row results of ``distill_forward`` (``[N]`` fp32 unless noted)."""

    kl: torch.Tensor  # reverse KL, or the sampled estimate log pS(y) - log pT(y)
    coef: torch.Tensor
    student_logp: torch.Tensor | None  # None without tokens
    teacher_logp: torch.Tensor | None  # None without tokens
    ablated_logp: torch.Tensor | None  # None without an ablated view
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
        ops.lse_gather(_logits(hidden[r], weight, buffer), tokens[r], lse[r], logp[r])


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
    *, vocab, chunk, ops, need_hidden, need_weight, ablated_hidden=None, teacher_logp=None, sampled=False,
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

    LM-head products: one per teacher view not given (clean, ablated), one for the student, one
    per wanted gradient. Buffers: ``[C, V]`` of the student's dtype and ``[C/2, V]`` of the
    teacher's (not needed, with the sampled estimate, when the teacher's dtype is the student's).
    """
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
    # The gradients wait for backward's upstream gradient (a loss scale, say) in a format that
    # can hold them: fp16 would flush realistic values (~1e-7) to zero before the scale could
    # help, so fp16 inputs get an fp32 hidden-state gradient; bf16 has fp32's range.
    grad_dtype = torch.float32 if student_hidden.dtype == torch.float16 else student_hidden.dtype
    grad_hidden = torch.empty(student_hidden.shape, dtype=grad_dtype, device=device) if need_hidden else None
    grad_weight = torch.zeros(student_weight.shape, dtype=torch.float32, device=device) if need_weight else None

    longest = max((end - start for start, end in chunks), default=0)
    sub = max(1, min(chunk // 2, longest))
    g_buffer = student_hidden.new_empty(longest, vocab)
    # Teacher-only logits (the ablated view; the clean view for the sampled estimate) go into the
    # student buffer while it is free, when the dtypes allow: whole-chunk products.
    shared = teacher_hidden.dtype == student_hidden.dtype
    needs_t_buffer = not sampled or (not shared and (ablated_hidden is not None or write_t_logp))
    t_buffer = teacher_hidden.new_empty(sub, vocab) if needs_t_buffer and longest else None
    zeros = torch.zeros(longest if sampled and need_grad else 0, dtype=torch.float32, device=device)

    for index, (start, end) in enumerate(chunks):
        rows = slice(start, end)
        g = g_buffer[: end - start]
        scratch = g if shared else t_buffer
        if ablated_hidden is not None:
            _lse_gather_rows(ablated_hidden, wt, tokens, rows, scratch, lse, a_logp, ops)
        if sampled and write_t_logp:
            _lse_gather_rows(teacher_hidden, wt, tokens, rows, scratch, lse, t_logp, ops)
        h = student_hidden[rows]
        torch.matmul(h, ws.T, out=g)
        if sampled:
            ops.lse_gather(g, tokens[rows], lse[rows], s_logp[rows])
            torch.sub(s_logp[rows], t_logp[rows], out=kl[rows])
        else:
            for sub_start in range(start, end, sub):
                r = slice(sub_start, min(sub_start + sub, end))
                ops.reverse_kl_(
                    g[r.start - start: r.stop - start], _logits(teacher_hidden[r], wt, t_buffer),
                    tokens[r] if has_tok else None, kl[r], s_logp[r] if has_tok else None, need_grad,
                    t_logp[r] if write_t_logp else None,
                )
        c = coefficients(index, rows, None if t_logp is None else t_logp[rows], None if a_logp is None else a_logp[rows])
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
            _accumulate_fp32(grad_weight[:vocab], g.T, scaled, alpha=alpha)
    return DistillRows(kl, coef, s_logp, t_logp, a_logp, grad_hidden, grad_weight)


# ----------------------------------------------------------------------------------------------
# Autograd: gradients formed in the forward pass, handed over once
# ----------------------------------------------------------------------------------------------


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


def _wanted(*tensors: torch.Tensor) -> list[bool]:
    """Which of ``tensors`` need a gradient from this call (none under no_grad/inference_mode)."""
    enabled = torch.is_grad_enabled()
    return [enabled and t.requires_grad for t in tensors]


def _attach(result: DistillRows, hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The loss of ``result``, differentiable in ``hidden``/``weight`` when their gradients were formed."""
    loss = result.loss
    if result.grad_hidden is None and result.grad_weight is None:
        return loss
    return PrecomputedGradients.apply(loss, hidden, weight, [result.grad_hidden, result.grad_weight])


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------


def fused_linear_logprobs(hidden, weight, tokens, vocab_size=None, *, backend="auto", chunk_size=None):
    """Log-probs of ``tokens`` and the log-sum-exp under ``softmax(hidden @ weight[:vocab_size].T)``.

    No logits are kept: each chunk's logits are recomputed in backward, which forms only the
    gradients wanted (of inputs that require grad; none under ``torch.no_grad()``). Backward may run
    more than once (``retain_graph=True``); ``create_graph=True`` raises ``RuntimeError``.

    Args:
        hidden: ``[..., D]`` fp32/bf16/fp16 hidden states (the positions that predict ``tokens``).
        weight: ``[V_w, D]`` LM-head weight, same dtype; rows past ``vocab_size`` are ignored.
        tokens: ``[...]`` int64 ids in ``[0, vocab_size)``.
        vocab_size: default ``V_w``.
        chunk_size: token rows per chunk (default 2048 on CUDA, 1024 on CPU); memory beyond the
            inputs is one ``[chunk_size, vocab_size]`` buffer of the input dtype.

    Returns:
        ``(logp, lse)``: fp32 tensors of shape ``[...]``, differentiable in ``hidden`` and ``weight``.

    Example (a GRPO-style trainer computing policy log-probs without full logits)::

        hidden = model.model(**batch).last_hidden_state[:, :-1]
        logp, _ = fused_linear_logprobs(hidden, model.lm_head.weight, batch["input_ids"][:, 1:])
    """
    check_linear(hidden, weight, "hidden", "weight", None)
    vocab = resolve_vocab_size(vocab_size, (weight.shape[0], "weight"))
    check_tokens(tokens, None, vocab, hidden.shape[:-1], hidden.device)
    ops = _row_ops(backend, hidden.device)
    chunk = _chunk_rows(chunk_size, hidden.device)
    lead = hidden.shape[:-1]
    flat_hidden, flat_tokens = hidden.reshape(-1, hidden.shape[-1]), tokens.reshape(-1).long().contiguous()
    if any(_wanted(hidden, weight)):
        logp, lse = LinearLogprobsFunction.apply(flat_hidden, weight, flat_tokens, vocab, chunk, ops)
    else:
        with torch.no_grad():
            logp, lse = linear_logprobs_forward(flat_hidden, weight, flat_tokens, vocab, chunk, ops)
    return logp.view(lead), lse.view(lead)


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
        vocab_size: default the common LM-head width.
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
    ops = _row_ops(backend, student_hidden.device)
    chunk = _chunk_rows(chunk_size, student_hidden.device)
    hidden = student_hidden.reshape(-1, student_hidden.shape[-1])
    need_hidden, need_weight = _wanted(hidden, student_weight)
    coef_rows = coef.detach().reshape(-1).float().contiguous()
    n = hidden.shape[0]
    with torch.no_grad():
        result = distill_forward(
            hidden.detach(), student_weight.detach(), teacher_hidden.detach().reshape(-1, teacher_hidden.shape[-1]),
            teacher_weight.detach(), None, _even_chunks(n, chunk), lambda i, rows, *_: coef_rows[rows],
            vocab=vocab, chunk=chunk, ops=ops, need_hidden=need_hidden, need_weight=need_weight,
        )
    return _attach(result, hidden, student_weight), result.kl.view(lead)


def va_opd_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_ablated_hidden: torch.Tensor | None,
    teacher_weight: torch.Tensor,
    tokens: torch.Tensor,
    mask: torch.Tensor,
    group_ids: torch.Tensor,
    *,
    method: str = "va_opd",
    kl_estimator: str = "full",
    vocab_size: int | None = None,
    num_prompts: int | None = None,
    temperature: float = 1.0,
    high_fraction: float = 0.2,
    high_weight: float = 0.5,
    backend: str = "auto",
    chunk_size: int | None = None,
    process_group=None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The VA-OPD (or OPD) loss without materialising ``[tokens x vocab]``.

    Arguments, defaults, return values and stats are those of
    ``vaopd.kernels.va_opd_loss_reference`` (see its docstring), plus:

    Args:
        backend: ``"triton"`` (Triton row kernels; CUDA, or CPU under ``TRITON_INTERPRET=1``),
            ``"torch"`` (chunked torch, any device) or ``"auto"`` (Triton for CUDA tensors, torch
            otherwise).
        chunk_size: ``C``, valid token rows per chunk (default 2048 on CUDA, 1024 on CPU). Memory
            beyond the inputs, the gradients and an fp32 ``[V_S, D_S]`` weight-gradient
            accumulator is ``1.5 * C * vocab_size`` elements of the input dtype (a ``[C, V]``
            student buffer and a ``[C/2, V]`` teacher buffer), plus on the torch backend fp32
            row-op temporaries of a bounded row block (about 16 MiB on a CPU, 256 MiB on a GPU);
            with Qwen's vocabulary in bf16 and the default, 890 MiB, flat in the token count. VA-OPD runs in one pass when every sibling group's valid tokens fit
            in ``C``; otherwise it falls back to two phases (see below).
        process_group: a ``torch.distributed`` group over which one batch is split (data
            parallelism). Sibling responses may then sit on different ranks: their VA means and
            group ids are all-gathered (two small collectives) so the weights are those of the
            whole batch. Every rank must call the loss; ``group_ids`` must be globally unique and
            ``num_prompts`` the global prompt count (required). The ranks' losses then add up to
            the single-process loss, and so do their gradients (sum, not average, across ranks).

    LM-head products (``2 N V D`` FLOPs each, ``N`` valid tokens) with both gradients wanted:

    - ``method="va_opd"``: 5 (ablated and clean teacher, student, input and weight gradients) in
      one pass when no ``process_group`` is given and every sibling group fits in a chunk (whole
      groups are packed into chunks greedily); else two phases: 6 with ``kl_estimator="full"``
      (the clean teacher is recomputed), 5 with ``"sampled"``.
    - ``method="opd"``: 4 (clean teacher, student, two gradients), with or without a process
      group; 5 when ``teacher_ablated_hidden`` is given (its log-probs feed the VA stats).

    A gradient is formed only when wanted: none under ``torch.no_grad()``/``inference_mode``, no
    weight gradient (and no fp32 accumulator) for a frozen LM head, no input gradient for hidden
    states that do not require grad; each saves one product. Gradients are formed in the forward
    pass: backward may run once per call, and not with ``create_graph=True`` (``RuntimeError``).
    Which path ran is logged at debug level (logger ``vaopd.kernels.fused``).

    Only valid tokens are computed: fully masked rows and padding cost nothing.
    """
    if process_group is not None and num_prompts is None:
        raise ValueError("num_prompts is required with process_group: pass the global number of prompts in the step")
    checked = check_loss_inputs(
        student_hidden, student_weight, teacher_hidden, teacher_ablated_hidden, teacher_weight,
        tokens, mask, group_ids, method=method, kl_estimator=kl_estimator,
        vocab_size=vocab_size, num_prompts=num_prompts,
    )
    device = student_hidden.device
    return chunked_va_opd_loss(
        student_hidden, student_weight, teacher_hidden, teacher_ablated_hidden, teacher_weight, tokens, checked.mask,
        group_ids, method=method, kl_estimator=kl_estimator, vocab=checked.vocab_size, num_prompts=checked.num_prompts,
        temperature=temperature, high_fraction=high_fraction, high_weight=high_weight,
        ops=_row_ops(backend, device), chunk=_chunk_rows(chunk_size, device), process_group=process_group,
    )


# ----------------------------------------------------------------------------------------------
# Row layout: which valid tokens go into which chunk
# ----------------------------------------------------------------------------------------------


def _even_chunks(n: int, chunk: int) -> list[tuple[int, int]]:
    return [(start, min(start + chunk, n)) for start in range(0, n, chunk)]


def pack_groups(lengths: list[int], group_ids: list[int], budget: int) -> list[list[int]] | None:
    """Whole sibling groups packed into chunks of at most ``budget`` valid tokens.

    Greedy in the order groups first appear (so a batch laid out group by group keeps its order):
    a group joins the current chunk if it fits, else it starts the next one. Responses without
    valid tokens are left out. Returns the chunks as lists of response indices (group by group,
    siblings in batch order), or None when one group alone exceeds ``budget``.
    """
    groups: dict[int, list[int]] = {}
    for b, (gid, length) in enumerate(zip(group_ids, lengths)):
        if length:
            groups.setdefault(gid, []).append(b)
    packs, current, used = [], [], 0
    for members in groups.values():
        size = sum(lengths[b] for b in members)
        if size > budget:
            return None
        if current and used + size > budget:
            packs.append(current)
            current, used = [], 0
        current += members
        used += size
    if current:
        packs.append(current)
    return packs


def _row_order(mask: torch.Tensor, responses: list[int], lengths: list[int]) -> torch.Tensor | None:
    """Flat ``[B * T]`` indices of the valid tokens of ``responses`` in order, or None when that is
    every position in batch order (the rows are then plain views, no copies). ``mask`` is the host
    copy: the indices are worked out on the CPU, where their data-dependent size costs no wait."""
    batch, width = mask.shape
    if responses == list(range(batch)) and sum(lengths) == batch * width:
        return None
    index = torch.tensor(responses, dtype=torch.long)
    flat = index[:, None] * width + torch.arange(width)
    return flat.masked_select(mask.index_select(0, index))


def _upload(tensors: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """CPU tensors of one dtype onto ``device`` in one copy that the host does not wait for (from
    pinned memory on CUDA): views of one buffer, shaped like ``tensors``."""
    if not tensors:
        return []
    flat = torch.cat([t.reshape(-1) for t in tensors])
    if device.type == "cuda":
        flat = flat.pin_memory()
    flat = flat.to(device, non_blocking=True)
    return [part.view(t.shape) for part, t in zip(flat.split([t.numel() for t in tensors]), tensors)]


@dataclass
class PackLayout:
    """One packed chunk's responses as ``vaopd.objective.va_opd_coefficients_nosync`` takes them.

    Tensors are int64: ``members [b]`` (batch indices, in row order), ``where [rows]`` (each row's
    flat position in the chunk's ``[b, T]`` layout), ``lengths [b]`` (valid tokens) and
    ``group_index [b]`` (dense sibling-group indices); ``groups`` and ``top_k`` (the longest
    response's length) are host ints.
    """

    members: torch.Tensor
    where: torch.Tensor
    lengths: torch.Tensor
    group_index: torch.Tensor
    groups: int
    top_k: int

    def tensors(self) -> list[torch.Tensor]:
        return [self.members, self.where, self.lengths, self.group_index]


def pack_layouts(packs: list[list[int]], mask: torch.Tensor, group_ids: torch.Tensor) -> list[PackLayout]:
    """The ``PackLayout`` of each pack, on the CPU, from the host copies of the ``[B, T]`` bool
    ``mask`` and ``[B]`` int64 ``group_ids``: whatever the coefficients need to know about the
    layout is known before the chunk loop, which then never waits on the device."""
    layouts = []
    for pack in packs:
        members = torch.tensor(pack, dtype=torch.long)
        sub_mask = mask.index_select(0, members)
        lengths = sub_mask.sum(dim=1)
        _, group_index = torch.unique(group_ids.index_select(0, members), return_inverse=True)
        where = sub_mask.reshape(-1).nonzero().squeeze(1)
        layouts.append(PackLayout(members, where, lengths, group_index, int(group_index.max()) + 1, int(lengths.max())))
    return layouts


def _pack_coefficients(layouts, mask, coef_rows, *, num_prompts, temperature, high_fraction, high_weight) -> Coefficients:
    """Coefficients of one packed chunk from its own teacher log-probs (``vaopd.objective``, on the
    chunk's responses: whole sibling groups, so the weights are those of the whole batch), laid
    out by the chunk's ``PackLayout`` (device tensors): no host-device synchronisation.
    Also writes the chunk's coefficients (before ``/ num_prompts``) into ``coef_rows``, for the stats."""

    def coefficients(index, rows, clean, ablated):
        layout = layouts[index]
        sub_mask = mask.index_select(0, layout.members)

        def spread(values):
            return torch.zeros(sub_mask.numel(), dtype=torch.float32, device=mask.device).index_copy_(0, layout.where, values).view(sub_mask.shape)

        coef = va_opd_coefficients_nosync(
            spread(clean), spread(ablated), sub_mask, layout.lengths, layout.group_index, layout.groups, layout.top_k,
            temperature, high_fraction, high_weight,
        )
        coef_rows[rows] = coef.reshape(-1).index_select(0, layout.where)
        return coef_rows[rows] / num_prompts

    return coefficients


def chunked_va_opd_loss(
    student_hidden, student_weight, teacher_hidden, teacher_ablated_hidden, teacher_weight, tokens, mask, group_ids,
    *, method, kl_estimator, vocab, num_prompts, temperature, high_fraction, high_weight, ops, chunk, process_group=None,
):
    """``va_opd_loss`` on validated arguments (bool ``mask``, resolved ``vocab`` and ``num_prompts``)
    with a given row-op module ``ops`` (``triton_ops``, ``torch_ops`` or a compatible one, such as
    the benchmarks' ``torch.compile``d twin) and ``chunk`` rows per chunk."""
    device = student_hidden.device
    sampled = kl_estimator == "sampled"
    # The row layout is planned on the host from one copy of the (small) mask and group ids, and
    # its index tensors go to the device in one copy: the chunk loop never waits on the device.
    host = torch.cat([mask.to(torch.int64), group_ids[:, None]], dim=1).cpu()
    host_mask, host_ids = host[:, :-1].bool(), host[:, -1].contiguous()
    lengths = host_mask.sum(dim=1).tolist()
    packs = None
    if method == "va_opd":
        if process_group is not None:
            log.debug("va_opd_loss: two-phase path (process_group: siblings may sit on other ranks)")
        else:
            packs = pack_groups(lengths, host_ids.tolist(), chunk)
            if packs is None:
                log.debug("va_opd_loss: two-phase path (a sibling group has more valid tokens than chunk_size=%d)", chunk)
            else:
                log.debug("va_opd_loss: one pass, whole sibling groups in %d chunk(s)", len(packs))
    responses = [b for pack in packs for b in pack] if packs is not None else [b for b, n in enumerate(lengths) if n]
    order = _row_order(host_mask, responses, lengths)
    layouts = [] if packs is None else pack_layouts(packs, host_mask, host_ids)
    uploaded = _upload(([] if order is None else [order]) + [t for layout in layouts for t in layout.tensors()], device)
    if order is not None:
        order = uploaded.pop(0)
    for i, layout in enumerate(layouts):
        layout.members, layout.where, layout.lengths, layout.group_index = uploaded[4 * i: 4 * i + 4]
    n = sum(lengths)

    def take(x):
        x = x.reshape(-1, x.shape[-1]) if x.dim() == 3 else x.reshape(-1)
        return x if order is None else x.index_select(0, order)

    def scatter(values):
        out = torch.zeros(mask.numel(), dtype=torch.float32, device=device)
        if order is None:
            out.copy_(values)
        else:
            out.index_copy_(0, order, values.float())
        return out.view(mask.shape)

    tok = take(tokens).long().contiguous()
    teacher_rows = take(teacher_hidden.detach())
    ablated_rows = None if teacher_ablated_hidden is None else take(teacher_ablated_hidden.detach())
    t_weight = teacher_weight.detach()
    teacher_logp = ablated_logp = va = None
    with torch.no_grad():
        if packs is not None:  # one pass: each chunk's coefficients from its own teacher log-probs
            coef_rows = torch.zeros(n, dtype=torch.float32, device=device)
            bounds = [0]
            for pack in packs:
                bounds.append(bounds[-1] + sum(lengths[b] for b in pack))
            chunks = list(zip(bounds[:-1], bounds[1:]))
            coefficients = _pack_coefficients(
                layouts, mask, coef_rows, num_prompts=num_prompts,
                temperature=temperature, high_fraction=high_fraction, high_weight=high_weight,
            )
        else:  # coefficients known before the pass
            chunks = _even_chunks(n, chunk)
            if method == "va_opd":  # phase A: both teacher views for every row, then the coefficients
                teacher_logp, _ = linear_logprobs_forward(teacher_rows, t_weight, tok, vocab, chunk, ops)
                ablated_logp, _ = linear_logprobs_forward(ablated_rows, t_weight, tok, vocab, chunk, ops)
                va = visual_advantage(scatter(teacher_logp), scatter(ablated_logp), mask)
                coef = loss_coefficients(method, va, mask, group_ids, temperature, high_fraction, high_weight, process_group)
            elif process_group is None:  # OPD: coefficients from the mask alone, so from its host copy
                coef, = _upload([loss_coefficients(method, torch.zeros(host_mask.shape), host_mask, host_ids)], device)
            else:
                coef = loss_coefficients(method, torch.zeros(mask.shape, device=device), mask, group_ids, process_group=process_group)
            scaled_coef = take(coef) / num_prompts

            def coefficients(index, rows, clean, ablated):
                return scaled_coef[rows]

    student_rows = take(student_hidden)
    need_hidden, need_weight = _wanted(student_rows, student_weight)
    with torch.no_grad():
        result = distill_forward(
            student_rows.detach(), student_weight.detach(), teacher_rows, t_weight, tok, chunks, coefficients,
            vocab=vocab, chunk=chunk, ops=ops, need_hidden=need_hidden, need_weight=need_weight,
            ablated_hidden=None if ablated_logp is not None else ablated_rows, teacher_logp=teacher_logp, sampled=sampled,
        )
        if result.ablated_logp is not None:
            ablated_logp = result.ablated_logp
        if packs is not None:
            # The VA of the coefficients again, as a statistic, and with visual_advantage's check
            # of the teacher's log-probs: after the loop, where its wait costs no idle device.
            va, coef = visual_advantage(scatter(result.teacher_logp), scatter(ablated_logp), mask), scatter(coef_rows)
        elif va is None:  # OPD: VA only as a statistic, when the ablated view is given
            va = torch.zeros(mask.shape, device=device) if ablated_logp is None else visual_advantage(
                scatter(result.teacher_logp), scatter(ablated_logp), mask)
        stats = {
            "kl": scatter(result.kl),
            "va": va,
            "coef": coef,
            "student_logp": scatter(result.student_logp),
            "teacher_logp": scatter(result.teacher_logp),
            "teacher_ablated_logp": torch.where(mask, float("nan"), 0.0).float() if ablated_logp is None else scatter(ablated_logp),
        }
    return _attach(result, student_rows, student_weight), stats
