"""Plain torch twins of the row ops in ``triton_ops.py`` (same signatures and results).

They run on any device and materialise fp32 temporaries of the chunk's size ``[C, V]`` only:
memory is bounded by the chunk, never by the token count.
"""
from __future__ import annotations

import torch


def lse_gather(logits, tokens, lse_out, logp_out):
    """Row log-sum-exp and sampled-token log-prob of ``logits [C, V]`` into ``[C]`` fp32 outputs."""
    x = logits.float()
    torch.logsumexp(x, dim=-1, out=lse_out)
    torch.sub(x.gather(1, tokens[:, None]).squeeze(1), lse_out, out=logp_out)


def logprob_grad_(logits, lse, tokens, g_logp, g_lse):
    """Overwrite ``logits [C, V]`` with the gradient of ``g_logp . logp + g_lse . lse`` w.r.t. them."""
    g = (logits.float() - lse[:, None]).exp_().mul_((g_lse - g_logp)[:, None])
    g.scatter_add_(1, tokens[:, None], g_logp[:, None])
    logits.copy_(g)


def reverse_kl_(student, teacher, tokens, kl_out, logp_out, write_grad):
    """Per-row reverse KL(pS || pT); optionally overwrite ``student`` with ``pS (log pS - log pT - KL)``."""
    log_ps = torch.log_softmax(student.float(), dim=-1)
    diff = log_ps - torch.log_softmax(teacher.float(), dim=-1)
    p = log_ps.exp()
    torch.sum(p * diff, dim=-1, out=kl_out)
    if tokens is not None:
        logp_out.copy_(log_ps.gather(1, tokens[:, None]).squeeze(1))
    if write_grad:
        student.copy_(p.mul_(diff.sub_(kl_out[:, None])))
