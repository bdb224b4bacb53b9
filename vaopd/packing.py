"""Packed teacher-forced scoring: prompt + response of every row in one sequence, no padding.

The padded path (``vaopd.scoring``) runs ``[rows, Lp + T - 1]`` with left-padded prompts and
right-padded responses. Here each row keeps only the positions whose hidden state is needed or
attended: its valid prompt tokens and its first ``n - 1`` response tokens (``n`` = its valid
response length; the hidden state at prompt position ``Lp - 1 + t`` predicts response token ``t``,
so the last valid token is never an input). The rows are concatenated into one sequence of
``sum(Lp_i + n_i - 1)`` positions:

- ``position_ids`` ``[4, 1, total]``: row 0 the text positions ``0, 1, ...`` restarting at every
  row (transformers detects the packed sequences from these restarts and keeps each row's
  attention inside its own sequence: ``masking_utils.find_packed_sequence_indices``); rows 1-3 the
  Qwen-VL 3-D rope index of each row on its own (``get_rope_index`` with the padded batch's
  attention mask, which counts positions over valid tokens only, then the kept positions);
- ``attention_mask=None`` and ``use_cache=False`` (with a cache the packed-sequence detection is
  skipped and rows would attend across each other);
- the images' patches in row order, as the padded batch has them.

The hidden states of the response positions are gathered back into the ``[rows, T, D]`` layout the
fused loss takes (zeros at invalid positions, which the loss masks out): per token they equal the
padded path's (tests/test_packing.py). Callers keep whole sibling groups in one pack (the loss's
weights need them).

Attention. With SDPA or eager attention transformers builds a dense block-causal mask of
``[total x total]`` per packed row: its memory and attention work grow with the square of the
micro-batch's total length, not of each row's. Two attentions take packed sequences natively:
flash-attention 2 where installed (variable-length kernels, the sequences found from the
restarting positions; ``model.attn_implementation``), and PyTorch's FlexAttention (a block mask,
no dense one; ``use_flex_attention``). ``choose_packed_attention`` picks per model from
``train.packed_attention``. transformers refuses ``attn_implementation="flex_attention"`` for Qwen3-VL ("does
not support an attention implementation through torch's flex_attention": the model class does not
declare flex support, in 5.17 and 5.24), so its own ``flex_attention_forward`` and
``flex_attention_mask`` are registered under ``vaopd_flex`` (``AttentionInterface``,
``AttentionMaskInterface``) for the text model only; the vision tower keeps its implementation.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from vaopd import torchvision_ops  # noqa: F401  first: transformers may import torchvision (see there)
from vaopd.rollout import PromptBatch
from vaopd.scoring import Scorer, body_hidden, scoring_inputs

__all__ = ["Packed", "pack", "packed_hidden", "unpack", "packed_teacher_hidden", "PackedScorer", "PackedAttention",
           "choose_packed_attention", "use_flex_attention", "FLEX"]

FLEX = "vaopd_flex"


@dataclass
class Packed:
    """``rows`` responses packed into one sequence.

    inputs: model keyword arguments for the packed sequence (``input_ids`` ``[1, total]``,
    ``position_ids`` ``[4, 1, total]``, ``mm_token_type_ids``, ``pixel_values``, ``image_grid_thw``,
    ``attention_mask=None``, ``use_cache=False``).
    index: ``[rows, T]`` int64, the packed position whose hidden state predicts response token
    ``t`` (0 where ``valid`` is False). valid: ``[rows, T]`` bool, the response mask.
    """

    inputs: dict
    index: torch.Tensor
    valid: torch.Tensor

    @property
    def total(self) -> int:
        return self.inputs["input_ids"].shape[1]


def pack(prompts: PromptBatch, tokens: torch.Tensor, mask: torch.Tensor, rope_index) -> Packed:
    """Pack ``prompts`` (``rows`` left-padded prompts, one per response) and ``[rows, T]`` responses.

    ``rope_index``: the model's ``get_rope_index`` (``model.model.get_rope_index`` of a
    ``*ForConditionalGeneration``). It depends only on the token layout, the image grids and the
    vision merge size, so one pack serves a student and a teacher of the same family.
    """
    mask = mask.bool()
    padded = scoring_inputs(prompts, tokens, mask)
    lp = prompts.input_ids.shape[1]
    n = mask.sum(1)  # valid response tokens per row (a prefix: response_mask)
    cols = torch.arange(padded["input_ids"].shape[1], device=tokens.device)
    # Prompt tokens where valid; response inputs tokens[:, :n - 1] only.
    keep = prompts.attention_mask.bool().new_zeros(padded["input_ids"].shape)
    keep[:, :lp] = prompts.attention_mask.bool()
    keep[:, lp:] = (cols[lp:] - lp).unsqueeze(0) < (n - 1).unsqueeze(1)
    rope, _ = rope_index(padded["input_ids"], padded["mm_token_type_ids"], image_grid_thw=prompts.image_grid_thw,
                         attention_mask=padded["attention_mask"])
    text = keep.long().cumsum(1) - 1  # restarts at 0 in every row
    position_ids = torch.cat([text.unsqueeze(0), rope.to(text.device)])[:, keep].unsqueeze(1)
    # Row i's response position t sits at offset_i + (Lp_i - 1) + t in the packed sequence.
    lengths = keep.sum(1)
    offset = torch.cumsum(lengths, 0) - lengths
    prompt_len = prompts.attention_mask.sum(1)
    t = torch.arange(tokens.shape[1], device=tokens.device)
    index = torch.where(mask, (offset + prompt_len - 1).unsqueeze(1) + t, 0)
    inputs = dict(input_ids=padded["input_ids"][keep].unsqueeze(0), position_ids=position_ids,
                  mm_token_type_ids=padded["mm_token_type_ids"][keep].unsqueeze(0), pixel_values=prompts.pixel_values,
                  image_grid_thw=prompts.image_grid_thw, attention_mask=None, use_cache=False)
    return Packed(inputs, index, mask)


def unpack(hidden: torch.Tensor, packed: Packed) -> torch.Tensor:
    """``[1, total, D]`` packed hidden states -> ``[rows, T, D]`` at the response positions (0 where invalid)."""
    gathered = hidden[0][packed.index]
    return torch.where(packed.valid.unsqueeze(-1), gathered, gathered.new_zeros(()))


def packed_hidden(body, packed: Packed) -> torch.Tensor:
    """``[rows, T, D]`` final hidden states of a model body (``model.model``) on ``packed`` (with gradients
    if enabled)."""
    return unpack(body(**packed.inputs).last_hidden_state, packed)


def packed_teacher_hidden(teacher, packed: Packed, ablated_pixels: torch.Tensor | None):
    """Teacher ``[rows, T, Dt]`` hidden states for the clean and the ablated view (or None), no gradients.

    Both views run as one batch of two packed rows of the same layout (the ablated row takes
    ``ablated_pixels``). ``teacher``: a ``*ForConditionalGeneration`` or a ``HiddenAndHead`` root
    over one (``vaopd.scoring.body_hidden``).
    """
    inputs = packed.inputs
    if ablated_pixels is not None:
        inputs = dict(inputs, input_ids=inputs["input_ids"].expand(2, -1),
                      position_ids=inputs["position_ids"].expand(-1, 2, -1),
                      mm_token_type_ids=inputs["mm_token_type_ids"].expand(2, -1),
                      pixel_values=torch.cat([inputs["pixel_values"], ablated_pixels]),
                      image_grid_thw=torch.cat([inputs["image_grid_thw"], inputs["image_grid_thw"]]))
    with torch.no_grad():
        hidden = body_hidden(teacher, inputs)
    if ablated_pixels is None:
        return unpack(hidden, packed), None
    return unpack(hidden[:1], packed), unpack(hidden[1:], packed)


def use_flex_attention(model) -> None:
    """Run the text model of ``model`` (a ``*ForConditionalGeneration``) on FlexAttention: packed
    sequences get a block mask built from the restarting positions, never a dense one. The vision
    tower keeps its attention. FlexAttention compiles its kernels on first use, and again for
    dynamic shapes when the packed length first changes (torch.compile's automatic dynamic shapes;
    on a CPU that second build fails, on a GPU ``bench/gpu_check.sh`` checks it)."""
    from transformers import AttentionInterface
    from transformers.integrations.flex_attention import flex_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, flex_attention_mask

    AttentionInterface.register(FLEX, flex_attention_forward)
    AttentionMaskInterface.register(FLEX, flex_attention_mask)
    model.set_attn_implementation({"text_config": FLEX})


@dataclass(frozen=True)
class PackedAttention:
    """What the packed passes of each model attend with (``train.packed_attention``).

    ``teacher`` / ``student``: ``"flex"`` (FlexAttention, ``use_flex_attention``) or ``"model"``
    (the model's own attention: flash-attention 2's variable-length kernels, or SDPA/eager with a
    dense block-causal ``[total x total]`` mask per packed row). ``why``: why the student keeps its
    own attention where FlexAttention was asked for ("" otherwise).
    """

    teacher: str
    student: str
    why: str = ""

    def describe(self, model_attention: str) -> str:
        def name(kind):
            if kind == "flex":
                return "FlexAttention"
            if model_attention == "flash_attention_2":
                return "flash-attention 2 (variable length)"
            return f"{model_attention} with a dense block mask"

        text = f"teacher {name(self.teacher)}, student {name(self.student)}"
        return f"{text} ({self.why})" if self.why else text


def choose_packed_attention(setting: str, model_attention: str, device: torch.device, student_samples: bool) -> PackedAttention:
    """Resolve ``train.packed_attention`` (``auto | flex | model``) for one run.

    ``model_attention``: the models' attention implementation (``model.attn_implementation``
    resolved). ``student_samples``: the trained student also generates the rollouts (LoRA on one
    process with the ``hf`` engine); it then keeps its own attention, which generation with a KV
    cache needs.

    auto: the models' own attention when it is flash-attention 2 (already bounded), else
    FlexAttention on CUDA, else (a CPU) the models' own: at a CPU's sizes the dense block mask is
    small. flex: FlexAttention, on CUDA only (``ValueError`` elsewhere): on a CPU it has no backward
    (torch 2.13), and once the packed length changes its kernels recompile for dynamic shapes,
    which inductor's CPU code generation fails to build (a C++ compile error).
    """
    if setting not in ("auto", "flex", "model"):
        raise ValueError(f"packed attention: {setting!r} is not one of auto, flex, model")
    if setting == "flex" and device.type != "cuda":
        raise ValueError(f"flex needs CUDA (this run is on {device.type}): on a CPU FlexAttention has no backward and its "
                         "kernels fail to compile once the packed length changes; use auto or model")
    if setting == "model" or (setting == "auto" and (model_attention == "flash_attention_2" or device.type != "cuda")):
        return PackedAttention("model", "model")
    if student_samples:
        return PackedAttention("flex", "model", "the student also samples the rollouts with a KV cache")
    return PackedAttention("flex", "flex")


class PackedScorer(Scorer):
    """The ``Scorer`` on packed sequences (``train.packed_scoring``): one packed row per pass for
    the student, two (clean and ablated view) for the teacher; hidden states come back in the
    padded path's ``[rows, T, D]`` layout, equal to it up to float rounding.

    Each model packs with its own ``get_rope_index`` (the Qwen-VL families share its signature).
    The attention is whatever each model's text part is set to (``build_setup`` applies
    ``choose_packed_attention``): flash-attention 2 runs the packed rows as variable-length
    sequences, FlexAttention with a block mask, SDPA or eager with a dense block-causal
    ``[total x total]`` mask per packed row (see the module docstring).
    """

    packed = True

    def teacher(self, prompts: PromptBatch, ablated_pixels: torch.Tensor | None, tokens, mask):
        with torch.no_grad():
            p = pack(prompts, tokens, mask, self.teacher_model.model.model.get_rope_index)
            clean, ablated = packed_teacher_hidden(self.teacher_model, p, ablated_pixels)
            weight = self.teacher_model.model.get_output_embeddings().weight
        return clean, ablated, weight

    def student(self, prompts: PromptBatch, tokens, mask) -> tuple[torch.Tensor, torch.Tensor]:
        p = pack(prompts, tokens, mask, self.student_model.model.model.get_rope_index)
        hidden, weight = self.student_model(**p.inputs)
        return unpack(hidden, p), weight
