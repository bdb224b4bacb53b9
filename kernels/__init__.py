"""vaopd.kernels: the VA-OPD loss computed straight from hidden states and LM-head weights.

- ``va_opd_loss``: the fused loss (Triton on CUDA, chunked torch on CPU); never builds
  ``[tokens x vocab]``.
- ``fused_linear_logprobs``, ``fused_linear_reverse_kl``: its building blocks, for other trainers.
- ``va_opd_loss_reference``: the executable spec (full fp32 logits) everything is tested against.
"""
from .fused import fused_linear_logprobs, fused_linear_reverse_kl, va_opd_loss
from .reference import va_opd_loss_reference

__all__ = ["va_opd_loss", "fused_linear_logprobs", "fused_linear_reverse_kl", "va_opd_loss_reference"]
