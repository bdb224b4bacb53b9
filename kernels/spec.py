"""``LossSpec``: the settings of the objective, shared by the fused loss, the reference and the trainer."""
from __future__ import annotations

from dataclasses import dataclass

from .objective import METHODS, check_high_fraction, check_high_weight, check_temperature, check_va_estimator

KL_ESTIMATORS = ("full", "sampled")


@dataclass(frozen=True)
class LossSpec:
    """What the loss computes; ``LossSpec()`` is the paper's VA-OPD.

    Attributes:
        method: ``"va_opd"`` (coefficients from the visual advantage: rollout weights times the
            high/low token split) or ``"opd"`` (standard OPD, ``1 / (K_g L_b)`` per valid token).
        kl_estimator: ``"full"``: the exact reverse KL over the vocabulary at each token.
            ``"sampled"``: the single-sample estimate ``k_t = log pS(y_t) - log pT(y_t)``, used as a
            detached advantage: the loss's value is ``sum c_t k_t / P`` and its gradient is
            ``sum c_t k_t grad log pS(y_t) / P`` (the policy-gradient form of the reverse KL).
        weight_temperature: softmax temperature ``tau > 0`` of the rollout weights among siblings
            (``vaopd.kernels.objective.rollout_weights``); log-probs are always at temperature 1.
        high_fraction: share of each response's tokens in its high-VA group, in ``(0, 1]``.
        high_weight: share of a response's weight given to its high group, in ``[0, 1]``.
        va: how a token's visual advantage is measured, one of ``objective.VA_ESTIMATORS``
            (``vaopd.kernels.objective.visual_advantage``): ``"sampled"`` (the paper's
            ``max(log pT(y_t | clean) - log pT(y_t | ablated), 0)``), ``"two_sided"`` (its absolute
            value) or ``"distribution"`` (``KL(pT(. | clean) || pT(. | ablated))`` at the position).

    The last four matter only for ``method="va_opd"`` and are checked whatever the method; with
    ``"opd"``, ``va`` only chooses what the ``va`` statistic reports (when an ablated view is given).
    Invalid values raise ``ValueError`` naming the field.
    """

    method: str = "va_opd"
    kl_estimator: str = "full"
    weight_temperature: float = 1.0
    high_fraction: float = 0.2
    high_weight: float = 0.5
    va: str = "sampled"

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"LossSpec.method must be one of {METHODS}, got {self.method!r}")
        if self.kl_estimator not in KL_ESTIMATORS:
            raise ValueError(f"LossSpec.kl_estimator must be one of {KL_ESTIMATORS}, got {self.kl_estimator!r}")
        check_temperature(self.weight_temperature, "LossSpec.weight_temperature")
        check_high_fraction(self.high_fraction, "LossSpec.high_fraction")
        check_high_weight(self.high_weight, "LossSpec.high_weight")
        check_va_estimator(self.va, "LossSpec.va")
