"""Plain torch twins of the row ops in ``triton_ops.py`` (same signatures and results).

They run on any device. Each op works through its chunk a block of rows at a time, so its fp32
temporaries hold about ``ROW_BLOCK_ELEMENTS`` numbers each (a few are live at once) whatever the
chunk's size: memory is bounded by a constant, never by the token count. The ``*_rows``
functions are the same ops on all rows at once (what ``torch.compile`` should see: it fuses the
elementwise work instead of materialising the temporaries).
"""
from __future__ import annotations

import torch

# fp32 numbers per temporary: 4 MiB on a CPU (where the temporaries compete with the chunk
# buffers for memory), 64 MiB on a GPU (where fewer, larger launches pay).
ROW_BLOCK_ELEMENTS = {"cpu": 2**20, "cuda": 2**24}


def _by_row_blocks(op, x: torch.Tensor, *args) -> None:
    """``op(x[r], *args[r])`` over blocks of rows ``r``; tensor arguments share ``x``'s rows."""
    rows, vocab = x.shape
    step = max(1, ROW_BLOCK_ELEMENTS.get(x.device.type, ROW_BLOCK_ELEMENTS["cpu"]) // max(vocab, 1))
    for start in range(0, rows, step):
        r = slice(start, min(start + step, rows))
        op(x[r], *(a[r] if isinstance(a, torch.Tensor) else a for a in args))


def lse_gather_rows(logits, tokens, lse_out, logp_out):
    x = logits.float()
    torch.logsumexp(x, dim=-1, out=lse_out)
    torch.sub(x.gather(1, tokens[:, None]).squeeze(1), lse_out, out=logp_out)


def logprob_grad_rows_(logits, lse, tokens, g_logp, g_lse):
    g = (logits.float() - lse[:, None]).exp_().mul_((g_lse - g_logp)[:, None])
    g.scatter_add_(1, tokens[:, None], g_logp[:, None])
    logits.copy_(g)


def reverse_kl_rows_(student, teacher, tokens, kl_out, logp_out, write_grad, teacher_logp_out=None):
    s, t = student.float(), teacher.float()
    lse_t = torch.logsumexp(t, dim=-1)
    log_ps = torch.log_softmax(s, dim=-1)
    diff = (log_ps - t).add_(lse_t[:, None])  # log pS - log pT
    if tokens is not None:
        logp_out.copy_(log_ps.gather(1, tokens[:, None]).squeeze(1))
        if teacher_logp_out is not None:
            teacher_logp_out.copy_(t.gather(1, tokens[:, None]).squeeze(1) - lse_t)
    p = log_ps.exp_()
    torch.sum(p * diff, dim=-1, out=kl_out)
    if write_grad:
        student.copy_(p.mul_(diff.sub_(kl_out[:, None])))


def lse_gather(logits, tokens, lse_out, logp_out):
    """Row log-sum-exp and sampled-token log-prob of ``logits [C, V]`` into ``[C]`` fp32 outputs."""
    _by_row_blocks(lse_gather_rows, logits, tokens, lse_out, logp_out)


def logprob_grad_(logits, lse, tokens, g_logp, g_lse):
    """Overwrite ``logits [C, V]`` with the gradient of ``g_logp . logp + g_lse . lse`` w.r.t. them."""
    _by_row_blocks(logprob_grad_rows_, logits, lse, tokens, g_logp, g_lse)


def reverse_kl_(student, teacher, tokens, kl_out, logp_out, write_grad, teacher_logp_out=None):
    """Per-row reverse KL(pS || pT); optionally overwrite ``student`` with ``pS (log pS - log pT - KL)``.

    With ``tokens``, ``logp_out`` gets the student's sampled-token log-prob and ``teacher_logp_out``
    (if given) the teacher's.
    """
    _by_row_blocks(reverse_kl_rows_, student, teacher, tokens, kl_out, logp_out, write_grad, teacher_logp_out)
