"""The three visual-advantage estimators (``LossSpec.va``): their definitions in the reference,
and the fused loss against the reference on both backends, both layouts, odd shapes, half
precision, masked rows; the products they cost and the loop's freedom from device waits.

``sampled`` is the paper's ``max(log pT(y | clean) - log pT(y | ablated), 0)``, ``two_sided`` its
absolute value, ``distribution`` ``KL(pT(. | clean) || pT(. | ablated))`` per position.
"""
import logging

import pytest
import torch

from helpers import clone_inputs, make_inputs
from test_kernels_nosync import SyncDetector
from test_kernels_onepass import V, grouped_inputs, matches_reference, path_of, products
import vaopd.kernels.va_opd as va_opd_module
from vaopd.kernels import LossSpec, va_opd_loss, va_opd_loss_reference
from vaopd.kernels.objective import VA_ESTIMATORS, loss_coefficients, visual_advantage

BACKENDS = ["torch", "triton"]


def teacher_views(inputs, vocab):
    """Full fp32 log-softmaxes ``[B, T, V]`` of both teacher views (the test's own computation)."""
    w = inputs["teacher_weight"][:vocab].float()
    return [torch.log_softmax(inputs[k].float() @ w.T, -1) for k in ("teacher_hidden", "teacher_ablated_hidden")]


# ---------------------------------------------------------------------------------------------
# Definitions
# ---------------------------------------------------------------------------------------------


