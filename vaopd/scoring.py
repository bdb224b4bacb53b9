"""Teacher-forced scoring of sampled responses: inputs and the teacher's final hidden states.

The trainer, the rollout log, the toy SFT and the analyses all score ``[rows, T]`` responses the
same way: the prompt followed by ``tokens[:, :-1]``, with hidden states aligned to ``tokens``.
"""
from __future__ import annotations

import torch

from vaopd.distributed import HiddenAndHead
from vaopd.rollout import PromptBatch

__all__ = ["scoring_inputs", "teacher_hidden"]


def scoring_inputs(prompts: PromptBatch, tokens: torch.Tensor, mask: torch.Tensor) -> dict:
    """Teacher-forcing inputs for ``[rows, T]`` responses: the prompt plus ``tokens[:, :-1]``.

    The final hidden state at prompt position ``Lp - 1 + t`` predicts response token ``t``, so
    ``hidden[:, Lp - 1:]`` is ``[rows, T, D]`` aligned with ``tokens`` as the loss expects.
    """
    prefix = tokens[:, :-1]
    return dict(
        input_ids=torch.cat([prompts.input_ids, prefix], 1),
        attention_mask=torch.cat([prompts.attention_mask, mask[:, :-1].long()], 1),
        # Generated tokens are text: mm type 0 (Qwen-VL needs this tensor with images).
        mm_token_type_ids=torch.cat([prompts.mm_token_type_ids, torch.zeros_like(prefix)], 1),
        pixel_values=prompts.pixel_values, image_grid_thw=prompts.image_grid_thw, use_cache=False,
    )


def teacher_hidden(teacher, prompts: PromptBatch, ablated_pixels: torch.Tensor | None, tokens, mask):
    """Teacher final hidden states ``[rows, T, Dt]`` for the clean and ablated views (or None).

    Both views run as one doubled batch through ``teacher.model`` (no LM head, no logits).
    ``teacher`` may also be an FSDP ``HiddenAndHead`` root over the teacher (its forward gives the
    same hidden states).
    """
    lp = prompts.input_ids.shape[1]
    inputs = scoring_inputs(prompts, tokens, mask)
    if ablated_pixels is not None:
        inputs = {k: (torch.cat([v, v]) if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}
        inputs["pixel_values"] = torch.cat([prompts.pixel_values, ablated_pixels])
    with torch.no_grad():
        if isinstance(teacher, HiddenAndHead):
            hidden = teacher(**inputs)[0][:, lp - 1:]
        else:
            hidden = teacher.model(**inputs).last_hidden_state[:, lp - 1:]
    if ablated_pixels is None:
        return hidden, None
    return hidden.chunk(2)
