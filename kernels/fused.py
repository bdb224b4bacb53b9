"""The fused VA-OPD loss: chunked LM-head products, row ops in Triton (GPU) or torch (CPU).

No ``[tokens x vocab]`` tensor is ever allocated. Work runs over chunks of ``C`` token rows with
reusable logits buffers in the input dtype (``[C, V]``, plus ``[C/2, V]`` in phase B):

- Phase A (no gradient): clean and ablated teacher logits per chunk, then the row op
  ``lse_gather`` gives the sampled-token log-probs. VA and the coefficients follow on ``[B, T]``
  tensors (``vaopd.objective``).
- Phase B: student logits per chunk and clean-teacher logits per half chunk; ``reverse_kl_``
  gives each row's KL and student log-prob in one sweep and, because the coefficients are already
  known, overwrites the student logits with ``dKL/ds`` in a second sweep. The chunk's input
  gradient ``coef * (G @ W_S)`` and weight gradient ``G^T @ (coef * H_S)`` follow at once, so the
  gradients are complete when the forward returns and backward only scales them.

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

import os
from types import ModuleType

import torch

from vaopd.objective import loss_coefficients, visual_advantage

from . import torch_ops
from .checks import check_linear, check_loss_inputs, check_tokens, resolve_vocab_size

BACKENDS = ("auto", "triton", "torch")

# Token rows per chunk. On a GPU, 2K rows keep the products efficient while the phase-B buffers
# (a chunk of student logits, half a chunk of teacher logits) stay under 1 GB in bf16 at the Qwen
# vocabulary (H100 measurements in bench/RESULTS.md); on a CPU the torch ops' fp32 temporaries
# make smaller chunks pay.
DEFAULT_CHUNK_GPU = 2048
DEFAULT_CHUNK_CPU = 256


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


def reverse_kl_forward(student_hidden, student_weight, teacher_hidden, teacher_weight, coef, tokens, vocab, chunk, ops, need_grad):
    """Per-row reverse KL and, with ``need_grad``, the gradients of ``sum(coef * KL)``.

    ``student_hidden [N, D_S]``, ``teacher_hidden [N, D_T]``, weights ``[V_*, D_*]``, ``coef [N]``
    fp32, ``tokens [N]`` int64 or None. Returns ``(kl [N] fp32, student_logp [N] fp32 or None,
    grad_hidden [N, D_S] or None (fp32 for fp16 inputs, else their dtype), grad_weight [V_S, D_S]
    fp32 or None)``.
    """
    n = student_hidden.shape[0]
    device = student_hidden.device
    ws, wt = student_weight[:vocab], teacher_weight[:vocab]
    kl = torch.empty(n, dtype=torch.float32, device=device)
    logp = torch.empty_like(kl) if tokens is not None else None
    # The gradients wait for backward's upstream gradient (a loss scale, say) in a format that
    # can hold them: fp16 would flush realistic values (~1e-7) to zero before the scale could
    # help, so fp16 inputs get an fp32 hidden-state gradient; bf16 has fp32's range.
    grad_dtype = torch.float32 if student_hidden.dtype == torch.float16 else student_hidden.dtype
    grad_hidden = torch.empty(student_hidden.shape, dtype=grad_dtype, device=device) if need_grad else None
    grad_weight = torch.zeros(student_weight.shape, dtype=torch.float32, device=device) if need_grad else None
    # The teacher's logits are needed one sub-chunk at a time, the student's (then their gradient)
    # for the whole chunk: a half-size teacher buffer buys the weight-gradient product twice the
    # depth per fp32 accumulation (each one reads and writes the whole [V, D_S] accumulator).
    sub = max(1, chunk // 2)
    # Coefficients such as 1 / (K L P) can sit below fp16's normal range: scale the rows by
    # coef / max(coef), in (0, 1], and apply max(coef) in fp32 (one host sync, outside the loop).
    coef_max = float(coef.max()) if need_grad and n else 1.0
    coef_max = coef_max if coef_max > 0 else 1.0
    rel_coef = coef / coef_max
    s_buffer = student_hidden.new_empty(min(chunk, n), vocab)
    t_buffer = teacher_hidden.new_empty(min(sub, n), vocab)
    for start in range(0, n, chunk):
        rows = slice(start, start + chunk)
        h = student_hidden[rows]
        g = _logits(h, ws, s_buffer)
        for sub_start in range(0, h.shape[0], sub):
            sub_end = min(sub_start + sub, h.shape[0])
            r = slice(start + sub_start, start + sub_end)
            t = _logits(teacher_hidden[r], wt, t_buffer)
            ops.reverse_kl_(
                g[sub_start:sub_end], t, None if tokens is None else tokens[r], kl[r], None if logp is None else logp[r], need_grad
            )
        if need_grad:
            torch.mul(torch.matmul(g, ws), coef[rows, None], out=grad_hidden[rows])
            _accumulate_fp32(grad_weight[:vocab], g.T, h * rel_coef[rows, None].to(h.dtype), alpha=coef_max)
    return kl, logp, grad_hidden, grad_weight


# ----------------------------------------------------------------------------------------------
# Thin autograd wrappers
# ----------------------------------------------------------------------------------------------


class LinearLogprobsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, tokens, vocab, chunk, ops):
        logp, lse = linear_logprobs_forward(hidden, weight, tokens, vocab, chunk, ops)
        ctx.save_for_backward(hidden, weight, tokens, lse)
        ctx.vocab, ctx.chunk, ctx.ops = vocab, chunk, ops
        return logp, lse

    @staticmethod
    def backward(ctx, g_logp, g_lse):
        hidden, weight, tokens, lse = ctx.saved_tensors
        g_logp = torch.zeros_like(lse) if g_logp is None else g_logp.float().contiguous()
        g_lse = torch.zeros_like(lse) if g_lse is None else g_lse.float().contiguous()
        grad_hidden, grad_weight = linear_logprobs_backward(
            hidden, weight, tokens, lse, g_logp, g_lse, ctx.vocab, ctx.chunk, ctx.ops,
            ctx.needs_input_grad[0], ctx.needs_input_grad[1],
        )
        return grad_hidden, grad_weight, None, None, None, None


class ReverseKLFunction(torch.autograd.Function):
    """``sum(coef * KL)`` whose gradients are formed during the forward pass (coef is known)."""

    @staticmethod
    def forward(ctx, student_hidden, student_weight, teacher_hidden, teacher_weight, coef, tokens, vocab, chunk, ops):
        need_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        kl, logp, grad_hidden, grad_weight = reverse_kl_forward(
            student_hidden, student_weight, teacher_hidden, teacher_weight, coef, tokens, vocab, chunk, ops, need_grad
        )
        ctx.grads = (grad_hidden, grad_weight)
        ctx.dtypes = (student_hidden.dtype, student_weight.dtype)
        loss = (coef * kl).sum()
        if logp is None:
            logp = torch.zeros_like(kl)
        ctx.mark_non_differentiable(kl, logp)
        return loss, kl, logp

    @staticmethod
    def backward(ctx, g_loss, _g_kl, _g_logp):
        if ctx.grads is None:
            raise RuntimeError("the fused reverse-KL loss holds its gradients once: backward can run only once per forward")
        grad_hidden, grad_weight = ctx.grads
        ctx.grads = None  # free them, and scale in place: no second fp32 [V, D] copy at the peak
        if grad_hidden is not None:
            grad_hidden = grad_hidden.mul_(g_loss).to(ctx.dtypes[0]) if ctx.needs_input_grad[0] else None
            grad_weight = grad_weight.mul_(g_loss).to(ctx.dtypes[1]) if ctx.needs_input_grad[1] else None
        return grad_hidden, grad_weight, None, None, None, None, None, None, None


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------


def fused_linear_logprobs(hidden, weight, tokens, vocab_size=None, *, backend="auto", chunk_size=None):
    """Log-probs of ``tokens`` and the log-sum-exp under ``softmax(hidden @ weight[:vocab_size].T)``.

    No logits are kept: each chunk's logits are recomputed in backward.

    Args:
        hidden: ``[..., D]`` fp32/bf16/fp16 hidden states (the positions that predict ``tokens``).
        weight: ``[V_w, D]`` LM-head weight, same dtype; rows past ``vocab_size`` are ignored.
        tokens: ``[...]`` int64 ids in ``[0, vocab_size)``.
        vocab_size: default ``V_w``.

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
    logp, lse = LinearLogprobsFunction.apply(
        hidden.reshape(-1, hidden.shape[-1]), weight, tokens.reshape(-1).long().contiguous(), vocab, chunk, ops
    )
    return logp.view(lead), lse.view(lead)


