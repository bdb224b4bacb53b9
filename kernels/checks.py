"""Argument validation shared by the reference loss and the fused loss.

Every error is a ``ValueError`` that names the offending argument and says what to fix.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .objective import as_mask
from .spec import LossSpec


@dataclass(frozen=True)
class LossInputs:
    """Validated loss arguments: the boolean mask, resolved vocabulary size and prompt count."""

    mask: torch.Tensor  # [B, T] bool
    vocab_size: int
    num_prompts: int


def check_float(x: torch.Tensor, name: str, dims: int | None) -> None:
    """A floating-point tensor with ``dims`` dimensions (None: at least one)."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.dtype.is_floating_point:
        raise ValueError(f"{name} must be a floating-point tensor (fp32, bf16 or fp16), got dtype {x.dtype}")
    if (dims is None and x.dim() < 1) or (dims is not None and x.dim() != dims):
        raise ValueError(f"{name} must have {dims or 'at least 1'} dimensions, got shape {tuple(x.shape)}")


def check_linear(hidden: torch.Tensor, weight: torch.Tensor, hidden_name: str, weight_name: str, hidden_dims: int | None) -> None:
    """``hidden [..., D]`` and an LM-head ``weight [V, D]`` that can be multiplied together."""
    check_float(hidden, hidden_name, hidden_dims)
    check_float(weight, weight_name, 2)
    if hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"{hidden_name} has hidden size {hidden.shape[-1]} but {weight_name} has shape {tuple(weight.shape)}: "
            "the LM-head weight must be [vocab, hidden]"
        )
    if hidden.dtype != weight.dtype:
        raise ValueError(f"{hidden_name} ({hidden.dtype}) and {weight_name} ({weight.dtype}) must have the same dtype")
    if hidden.device != weight.device:
        raise ValueError(f"{hidden_name} is on {hidden.device} but {weight_name} is on {weight.device}")


def resolve_vocab_size(vocab_size: int | None, *widths_and_names: tuple[int, str]) -> int:
    """``vocab_size`` or the common LM-head width; it may not exceed any width."""
    if vocab_size is None:
        widths = {w for w, _ in widths_and_names}
        if len(widths) != 1:
            names = ", ".join(f"{n} has {w} rows" for w, n in widths_and_names)
            raise ValueError(f"LM-head widths differ ({names}): pass vocab_size, the tokenizer's vocabulary size")
        return widths.pop()
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
        raise ValueError(f"vocab_size must be a positive int, got {vocab_size!r}")
    for width, name in widths_and_names:
        if vocab_size > width:
            raise ValueError(f"vocab_size {vocab_size} exceeds the {width} rows of {name}")
    return vocab_size


def check_tokens(tokens: torch.Tensor, mask: torch.Tensor | None, vocab_size: int, shape: tuple, device) -> None:
    """Integer token ids of ``shape``, inside ``[0, vocab_size)`` wherever ``mask`` is set."""
    if not isinstance(tokens, torch.Tensor) or tokens.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"tokens must be an int64 (or int32) tensor, got {getattr(tokens, 'dtype', type(tokens).__name__)}")
    if tuple(tokens.shape) != tuple(shape):
        raise ValueError(f"tokens must have shape {list(shape)}, got {tuple(tokens.shape)}")
    if tokens.device != device:
        raise ValueError(f"tokens is on {tokens.device} but the hidden states are on {device}")
    bad = (tokens < 0) | (tokens >= vocab_size)
    if mask is not None:
        bad &= mask  # not tokens[mask]: a mask index is one more wait on the device
    if bad.any():
        raise ValueError(f"tokens holds id {int(tokens[bad][0])} at a valid position: ids must be in [0, vocab_size={vocab_size})")


def check_loss_inputs(
    student_hidden, student_weight, teacher_hidden, teacher_ablated_hidden, teacher_weight,
    tokens, mask, group_ids, *, spec, vocab_size, num_prompts,
) -> LossInputs:
    """Validate the arguments of ``va_opd_loss`` / ``va_opd_loss_reference`` (shapes in their docs)."""
    if not isinstance(spec, LossSpec):
        raise ValueError(f"spec must be a vaopd.kernels.LossSpec (e.g. LossSpec(method='opd')), got {type(spec).__name__}")
    check_linear(student_hidden, student_weight, "student_hidden", "student_weight", 3)
    check_linear(teacher_hidden, teacher_weight, "teacher_hidden", "teacher_weight", 3)
    batch_shape = tuple(student_hidden.shape[:2])
    device = student_hidden.device
    if tuple(teacher_hidden.shape[:2]) != batch_shape:
        raise ValueError(f"teacher_hidden is {tuple(teacher_hidden.shape)} but student_hidden is {tuple(student_hidden.shape)}: [B, T] must match")
    if teacher_hidden.device != device:
        raise ValueError(f"teacher_hidden is on {teacher_hidden.device} but student_hidden is on {device}")
    if teacher_ablated_hidden is None:
        if spec.method == "va_opd":
            raise ValueError("teacher_ablated_hidden is required for method='va_opd' (it gives the visual advantage)")
    else:
        check_float(teacher_ablated_hidden, "teacher_ablated_hidden", 3)
        if teacher_ablated_hidden.shape != teacher_hidden.shape or teacher_ablated_hidden.dtype != teacher_hidden.dtype:
            raise ValueError(
                f"teacher_ablated_hidden ({tuple(teacher_ablated_hidden.shape)}, {teacher_ablated_hidden.dtype}) must match "
                f"teacher_hidden ({tuple(teacher_hidden.shape)}, {teacher_hidden.dtype})"
            )
        if teacher_ablated_hidden.device != device:
            raise ValueError(f"teacher_ablated_hidden is on {teacher_ablated_hidden.device} but student_hidden is on {device}")
    if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != batch_shape:
        raise ValueError(f"mask must be a [B, T] = {list(batch_shape)} tensor, got {tuple(getattr(mask, 'shape', ()))}")
    if mask.device != device:
        raise ValueError(f"mask is on {mask.device} but student_hidden is on {device}")
    mask = as_mask(mask)
    if not isinstance(group_ids, torch.Tensor) or group_ids.dtype != torch.int64 or tuple(group_ids.shape) != batch_shape[:1]:
        raise ValueError(f"group_ids must be an int64 tensor of shape [B] = [{batch_shape[0]}] (one id per response)")
    if group_ids.device != device:
        raise ValueError(f"group_ids is on {group_ids.device} but student_hidden is on {device}")
    vocab = resolve_vocab_size(vocab_size, (student_weight.shape[0], "student_weight"), (teacher_weight.shape[0], "teacher_weight"))
    check_tokens(tokens, mask, vocab, batch_shape, device)
    if num_prompts is None:
        num_prompts = max(1, int(torch.unique(group_ids[mask.any(dim=1)]).numel()))
    elif isinstance(num_prompts, bool) or not isinstance(num_prompts, int) or num_prompts < 1:
        raise ValueError(f"num_prompts must be a positive int (prompts in the optimizer step), got {num_prompts!r}")
    return LossInputs(mask=mask, vocab_size=vocab, num_prompts=num_prompts)