def test_visual_advantage_estimators_by_definition():
    clean = torch.tensor([[-1.0, -3.0, -2.0], [-0.5, -4.0, 0.0]])
    ablated = torch.tensor([[-2.0, -1.0, -2.0], [-0.5, -1.5, 0.0]])
    divergence = torch.tensor([[0.3, 0.0, -1e-8], [2.0, 0.7, 9.0]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    assert visual_advantage(clean, ablated, mask).tolist() == [[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]]
    assert visual_advantage(clean, ablated, mask, "two_sided").tolist() == [[1.0, 2.0, 0.0], [0.0, 2.5, 0.0]]
    # The KL itself, rounding below 0 removed, zero outside the mask.
    torch.testing.assert_close(visual_advantage(clean, ablated, mask, "distribution", divergence),
                               torch.tensor([[0.3, 0.0, 0.0], [2.0, 0.7, 0.0]]))


def test_visual_advantage_estimator_errors():
    z, mask = torch.zeros(2, 3), torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="estimator must be one of"):
        visual_advantage(z, z, mask, "clipped")
    with pytest.raises(ValueError, match="needs divergence"):
        visual_advantage(z, z, mask, "distribution")
    with pytest.raises(ValueError, match="divergence has a non-finite value inside mask"):
        visual_advantage(z, z, mask, "distribution", torch.tensor([[0.0, float("nan"), 0.0], [0.0] * 3]))
    with pytest.raises(ValueError, match="LossSpec.va must be one of"):
        LossSpec(va="kl")
    assert LossSpec().va == "sampled"


@pytest.mark.parametrize("estimator", VA_ESTIMATORS)
def test_reference_va_and_coefficients_follow_the_definition(estimator):
    inputs = make_inputs(b=6, t=9, v=23, vs=27, vt=29, seed=4, scale=2.0)
    clean, ablated = teacher_views(inputs, 23)
    index = torch.where(inputs["mask"], inputs["tokens"], 0)[..., None]
    c, a = clean.gather(-1, index)[..., 0], ablated.gather(-1, index)[..., 0]
    expected = {"sampled": (c - a).clamp_min(0), "two_sided": (c - a).abs(),
                "distribution": (clean.exp() * (clean - ablated)).sum(-1).clamp_min(0)}[estimator]
    expected = torch.where(inputs["mask"], expected, 0.0)
    _, stats = va_opd_loss_reference(**inputs, spec=LossSpec(va=estimator), vocab_size=23)
    torch.testing.assert_close(stats["va"], expected, rtol=1e-5, atol=1e-6)
    # Everything downstream is the paper's, on this VA.
    torch.testing.assert_close(stats["coef"], loss_coefficients("va_opd", expected, inputs["mask"], inputs["group_ids"]))
    # The estimators differ on these inputs (so the comparisons below can tell them apart).
    others = [va_opd_loss_reference(**inputs, spec=LossSpec(va=e), vocab_size=23)[1]["coef"] for e in VA_ESTIMATORS if e != estimator]
    assert all((stats["coef"] - o).abs().max() > 1e-3 for o in others)


# ---------------------------------------------------------------------------------------------
# The fused loss against the reference
# ---------------------------------------------------------------------------------------------

LAYOUTS = {
    # Groups of 9, 4, 13 and 6 valid tokens in chunks of 16: packed as [9 + 4], [13], [6].
    "one_pass": dict(groups=[0, 0, 1, 2, 2, 2, 3], lengths=[5, 4, 4, 6, 1, 6, 6], chunk=16, path="one pass"),
    # A fully masked response; group 1 (14 tokens) exceeds a chunk of 10.
    "two_phase": dict(groups=[0, 1, 1, 2, 3], lengths=[4, 8, 6, 5, 0], chunk=10, path="two-phase"),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("kl_estimator", ["full", "sampled"])
@pytest.mark.parametrize("estimator", ["two_sided", "distribution"])
def test_fused_matches_reference(backend, layout, kl_estimator, estimator, caplog):
    spec = LAYOUTS[layout]
    inputs = grouped_inputs(spec["groups"], seed=11, lengths=spec["lengths"], scale=2.0)
    with caplog.at_level(logging.DEBUG, logger="vaopd.kernels.va_opd"):
        stats = matches_reference(inputs, spec=LossSpec(kl_estimator=kl_estimator, va=estimator), backend=backend,
                                  chunk_size=spec["chunk"], vocab_size=V)
    assert path_of(caplog) == spec["path"]
    assert (stats["va"][~inputs["mask"]] == 0).all() and (stats["va"][inputs["mask"]] > 0).any()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kl_estimator", ["full", "sampled"])
def test_opd_reports_the_chosen_va(backend, kl_estimator):
    # OPD's coefficients ignore the VA; with an ablated view its `va` statistic is the chosen estimator's.
    inputs = grouped_inputs([0, 0, 1, 1], seed=2, lengths=[3, 7, 5, 8])
    stats = matches_reference(inputs, spec=LossSpec(method="opd", kl_estimator=kl_estimator, va="distribution"),
                              backend=backend, chunk_size=8, vocab_size=V)
    opd = va_opd_loss(**clone_inputs(inputs), spec=LossSpec(method="opd"), backend=backend, chunk_size=8)[1]
    torch.testing.assert_close(stats["coef"], opd["coef"])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("estimator", VA_ESTIMATORS)
@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 64])
def test_odd_shapes_and_tiny_chunks(backend, estimator, chunk):
    # Responses of 13 and 4 valid tokens (17 rows, a prime) and a padding response, a vocabulary
    # of 1031 (prime: no multiple of any block) in padded heads (1036 and 1040 rows), student and
    # teacher of different widths; chunks of 1 to 7 rows (the view buffers' halves at their
    # smallest; the two phases) and one holding everything (one pass).
    inputs = make_inputs(b=3, t=13, ds=8, dt=12, v=V, vs=V + 5, vt=V + 9, groups=torch.tensor([5, 9, 5]), seed=13, scale=2.0)
    inputs["mask"] = torch.arange(13)[None, :] < torch.tensor([13, 0, 4])[:, None]
    matches_reference(inputs, spec=LossSpec(va=estimator), backend=backend, chunk_size=chunk, vocab_size=V)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("estimator", ["two_sided", "distribution"])
