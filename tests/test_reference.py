import pytest
import torch

from vaopd.kernels import LossSpec, va_opd_loss_reference
from vaopd.objective import loss_coefficients

from helpers import make_inputs


def test_two_token_vocabulary_kl_is_analytic():
    # Student logits (0, log 3) -> p = (1/4, 3/4); teacher logits (0, 0) -> q = (1/2, 1/2).
    sh = torch.tensor([[[1.0]]], requires_grad=True)
    sw = torch.tensor([[0.0], [torch.log(torch.tensor(3.0))]], requires_grad=True)
    th = torch.tensor([[[1.0]]])
    tw = torch.zeros(2, 1)
    loss, stats = va_opd_loss_reference(
        sh, sw, th, None, tw, torch.tensor([[1]]), torch.ones(1, 1, dtype=torch.bool),
        torch.zeros(1, dtype=torch.long), spec=LossSpec(method="opd"),
    )
    expected = 0.25 * torch.log(torch.tensor(0.5)) + 0.75 * torch.log(torch.tensor(1.5))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert stats["student_logp"].item() == pytest.approx(torch.log(torch.tensor(0.75)).item(), rel=1e-6)
    assert stats["teacher_logp"].item() == pytest.approx(torch.log(torch.tensor(0.5)).item(), rel=1e-6)
    assert torch.isnan(stats["teacher_ablated_logp"]).all() and (stats["va"] == 0).all()


def test_stats_are_masked_and_coefficients_match_objective():
    inputs = make_inputs()
    loss, stats = va_opd_loss_reference(**inputs)
    mask = inputs["mask"]
    assert set(stats) == {"kl", "va", "coef", "student_logp", "teacher_logp", "teacher_ablated_logp"}
    for name, x in stats.items():
        assert x.shape == mask.shape and x.dtype == torch.float32 and not x.requires_grad, name
        assert (x[~mask] == 0).all(), name
    assert (stats["kl"][mask] >= -1e-6).all()
    expected_va = (stats["teacher_logp"] - stats["teacher_ablated_logp"]).clamp_min(0) * mask
    assert torch.allclose(stats["va"], expected_va)
    assert torch.allclose(stats["coef"], loss_coefficients("va_opd", stats["va"], mask, inputs["group_ids"]))
    assert loss.item() == pytest.approx((stats["coef"] * stats["kl"]).sum().item() / 2, rel=1e-6)


