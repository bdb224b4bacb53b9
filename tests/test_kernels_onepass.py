"""The fused loss's layouts and its product count: whole sibling groups packed into chunks (one
pass), the two-phase fallback, OPD without a teacher phase, and only the gradients wanted.

Products are counted by dispatch over the matrix-product ops (``torch.utils.flop_counter`` misses
the in-place ``addmm_`` of the weight-gradient accumulation), in units of one ``2 N V D`` product
with equal student and teacher hidden sizes. The Triton backend runs under the interpreter (root
conftest): shapes stay small.
"""
import logging

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from helpers import clone_inputs, make_inputs, run_both
from vaopd.kernels import LossSpec, fused_linear_logprobs, fused_linear_reverse_kl, torch_ops, triton_ops, va_opd_loss, va_opd_loss_reference
from vaopd.kernels.va_opd import pack_groups

BACKENDS = ["torch", "triton"]
V = 1031
aten = torch.ops.aten
# Every matrix-product op torch may dispatch to; mm/addmm/addmm_ are the ones the loss uses.
MATMULS = {aten.mm, aten.matmul, aten.addmm, aten.addmm_, aten.bmm, aten.baddbmm, aten.addbmm, aten.mv, aten.addmv, aten.dot, aten.vdot}


class ProductCounter(TorchDispatchMode):
    """Sum of matrix-product FLOPs (``2 m n k`` per ``[m, k] @ [k, n]``) of the ops dispatched,
    and the fp32 tensors of a given shape created (the weight-gradient accumulator)."""

    def __init__(self, watch_shape=None):
        super().__init__()
        self.flops = 0
        self.watch_shape = watch_shape
        self.watched = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        packet = func.overloadpacket
        if packet in (aten.mm, aten.matmul):  # matmul reaches a mode undecomposed under inference_mode
            assert args[0].dim() == args[1].dim() == 2, f"{func} on {args[0].shape} @ {args[1].shape}"
            self.flops += 2 * args[0].shape[0] * args[0].shape[1] * args[1].shape[1]
        elif packet in (aten.addmm, aten.addmm_):
            self.flops += 2 * args[1].shape[0] * args[1].shape[1] * args[2].shape[1]
        elif packet in (aten.bmm, aten.baddbmm, aten.addbmm):
            a, b = (args[0], args[1]) if packet is aten.bmm else (args[1], args[2])
            self.flops += 2 * a.shape[0] * a.shape[1] * a.shape[2] * b.shape[2]
        elif packet in MATMULS:
            a = args[0] if packet in (aten.mv, aten.dot, aten.vdot) else args[1]
            self.flops += 2 * a.numel()
        out = func(*args, **kwargs)
        if self.watch_shape is not None:
            # New memory only: views and in-place results share an argument's storage.
            inputs = {a.untyped_storage().data_ptr() for a in [*args, *kwargs.values()] if isinstance(a, torch.Tensor)}
            for x in out if isinstance(out, (tuple, list)) else (out,):
                if (isinstance(x, torch.Tensor) and x.dtype == torch.float32 and tuple(x.shape) == self.watch_shape
                        and x.untyped_storage().data_ptr() not in inputs):
                    self.watched += 1
        return out


def grouped_inputs(groups, t=8, d=16, seed=0, lengths=None, scale=1.0):
    """Loss inputs with ``groups`` as group ids, hidden size ``d`` for both models, LM heads ``V``
    wide; ``lengths`` sets each response's valid tokens (default: random, at least 1)."""
    inputs = make_inputs(b=len(groups), t=t, ds=d, dt=d, v=V, groups=torch.tensor(groups), seed=seed, scale=scale)
    if lengths is not None:
        inputs["mask"] = torch.arange(t)[None, :] < torch.tensor(lengths)[:, None]
    return inputs


def products(inputs, grad=True, frozen=(), **kwargs):
    """LM-head products one forward (+ backward when ``grad``) performs, and the fp32 ``[V, D]``
    tensors it creates."""
    inputs = clone_inputs(inputs)
    for key in frozen:
        inputs[key].requires_grad_(False)
    n, d = int(inputs["mask"].sum()), inputs["student_hidden"].shape[-1]
    with ProductCounter(watch_shape=(V, d)) as counter:
        with torch.set_grad_enabled(grad):
            loss, _ = va_opd_loss(**inputs, backend="torch", **kwargs)
            if grad:
                loss.backward()
    return counter.flops / (2 * n * V * d), counter.watched


