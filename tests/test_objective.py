import math

import pytest
import torch

from vaopd.objective import (
    high_group,
    loss_coefficients,
    opd_coefficients,
    rollout_weights,
    token_coefficients,
    visual_advantage,
)

ONE_GROUP4 = torch.zeros(4, dtype=torch.long)


def full_mask(b, t):
    return torch.ones(b, t, dtype=torch.bool)


def test_visual_advantage_clamps_and_masks():
    clean = torch.tensor([[-1.0, -2.0, float("nan")]])
    ablated = torch.tensor([[-3.0, -1.0, 0.0]])
    mask = torch.tensor([[True, True, False]])
    va = visual_advantage(clean, ablated, mask)
    assert va.dtype == torch.float32 and not va.requires_grad
    assert va.tolist() == [[2.0, 0.0, 0.0]]


def test_visual_advantage_is_detached_and_fp32():
    clean = torch.randn(2, 3, dtype=torch.bfloat16, requires_grad=True)
    va = visual_advantage(clean, torch.zeros(2, 3, dtype=torch.bfloat16), full_mask(2, 3))
    assert va.dtype == torch.float32 and not va.requires_grad


def test_visual_advantage_rejects_non_finite_inside_mask():
    clean = torch.tensor([[0.0, float("inf")]])
    with pytest.raises(ValueError, match="logp_clean has a non-finite"):
        visual_advantage(clean, torch.zeros(1, 2), full_mask(1, 2))


def test_paper_rollout_weight_example():
    means = torch.tensor([0.045, 0.030, 0.020, 0.010])
    va = means[:, None].repeat(1, 7)
    w = rollout_weights(va, full_mask(4, 7), ONE_GROUP4)
    assert torch.allclose(w, torch.tensor([0.656, 0.206, 0.095, 0.044]), atol=1e-3)
    assert math.isclose(w.sum().item(), 1.0, rel_tol=1e-6)


def test_rollout_weights_means_use_only_valid_tokens():
    va = torch.tensor([[0.045, 99.0], [0.030, 99.0], [0.020, 99.0], [0.010, float("nan")]])
    mask = torch.tensor([[True, False]] * 4)
    w = rollout_weights(va, mask, ONE_GROUP4)
    assert torch.allclose(w, torch.tensor([0.656, 0.206, 0.095, 0.044]), atol=1e-3)


def test_rollout_weights_uniform_for_ties_and_singletons():
    va = torch.tensor([[0.3, 0.1], [0.2, 0.2], [5.0, 1.0]])
    w = rollout_weights(va, full_mask(3, 2), torch.tensor([7, 7, 9]))
    assert torch.allclose(w, torch.tensor([0.5, 0.5, 1.0]))
    w0 = rollout_weights(torch.zeros(3, 2), full_mask(3, 2), torch.tensor([1, 1, 1]), eps=0.0)
    assert torch.allclose(w0, torch.full((3,), 1 / 3))


def test_rollout_weights_temperature_sharpens():
    va = torch.tensor([[0.045], [0.030], [0.020], [0.010]])
    w1 = rollout_weights(va, full_mask(4, 1), ONE_GROUP4)
    w_half = rollout_weights(va, full_mask(4, 1), ONE_GROUP4, temperature=0.5)
    assert w_half[0] > w1[0] and w_half[3] < w1[3]


def test_group_permutation_invariance():
    torch.manual_seed(0)
    va = torch.rand(12, 9)
    mask = torch.rand(12, 9) > 0.3
    mask[:, 0] = True
    groups = torch.tensor([3, 1, 2, 3, 1, 2, 3, 1, 2, 3, 1, 2])
    perm = torch.randperm(12)
    w = rollout_weights(va, mask, groups)
    w_perm = rollout_weights(va[perm], mask[perm], groups[perm])
    assert torch.allclose(w[perm], w_perm, atol=1e-6)
    # Renaming the groups changes nothing either.
    assert torch.allclose(rollout_weights(va, mask, groups * 100 - 7), w)
    c = loss_coefficients("va_opd", va, mask, groups)
    c_perm = loss_coefficients("va_opd", va[perm], mask[perm], groups[perm])
    assert torch.allclose(c[perm], c_perm, atol=1e-7)
    for g in groups.unique():
        assert math.isclose(c[groups == g].sum().item(), 1.0, rel_tol=1e-5)


