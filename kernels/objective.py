"""The VA-OPD objective on per-token tensors: visual advantage, rollout weights, token coefficients
and the high group. The loss (``vaopd.kernels``) computes its coefficients here; the trainer
imports this module as ``vaopd.objective``.

Nothing here has a vocabulary dimension: every function takes ``[B, T]`` per-token tensors (B
responses, T positions) and a ``[B]`` group id per response, and is vectorised over the batch
(no Python loop over responses or tokens). See ``docs/objective.md`` for the math.

Conventions shared by every function:

- ``mask`` is ``[B, T]`` and boolean-like (``bool``, or an integer/float tensor holding only 0 and
  1); True marks a valid token of a response (generated tokens up to and including the first EOS).
- ``group_ids`` is an int64 ``[B]`` tensor; responses with equal ids are siblings (the samples of
  one prompt).
- Outputs are fp32 (``high_group``: bool), detached, and exactly zero (False) outside ``mask``.
"""
from __future__ import annotations

import math

import torch

__all__ = [
    "visual_advantage",
    "rollout_weights",
    "token_coefficients",
    "high_group",
    "opd_coefficients",
    "loss_coefficients",
    "va_opd_coefficients_nosync",
    "METHODS",
    "VA_ESTIMATORS",
]

METHODS = ("va_opd", "opd")
# How a token's visual advantage is measured (``visual_advantage``); "sampled" is the paper's.
VA_ESTIMATORS = ("sampled", "two_sided", "distribution")
_EPS = 1e-6  # rollout_weights' default: added to the std of the sibling means


def as_mask(mask: torch.Tensor, like: torch.Tensor | None = None, name: str = "mask") -> torch.Tensor:
    """Validate a boolean-like ``[B, T]`` mask and return it as ``torch.bool``."""
    if not isinstance(mask, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(mask).__name__}")
    if mask.dim() != 2:
        raise ValueError(f"{name} must have shape [B, T], got {tuple(mask.shape)}")
    if like is not None and mask.shape != like.shape:
        raise ValueError(f"{name} has shape {tuple(mask.shape)} but the per-token values have shape {tuple(like.shape)}")
    if mask.dtype == torch.bool:
        return mask
    if mask.dtype.is_complex or not ((mask == 0) | (mask == 1)).all():
        raise ValueError(f"{name} must be boolean-like (bool, or only 0 and 1 values), got dtype {mask.dtype} with other values")
    return mask != 0