def matches_reference(inputs, **kwargs):
    """Run the fused loss and the reference (``helpers.run_both``), assert loss, stats and both
    gradients agree, and return the fused stats."""
    (loss, stats, fused_in), (ref_loss, ref_stats, ref_in) = run_both(inputs, **kwargs)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-4, atol=1e-6)
    for key in ref_stats:
        torch.testing.assert_close(stats[key], ref_stats[key], rtol=1e-4, atol=1e-5, equal_nan=True, msg=lambda m: f"{key}: {m}")
    for key in ("student_hidden", "student_weight"):
        torch.testing.assert_close(fused_in[key].grad, ref_in[key].grad, rtol=1e-4, atol=1e-5, msg=lambda m: f"d {key}: {m}")
    return stats


def path_of(caplog):
    text = " ".join(r.getMessage() for r in caplog.records if r.name == "vaopd.kernels.va_opd")
    return "one pass" if "one pass" in text else ("two-phase" if "two-phase" in text else "none")


# ---------------------------------------------------------------------------------------------
# Packing
# ---------------------------------------------------------------------------------------------


def test_pack_groups_keeps_groups_whole_and_first_seen_order():
    lengths = [3, 2, 4, 1, 0, 5]
    ids = [7, 7, 2, 2, 9, 5]
    # group 7: 5 tokens, group 2: 5, group 9: empty (left out), group 5: 5.
    assert pack_groups(lengths, ids, 10) == [[0, 1, 2, 3], [5]]
    assert pack_groups(lengths, ids, 5) == [[0, 1], [2, 3], [5]]
    assert pack_groups(lengths, ids, 4) is None
    # Out-of-order siblings are gathered into their group.
    assert pack_groups([1, 1, 1, 1, 1, 1], [2, 0, 2, 1, 0, 1], 4) == [[0, 2, 1, 4], [3, 5]]
    assert pack_groups([0, 0], [0, 1], 4) == []


# ---------------------------------------------------------------------------------------------
# Against the reference, both backends, the packed and the fallback layouts
# ---------------------------------------------------------------------------------------------

