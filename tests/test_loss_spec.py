"""``LossSpec``: the objective's settings, checked on construction and used by both losses."""
import dataclasses

import pytest
import torch

from helpers import make_inputs
from vaopd.kernels import LossSpec, va_opd_loss, va_opd_loss_reference


def test_defaults_are_the_papers_objective():
    spec = LossSpec()
    assert (spec.method, spec.kl_estimator, spec.weight_temperature, spec.high_fraction, spec.high_weight) == ("va_opd", "full", 1.0, 0.2, 0.5)
    assert LossSpec(method="opd").method == "opd"
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.method = "opd"


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(method="sft"), r"LossSpec.method must be one of \('va_opd', 'opd'\), got 'sft'"),
        (dict(kl_estimator="k3"), r"LossSpec.kl_estimator must be one of \('full', 'sampled'\)"),
        (dict(weight_temperature=0.0), "LossSpec.weight_temperature must be a finite number > 0"),
        (dict(weight_temperature=float("inf")), "LossSpec.weight_temperature"),
        (dict(high_fraction=0.0), r"LossSpec.high_fraction must be in \(0, 1\]"),
        (dict(high_fraction=1.5), "LossSpec.high_fraction"),
        (dict(high_weight=-0.1), r"LossSpec.high_weight must be in \[0, 1\]"),
        (dict(high_weight="0.5"), "LossSpec.high_weight"),
    ],
)
def test_bad_settings_name_the_field(change, match):
    with pytest.raises(ValueError, match=match):
        LossSpec(**change)


@pytest.mark.parametrize("loss", [va_opd_loss, va_opd_loss_reference])
def test_the_spec_reaches_the_coefficients(loss):
    # Each setting changes the coefficients the way the objective says; a setting ignored by a
    # loss would leave them equal to the default's.
    inputs = make_inputs(b=4, t=9, groups=torch.tensor([0, 0, 1, 1]), seed=5)
    kwargs = {"backend": "torch"} if loss is va_opd_loss else {}

    def coef(**settings):
        with torch.no_grad():
            return loss(**inputs, spec=LossSpec(**settings), **kwargs)[1]["coef"]

    base = coef()
    mask = inputs["mask"]
    opd = coef(method="opd")
    assert torch.allclose(opd.sum(1), torch.full((4,), 0.5))  # 1 / K_g per response
    assert torch.allclose(opd[mask], (1 / (2 * mask.sum(1, keepdim=True).float())).expand_as(mask)[mask])
    hot, cold = coef(weight_temperature=100.0), coef(weight_temperature=0.01)
    assert torch.allclose(hot.sum(1), torch.full((4,), 0.5), atol=2e-2)  # near-uniform weights
    assert not torch.allclose(cold.sum(1), base.sum(1))
    all_high = coef(high_fraction=1.0)
    assert torch.allclose(all_high[mask], (base.sum(1, keepdim=True) / mask.sum(1, keepdim=True)).expand_as(mask)[mask])
    low_only = coef(high_weight=0.0)
    assert ((low_only > 0) == (mask & (coef(high_weight=1.0) == 0))).all()
