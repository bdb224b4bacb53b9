"""vaopd.kernels: the VA-OPD loss computed straight from hidden states and LM-head weights.

Self-contained: it imports torch, triton (for the Triton backend) and nothing of the trainer.

- ``va_opd_loss``: the fused loss (Triton on CUDA, chunked torch on CPU); never builds
  ``[tokens x vocab]``. ``LossSpec``: what it computes (method, KL estimator, weighting).
- ``fused_linear_logprobs``, ``fused_linear_reverse_kl``: its building blocks, for other trainers.
- ``va_opd_loss_reference``: the executable spec (full fp32 logits) everything is tested against.
- ``vaopd.kernels.objective``: the per-token math (visual advantage, rollout weights, token
  coefficients, the high group).

Modules: ``triton_ops`` / ``torch_ops`` (row ops over a chunk of logits), ``chunks`` (plumbing),
``logprobs`` (the log-prob op), ``distill`` (the distillation engine), ``va_opd`` (VA-OPD on it),
``objective`` and ``spec`` (the math and its settings), ``checks`` (argument validation),
``reference``.
"""
from .distill import fused_linear_reverse_kl
from .logprobs import fused_linear_logprobs
from .reference import va_opd_loss_reference
from .spec import LossSpec
from .va_opd import va_opd_loss

__all__ = ["va_opd_loss", "LossSpec", "fused_linear_logprobs", "fused_linear_reverse_kl", "va_opd_loss_reference"]