def fused_linear_reverse_kl(student_hidden, student_weight, teacher_hidden, teacher_weight, coef, vocab_size=None, *, backend="auto", chunk_size=None):
    """``sum(coef * KL(pS || pT))`` over tokens, with the full-vocabulary reverse KL per token.

    ``pS = softmax(student_hidden @ student_weight[:V].T)``, ``pT`` likewise for the teacher, over
    ``[0, vocab_size)``. Gradients reach ``student_hidden`` and ``student_weight`` only; backward may
    run once per call.

    Args:
        student_hidden: ``[..., D_S]``; teacher_hidden: ``[..., D_T]`` (same leading shape).
        student_weight: ``[V_S, D_S]``; teacher_weight: ``[V_T, D_T]``.
        coef: ``[...]`` float per-token coefficients (e.g. ``mask / mask.sum()`` for a token mean);
            tokens with coefficient 0 still cost compute: drop them from the inputs instead.
        vocab_size: default the common LM-head width.

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
    loss, kl, _ = ReverseKLFunction.apply(
        student_hidden.reshape(-1, student_hidden.shape[-1]), student_weight,
        teacher_hidden.detach().reshape(-1, teacher_hidden.shape[-1]), teacher_weight.detach(),
        coef.detach().reshape(-1).float().contiguous(), None, vocab, chunk, ops,
    )
    return loss, kl.view(lead)


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
        chunk_size: token rows per chunk (default 2048 on CUDA, 256 on CPU). Memory beyond the
            inputs, the gradients and an fp32 weight-gradient accumulator is about
            ``1.5 * chunk_size * vocab_size`` elements of the input dtype (plus fp32 temporaries
            of a chunk's size on the torch backend).

        process_group: a ``torch.distributed`` group over which one batch is split (data
            parallelism). Sibling responses may then sit on different ranks: their VA means and
            group ids are all-gathered (two small collectives) so the weights are those of the
            whole batch. Every rank must call the loss; ``group_ids`` must be globally unique and
            ``num_prompts`` the global prompt count (required). The ranks' losses then add up to
            the single-process loss, and so do their gradients (sum, not average, across ranks).

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


def chunked_va_opd_loss(
    student_hidden, student_weight, teacher_hidden, teacher_ablated_hidden, teacher_weight, tokens, mask, group_ids,
    *, method, kl_estimator, vocab, num_prompts, temperature, high_fraction, high_weight, ops, chunk, process_group=None,
):
    """``va_opd_loss`` on validated arguments (bool ``mask``, resolved ``vocab`` and ``num_prompts``)
    with a given row-op module ``ops`` (``triton_ops``, ``torch_ops`` or a compatible one, such as
    the benchmarks' ``torch.compile``d twin) and ``chunk`` rows per chunk."""
    device = student_hidden.device
    flat_mask = mask.reshape(-1)
    rows = None if bool(flat_mask.all()) else flat_mask.nonzero().squeeze(1)

    def valid_rows(x):
        x = x.reshape(-1, x.shape[-1]) if x.dim() == 3 else x.reshape(-1)
        return x if rows is None else x.index_select(0, rows)

    def scatter(values):
        out = torch.zeros(flat_mask.numel(), dtype=torch.float32, device=device)
        if rows is None:
            out.copy_(values)
        else:
            out.index_copy_(0, rows, values.float())
        return out.view(mask.shape)

    tok = valid_rows(tokens).long().contiguous()
    teacher_rows = valid_rows(teacher_hidden.detach())
    with torch.no_grad():
        t_logp, _ = linear_logprobs_forward(teacher_rows, teacher_weight.detach(), tok, vocab, chunk, ops)
        teacher_logp = scatter(t_logp)
        if teacher_ablated_hidden is not None:
            a_logp, _ = linear_logprobs_forward(valid_rows(teacher_ablated_hidden.detach()), teacher_weight.detach(), tok, vocab, chunk, ops)
            ablated_logp = scatter(a_logp)
            va = visual_advantage(teacher_logp, ablated_logp, mask)
        else:
            ablated_logp = torch.where(mask, float("nan"), 0.0).float()
            va = torch.zeros_like(teacher_logp)
        coef = loss_coefficients(method, va, mask, group_ids, temperature, high_fraction, high_weight, process_group)
        coef_rows = valid_rows(coef) / num_prompts

    student_rows = valid_rows(student_hidden)
    if kl_estimator == "full":
        loss, kl, s_logp = ReverseKLFunction.apply(
            student_rows, student_weight, teacher_rows, teacher_weight.detach(), coef_rows, tok, vocab, chunk, ops
        )
    else:
        s_logp, _ = LinearLogprobsFunction.apply(student_rows, student_weight, tok, vocab, chunk, ops)
        kl = s_logp.detach() - t_logp
        # Value sum(c k); gradient sum(c k grad log pS(y)): the policy-gradient form of reverse KL.
        loss = (coef_rows * kl * (1.0 + s_logp - s_logp.detach())).sum()

    stats = {
        "kl": scatter(kl.detach()),
        "va": va,
        "coef": coef,
        "student_logp": scatter(s_logp.detach()),
        "teacher_logp": teacher_logp,
        "teacher_ablated_logp": ablated_logp,
    }
    return loss, stats
