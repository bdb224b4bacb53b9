"""How a run executes: one strategy object per mode, so the step reads the same in both.

``SingleProcess``: one process holds the whole student and teacher. ``FSDP``: torchrun launched
the run; the student (and, with ``distributed.teacher: fsdp``, the teacher) is sharded with FSDP2
over the ranks (``vaopd.distributed``), each rank samples and scores its share of the step's
slots, and sums, stop decisions and the gradient norm are reduced over the ranks.

Each strategy owns:

- ``student`` / ``teacher``: modules whose forward on scoring inputs returns
  ``(final hidden [rows, S, D], LM-head weight [V, D])`` (``vaopd.distributed.HiddenAndHead``,
  sharded or not): the scorer (``vaopd.scoring.Scorer``) calls them.
- the rollout weights: ``replica``, an inference copy of the student in the rollout dtype
  (``rollout_dtype``) that the ``hf`` engine samples from, refreshed in place before every
  rollout (``refresh_rollout``: ``copy_`` into its existing storage). An engine with its own
  weights (vLLM, ``load_weights``) gets the student's tensors instead and no replica is kept.
  On one process with LoRA the engine samples from the student itself: the adapter layers are
  the trainable state and a merged copy would have to be rebuilt every step.
- sampling (``sample``): which slots (``prompt * K + response``) this process samples, with which
  seed, and how they are cut into micro-batches of whole sibling groups;
- reductions (``reduce_sums``, ``any_rank``), gradient clipping (``clip_grad_norm``) and the
  per-rank split of validation (``validation_share``, ``reduce_validation``).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Iterable, Iterator

import torch
import torch.distributed as dist
from torch import nn

from vaopd.distributed import (DistEnv, HiddenAndHead, any_rank, clip_grad_norm, generate_slots, reduce_sums,
                               rollout_seed, slot_layout)
from vaopd.kernels import fused_linear_logprobs
from vaopd.models import base_model
from vaopd.rollout import PromptBatch, RolloutBackend

__all__ = ["Sampled", "NonFiniteRollout", "Strategy", "SingleProcess", "FSDP", "rollout_dtype", "inference_copy",
           "copy_weights", "all_finite", "finite_logits"]


def rollout_dtype(bf16: bool) -> torch.dtype:
    """The dtype the rollout engine samples in: bf16 when training under bf16 autocast, else fp32."""
    return torch.bfloat16 if bf16 else torch.float32


def inference_copy(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A frozen copy of ``model`` in ``dtype`` for sampling (take it before sharding ``model``)."""
    replica = copy.deepcopy(model).to(dtype)
    replica.requires_grad_(False)
    replica.eval()
    return replica


@torch.no_grad()
def copy_weights(target: nn.Module, named: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Copy ``(state-dict name, tensor)`` pairs into ``target``'s existing tensors (cast to their
    dtype): no new storage, so the engine's references to the weights stay valid."""
    state = target.state_dict()
    for name, value in named:
        state[name].copy_(value)


@torch.no_grad()
def all_finite(tensors: Iterable[torch.Tensor]) -> bool:
    """True when no element of ``tensors`` is NaN or infinite (one host sync)."""
    flags = [torch.isfinite(t).all() for t in tensors]
    return bool(torch.stack(flags).all()) if flags else True


@torch.no_grad()
def finite_logits(model: nn.Module, prompts: PromptBatch) -> bool:
    """Whether ``model``'s weights and its next-token logits after ``prompts`` are all finite.

    The logits are checked through their log-sum-exp (``fused_linear_logprobs``; no
    ``[rows x vocab]`` tensor is kept): it is finite exactly when every logit is.
    """
    if not all_finite(model.parameters()):
        return False
    body = base_model(model)
    device = next(model.parameters()).device
    batch = prompts.to(device)
    hidden = body.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                        mm_token_type_ids=batch.mm_token_type_ids, pixel_values=batch.pixel_values,
                        image_grid_thw=batch.image_grid_thw, use_cache=False).last_hidden_state[:, -1]
    weight = body.get_output_embeddings().weight
    _, lse = fused_linear_logprobs(hidden.to(weight.dtype), weight, torch.zeros(len(hidden), dtype=torch.long, device=device))
    return all_finite([hidden, lse])