def test_gradients_reach_student_only_and_match_float64():
    inputs = make_inputs(vs=23, vt=21, v=19, seed=3)
    inputs["teacher_hidden"].requires_grad_()
    loss, stats = va_opd_loss_reference(**inputs, vocab_size=19)
    loss.backward()
    assert inputs["teacher_hidden"].grad is None or (inputs["teacher_hidden"].grad == 0).all()

    # Independent float64 computation with the coefficients held fixed.
    sh = inputs["student_hidden"].detach().double().requires_grad_()
    sw = inputs["student_weight"].detach().double().requires_grad_()
    ls = torch.log_softmax(sh @ sw[:19].T, -1)
    lt = torch.log_softmax(inputs["teacher_hidden"].detach().double() @ inputs["teacher_weight"].double()[:19].T, -1)
    kl = (ls.exp() * (ls - lt)).sum(-1)
    loss64 = (stats["coef"].double() * kl * inputs["mask"]).sum() / 2
    loss64.backward()
    assert loss.item() == pytest.approx(loss64.item(), rel=1e-5)
    torch.testing.assert_close(inputs["student_hidden"].grad, sh.grad.float(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(inputs["student_weight"].grad, sw.grad.float(), rtol=1e-4, atol=1e-6)
    assert (inputs["student_weight"].grad[19:] == 0).all()


def test_padded_heads_ignore_padding_rows():
    inputs = make_inputs(v=19, seed=4)
    loss, stats = va_opd_loss_reference(**inputs)
    padded = dict(inputs)
    padded["student_weight"] = torch.cat([inputs["student_weight"].detach(), 50 * torch.randn(5, 8)]).requires_grad_()
    padded["teacher_weight"] = torch.cat([inputs["teacher_weight"], 50 * torch.randn(3, 12)])
    loss_p, stats_p = va_opd_loss_reference(**padded, vocab_size=19)
    assert loss_p.item() == pytest.approx(loss.item(), rel=1e-6)
    for k in stats:
        torch.testing.assert_close(stats_p[k], stats[k], equal_nan=True)


def test_fully_masked_rows_contribute_zero():
    inputs = make_inputs(b=4, seed=5)
    inputs["mask"][1] = False
    inputs["tokens"][1] = -100  # padding ids are never looked at
    loss, stats = va_opd_loss_reference(**inputs)
    assert torch.isfinite(loss)
    loss.backward()
    assert (inputs["student_hidden"].grad[1] == 0).all()
    # The half-masked group {0, 1} keeps response 0 alone: it gets the whole group weight.
    assert stats["coef"][0].sum().item() == pytest.approx(1.0)


def test_sampled_estimator_value_and_policy_gradient():
    inputs = make_inputs(seed=6)
    loss, stats = va_opd_loss_reference(**inputs, spec=LossSpec(kl_estimator="sampled"))
    k = stats["student_logp"] - stats["teacher_logp"]
    torch.testing.assert_close(stats["kl"], k * inputs["mask"])
    assert loss.item() == pytest.approx((stats["coef"] * k).sum().item() / 2, rel=1e-5)
    loss.backward()
    g_sampled = inputs["student_hidden"].grad.clone()
    # The gradient is sum c k grad(log pS(y)) / P.
    sh = inputs["student_hidden"].detach().requires_grad_()
    lp = torch.log_softmax(sh @ inputs["student_weight"].detach().T, -1).gather(-1, inputs["tokens"][..., None]).squeeze(-1)
    ((stats["coef"] * k * lp).sum() / 2).backward()
    torch.testing.assert_close(g_sampled, sh.grad)


def test_opd_method_and_num_prompts():
    inputs = make_inputs(seed=7)
    loss, stats = va_opd_loss_reference(**inputs, spec=LossSpec(method="opd"))
    mask = inputs["mask"]
    per_response = (stats["kl"] * mask).sum(1) / mask.sum(1)
    assert loss.item() == pytest.approx(per_response.mean().item(), rel=1e-5)
    loss4, _ = va_opd_loss_reference(**inputs, spec=LossSpec(method="opd"), num_prompts=4)
    assert loss4.item() == pytest.approx(loss.item() / 2, rel=1e-6)


def test_each_group_of_coefficients_sums_to_one():
    inputs = make_inputs(b=3, t=5, groups=torch.tensor([0, 0, 1]), seed=8)
    inputs["mask"] = torch.tensor([[1] * 5, [1] * 5, [1, 0, 0, 0, 0]]).bool()
    loss, stats = va_opd_loss_reference(**inputs)
    assert stats["coef"][:2].sum().item() == pytest.approx(1.0, rel=1e-6)
    assert stats["coef"][2].sum().item() == pytest.approx(1.0, rel=1e-6)
    assert loss.item() == pytest.approx((stats["coef"] * stats["kl"]).sum().item() / 2, rel=1e-6)


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(spec="opd"), "spec must be a vaopd.kernels.LossSpec"),
        (dict(teacher_ablated_hidden=None), "teacher_ablated_hidden is required"),
        (dict(tokens=torch.full((4, 7), 19)), "tokens holds id 19"),
        (dict(tokens=torch.zeros(4, 7)), "tokens must be an int64"),
        (dict(mask=torch.ones(4, 6, dtype=torch.bool)), "mask must be"),
        (dict(group_ids=torch.zeros(3, dtype=torch.long)), "group_ids"),
        (dict(student_hidden=torch.zeros(4, 7, 9)), "student_hidden has hidden size 9"),
        (dict(teacher_hidden=torch.zeros(4, 6, 12)), "teacher_hidden"),
        (dict(teacher_weight=torch.zeros(20, 12)), "LM-head widths differ"),
        (dict(vocab_size=40), "vocab_size 40 exceeds"),
        (dict(num_prompts=0), "num_prompts"),
        (dict(student_weight=torch.zeros(19, 8, dtype=torch.long)), "student_weight must be a floating-point"),
        (dict(student_weight=torch.zeros(19, 8, dtype=torch.float64)), "same dtype"),
    ],
)
def test_errors_name_the_argument(change, match):
    inputs = make_inputs()
    inputs.update(change)
    kwargs = {k: inputs.pop(k) for k in list(inputs) if k in ("spec", "vocab_size", "num_prompts")}
    with pytest.raises(ValueError, match=match):
        va_opd_loss_reference(**inputs, **kwargs)
