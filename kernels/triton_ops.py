"""Triton row kernels over a chunk of LM-head logits: one program per token row.

The LM-head products run in cuBLAS on token chunks (see ``distill.py`` for why); these kernels do
everything that touches a logit after that, in one or two sweeps over the vocabulary with an
online (running-max) log-sum-exp, so no softmax, log-softmax or probability tensor is ever
written. Every loaded value is upcast to fp32 first (the interpreter silently miscomputes bf16
arithmetic, and fp32 statistics are what we want on the GPU too).

Each op has a plain torch twin with the same signature in ``torch_ops.py``.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# Vocabulary columns per loop iteration. On a GPU a 4K-column tile keeps enough loads in flight
# per program; under the CPU interpreter every iteration costs milliseconds, so take the whole row.
GPU_BLOCK = 4096
GPU_WARPS = 8
INTERPRET_MAX_BLOCK = 65536


def _launch_params(vocab: int, block: int | None, num_warps: int | None) -> tuple[int, int]:
    if os.environ.get("TRITON_INTERPRET") == "1":
        return block or min(triton.next_power_of_2(vocab), INTERPRET_MAX_BLOCK), num_warps or 1
    return block or min(GPU_BLOCK, triton.next_power_of_2(vocab)), num_warps or GPU_WARPS


@triton.jit
def _lse_gather_kernel(X, stride_x, TOK, LSE, LOGP, V, BLOCK: tl.constexpr):
    """LSE[r] = logsumexp(X[r, :V]); LOGP[r] = X[r, TOK[r]] - LSE[r]."""
    row = tl.program_id(0).to(tl.int64)
    x_ptr = X + row * stride_x
    m = float("-inf")
    d = 0.0
    for start in range(0, V, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        d = d * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        m = m_new
    log_d = tl.log(d)
    tok = tl.load(TOK + row)
    x_tok = tl.load(x_ptr + tok).to(tl.float32)
    tl.store(LSE + row, m + log_d)
    tl.store(LOGP + row, (x_tok - m) - log_d)


@triton.jit
def _logprob_grad_kernel(X, stride_x, TOK, LSE, G_LOGP, G_LSE, V, BLOCK: tl.constexpr):
    """In place: X[r, v] <- g_logp[r] * (1[v == tok] - p[v]) + g_lse[r] * p[v], p = exp(X - LSE)."""
    row = tl.program_id(0).to(tl.int64)
    x_ptr = X + row * stride_x
    tok = tl.load(TOK + row)
    lse = tl.load(LSE + row)
    g_logp = tl.load(G_LOGP + row)
    g_lse = tl.load(G_LSE + row)
    for start in range(0, V, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        valid = cols < V
        x = tl.load(x_ptr + cols, mask=valid, other=0.0).to(tl.float32)
        g = (g_lse - g_logp) * tl.exp(x - lse)
        g = tl.where(cols == tok, g + g_logp, g)
        tl.store(x_ptr + cols, g.to(X.dtype.element_ty), mask=valid)


@triton.jit
def _reverse_kl_kernel(
    S, stride_s, T, stride_t, TOK, KL, LOGP, T_LOGP, V,
    HAS_TOK: tl.constexpr, WRITE_T_LOGP: tl.constexpr, WRITE_GRAD: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """KL[r] = sum_v pS (log pS - log pT) over v < V, from student logits S and teacher logits T.

    Sweep 1 keeps running maxima ``m`` and sums ``d`` for both log-sum-exps and
    ``u = sum exp(s - m_s) ((s - m_s) - (t - m_t))``, so ``KL = u / d_s - log d_s + log d_t``
    without a second read. Measuring from the running maxima keeps the bracket small where
    ``pS`` is large, which the gradient's accuracy depends on.
    With HAS_TOK, LOGP[r] = S[r, TOK[r]] - lse_s (read before sweep 2 overwrites S), and with
    WRITE_T_LOGP also T_LOGP[r] = T[r, TOK[r]] - lse_t.
    With WRITE_GRAD, sweep 2 writes dKL/ds = pS (log pS - log pT - KL) over S in place.
    """
    row = tl.program_id(0).to(tl.int64)
    s_ptr = S + row * stride_s
    t_ptr = T + row * stride_t
    if HAS_TOK:
        s_tok = tl.load(s_ptr + tl.load(TOK + row)).to(tl.float32)
    m_s = float("-inf")
    d_s = 0.0
    m_t = float("-inf")
    d_t = 0.0
    u = 0.0
    for start in range(0, V, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        valid = cols < V
        s = tl.load(s_ptr + cols, mask=valid, other=float("-inf")).to(tl.float32)
        t = tl.load(t_ptr + cols, mask=valid, other=float("-inf")).to(tl.float32)
        m_s_new = tl.maximum(m_s, tl.max(s, axis=0))
        m_t_new = tl.maximum(m_t, tl.max(t, axis=0))
        alpha = tl.exp(m_s - m_s_new)
        e_s = tl.exp(s - m_s_new)
        # Moving the maxima shifts every earlier bracket by the same amount (0 on the first block).
        shift = tl.where(d_s > 0, (m_s - m_s_new) - (m_t - m_t_new), 0.0)
        bracket = tl.where(valid, (s - m_s_new) - (t - m_t_new), 0.0)
        u = alpha * (u + d_s * shift) + tl.sum(e_s * bracket, axis=0)
        d_s = d_s * alpha + tl.sum(e_s, axis=0)
        d_t = d_t * tl.exp(m_t - m_t_new) + tl.sum(tl.exp(t - m_t_new), axis=0)
        m_s = m_s_new
        m_t = m_t_new
    # log p = (x - m) - log d keeps the small terms apart from the large max (as log_softmax does).
    log_d_s = tl.log(d_s)
    log_d_t = tl.log(d_t)
    kl = u / d_s - log_d_s + log_d_t
    tl.store(KL + row, kl)
    if HAS_TOK:
        tl.store(LOGP + row, (s_tok - m_s) - log_d_s)
        if WRITE_T_LOGP:
            t_tok = tl.load(t_ptr + tl.load(TOK + row)).to(tl.float32)
            tl.store(T_LOGP + row, (t_tok - m_t) - log_d_t)
    if WRITE_GRAD:
        for start in range(0, V, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            valid = cols < V
            s = tl.load(s_ptr + cols, mask=valid, other=0.0).to(tl.float32)
            t = tl.load(t_ptr + cols, mask=valid, other=0.0).to(tl.float32)
            log_ps = (s - m_s) - log_d_s
            g = tl.exp(log_ps) * (log_ps - ((t - m_t) - log_d_t) - kl)
            tl.store(s_ptr + cols, g.to(S.dtype.element_ty), mask=valid)


def lse_gather(logits, tokens, lse_out, logp_out, *, block=None, num_warps=None):
    """Row log-sum-exp and sampled-token log-prob.

    Args:
        logits: ``[C, V]`` float (row stride may exceed V); read only.
        tokens: ``[C]`` int64 ids in ``[0, V)``.
        lse_out, logp_out: ``[C]`` fp32 outputs.
    """
    rows, vocab = logits.shape
    block, num_warps = _launch_params(vocab, block, num_warps)
    _lse_gather_kernel[(rows,)](logits, logits.stride(0), tokens, lse_out, logp_out, vocab, BLOCK=block, num_warps=num_warps)


def logprob_grad_(logits, lse, tokens, g_logp, g_lse, *, block=None, num_warps=None):
    """Overwrite ``logits [C, V]`` with the gradient of ``g_logp . logp + g_lse . lse`` w.r.t. them.

    ``lse``, ``g_logp``, ``g_lse``: ``[C]`` fp32; ``tokens``: ``[C]`` int64.
    """
    rows, vocab = logits.shape
    block, num_warps = _launch_params(vocab, block, num_warps)
    _logprob_grad_kernel[(rows,)](logits, logits.stride(0), tokens, lse, g_logp, g_lse, vocab, BLOCK=block, num_warps=num_warps)


def reverse_kl_(student, teacher, tokens, kl_out, logp_out, write_grad, teacher_logp_out=None, *, block=None, num_warps=None):
    """Per-row reverse KL(pS || pT) over ``[0, V)``; optionally overwrite ``student`` with dKL/ds.

    Args:
        student: ``[C, V]`` student logits; with ``write_grad`` it becomes
            ``pS * (log pS - log pT - KL)`` (the gradient of each row's KL w.r.t. its logits).
        teacher: ``[C, V]`` teacher logits; read only.
        tokens: ``[C]`` int64 or None; with it, ``logp_out`` gets the student's sampled-token
            log-prob and ``teacher_logp_out`` (if given) the teacher's.
        kl_out: ``[C]`` fp32 output; logp_out: ``[C]`` fp32 output or None.
        teacher_logp_out: ``[C]`` fp32 output or None.
    """
    rows, vocab = student.shape
    block, num_warps = _launch_params(vocab, block, num_warps)
    has_tok = tokens is not None
    write_t_logp = has_tok and teacher_logp_out is not None
    _reverse_kl_kernel[(rows,)](
        student, student.stride(0), teacher, teacher.stride(0),
        tokens if has_tok else kl_out, kl_out, logp_out if has_tok else kl_out,
        teacher_logp_out if write_t_logp else kl_out, vocab,
        HAS_TOK=has_tok, WRITE_T_LOGP=write_t_logp, WRITE_GRAD=write_grad,
        BLOCK=block, num_warps=num_warps,
    )