class NonFiniteRollout(RuntimeError):
    """Sampling failed because the rollout weights hold a NaN or an infinity."""


@dataclass
class Sampled:
    """A step's rollouts on this process.

    ``tokens`` ``[rows, T]`` int64 and ``mask`` ``[rows, T]`` bool: this process's slots in
    ascending slot order. ``parts``: the global slots of each micro-batch (whole sibling groups,
    or under torchrun this rank's share of them), in the order they are scored.
    """

    tokens: torch.Tensor
    mask: torch.Tensor
    parts: list[list[int]]

    def rows(self, part: list[int]) -> torch.Tensor:
        """Row indices into ``tokens`` of the slots ``part``."""
        order = {j: r for r, j in enumerate(sorted(j for p in self.parts for j in p))}
        return torch.tensor([order[j] for j in part])


class Strategy:
    """What differs between one process and torchrun; see the module docstring."""

    student: nn.Module
    teacher: nn.Module
    replica: nn.Module | None
    device: torch.device
    process_group = None  # the loss's group for sibling groups split over ranks
    is_main = True

    def weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """The student's current ``(state-dict name, tensor)`` pairs (of the transformers model)."""
        raise NotImplementedError

    def refresh_rollout(self, rollout: RolloutBackend) -> None:
        """Bring the engine's weights to the student's current ones (before every rollout)."""
        load = getattr(rollout, "load_weights", None)
        if load is not None:
            load(self.weights())
        elif self.replica is not None:
            copy_weights(self.replica, self.weights())

    def sampling_model(self) -> nn.Module:
        """The model the ``hf`` engine and validation sample from."""
        raise NotImplementedError

    def sample(self, rollout: RolloutBackend, prompts: PromptBatch, *, k: int, micro_prompts: int, step: int,
               seed: int, length_buckets: bool) -> Sampled:
        """Refresh the engine's weights and sample this process's slots of the step.

        Raises ``NonFiniteRollout`` (on every rank) when sampling failed on non-finite weights.
        """
        raise NotImplementedError

    def _generate(self, generate, prompts: PromptBatch) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``generate()``, or None when it raised and the sampling model's numbers are non-finite
        (NaN or infinite logits make sampling's ``multinomial`` raise); other errors propagate."""
        try:
            return generate()
        except RuntimeError:
            if finite_logits(self.sampling_model(), prompts):
                raise
            return None

    def done_with_teacher(self) -> None:
        """After a micro-batch's teacher pass: release what the teacher's forward kept gathered."""

    def reduce_sums(self, sums: dict[str, float]) -> dict[str, float]:
        return sums

    def any_rank(self, flag: bool) -> bool:
        return flag

    def clip_grad_norm(self, params: list[nn.Parameter], max_norm: float) -> float:
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))

    def validation_share(self, records: list, seed: int) -> tuple[list, int]:
        """The validation questions this process grades and its sampling seed."""
        return records, seed

    def reduce_validation(self, out: dict) -> dict:
        """Accuracy, samples and questions over all processes."""
        return out


