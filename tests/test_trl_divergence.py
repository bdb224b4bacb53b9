"""Our fused reverse KL and OPD loss against TRL's ``ChunkedDivergenceFunction`` (``beta=1``).

TRL returns the per-token reverse KL ``KL(pS || pT)`` of softmax(logits / temperature) and leaves
the reduction to its caller (``DistillationTrainer`` divides the sum over valid tokens by their
count). Ours takes per-token coefficients (``fused_linear_reverse_kl``) or computes OPD's
``1 / (K_g L_b P)`` (``va_opd_loss(spec=LossSpec(method="opd"))``), and has no logit temperature
(``va_opd_loss``'s ``temperature`` is the rollout weights'): dividing both hidden states by the
temperature gives ``logits / temperature``. The benchmark's ``trl`` row relies on the same
equivalence (token mean, temperature 1).
"""
import pytest
import torch

from vaopd.kernels import LossSpec, fused_linear_reverse_kl, va_opd_loss

divergence = pytest.importorskip("trl.kernels.chunked_divergence", reason="trl is not installed (pip install -e '.[trl]')")

V, D_S, D_T = 257, 24, 40
LENGTHS = [7, 3, 5, 6]  # valid tokens per response; rows are padded to 7
GROUP_IDS = [0, 0, 1, 1]  # two prompts with two sibling responses each


def make_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    b, t = len(LENGTHS), max(LENGTHS)
    return dict(
        student_hidden=torch.randn(b, t, D_S, generator=g),
        student_weight=torch.randn(V, D_S, generator=g) * D_S**-0.5,
        teacher_hidden=torch.randn(b, t, D_T, generator=g),
        teacher_weight=torch.randn(V, D_T, generator=g) * D_T**-0.5,
        tokens=torch.randint(0, V, (b, t), generator=g),
        mask=torch.arange(t)[None, :] < torch.tensor(LENGTHS)[:, None],
        group_ids=torch.tensor(GROUP_IDS),
    )


def trl_per_token_kl(h_s, w_s, h_t, w_t, temperature=1.0):
    kl, _entropy = divergence.ChunkedDivergenceFunction.apply(h_s, w_s, None, h_t, w_t, None, 1.0, temperature)
    return kl


def leaves(x):
    return {k: v.clone().requires_grad_() for k, v in x.items() if k in ("student_hidden", "student_weight")}


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_opd_loss_equals_trl_reverse_kl_with_opd_weights(backend):
    x = make_inputs()
    mask = x["mask"]
    # OPD's coefficient of a valid token: 1 / (K_g * L_b * P), K_g the group's size, L_b the response's length.
    k = torch.tensor([GROUP_IDS.count(gid) for gid in GROUP_IDS], dtype=torch.float32)
    coef = 1.0 / (k * torch.tensor(LENGTHS, dtype=torch.float32) * len(set(GROUP_IDS)))
    coef_rows = coef[:, None].expand_as(mask)[mask]

    ours_in = leaves(x)
    loss, stats = va_opd_loss(
        ours_in["student_hidden"], ours_in["student_weight"], x["teacher_hidden"], None, x["teacher_weight"],
        x["tokens"], mask, x["group_ids"], spec=LossSpec(method="opd"), backend=backend, chunk_size=8,
    )
    loss.backward()

    trl_in = leaves(x)
    kl = trl_per_token_kl(trl_in["student_hidden"][mask], trl_in["student_weight"], x["teacher_hidden"][mask], x["teacher_weight"])
    trl_loss = (kl * coef_rows).sum()
    trl_loss.backward()

    torch.testing.assert_close(loss, trl_loss, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(stats["kl"][mask], kl.detach(), rtol=1e-5, atol=1e-6)
    for name in ours_in:
        torch.testing.assert_close(ours_in[name].grad, trl_in[name].grad, rtol=1e-4, atol=1e-7, msg=name)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_fused_reverse_kl_equals_trl_token_mean(temperature):
    """DistillationTrainer's reduction (sum over valid tokens / their count) at a logit temperature."""
    x = make_inputs(seed=1)
    mask = x["mask"]
    n = mask.sum()

    ours_in = leaves(x)
    h_s = ours_in["student_hidden"][mask] / temperature
    h_t = x["teacher_hidden"][mask] / temperature
    loss, kl = fused_linear_reverse_kl(h_s, ours_in["student_weight"], h_t, x["teacher_weight"], torch.full((int(n),), 1.0 / n))
    loss.backward()

    trl_in = leaves(x)
    trl_kl = trl_per_token_kl(trl_in["student_hidden"][mask], trl_in["student_weight"], x["teacher_hidden"][mask], x["teacher_weight"], temperature)
    trl_loss = trl_kl.sum() / n
    trl_loss.backward()

    torch.testing.assert_close(loss, trl_loss, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(kl, trl_kl.detach(), rtol=1e-5, atol=1e-6)
    for name in ours_in:
        torch.testing.assert_close(ours_in[name].grad, trl_in[name].grad, rtol=1e-4, atol=1e-7, msg=name)
    assert ours_in["student_hidden"].grad[~mask].abs().max() == 0  # padding gets no gradient in either