def test_token_coefficients_high_low_split_and_ties():
    va = torch.tensor([[1.0, 3.0, 3.0, 0.0, 2.0, 0.5, 0.1, 0.0, 0.0, 0.2]])
    c = token_coefficients(va, full_mask(1, 10), torch.tensor([0.8]))
    # ceil(0.2 * 10) = 2 high tokens: the two 3.0s; 8 low tokens.
    expected = torch.full((1, 10), 0.8 * 0.5 / 8)
    expected[0, 1] = expected[0, 2] = 0.8 * 0.5 / 2
    assert torch.allclose(c, expected)
    # Ties for the last high place go to the earlier position.
    tie = token_coefficients(torch.tensor([[1.0, 2.0, 2.0, 2.0, 0.0]]), full_mask(1, 5), torch.tensor([1.0]))
    assert tie[0].tolist() == pytest.approx([0.125, 0.5, 0.125, 0.125, 0.125])


def test_token_coefficients_ceil_is_exact():
    # 0.2 * 15 is 3.0000000000000004 in floating point: the high group must still have 3 tokens.
    va = torch.arange(15.0)[None]
    c = token_coefficients(va, full_mask(1, 15), torch.tensor([1.0]))
    assert int((c > c.min()).sum()) == 3


def test_token_coefficients_one_token_and_masking():
    va = torch.tensor([[0.0, 7.0, 7.0], [4.0, float("nan"), 1.0]])
    mask = torch.tensor([[True, False, False], [True, False, True]])
    c = token_coefficients(va, mask, torch.tensor([0.3, 0.6]))
    # One valid token: the low group is empty and the token gets the whole weight.
    assert c[0].tolist() == pytest.approx([0.3, 0.0, 0.0])
    assert c[1].tolist() == pytest.approx([0.3, 0.0, 0.3])
    assert torch.allclose(c.sum(1), torch.tensor([0.3, 0.6]))


def test_token_coefficients_rows_sum_to_weights():
    torch.manual_seed(1)
    va = torch.rand(20, 33)
    mask = torch.rand(20, 33) > 0.5
    mask[:, 5] = True
    w = torch.rand(20)
    for hf, hw in [(0.2, 0.5), (0.5, 0.9), (1.0, 0.5), (0.01, 0.0)]:
        c = token_coefficients(va, mask, w, high_fraction=hf, high_weight=hw)
        assert torch.allclose(c.sum(1), w, atol=1e-6)
        assert (c[~mask] == 0).all()


def test_opd_coefficients():
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
    c = opd_coefficients(mask, torch.tensor([0, 0, 5]))
    assert c[0].tolist() == pytest.approx([0.25, 0.25, 0, 0])
    assert c[1].tolist() == pytest.approx([0.125] * 4)
    assert c[2].tolist() == pytest.approx([1, 0, 0, 0])


def test_worked_example_of_spec():
    va = torch.tensor([[5.0, 1, 1, 1, 1], [1, 5, 1, 1, 1], [0, 0, 0, 0, 0]])
    mask = torch.tensor([[1] * 5, [1] * 5, [1, 0, 0, 0, 0]]).bool()
    kl = torch.tensor([[10.0, 2, 2, 2, 2], [2, 20, 2, 2, 2], [3, 0, 0, 0, 0]])
    c = loss_coefficients("va_opd", va, mask, torch.tensor([0, 0, 1]))
    assert ((c * kl).sum() / 2).item() == pytest.approx(5.75)


def test_loss_coefficients_allows_fully_masked_rows():
    va = torch.rand(3, 4)
    mask = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0], [1, 1, 1, 0]]).bool()
    for method in ("va_opd", "opd"):
        c = loss_coefficients(method, va, mask, torch.tensor([0, 0, 1]))
        assert (c[1] == 0).all() and torch.isfinite(c).all()
        assert c[0].sum().item() == pytest.approx(1.0) and c[2].sum().item() == pytest.approx(1.0)
    assert (loss_coefficients("opd", va, torch.zeros(3, 4), torch.tensor([0, 0, 1])) == 0).all()


