"""vaopd.kernels: the VA-OPD loss computed straight from hidden states and LM-head weights.

- ``va_opd_loss_reference``: the executable spec (full fp32 logits).
"""
from .reference import va_opd_loss_reference

__all__ = ["va_opd_loss_reference"]
