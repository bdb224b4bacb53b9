"""The fused loss and its building blocks against the reference, on both backends.

The Triton backend runs under ``TRITON_INTERPRET=1`` on a CPU (set by the root conftest), so
shapes stay small: a vocabulary of 1,031 (prime, not a multiple of any block) with padded heads.
"""
import os

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from helpers import clone_inputs, make_inputs, run_both
from vaopd.kernels import LossSpec, fused_linear_logprobs, fused_linear_reverse_kl, va_opd_loss, va_opd_loss_reference

BACKENDS = ["torch", "triton"]
V, VS, VT = 1031, 1040, 1035
# fp32 must match tightly; half precision rounds the logits chunks, so compare loosely.
TOL = {torch.float32: dict(rtol=1e-4, atol=1e-5), torch.bfloat16: dict(rtol=3e-2, atol=3e-2), torch.float16: dict(rtol=1e-2, atol=1e-2)}


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


def assert_matches(fused, ref, dtype):
    (loss, stats, fin), (ref_loss, ref_stats, rin) = fused, ref
    assert loss.dtype == torch.float32 and loss.shape == ()
    tol = TOL[dtype]
    torch.testing.assert_close(loss, ref_loss, **tol)
    assert set(stats) == set(ref_stats)
    for key in ref_stats:
        assert stats[key].shape == ref_stats[key].shape and stats[key].dtype == torch.float32, key
        torch.testing.assert_close(stats[key], ref_stats[key], equal_nan=True, **tol, msg=lambda m: f"{key}: {m}")
    for key in ("student_hidden", "student_weight"):
        g, rg = fin[key].grad, rin[key].grad
        assert g.dtype == rg.dtype == dtype and g.shape == rg.shape
        if dtype == torch.float32:
            torch.testing.assert_close(g, rg, rtol=1e-4, atol=1e-6)
        else:
            assert rel_err(g, rg) < 3e-2, key


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", ["va_opd", "opd"])
@pytest.mark.parametrize("kl_estimator", ["full", "sampled"])
def test_matches_reference_fp32(backend, method, kl_estimator):
    inputs = make_inputs(b=5, t=11, ds=16, dt=24, v=V, vs=VS, vt=VT, groups=torch.tensor([0, 0, 1, 1, 2]), seed=11)
    inputs["mask"][3] = False  # an all-masked row
    fused, ref = run_both(inputs, vocab_size=V, spec=LossSpec(method=method, kl_estimator=kl_estimator), backend=backend, chunk_size=16)
    assert_matches(fused, ref, torch.float32)
    assert (fused[2]["student_hidden"].grad[3] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_matches_reference_half_precision(backend, dtype):
    inputs = make_inputs(b=4, t=9, ds=32, dt=48, v=V, vs=VS, vt=VT, dtype=dtype, seed=12, scale=0.3)
    fused, ref = run_both(inputs, vocab_size=V, backend=backend, chunk_size=12)
    assert_matches(fused, ref, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_prime_token_count_one_chunk_and_many(backend):
    inputs = make_inputs(b=1, t=29, ds=16, dt=8, v=V, vs=VS, vt=VT, groups=torch.tensor([4]), seed=13)
    inputs["mask"][:] = True
    for chunk in (7, 64):
        fused, ref = run_both(inputs, vocab_size=V, backend=backend, chunk_size=chunk)
        assert_matches(fused, ref, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sharp_distributions_against_float64(backend):
    # Logits in the hundreds: the online log-sum-exp must rescale its running sums without
    # overflow, and the KL must be accurate enough for the gradient (which depends on it).
    inputs = make_inputs(b=2, t=6, ds=16, dt=16, v=V, seed=14, scale=8.0)
    fused_in = clone_inputs(inputs)
    loss, stats = va_opd_loss(**fused_in, backend=backend, chunk_size=5)
    loss.backward()
    sh = inputs["student_hidden"].detach().double().requires_grad_()
    ls = torch.log_softmax(sh @ inputs["student_weight"].detach().double().T, -1)
    lt = torch.log_softmax(inputs["teacher_hidden"].double() @ inputs["teacher_weight"].double().T, -1)
    kl = (ls.exp() * (ls - lt)).sum(-1) * inputs["mask"]
    (stats["coef"].double() * kl).sum().backward()
    torch.testing.assert_close(stats["kl"].double(), kl, rtol=1e-5, atol=1e-4)
    assert rel_err(fused_in["student_hidden"].grad, sh.grad) < 2e-4


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_rows_masked_gives_zero_loss_and_gradients(backend):
    inputs = make_inputs(b=2, t=5, v=V, seed=15)
    inputs["mask"][:] = False
    loss, stats = va_opd_loss(**inputs, backend=backend)
    loss.backward()
    assert loss.item() == 0.0
    assert (inputs["student_hidden"].grad == 0).all() and (inputs["student_weight"].grad == 0).all()
    assert all(torch.isfinite(x).all() for k, x in stats.items() if k != "teacher_ablated_logp")


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_linear_logprobs(backend):
    g = torch.Generator().manual_seed(16)
    hidden = torch.randn(3, 7, 16, generator=g, requires_grad=True)
    weight = torch.randn(VS, 16, generator=g, requires_grad=True)
    tokens = torch.randint(0, V, (3, 7), generator=g)
    logp, lse = fused_linear_logprobs(hidden, weight, tokens, V, backend=backend, chunk_size=8)
    g_logp, g_lse = torch.randn(3, 7, generator=g), torch.randn(3, 7, generator=g)
    ((logp * g_logp).sum() + (lse * g_lse).sum()).backward()

    h2, w2 = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    logits = h2 @ w2[:V].T
    ref_lse = torch.logsumexp(logits, -1)
    ref_logp = logits.gather(-1, tokens[..., None]).squeeze(-1) - ref_lse
    ((ref_logp * g_logp).sum() + (ref_lse * g_lse).sum()).backward()
    torch.testing.assert_close(logp, ref_logp.float())
    torch.testing.assert_close(lse, ref_lse.float())
    torch.testing.assert_close(hidden.grad, h2.grad.float(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(weight.grad, w2.grad.float(), rtol=1e-4, atol=1e-5)
    assert (weight.grad[V:] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_linear_reverse_kl(backend):
    g = torch.Generator().manual_seed(17)
    sh = torch.randn(13, 16, generator=g, requires_grad=True)
    sw = torch.randn(VS, 16, generator=g, requires_grad=True)
    th, tw = torch.randn(13, 24, generator=g), torch.randn(VT, 24, generator=g)
    coef = torch.rand(13, generator=g)
    loss, kl = fused_linear_reverse_kl(sh, sw, th, tw, coef, V, backend=backend, chunk_size=6)
    loss.backward()

    s2, w2 = sh.detach().double().requires_grad_(), sw.detach().double().requires_grad_()
    ls = torch.log_softmax(s2 @ w2[:V].T, -1)
    lt = torch.log_softmax(th.double() @ tw[:V].double().T, -1)
    ref_kl = (ls.exp() * (ls - lt)).sum(-1)
    (coef.double() * ref_kl).sum().backward()
    torch.testing.assert_close(kl, ref_kl.float(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(loss, (coef.double() * ref_kl).sum().float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sh.grad, s2.grad.float(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(sw.grad, w2.grad.float(), rtol=1e-4, atol=1e-5)
    assert not kl.requires_grad


def test_backward_runs_once_and_scales_with_the_upstream_gradient():
    inputs = make_inputs(v=V, seed=18)
    loss, _ = va_opd_loss(**clone_inputs(inputs))
    twice = clone_inputs(inputs)
    loss2, _ = va_opd_loss(**twice)
    (3.0 * loss2).backward(retain_graph=True)
    once = clone_inputs(inputs)
    loss1, _ = va_opd_loss(**once)
    loss1.backward()
    torch.testing.assert_close(twice["student_weight"].grad, 3.0 * once["student_weight"].grad)
    with pytest.raises(RuntimeError, match="backward can run only once"):
        loss2.backward()


def test_no_grad_forward_and_teacher_gets_no_gradient():
    inputs = make_inputs(v=V, seed=19)
    inputs["teacher_hidden"].requires_grad_()
    with torch.no_grad():
        loss_ng, _ = va_opd_loss(**clone_inputs(inputs))
    loss, _ = va_opd_loss(**inputs)
    loss.backward()
    assert inputs["teacher_hidden"].grad is None
    torch.testing.assert_close(loss_ng, loss)


class _LargestTensor(TorchDispatchMode):
    """Records the size in bytes of the largest tensor any op returns (the Triton interpreter's
    byte views of argument storage included)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for x in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(x, torch.Tensor):
                self.largest = max(self.largest, x.numel() * x.element_size())
        return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kl_estimator", ["full", "sampled"])
@pytest.mark.parametrize("method, t, path", [("va_opd", 40, "two-phase"), ("va_opd", 8, "one pass"), ("opd", 40, "one pass")])
def test_never_allocates_tokens_by_vocab(backend, kl_estimator, method, t, path, caplog):
    # Sibling pairs of 2 x 40 tokens exceed the 16-row chunk (VA-OPD's two phases); pairs of
    # 2 x 8 fit it (one pass); OPD always takes one pass.
    n_tokens, chunk = 6 * t, 16
    inputs = make_inputs(b=6, t=t, ds=8, dt=8, v=V, seed=20)
    inputs["mask"][:] = True
    caplog.set_level("DEBUG", logger="vaopd.kernels.va_opd")
    with _LargestTensor() as mode:
        loss, _ = va_opd_loss(**inputs, spec=LossSpec(method=method, kl_estimator=kl_estimator), backend=backend, chunk_size=chunk)
        loss.backward()
    if method == "va_opd":
        assert path in caplog.text
    # One fp32 chunk of logits at most; tokens x vocab in fp32 would be 15 times more.
    assert mode.largest <= chunk * VS * 4, f"a tensor of {mode.largest} bytes (tokens x vocab x 4 = {n_tokens * V * 4})"
    # The probe does see a [tokens x vocab] tensor where one exists: in the reference.
    with _LargestTensor() as ref_mode:
        va_opd_loss_reference(**clone_inputs(inputs), spec=LossSpec(method=method, kl_estimator=kl_estimator))
    assert ref_mode.largest >= n_tokens * V * 4


@pytest.mark.parametrize(
    "change, kwargs, match",
    [
        ({}, dict(backend="cuda"), "backend must be one of"),
        ({}, dict(chunk_size=0), "chunk_size"),
        (dict(tokens=torch.full((4, 7), V)), {}, f"tokens holds id {V}"),
        (dict(student_hidden=torch.zeros(4, 7, 8, dtype=torch.int32)), {}, "student_hidden must be a floating-point"),
        (dict(teacher_hidden=torch.zeros(4, 7, 12, device="meta")), {}, "teacher_hidden is on meta"),
        (dict(teacher_ablated_hidden=torch.zeros(4, 7, 11)), {}, "teacher_ablated_hidden"),
    ],
)
def test_errors_name_the_argument(change, kwargs, match):
    inputs = make_inputs(v=V)
    inputs.update(change)
    with pytest.raises(ValueError, match=match):
        va_opd_loss(**inputs, **kwargs)


def test_triton_backend_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        va_opd_loss(**make_inputs(v=V), backend="triton")


def test_building_block_errors():
    h, w = torch.randn(3, 8), torch.randn(V, 8)
    with pytest.raises(ValueError, match="tokens must have shape"):
        fused_linear_logprobs(h, w, torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="coef must be"):
        fused_linear_reverse_kl(h, w, h, w, torch.ones(4))
    with pytest.raises(ValueError, match="hidden has hidden size 8"):
        fused_linear_logprobs(h, torch.randn(V, 9), torch.zeros(3, dtype=torch.long))


def test_interpreter_is_on_for_cpu_runs():
    if not torch.cuda.is_available():
        assert os.environ.get("TRITON_INTERPRET") == "1"


@pytest.mark.parametrize("backend", BACKENDS)
def test_tiny_coefficients_keep_fp16_gradients_accurate_under_loss_scaling(backend):
    # Realistic coefficients 1 / (K L P) ~ 4e-6 lie below fp16's normal range (6e-5).
    g = torch.Generator().manual_seed(21)
    sh = torch.randn(24, 32, generator=g).half().requires_grad_()
    sw = (0.3 * torch.randn(V, 32, generator=g)).half().requires_grad_()
    th, tw = torch.randn(24, 32, generator=g).half(), (0.3 * torch.randn(V, 32, generator=g)).half()
    coef = torch.full((24,), 4e-6)
    coef[::3] = 1.6e-5
    loss, _ = fused_linear_reverse_kl(sh, sw, th, tw, coef, backend=backend, chunk_size=8)
    scale = 2.0**16  # the gradients (~1e-7) need a loss scale in fp16, as in any fp16 training
    (loss * scale).backward()
    s2, w2 = sh.detach().double().requires_grad_(), sw.detach().double().requires_grad_()
    ls = torch.log_softmax(s2 @ w2.T, -1)
    lt = torch.log_softmax(th.double() @ tw.double().T, -1)
    (coef.double() * (ls.exp() * (ls - lt)).sum(-1)).sum().backward()
    assert rel_err(sw.grad.float() / scale, w2.grad) < 5e-3
    assert rel_err(sh.grad.float() / scale, s2.grad) < 5e-3