class SingleProcess(Strategy):
    """The whole run on one process.

    ``student``, ``teacher``: the transformers models (the student possibly under a peft
    wrapper). ``replica``: the inference copy the ``hf`` engine samples from, or None to sample
    from the student itself (LoRA, or an engine with its own weights).
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, replica: nn.Module | None, device: torch.device):
        self.model, self.replica, self.device = student, replica, device
        self.student, self.teacher = HiddenAndHead(base_model(student)), HiddenAndHead(teacher)

    def weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        return iter(base_model(self.model).state_dict().items())

    def sampling_model(self) -> nn.Module:
        return self.replica if self.replica is not None else self.model

    def sample(self, rollout, prompts, *, k, micro_prompts, step, seed, length_buckets) -> Sampled:
        # One process draws from the run's RNG stream (restored on --resume): no per-step seed.
        self.refresh_rollout(rollout)
        out = self._generate(lambda: rollout.generate(prompts, k), prompts)
        release = getattr(rollout, "release", None)
        if release is not None:
            release()
        if out is None:
            raise NonFiniteRollout("sampling failed: the rollout weights are non-finite")
        tokens, mask = out
        P = len(prompts)
        groups = list(range(P))
        if length_buckets and micro_prompts < P:  # vaopd.step: "Length buckets"
            longest = mask.sum(1).view(P, k).max(1).values.tolist()
            groups.sort(key=lambda g: longest[g])
        parts = [[g * k + i for g in groups[first:first + micro_prompts] for i in range(k)]
                 for first in range(0, P, micro_prompts)]
        return Sampled(tokens, mask, parts)


class FSDP(Strategy):
    """torchrun with an FSDP2 student: every rank runs this with its own ``env``.

    ``student``: the FSDP2 root over the trainable student; ``teacher``: the FSDP2 root over the
    teacher, or a ``HiddenAndHead`` over a full replica on every rank. ``replica``: the unsharded
    copy the ``hf`` engine and validation sample from (``generate`` runs a data-dependent number of
    forward passes, which would desynchronise FSDP's per-forward all-gathers across ranks), or None
    with an engine that keeps its own weights.
    """

    def __init__(self, env: DistEnv, student: HiddenAndHead, teacher: nn.Module, replica: nn.Module | None):
        self.env, self.device = env, env.device
        self.student, self.teacher, self.replica = student, teacher, replica
        self.is_main = env.is_main
        self.process_group = dist.group.WORLD  # set once the process group exists, as it does here

    @torch.no_grad()
    def weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """The sharded student's ``(state-dict name, full tensor)`` pairs, gathered one tensor at a
        time, so the transient memory is the largest tensor in fp32 (the embedding), not a second
        full fp32 copy of the model. Collective: every rank must consume all of them, in order."""
        from torch.distributed.tensor import DTensor

        for name, value in self.student.model.state_dict().items():
            yield name, value.full_tensor() if isinstance(value, DTensor) else value

    def sampling_model(self) -> nn.Module:
        return self.replica

    def sample(self, rollout, prompts, *, k, micro_prompts, step, seed, length_buckets) -> Sampled:
        # Slots are fixed before sampling (vaopd.distributed: groups may continue on a neighbour
        # rank); each rank reseeds per step so that a resume on the same ranks samples the same.
        rank = self.env.rank
        parts = [list(m[rank]) for m in slot_layout(len(prompts), k, micro_prompts, self.env.world_size)]
        self.refresh_rollout(rollout)
        torch.manual_seed(rollout_seed(seed, step, rank))
        out = self._generate(lambda: generate_slots(rollout, prompts, [j for part in parts for j in part], k), prompts)
        release = getattr(rollout, "release", None)
        if release is not None:
            release()
        if self.any_rank(out is None):
            raise NonFiniteRollout("sampling failed on a rank: the rollout weights are non-finite")
        return Sampled(*out, parts)

    def done_with_teacher(self) -> None:
        if hasattr(self.teacher, "reshard"):  # an FSDP root stays gathered after its forward
            self.teacher.reshard()

    def reduce_sums(self, sums: dict[str, float]) -> dict[str, float]:
        return reduce_sums(sums, self.device)

    def any_rank(self, flag: bool) -> bool:
        return any_rank(flag, self.device)

    def clip_grad_norm(self, params: list[nn.Parameter], max_norm: float) -> float:
        return clip_grad_norm(params, max_norm)

    def validation_share(self, records: list, seed: int) -> tuple[list, int]:
        # Every N-th question, sampled with a seed of its own per rank.
        return records[self.env.rank::self.env.world_size], seed + self.env.rank

    def reduce_validation(self, out: dict) -> dict:
        totals = self.reduce_sums({"correct": out["accuracy"] * out["samples"], "samples": float(out["samples"]),
                                   "questions": float(out["questions"])})
        return {"accuracy": totals["correct"] / max(totals["samples"], 1.0), "samples": int(totals["samples"]),
                "questions": int(totals["questions"])}