def test_vectorised_fast_enough_for_big_batches():
    # Functional smoke at the bench size (timing lives in bench/): 256 x 4096 works in one call.
    va = torch.rand(256, 4096)
    mask = torch.rand(256, 4096) > 0.1
    c = loss_coefficients("va_opd", va, mask, torch.arange(256) // 4)
    assert torch.allclose(c.view(64, 4, -1).sum((1, 2)), torch.ones(64), atol=1e-4)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: visual_advantage(torch.zeros(2, 3), torch.zeros(2, 4), full_mask(2, 3)), "same shape"),
        (lambda: visual_advantage(torch.zeros(2, 3), torch.zeros(2, 3), full_mask(2, 4)), "mask has shape"),
        (lambda: visual_advantage(torch.zeros(2, 3), torch.zeros(2, 3), torch.full((2, 3), 2)), "boolean-like"),
        (lambda: visual_advantage(torch.zeros(3), torch.zeros(3), full_mask(1, 3)), r"shape \[B, T\]"),
        (lambda: visual_advantage(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3), full_mask(2, 3)), "floating-point"),
        (lambda: rollout_weights(torch.zeros(2, 3), torch.tensor([[1, 0, 0], [0, 0, 0]]), torch.zeros(2, dtype=torch.long)), "empty response"),
        (lambda: rollout_weights(torch.zeros(2, 3), full_mask(2, 3), torch.zeros(1, dtype=torch.long)), "one group id per response"),
        (lambda: rollout_weights(torch.zeros(2, 3), full_mask(2, 3), torch.zeros(2)), "int64"),
        (lambda: rollout_weights(torch.zeros(2, 3), full_mask(2, 3), torch.zeros(2, dtype=torch.long), temperature=0), "temperature"),
        (lambda: rollout_weights(torch.zeros(2, 3), full_mask(2, 3), torch.zeros(2, dtype=torch.long), eps=-1), "eps"),
        (lambda: token_coefficients(torch.zeros(2, 3), full_mask(2, 3), torch.ones(2), high_fraction=0), "high_fraction"),
        (lambda: token_coefficients(torch.zeros(2, 3), full_mask(2, 3), torch.ones(2), high_weight=1.5), "high_weight"),
        (lambda: token_coefficients(torch.zeros(2, 3), full_mask(2, 3), torch.ones(3)), "weights must have shape"),
        (lambda: opd_coefficients(torch.tensor([[1, 0], [0, 0]]), torch.zeros(2, dtype=torch.long)), "empty response"),
        (lambda: loss_coefficients("grpo", torch.zeros(2, 3), full_mask(2, 3), torch.zeros(2, dtype=torch.long)), "method"),
        (lambda: high_group(torch.zeros(2, 3), full_mask(2, 3), high_fraction=1.5), "high_fraction"),
        (lambda: high_group(torch.zeros(2, 3), full_mask(2, 4)), "mask has shape"),
    ],
)
def test_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_token_groups_match_a_stable_sort_under_heavy_ties():
    g = torch.Generator().manual_seed(2)
    va = torch.randint(0, 3, (64, 40), generator=g).float()  # three values: ties everywhere
    mask = torch.rand(64, 40, generator=g) > 0.3
    mask[:, 7] = True
    w = torch.ones(64)
    c = token_coefficients(va, mask, w)
    lengths = mask.sum(1)
    n_high = torch.clamp(torch.ceil(lengths * 0.2 - 1e-9), min=1).long()
    for b in range(64):
        valid = mask[b].nonzero().flatten()
        order = valid[torch.sort(va[b, valid], descending=True, stable=True).indices]
        expected_high = set(order[: n_high[b]].tolist())
        got_high = set((c[b] == c[b].max()).nonzero().flatten().tolist()) if n_high[b] < lengths[b] else set(valid.tolist())
        assert got_high == expected_high, b


def test_high_group_by_hand():
    # 5 valid tokens of row 0: ceil(0.4 * 5) = 2 highest, the tie at 3.0 going to the earlier one;
    # row 1 has one valid token (the NaN outside the mask is ignored); row 2 has none.
    va = torch.tensor([[1.0, 3.0, 0.0, 3.0, 2.0, 9.0], [0.0, float("nan"), 5.0, 0.0, 0.0, 0.0], [9.0] * 6])
    mask = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 0, 0, 0, 0, 0], [0] * 6]).bool()
    high = high_group(va, mask, high_fraction=0.4)
    assert high.dtype == torch.bool
    assert high.tolist() == [[False, True, False, True, False, False], [True] + [False] * 5, [False] * 6]
    assert high_group(va, mask, high_fraction=0.5)[0].tolist() == [False, True, False, True, True, False]


def test_high_group_is_where_token_coefficients_gives_the_high_share():
    g = torch.Generator().manual_seed(4)
    va = torch.randint(0, 4, (32, 25), generator=g).float()  # ties everywhere
    mask = torch.rand(32, 25, generator=g) > 0.4
    mask[:, 3] = True
    for fraction in (0.2, 0.5, 1.0):
        expected = token_coefficients(va, mask, torch.ones(32), high_fraction=fraction, high_weight=1.0) > 0
        assert torch.equal(high_group(va, mask, fraction), expected)
