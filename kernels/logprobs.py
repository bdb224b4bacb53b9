"""``fused_linear_logprobs``: sampled-token log-probs and log-sum-exp straight from hidden states
and an LM-head weight, chunk by chunk, with no ``[tokens x vocab]`` tensor kept.

Forward: each chunk's logits into one reused ``[C, V]`` buffer, then the row op ``lse_gather``.
Backward recomputes each chunk's logits, overwrites them with their gradient (``logprob_grad_``)
and forms the input and weight gradients wanted.
"""
from __future__ import annotations

import torch

from .checks import check_linear, check_tokens, resolve_vocab_size
from .chunks import accumulate_fp32, chunk_rows, finish_weight_grad, logits, row_ops, wanted


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
        ops.lse_gather(logits(hidden[rows], w, buffer), tokens[rows], lse[rows], logp[rows])
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
        g = logits(hidden[rows], w, buffer)
        ops.logprob_grad_(g, lse[rows], tokens[rows], g_logp[rows], g_lse[rows])
        if need_hidden:
            torch.matmul(g, w, out=grad_hidden[rows])
        if need_weight:
            accumulate_fp32(grad_weight[:vocab], g.T, hidden[rows])
    return grad_hidden, None if grad_weight is None else finish_weight_grad(grad_weight, weight)


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


def fused_linear_logprobs(hidden, weight, tokens, vocab_size=None, *, backend="auto", chunk_size=None):
    """Log-probs of ``tokens`` and the log-sum-exp under ``softmax(hidden @ weight[:vocab_size].T)``.

    No logits are kept: each chunk's logits are recomputed in backward, which forms only the
    gradients wanted (of inputs that require grad; none under ``torch.no_grad()``). Backward may run
    more than once (``retain_graph=True``); ``create_graph=True`` raises ``RuntimeError``.

    Args:
        hidden: ``[..., D]`` fp32/bf16/fp16 hidden states (the positions that predict ``tokens``).
        weight: ``[V_w, D]`` LM-head weight, same dtype; rows past ``vocab_size`` are ignored.
        tokens: ``[...]`` int64 ids in ``[0, vocab_size)``.
        vocab_size: ``V``, log-probs are normalised over ``[0, V)``; default ``V_w``.
        backend: ``"triton"`` (Triton row kernels; CUDA, or CPU under ``TRITON_INTERPRET=1``),
            ``"torch"`` (any device) or ``"auto"`` (Triton for CUDA tensors, torch otherwise).
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
    ops = row_ops(backend, hidden.device)
    chunk = chunk_rows(chunk_size, hidden.device)
    lead = hidden.shape[:-1]
    flat_hidden, flat_tokens = hidden.reshape(-1, hidden.shape[-1]), tokens.reshape(-1).long().contiguous()
    if any(wanted(hidden, weight)):
        logp, lse = LinearLogprobsFunction.apply(flat_hidden, weight, flat_tokens, vocab, chunk, ops)
    else:
        with torch.no_grad():
            logp, lse = linear_logprobs_forward(flat_hidden, weight, flat_tokens, vocab, chunk, ops)
    return logp.view(lead), lse.view(lead)