@pytest.mark.parametrize("chunk", [24, 9])  # one pass; two phases (a group of 16 tokens)
def test_bf16_matches_reference(backend, estimator, chunk):
    inputs = grouped_inputs([1, 0, 1, 0, 2], t=9, d=32, seed=5, lengths=[9, 4, 7, 2, 9], scale=0.6)
    inputs = {k: (v.to(torch.bfloat16) if v.is_floating_point() else v) for k, v in inputs.items()}
    for key in ("student_hidden", "student_weight"):
        inputs[key] = inputs[key].detach().requires_grad_()
    fused_in, ref_in = clone_inputs(inputs), clone_inputs(inputs)
    loss, stats = va_opd_loss(**fused_in, spec=LossSpec(va=estimator), backend=backend, chunk_size=chunk)
    loss.backward()
    ref_loss, ref_stats = va_opd_loss_reference(**ref_in, spec=LossSpec(va=estimator))
    ref_loss.backward()
    torch.testing.assert_close(loss, ref_loss, rtol=3e-2, atol=3e-2)
    for key in ("va", "coef", "kl"):
        torch.testing.assert_close(stats[key], ref_stats[key], rtol=3e-2, atol=3e-2, msg=lambda m: f"{key}: {m}")
    for key in ("student_hidden", "student_weight"):
        g, rg = fused_in[key].grad.float(), ref_in[key].grad.float()
        assert ((g - rg).norm() / rg.norm()).item() < 3e-2, key


def test_one_pass_and_two_phases_agree_on_the_distribution_va():
    inputs = grouped_inputs([3, 1, 3, 1, 0, 0], lengths=[8, 3, 6, 8, 2, 5], seed=7, scale=2.0)
    one, two = clone_inputs(inputs), clone_inputs(inputs)
    spec = LossSpec(va="distribution")
    loss1, stats1 = va_opd_loss(**one, spec=spec, backend="torch", chunk_size=16)
    loss2, stats2 = va_opd_loss(**two, spec=spec, backend="torch", chunk_size=13)
    torch.testing.assert_close(loss1, loss2)
    for key in stats1:
        torch.testing.assert_close(stats1[key], stats2[key], equal_nan=True)


# ---------------------------------------------------------------------------------------------
# Cost: LM-head products, device waits
# ---------------------------------------------------------------------------------------------

COUNT_INPUTS = dict(groups=[0, 0, 1, 1, 2, 2], lengths=[8, 5, 7, 8, 3, 6])


@pytest.mark.parametrize("estimator", VA_ESTIMATORS)
@pytest.mark.parametrize(
    "method, kl_estimator, chunk, expected",
    [
        ("va_opd", "full", 16, 5), ("va_opd", "sampled", 16, 5),  # one pass
        ("va_opd", "full", 12, 6), ("va_opd", "sampled", 12, 5),  # two phases (a group of 15 tokens)
        ("opd", "full", 16, 5), ("opd", "sampled", 16, 5),  # with the ablated view, for the VA stats
    ],
)
def test_lm_head_products_are_the_same_for_every_estimator(estimator, method, kl_estimator, chunk, expected):
    count, _ = products(grouped_inputs(**COUNT_INPUTS), spec=LossSpec(method=method, kl_estimator=kl_estimator, va=estimator),
                        chunk_size=chunk)
    assert count == pytest.approx(expected, abs=1e-3)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kl_estimator", ["full", "sampled"])
@pytest.mark.parametrize("estimator", ["two_sided", "distribution"])
def test_the_one_pass_loop_never_waits_on_the_device(monkeypatch, backend, dtype, kl_estimator, estimator):
    detector, inner = SyncDetector(), va_opd_module.distill_forward

    def watched(*args, **kwargs):
        with detector:
            return inner(*args, **kwargs)

    monkeypatch.setattr(va_opd_module, "distill_forward", watched)
    inputs = make_inputs(b=8, t=8, ds=16, dt=16, v=211, groups=torch.tensor([0, 2, 0, 1, 2, 2, 3, 1]), dtype=dtype, seed=3)
    inputs["mask"] = torch.arange(8)[None, :] < torch.tensor([5, 4, 4, 0, 1, 8, 6, 4])[:, None]
    inputs = clone_inputs(inputs)
    loss, _ = va_opd_loss(**inputs, spec=LossSpec(kl_estimator=kl_estimator, va=estimator), backend=backend, chunk_size=16)
    loss.backward()
    assert detector.ops > 0 and detector.syncs == []
