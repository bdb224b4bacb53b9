"""Data parallelism for the trainer: process group, FSDP2 sharding, the step's data layout, and the
sibling-aware loss.

A run is distributed when ``torchrun`` launched it (``RANK`` and ``WORLD_SIZE`` in the
environment), even with one process; otherwise the trainer's single-process path runs unchanged.

Data layout. An optimizer step holds ``P`` prompts x ``K`` responses = ``P K`` *slots*; slot ``j``
is response ``j mod K`` of prompt ``j // K``. Micro-batch ``m`` covers the slots of prompts
``[m M, (m + 1) M)`` and every micro-batch's slots are cut into ``N`` contiguous, near-equal parts,
one per rank. Every rank therefore runs the same number of forward and backward passes (FSDP's
collectives need that), and a sibling group lies either on one rank or across neighbouring ranks
(when ``N`` does not divide ``M``, or ``M < N``).

Split siblings. The VA-OPD weight of a response depends on its siblings' mean visual advantage:
the trainer calls ``va_opd_loss(..., process_group=WORLD)``, which all-gathers each response's
mean VA and group id and computes the rollout weights of the whole micro-batch (the token split
stays local). The loss is divided by the global ``P``, and FSDP's reduce-scatter *sums* the
ranks' gradients (divide factor 1), so the step's gradient is the single-process gradient of the
same global batch.
"""
from __future__ import annotations

import datetime
import math
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from vaopd.metrics import PEAK_SUMS

__all__ = ["DistEnv", "launched_by_torchrun", "init_distributed", "shutdown", "HiddenAndHead", "shard_model",
           "slot_layout", "generate_slots", "rollout_seed", "reduce_sums", "any_rank", "clip_grad_norm", "load_full_optimizer_state"]


@dataclass(frozen=True)
class DistEnv:
    """This process's place in a torchrun job and the device it computes on."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init_distributed(device_setting: str, timeout_s: float) -> DistEnv:
    """Join the job torchrun started: NCCL with one GPU per local rank, gloo on CPUs.

    ``timeout_s`` bounds every collective: a rank that died or hangs makes the others raise
    instead of waiting forever. ``device_setting`` is ``train.device`` (``auto``, ``cpu``, ``cuda``).
    """
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))
    cuda = torch.cuda.is_available() and device_setting != "cpu"
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=timeout_s),
                                device_id=device if cuda else None)
    return DistEnv(rank, world, local, device)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


class HiddenAndHead(nn.Module):
    """FSDP root over a transformers VLM whose forward returns ``(final hidden [B, S, D], lm_head.weight)``.

    The fused loss needs the LM-head weight as a tensor, not the logits. Returning it from the
    root's forward keeps it inside FSDP's bracket: gathered before, and its gradient
    reduce-scattered after backward like any other parameter's. A frozen (teacher) root has no
    backward to reshard it: call ``reshard()`` once the weight is no longer needed.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, **inputs) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.model.model(**inputs).last_hidden_state
        return hidden, self.model.get_output_embeddings().weight


def shard_model(model: nn.Module, *, param_dtype: torch.dtype | None, device: torch.device) -> HiddenAndHead:
    """Shard ``model`` with FSDP2 over all ranks and return its ``HiddenAndHead`` root.

    One FSDP unit per transformer block (``model._no_split_modules``: decoder layers and vision
    blocks) and a root unit for the rest (embeddings, norms, LM head, patch merger).
    ``param_dtype=bfloat16`` computes in bf16 with fp32 gradient reduction and fp32 sharded
    master weights. Gradients are summed across ranks, not averaged: the loss is already divided
    by the global prompt count.
    """
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    blocks = set(getattr(model, "_no_split_modules", None) or ())
    if not blocks:
        raise ValueError(f"{type(model).__name__} names no transformer block class (_no_split_modules) to shard by")
    units = [m for m in model.modules() if type(m).__name__ in blocks]
    for unit in units:
        fully_shard(unit, mesh=mesh, mp_policy=mp)
    # The root stays gathered after forward (until backward, or an explicit reshard()), so the
    # LM-head weight it returns can be used by the loss afterwards.
    root = fully_shard(HiddenAndHead(model), mesh=mesh, mp_policy=mp, reshard_after_forward=False)
    for unit in [*units, root]:
        unit.set_gradient_divide_factor(1.0)
        unit.set_force_sum_reduction_for_comms(True)  # a plain SUM (gloo has no PREMUL_SUM)
    return root


