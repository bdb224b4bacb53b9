"""Plain torch twins of the row ops in ``triton_ops.py`` (same signatures and results).

They run on any device. Each op works through its chunk a block of rows at a time, so its fp32
temporaries hold about ``ROW_BLOCK_ELEMENTS`` numbers each (a few are live at once) whatever the
chunk's size: memory is bounded by a constant, never by the token count.
"""
from __future__ import annotations

import torch

# fp32 numbers per temporary: 4 MiB on a CPU (where the temporaries compete with the chunk
# buffers for memory), 128 MiB on a GPU (where fewer, larger launches pay).
ROW_BLOCK_ELEMENTS = {"cpu": 2**20, "cuda": 2**25}


def _row_blocks(x: torch.Tensor):
    rows, vocab = x.shape
    step = max(1, ROW_BLOCK_ELEMENTS.get(x.device.type, ROW_BLOCK_ELEMENTS["cpu"]) // max(vocab, 1))
    for start in range(0, rows, step):
        yield slice(start, min(start + step, rows))


def lse_gather(logits, tokens, lse_out, logp_out):
    """Row log-sum-exp and sampled-token log-prob of ``logits [C, V]`` into ``[C]`` fp32 outputs."""
    for r in _row_blocks(logits):
        x = logits[r].float()
        torch.logsumexp(x, dim=-1, out=lse_out[r])
        torch.sub(x.gather(1, tokens[r, None]).squeeze(1), lse_out[r], out=logp_out[r])


def logprob_grad_(logits, lse, tokens, g_logp, g_lse):
    """Overwrite ``logits [C, V]`` with the gradient of ``g_logp . logp + g_lse . lse`` w.r.t. them."""
    for r in _row_blocks(logits):
        g = (logits[r].float() - lse[r, None]).exp_().mul_((g_lse[r] - g_logp[r])[:, None])
        g.scatter_add_(1, tokens[r, None], g_logp[r, None])
        logits[r].copy_(g)


def reverse_kl_(student, teacher, tokens, kl_out, logp_out, write_grad, teacher_logp_out=None, teacher_lse_out=None):
    """Per-row reverse KL(pS || pT); optionally overwrite ``student`` with ``pS (log pS - log pT - KL)``.

    With ``tokens``, ``logp_out`` gets the student's sampled-token log-prob and ``teacher_logp_out``
    (if given) the teacher's; ``teacher_lse_out`` (if given) gets the teacher's log-sum-exp.
    """
    for r in _row_blocks(student):
        s, t = student[r].float(), teacher[r].float()
        lse_t = torch.logsumexp(t, dim=-1)
        log_ps = torch.log_softmax(s, dim=-1)
        diff = (log_ps - t).add_(lse_t[:, None])  # log pS - log pT
        if tokens is not None:
            tok = tokens[r, None]
            logp_out[r] = log_ps.gather(1, tok).squeeze(1)
            if teacher_logp_out is not None:
                teacher_logp_out[r] = t.gather(1, tok).squeeze(1) - lse_t
        if teacher_lse_out is not None:
            teacher_lse_out[r] = lse_t
        del t
        p = log_ps.exp_()
        torch.sum(p * diff, dim=-1, out=kl_out[r])
        if write_grad:
            student[r].copy_(p.mul_(diff.sub_(kl_out[r, None])))
