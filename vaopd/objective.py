"""The trainer's name for the VA-OPD objective's per-token math, which lives with the loss in
``vaopd.kernels.objective`` (so the kernels need nothing of the trainer): visual advantage,
rollout weights, token coefficients, the high group. See ``docs/objective.md``."""
from vaopd.kernels.objective import (
    high_group,
    loss_coefficients,
    opd_coefficients,
    rollout_weights,
    token_coefficients,
    va_opd_coefficients_nosync,
    visual_advantage,
)

__all__ = [
    "visual_advantage",
    "rollout_weights",
    "token_coefficients",
    "high_group",
    "opd_coefficients",
    "loss_coefficients",
    "va_opd_coefficients_nosync",
]