def slot_layout(prompts: int, k: int, micro_prompts: int, world: int) -> list[list[range]]:
    """``layout[m][r]``: the global slots (``prompt * k + sample``) of micro-batch ``m`` on rank ``r``.

    Contiguous near-equal parts of each micro-batch's ``micro_prompts * k`` slots; needs
    ``micro_prompts * k >= world`` so that every rank holds a response of every micro-batch.
    """
    if micro_prompts * k < world:
        raise ValueError(f"a micro-batch holds {micro_prompts} x {k} responses, fewer than the {world} ranks")
    layout = []
    for first in range(0, prompts, micro_prompts):
        start, size = first * k, micro_prompts * k
        layout.append([range(start + r * size // world, start + (r + 1) * size // world) for r in range(world)])
    return layout


def generate_slots(rollout, prompts, slots: list[int], k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample the responses at global ``slots`` (``prompt * k + sample``, ascending) with ``rollout``.

    Prompts with the same number of local slots go to one ``rollout.generate(prompts, n)`` call
    (whole groups: ``n = k``). Returns ``tokens [len(slots), T]`` int64 and ``mask [len(slots), T]``
    bool rows in ``slots`` order, right-padded with masked zeros to a common width.
    """
    per_prompt: dict[int, int] = {}
    for slot in slots:
        per_prompt[slot // k] = per_prompt.get(slot // k, 0) + 1
    rows: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for n in sorted(set(per_prompt.values())):
        owners = [p for p, c in per_prompt.items() if c == n]
        tokens, mask = rollout.generate(prompts.select(owners), n)
        for i, p in enumerate(owners):
            first = min(s for s in slots if s // k == p)
            for j in range(n):
                rows[first + j] = tokens[i * n + j], mask[i * n + j]
    width = max(t.shape[0] for t, _ in rows.values())
    tokens = torch.zeros(len(slots), width, dtype=torch.long)
    mask = torch.zeros(len(slots), width, dtype=torch.bool)
    for i, slot in enumerate(slots):
        t, m = rows[slot]
        tokens[i, : t.shape[0]], mask[i, : m.shape[0]] = t, m.bool()
    return tokens, mask


def rollout_seed(seed: int, step: int, rank: int) -> int:
    """The sampling seed of ``rank`` at ``step``: different on every rank (split siblings must not
    repeat each other), and a function of the step alone, so a resumed run samples as the
    uninterrupted one would on the same number of ranks."""
    return (seed * 1_000_003 + step) * 65_537 + rank


def reduce_sums(sums: dict[str, float], device: torch.device) -> dict[str, float]:
    """Every rank's metric sums added up (those in ``PEAK_SUMS``: the maximum), identical on all ranks."""
    keys = sorted(sums)
    values = torch.tensor([sums[k] for k in keys], dtype=torch.float64, device=device)
    peak = values.clone()
    dist.all_reduce(values, op=dist.ReduceOp.SUM)
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    return {k: float(peak[i] if k in PEAK_SUMS else values[i]) for i, k in enumerate(keys)}


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when ``flag`` is True on any (e.g. a stop signal that reached one rank)."""
    value = torch.tensor([float(flag)], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def clip_grad_norm(params: list[nn.Parameter], max_norm: float) -> float:
    """Global gradient 2-norm of sharded (DTensor) gradients, clipped to ``max_norm`` in place.

    The norm of a sharded gradient is a partial sum on each rank; ``full_tensor`` reduces it so
    every rank clips by, and reports, the norm of the whole model's gradient.
    """
    grads = [p.grad for p in params if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads, norm_type=2.0)
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()
    if math.isfinite(max_norm):
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return float(norm)


def load_full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load a single-process ``optimizer.state_dict()`` (parameters numbered in the order of
    ``optimizer.param_groups``) into the optimizer of the sharded ``model``: the numbers become
    parameter names, and ``set_optimizer_state_dict`` shards each full state tensor."""
    names = {id(p): n for n, p in model.named_parameters()}
    order = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    named = {
        "state": {order[i]: v for i, v in state["state"].items()},
        "param_groups": [{**g, "params": [order[i] for i in g["params"]]} for g in state["param_groups"]],
    }
    set_optimizer_state_dict(model, optimizer, named, options=StateDictOptions(full_state_dict=True))