def _check_values(x: torch.Tensor, name: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.dtype.is_floating_point:
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if x.dim() != 2:
        raise ValueError(f"{name} must have shape [B, T], got {tuple(x.shape)}")


def _lengths(mask: torch.Tensor) -> torch.Tensor:
    """Valid-token count per response; an empty response is an error (SPEC: it has no mean VA)."""
    lengths = mask.sum(dim=1)
    if (lengths == 0).any():
        empty = torch.nonzero(lengths == 0).flatten().tolist()
        raise ValueError(f"empty response(s) at batch index {empty[:8]}: every response needs at least one valid token in mask")
    return lengths


def _group_index(group_ids: torch.Tensor, batch: int) -> tuple[torch.Tensor, int]:
    """Map arbitrary int64 group ids to dense indices ``0..G-1``; returns (index [B], G)."""
    if not isinstance(group_ids, torch.Tensor):
        raise ValueError(f"group_ids must be a torch.Tensor, got {type(group_ids).__name__}")
    if group_ids.dtype != torch.int64:
        raise ValueError(f"group_ids must be an int64 tensor, got dtype {group_ids.dtype}")
    if group_ids.shape != (batch,):
        raise ValueError(f"group_ids must have shape [B] = [{batch}] (one group id per response), got {tuple(group_ids.shape)}")
    unique, index = torch.unique(group_ids, return_inverse=True)
    return index, unique.numel()


def _group_sum(values: torch.Tensor, index: torch.Tensor, groups: int) -> torch.Tensor:
    return torch.zeros(groups, dtype=values.dtype, device=values.device).index_add_(0, index, values)


def visual_advantage(
    logp_clean: torch.Tensor,
    logp_ablated: torch.Tensor,
    mask: torch.Tensor,
    estimator: str = "sampled",
    divergence: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-token visual advantage ``a_t``, by ``estimator`` (``VA_ESTIMATORS``):

    - ``"sampled"`` (the paper): ``max(logp_clean - logp_ablated, 0)``;
    - ``"two_sided"``: ``|logp_clean - logp_ablated|``, so a token the clean-image teacher rejects
      and the ablated one accepts counts as vision-critical too;
    - ``"distribution"``: ``max(divergence, 0)`` with ``divergence = KL(pT(. | clean, y_<t) ||
      pT(. | ablated, y_<t))`` over the vocabulary at temperature 1 (the clamp only removes
      rounding below 0): how much the teacher's next-token prediction depends on the image,
      whatever token was sampled.

    Args:
        logp_clean: ``[B, T]`` float, teacher log-prob of the sampled token with the original image.
        logp_ablated: ``[B, T]`` float, the same with the ablated (e.g. pixelated) image.
        mask: ``[B, T]`` boolean-like valid-token mask.
        estimator: one of ``VA_ESTIMATORS``.
        divergence: ``[B, T]`` float, the teacher's per-position KL between its two views; required
            with ``"distribution"`` and ignored otherwise.

    Returns:
        ``[B, T]`` fp32, detached, zero outside ``mask``. Values outside the mask (NaN padding
        included) are ignored; a non-finite value inside it raises ``ValueError``.
    """
    check_va_estimator(estimator)
    _check_values(logp_clean, "logp_clean")
    _check_values(logp_ablated, "logp_ablated")
    if logp_clean.shape != logp_ablated.shape:
        raise ValueError(f"logp_clean {tuple(logp_clean.shape)} and logp_ablated {tuple(logp_ablated.shape)} must have the same shape")
    mask = as_mask(mask, logp_clean)
    named = [("logp_clean", logp_clean), ("logp_ablated", logp_ablated)]
    if estimator == "distribution":
        if divergence is None:
            raise ValueError("estimator='distribution' needs divergence: the [B, T] KL(pT(.|clean) || pT(.|ablated)) per position")
        _check_values(divergence, "divergence")
        if divergence.shape != logp_clean.shape:
            raise ValueError(f"divergence {tuple(divergence.shape)} must have the shape of logp_clean {tuple(logp_clean.shape)}")
        named.append(("divergence", divergence))
    checked = []
    for name, x in named:
        x = x.detach().float()
        bad = mask & ~torch.isfinite(x)
        if bad.any():
            where = torch.nonzero(bad)[0].tolist()
            raise ValueError(f"{name} has a non-finite value inside mask (first at [b, t] = {where})")
        checked.append(x)
    return _visual_advantage(checked[0], checked[1], mask, estimator, checked[2] if len(checked) > 2 else None)


def check_va_estimator(estimator: str, name: str = "estimator") -> None:
    if estimator not in VA_ESTIMATORS:
        raise ValueError(f"{name} must be one of {VA_ESTIMATORS}, got {estimator!r}")


def _visual_advantage(clean: torch.Tensor, ablated: torch.Tensor, mask: torch.Tensor, estimator: str = "sampled",
                      divergence: torch.Tensor | None = None) -> torch.Tensor:
    """``visual_advantage``'s math on checked fp32 ``[B, T]`` inputs and a bool mask."""
    if estimator == "sampled":
        va = (clean - ablated).clamp_min(0.0)
    elif estimator == "two_sided":
        va = (clean - ablated).abs()
    else:
        va = divergence.float().clamp_min(0.0)
    return torch.where(mask, va, torch.zeros((), dtype=va.dtype, device=va.device))


def check_temperature(temperature: float, name: str = "temperature") -> None:
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {temperature!r}")


def check_high_fraction(high_fraction: float, name: str = "high_fraction") -> None:
    if not (isinstance(high_fraction, (int, float)) and 0 < high_fraction <= 1):
        raise ValueError(f"{name} must be in (0, 1], got {high_fraction!r}")


def check_high_weight(high_weight: float, name: str = "high_weight") -> None:
    if not (isinstance(high_weight, (int, float)) and 0 <= high_weight <= 1):
        raise ValueError(f"{name} must be in [0, 1], got {high_weight!r}")


def _check_split(high_fraction: float, high_weight: float) -> None:
    check_high_fraction(high_fraction)
    check_high_weight(high_weight)


def _response_means(va: torch.Tensor, mask: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """``[B]`` fp32 mean of ``va`` over each response's valid tokens (``lengths = mask.sum(1)``)."""
    return torch.where(mask, va.detach().float(), torch.zeros((), device=va.device)).sum(dim=1) / lengths


def rollout_weights(
    va: torch.Tensor,
    mask: torch.Tensor,
    group_ids: torch.Tensor,
    temperature: float = 1.0,
    eps: float = _EPS,
) -> torch.Tensor:
    """Per-response weight from the response's mean VA relative to its siblings.

    ``m_k = mean_t a_t`` over valid tokens; within each group ``z_k = (m_k - mean(m)) /
    (std(m) + eps)`` with the population std (divide by K); ``w = softmax(z / temperature)``.
    Equal means and singleton groups give uniform weights; each group's weights sum to 1.

    Args:
        va: ``[B, T]`` float visual advantage (values outside ``mask`` are ignored).
        mask: ``[B, T]`` boolean-like valid-token mask; every row needs a valid token.
        group_ids: ``[B]`` int64 sibling-group id per response.
        temperature: softmax temperature ``tau > 0``.
        eps: added to the std, ``>= 0``.

    Returns:
        ``[B]`` fp32 weights, detached.
    """
    _check_values(va, "va")
    mask = as_mask(mask, va)
    check_temperature(temperature)
    if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps >= 0):
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    index, groups = _group_index(group_ids, va.shape[0])
    return _rollout_weights(_response_means(va, mask, _lengths(mask)), index, groups, temperature, eps)


def _rollout_weights(means: torch.Tensor, index: torch.Tensor, groups: int, temperature: float, eps: float) -> torch.Tensor:
    """``rollout_weights``' math from ``[B]`` fp32 response means and dense group indices in ``[0, groups)``."""
    count = _group_sum(torch.ones_like(means), index, groups)
    group_mean = (_group_sum(means, index, groups) / count)[index]
    deviation = means - group_mean
    std = torch.sqrt(_group_sum(deviation * deviation, index, groups) / count)[index]
    z = deviation / (std + eps) / temperature
    # Equal means give deviation 0 and, with eps == 0, 0/0: define z = 0 (uniform weights).
    z = torch.where(deviation == 0, torch.zeros_like(z), z)
    group_max = torch.full((groups,), -math.inf, device=z.device).scatter_reduce(0, index, z, reduce="amax")
    e = torch.exp(z - group_max[index])
    return e / _group_sum(e, index, groups)[index]


def token_coefficients(
    va: torch.Tensor,
    mask: torch.Tensor,
    weights: torch.Tensor,
    high_fraction: float = 0.2,
    high_weight: float = 0.5,
) -> torch.Tensor:
    """Per-token loss coefficient from the high/low VA split inside each response.

    In a response of ``L`` valid tokens the high group is the ``max(1, ceil(high_fraction * L))``
    tokens with the largest VA (ties go to the earlier position); the low group is the rest.
    ``c_t = w * high_weight / |high|`` in the high group, ``w * (1 - high_weight) / |low|`` in
    the low group, and ``w / |high|`` when the low group is empty. Each row sums to ``w``.

    Args:
        va: ``[B, T]`` float visual advantage (values outside ``mask`` are ignored).
        mask: ``[B, T]`` boolean-like valid-token mask; every row needs a valid token.
        weights: ``[B]`` float rollout weights.
        high_fraction: share of tokens in the high group, in ``(0, 1]``.
        high_weight: share of the response's weight given to the high group, in ``[0, 1]``.

    Returns:
        ``[B, T]`` fp32 coefficients, detached, zero outside ``mask``.
    """
    _check_values(va, "va")
    mask = as_mask(mask, va)
    if not isinstance(weights, torch.Tensor) or not weights.dtype.is_floating_point:
        raise ValueError("weights must be a floating-point torch.Tensor of shape [B]")
    if weights.shape != (va.shape[0],):
        raise ValueError(f"weights must have shape [B] = [{va.shape[0]}], got {tuple(weights.shape)}")
    _check_split(high_fraction, high_weight)
    lengths = _lengths(mask)
    top_k = int(_high_counts(lengths, high_fraction).max())
    return _token_coefficients(va, mask, weights, lengths, top_k, high_fraction, high_weight)


def _high_counts(lengths: torch.Tensor, high_fraction: float) -> torch.Tensor:
    """``max(1, ceil(high_fraction * L))`` per response, in ``lengths``' dtype."""
    # ceil(0.2 * 15) must be 3, not 4: shave float noise off the product before the ceiling.
    return torch.ceil(lengths.double() * high_fraction - 1e-9).clamp_min(1).to(lengths.dtype)


def high_group(va: torch.Tensor, mask: torch.Tensor, high_fraction: float = 0.2) -> torch.Tensor:
    """Each response's high group, the tokens ``token_coefficients`` gives ``high_weight``.

    In a response of ``L`` valid tokens: the ``max(1, ceil(high_fraction * L))`` tokens with the
    largest VA, ties going to the earlier position. A row without valid tokens has none.

    Args:
        va: ``[B, T]`` float visual advantage (values outside ``mask`` are ignored).
        mask: ``[B, T]`` boolean-like valid-token mask.
        high_fraction: share of tokens in the high group, in ``(0, 1]``.

    Returns:
        ``[B, T]`` bool, False outside ``mask``.
    """
    _check_values(va, "va")
    mask = as_mask(mask, va)
    check_high_fraction(high_fraction)
    n_high = _high_counts(mask.sum(dim=1), high_fraction)
    return _high_group(va, mask, n_high, int(n_high.max()))


def _high_group(va: torch.Tensor, mask: torch.Tensor, n_high: torch.Tensor, top_k: int) -> torch.Tensor:
    """``high_group``'s math: bool ``mask``, ``n_high [B]`` high-group sizes (at least 1) and any
    ``top_k`` from the largest of them to ``T`` (the ``top_k``-th largest values are only read up
    to each row's ``n_high``, so the result is the same)."""
    # Every valid token above the row's n_high-th largest VA, then as many tokens equal to it as
    # still fit, earliest first (top-k plus a tie count: no full sort).
    key = torch.where(mask, va.detach().float(), torch.full((), -math.inf, device=va.device))
    top = torch.topk(key, top_k, dim=1).values
    threshold = top.gather(1, (n_high - 1)[:, None])
    above = key > threshold
    at = mask & (key == threshold)
    room = n_high[:, None] - above.sum(dim=1, keepdim=True)
    return mask & (above | (at & (at.cumsum(dim=1) <= room)))


def _token_coefficients(va, mask, weights, lengths, top_k: int, high_fraction: float, high_weight: float) -> torch.Tensor:
    """``token_coefficients``' math on checked inputs: bool ``mask``, ``lengths = mask.sum(1)``
    (all positive) and ``top_k`` as ``_high_group`` takes it."""
    n_high = _high_counts(lengths, high_fraction)
    n_low = lengths - n_high
    high = _high_group(va, mask, n_high, top_k)
    low = mask & ~high
    w = weights.detach().float()
    has_low = n_low > 0
    high_share = torch.where(has_low, torch.full_like(w, high_weight), torch.ones_like(w))
    c_high = w * high_share / n_high
    c_low = w * (1.0 - high_weight) / n_low.clamp_min(1)
    zero = torch.zeros((), device=va.device)
    return torch.where(high, c_high[:, None], torch.where(low, c_low[:, None], zero))


def opd_coefficients(mask: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """Standard OPD coefficients: ``1 / (K_g * L_b)`` per valid token.

    Args:
        mask: ``[B, T]`` boolean-like valid-token mask; every row needs a valid token.
        group_ids: ``[B]`` int64 sibling-group id per response (``K_g`` is the group's size).

    Returns:
        ``[B, T]`` fp32, zero outside ``mask``; each response sums to ``1 / K_g``, each group to 1.
    """
    mask = as_mask(mask)
    _group_index(group_ids, mask.shape[0])
    return mask.float() / (_group_sizes(group_ids) * _lengths(mask))[:, None]


def _group_sizes(group_ids: torch.Tensor) -> torch.Tensor:
    """``[B]`` fp32: the size of each response's sibling group."""
    _, index, counts = torch.unique(group_ids, return_inverse=True, return_counts=True)
    return counts[index].float()


def loss_coefficients(
    method: str,
    va: torch.Tensor,
    mask: torch.Tensor,
    group_ids: torch.Tensor,
    temperature: float = 1.0,
    high_fraction: float = 0.2,
    high_weight: float = 0.5,
    process_group=None,
) -> torch.Tensor:
    """The per-token coefficient ``c_t`` of the loss for ``method`` ("va_opd" or "opd").

    Unlike the functions above, fully masked rows are allowed (padding rows of a micro-batch):
    they are left out of every group statistic and get zero coefficients.

    With a ``torch.distributed`` ``process_group``, a sibling group may be spread over its ranks:
    each response's mean VA and group id are all-gathered, so the rollout weights (and OPD's group
    sizes) are those of the batch of all ranks together. Every rank of the group must call this,
    with globally unique group ids (e.g. the prompt's index in the global batch).

    Returns:
        ``[B, T]`` fp32 coefficients, detached, zero outside ``mask``.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    mask = as_mask(mask)
    _group_index(group_ids, mask.shape[0])  # validates before sub-setting
    coef = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
    rows = mask.any(dim=1)
    sub_mask, sub_groups = mask[rows], group_ids[rows]
    lengths = sub_mask.sum(dim=1)
    if method == "va_opd":
        sub_va = va[rows]
        _check_values(sub_va, "va")
        means = _response_means(sub_va, sub_mask, lengths)
    else:
        means = torch.zeros(len(sub_groups), device=mask.device)
    all_means, all_ids, offset = _gather_responses(means, sub_groups, process_group)
    if len(sub_groups) == 0:
        return coef
    mine = slice(offset, offset + len(sub_groups))
    if method == "opd":
        coef[rows] = sub_mask.float() / (_group_sizes(all_ids)[mine] * lengths)[:, None]
    else:
        ones = torch.ones(len(all_ids), 1, dtype=torch.bool, device=mask.device)
        weights = rollout_weights(all_means[:, None], ones, all_ids, temperature=temperature)[mine]
        coef[rows] = token_coefficients(sub_va, sub_mask, weights, high_fraction, high_weight)
    return coef


def va_opd_coefficients_nosync(
    logp_clean: torch.Tensor,
    logp_ablated: torch.Tensor,
    mask: torch.Tensor,
    lengths: torch.Tensor,
    group_index: torch.Tensor,
    groups: int,
    top_k: int,
    temperature: float = 1.0,
    high_fraction: float = 0.2,
    high_weight: float = 0.5,
    estimator: str = "sampled",
    divergence: torch.Tensor | None = None,
) -> torch.Tensor:
    """``loss_coefficients("va_opd", visual_advantage(logp_clean, logp_ablated, mask, estimator, divergence), ...)`` of whole
    sibling groups with no host-device synchronisation, for callers that know the batch layout
    (the fused loss's chunks).

    Same math as those functions (it runs their cores); what they find out on the device, the
    caller gives from the host, and tensor values are not checked (no non-finite check):

    Args:
        logp_clean, logp_ablated: ``[B, T]`` fp32 teacher log-probs, any finite value outside ``mask``.
        divergence: ``[B, T]`` fp32 KL between the teacher's views (``estimator="distribution"``), likewise.
        mask: ``[B, T]`` bool; every response has a valid token, and its siblings are all here.
        lengths: ``[B]`` int64, ``mask.sum(1)``.
        group_index: ``[B]`` int64 sibling-group index in ``[0, groups)``, every index used.
        top_k: an int from the largest high-group size, ``max(1, ceil(high_fraction * L))``, to ``T``
            (the longest response's length will do).

    Returns:
        ``[B, T]`` fp32 coefficients, zero outside ``mask``.
    """
    check_temperature(temperature)
    _check_split(high_fraction, high_weight)
    check_va_estimator(estimator)
    va = _visual_advantage(logp_clean, logp_ablated, mask, estimator, divergence)
    weights = _rollout_weights(_response_means(va, mask, lengths), group_index, groups, temperature, _EPS)
    return _token_coefficients(va, mask, weights, lengths, top_k, high_fraction, high_weight)


def _gather_responses(means: torch.Tensor, group_ids: torch.Tensor, process_group) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Every rank's ``[n_r]`` response means and group ids, in rank order, and this rank's offset.

    Without a process group: the inputs and offset 0. Ranks may hold different numbers of
    responses (none included): the counts go first, then rows padded to the largest count.
    """
    if process_group is None:
        return means, group_ids, 0
    import torch.distributed as dist

    world, rank = dist.get_world_size(process_group), dist.get_rank(process_group)
    counts = [torch.zeros(1, dtype=torch.int64, device=means.device) for _ in range(world)]
    dist.all_gather(counts, torch.tensor([len(means)], device=means.device), group=process_group)
    counts = [int(c) for c in counts]
    width = max(max(counts), 1)
    # fp64 carries the fp32 means and int64 ids (below 2^53) exactly.
    local = torch.zeros(width, 2, dtype=torch.float64, device=means.device)
    local[: len(means), 0] = means.double()
    local[: len(means), 1] = group_ids.double()
    parts = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(parts, local, group=process_group)
    rows = torch.cat([part[:n] for part, n in zip(parts, counts)])
    return rows[:, 0].float(), rows[:, 1].long(), sum(counts[:rank])