LAYOUTS = {
    # Groups of 9, 4, 13 and 6 valid tokens in chunks of 16: packed as [9 + 4], [13], [6].
    "unequal_groups": dict(groups=[0, 0, 1, 2, 2, 2, 3], lengths=[5, 4, 4, 6, 1, 6, 6], chunk=16, path="one pass"),
    # Siblings scattered through the batch: [2, 0, 2, 1, 0, 1].
    "out_of_order": dict(groups=[2, 0, 2, 1, 0, 1], lengths=[3, 8, 2, 5, 7, 1], chunk=16, path="one pass"),
    # Responses without valid tokens, a whole group of them among them.
    "all_masked_responses": dict(groups=[0, 0, 1, 1, 2, 2], lengths=[4, 0, 0, 0, 7, 3], chunk=12, path="one pass"),
    # Group 1 holds 14 valid tokens, more than a chunk of 10: two phases.
    "group_larger_than_chunk": dict(groups=[0, 1, 1, 2], lengths=[4, 8, 6, 5], chunk=10, path="two-phase"),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("method, kl_estimator", [("va_opd", "full"), ("va_opd", "sampled"), ("opd", "full"), ("opd", "sampled")])
def test_layouts_match_reference(backend, layout, method, kl_estimator, caplog):
    spec = LAYOUTS[layout]
    inputs = grouped_inputs(spec["groups"], seed=len(layout), lengths=spec["lengths"])
    with caplog.at_level(logging.DEBUG, logger="vaopd.kernels.va_opd"):
        stats = matches_reference(inputs, spec=LossSpec(method=method, kl_estimator=kl_estimator), backend=backend, chunk_size=spec["chunk"], vocab_size=V)
    assert path_of(caplog) == (spec["path"] if method == "va_opd" else "none")
    assert (stats["coef"][~inputs["mask"]] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_pass_half_precision_matches_reference(backend):
    inputs = grouped_inputs([1, 0, 1, 0, 2], t=9, d=32, seed=5, lengths=[9, 4, 7, 2, 9], scale=0.3)
    inputs = {k: (v.to(torch.bfloat16) if v.is_floating_point() else v) for k, v in inputs.items()}
    for key in ("student_hidden", "student_weight"):
        inputs[key] = inputs[key].detach().requires_grad_()
    fused_in, ref_in = clone_inputs(inputs), clone_inputs(inputs)
    loss, stats = va_opd_loss(**fused_in, backend=backend, chunk_size=24)
    loss.backward()
    ref_loss, ref_stats = va_opd_loss_reference(**ref_in)
    ref_loss.backward()
    torch.testing.assert_close(loss, ref_loss, rtol=3e-2, atol=3e-2)
    torch.testing.assert_close(stats["kl"], ref_stats["kl"], rtol=3e-2, atol=3e-2)
    for key in ("student_hidden", "student_weight"):
        g, rg = fused_in[key].grad.float(), ref_in[key].grad.float()
        assert ((g - rg).norm() / rg.norm()).item() < 3e-2, key


def test_one_pass_and_two_phases_agree():
    inputs = grouped_inputs([3, 1, 3, 1, 0, 0], lengths=[8, 3, 6, 8, 2, 5], seed=7)
    one, two = clone_inputs(inputs), clone_inputs(inputs)
    loss1, stats1 = va_opd_loss(**one, backend="torch", chunk_size=16)  # groups of 14, 11 and 7 fit
    loss2, stats2 = va_opd_loss(**two, backend="torch", chunk_size=13)  # group 3 (14 tokens) does not
    torch.testing.assert_close(loss1, loss2)
    for key in stats1:
        torch.testing.assert_close(stats1[key], stats2[key], equal_nan=True)
    torch.testing.assert_close(one["student_weight"].grad, two["student_weight"].grad)


# ---------------------------------------------------------------------------------------------
# The product count
# ---------------------------------------------------------------------------------------------

COUNT_INPUTS = dict(groups=[0, 0, 1, 1, 2, 2], lengths=[8, 5, 7, 8, 3, 6])


@pytest.mark.parametrize(
    "method, ablated, grad, frozen, expected",
    [
        ("va_opd", True, True, (), 5),
        ("opd", False, True, (), 4),
        ("va_opd", True, False, (), 3),
        ("opd", False, False, (), 2),
        ("va_opd", True, True, ("student_weight",), 4),
        ("opd", False, True, ("student_weight",), 3),
        ("va_opd", True, True, ("student_hidden",), 4),
        ("opd", False, True, ("student_hidden",), 3),
        ("opd", True, True, (), 5),  # the ablated view, when given, feeds the VA stats
    ],
)
def test_lm_head_products_when_whole_groups_fit_a_chunk(method, ablated, grad, frozen, expected):
    inputs = grouped_inputs(**COUNT_INPUTS)
    if not ablated:
        inputs["teacher_ablated_hidden"] = None
    count, accumulators = products(inputs, grad=grad, frozen=frozen, spec=LossSpec(method=method), chunk_size=16)
    assert count == pytest.approx(expected, abs=1e-3)
    # No fp32 [V, D] weight-gradient accumulator unless the weight gradient is formed.
    assert (accumulators > 0) == (grad and "student_weight" not in frozen)


@pytest.mark.parametrize("kl_estimator, expected", [("full", 6), ("sampled", 5)])
def test_lm_head_products_of_the_two_phase_fallback(kl_estimator, expected):
    inputs = grouped_inputs(**COUNT_INPUTS)
    count, _ = products(inputs, spec=LossSpec(kl_estimator=kl_estimator), chunk_size=12)  # group 1 has 15 tokens
    assert count == pytest.approx(expected, abs=1e-3)


@pytest.mark.parametrize("method, expected", [("va_opd", 5), ("opd", 4)])
def test_lm_head_products_sampled_estimator(method, expected):
    inputs = grouped_inputs(**COUNT_INPUTS)
    if method == "opd":
        inputs["teacher_ablated_hidden"] = None
    count, _ = products(inputs, spec=LossSpec(method=method, kl_estimator="sampled"), chunk_size=16)
    assert count == pytest.approx(expected, abs=1e-3)


def test_inference_mode_forms_no_gradient():
    inputs = clone_inputs(grouped_inputs(**COUNT_INPUTS))
    with ProductCounter(watch_shape=(V, 16)) as counter, torch.inference_mode():
        loss, _ = va_opd_loss(**inputs, backend="torch", chunk_size=16)
    assert not loss.requires_grad
    assert counter.flops / (2 * int(inputs["mask"].sum()) * V * 16) == pytest.approx(3, abs=1e-3)
    assert counter.watched == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_frozen_inputs_get_no_gradient_and_the_rest_is_exact(backend):
    inputs = grouped_inputs(**COUNT_INPUTS)
    ref_in = clone_inputs(inputs)
    ref_loss, _ = va_opd_loss_reference(**ref_in)
    ref_loss.backward()
    for frozen, kept in (("student_weight", "student_hidden"), ("student_hidden", "student_weight")):
        fused_in = clone_inputs(inputs)
        fused_in[frozen].requires_grad_(False)
        loss, _ = va_opd_loss(**fused_in, backend=backend, chunk_size=16)
        loss.backward()
        assert fused_in[frozen].grad is None
        torch.testing.assert_close(fused_in[kept].grad, ref_in[kept].grad, rtol=1e-4, atol=1e-6)


def test_building_blocks_form_only_wanted_gradients():
    g = torch.Generator().manual_seed(3)
    h = torch.randn(12, 16, generator=g, requires_grad=True)
    w = torch.randn(V, 16, generator=g, requires_grad=True)
    th, tw = torch.randn(12, 16, generator=g), torch.randn(V, 16, generator=g)
    tok = torch.randint(0, V, (12,), generator=g)
    unit = 2 * 12 * V * 16

    def count(fn, frozen=None, grad=True):
        hh, ww = h.detach().clone().requires_grad_(frozen != "h"), w.detach().clone().requires_grad_(frozen != "w")
        with ProductCounter(watch_shape=(V, 16)) as counter, torch.set_grad_enabled(grad):
            out = fn(hh, ww)
            if grad:
                out.backward()
        return counter.flops / unit, counter.watched

    def kl(hh, ww):
        return fused_linear_reverse_kl(hh, ww, th, tw, torch.ones(12), backend="torch", chunk_size=8)[0]

    def logp(hh, ww):
        return fused_linear_logprobs(hh, ww, tok, backend="torch", chunk_size=8)[0].sum()

    assert count(kl) == (pytest.approx(4, abs=1e-3), 1)
    assert count(kl, grad=False) == (pytest.approx(2, abs=1e-3), 0)
    assert count(kl, frozen="w") == (pytest.approx(3, abs=1e-3), 0)
    assert count(kl, frozen="h")[0] == pytest.approx(3, abs=1e-3)
    # fused_linear_logprobs recomputes its logits in backward: 1 + 1 + one per wanted gradient.
    assert count(logp) == (pytest.approx(4, abs=1e-3), 1)
    assert count(logp, grad=False) == (pytest.approx(1, abs=1e-3), 0)
    assert count(logp, frozen="w") == (pytest.approx(3, abs=1e-3), 0)


# ---------------------------------------------------------------------------------------------
# The backward contract
# ---------------------------------------------------------------------------------------------


def test_second_backward_and_create_graph_raise():
    inputs = grouped_inputs(**COUNT_INPUTS)
    loss, _ = va_opd_loss(**clone_inputs(inputs), backend="torch")
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward can run only once per forward"):
        loss.backward()
    fresh = clone_inputs(inputs)
    loss, _ = va_opd_loss(**fresh, backend="torch")
    with pytest.raises(RuntimeError, match="create_graph=True"):
        torch.autograd.grad(loss, fresh["student_hidden"], create_graph=True)
    h = torch.randn(5, 16, requires_grad=True)
    w = torch.randn(V, 16, requires_grad=True)
    loss, _ = fused_linear_reverse_kl(h, w, torch.randn(5, 16), torch.randn(V, 16), torch.ones(5), backend="torch")
    with pytest.raises(RuntimeError, match="create_graph=True"):
        torch.autograd.grad(loss, h, create_graph=True)
    logp, _ = fused_linear_logprobs(h, w, torch.zeros(5, dtype=torch.long), backend="torch")
    with pytest.raises(RuntimeError, match="create_graph=True"):
        torch.autograd.grad(logp.sum(), h, create_graph=True)
    # fused_linear_logprobs recomputes in backward: a second backward is exact.
    logp, _ = fused_linear_logprobs(h, w, torch.zeros(5, dtype=torch.long), backend="torch")
    (first,) = torch.autograd.grad(logp.sum(), h, retain_graph=True)
    (second,) = torch.autograd.grad(logp.sum(), h)
    torch.testing.assert_close(first, second)


# ---------------------------------------------------------------------------------------------
# The row op's teacher output
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ops", [torch_ops, triton_ops], ids=["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reverse_kl_returns_the_teachers_logp(ops, dtype):
    g = torch.Generator().manual_seed(9)
    s = (3 * torch.randn(6, V, generator=g)).to(dtype)
    t = (3 * torch.randn(6, V, generator=g)).to(dtype)
    tok = torch.randint(0, V, (6,), generator=g)
    kl, logp, t_logp = (torch.empty(6) for _ in range(3))
    ops.reverse_kl_(s.clone(), t, tok, kl, logp, False, t_logp)
    lt = torch.log_softmax(t.double(), -1)
    torch.testing.assert_close(t_logp, lt.gather(1, tok[:, None]).squeeze(1).float())
    ls = torch.log_softmax(s.double(), -1)
    torch.testing.assert_close(kl, (ls.exp() * (ls - lt)).sum(-1).float(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(logp, ls.gather(1, tok[:, None]).squeeze(1).float())
