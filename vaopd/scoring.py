"""Teacher-forced scoring of sampled responses: inputs, hidden states, the ablated view, the scorer.

The trainer, the rollout log, the toy SFT and the analyses all score ``[rows, T]`` responses the
same way: the prompt followed by ``tokens[:, :-1]``, with hidden states aligned to ``tokens``.
"""
from __future__ import annotations

import torch

from typing import TYPE_CHECKING

from vaopd.ablate import ablate
from vaopd.distributed import HiddenAndHead
from vaopd.rollout import PromptBatch, prompt_pixels

if TYPE_CHECKING:
    from vaopd.config import Config

__all__ = ["scoring_inputs", "response_states", "response_hidden", "body_hidden", "teacher_hidden", "ablation_seed",
           "ablated_view", "scoring_padding", "Scorer"]


def scoring_inputs(prompts: PromptBatch, tokens: torch.Tensor, mask: torch.Tensor) -> dict:
    """Teacher-forcing inputs for ``[rows, T]`` responses: the prompt plus ``tokens[:, :-1]``.

    The final hidden state at prompt position ``Lp - 1 + t`` predicts response token ``t``, so
    ``response_states`` (``hidden[:, Lp - 1:]``) is ``[rows, T, D]`` aligned with ``tokens`` as
    the loss expects.
    """
    prefix = tokens[:, :-1]
    return dict(
        input_ids=torch.cat([prompts.input_ids, prefix], 1),
        attention_mask=torch.cat([prompts.attention_mask, mask[:, :-1].long()], 1),
        # Generated tokens are text: mm type 0 (Qwen-VL needs this tensor with images).
        mm_token_type_ids=torch.cat([prompts.mm_token_type_ids, torch.zeros_like(prefix)], 1),
        pixel_values=prompts.pixel_values, image_grid_thw=prompts.image_grid_thw, use_cache=False,
    )


def response_states(hidden: torch.Tensor, prompts: PromptBatch) -> torch.Tensor:
    """``[rows, Lp + T - 1, D]`` final hidden states of ``scoring_inputs`` -> ``[rows, T, D]``, the
    positions that predict the response tokens (``Lp``: the prompts' padded length)."""
    return hidden[:, prompts.input_ids.shape[1] - 1:]


def response_hidden(model, prompts: PromptBatch, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Final hidden states ``[rows, T, D]`` of a transformers VLM's body on the responses (no LM head)."""
    return response_states(model.model(**scoring_inputs(prompts, tokens, mask)).last_hidden_state, prompts)


def body_hidden(model, inputs: dict) -> torch.Tensor:
    """Final hidden states of ``model`` on ``inputs``: a transformers VLM's body (no LM head, no
    logits) or the forward of a ``HiddenAndHead`` root over one (FSDP-sharded or not)."""
    if isinstance(model, HiddenAndHead):
        return model(**inputs)[0]
    return model.model(**inputs).last_hidden_state


def teacher_hidden(teacher, prompts: PromptBatch, ablated_pixels: torch.Tensor | None, tokens, mask):
    """Teacher final hidden states ``[rows, T, Dt]`` for the clean and ablated views (or None).

    Both views run as one doubled batch through the teacher's body (no LM head, no logits).
    ``teacher`` is a transformers VLM or a ``HiddenAndHead`` root over one (FSDP-sharded or not;
    its forward gives the same hidden states).
    """
    inputs = scoring_inputs(prompts, tokens, mask)
    if ablated_pixels is not None:
        inputs = {k: (torch.cat([v, v]) if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}
        inputs["pixel_values"] = torch.cat([prompts.pixel_values, ablated_pixels])
    with torch.no_grad():
        hidden = response_states(body_hidden(teacher, inputs), prompts)
    if ablated_pixels is None:
        return hidden, None
    return hidden.chunk(2)


def ablation_seed(seed: int, step: int, prompts_per_step: int, prompt: int) -> int:
    """Seed of the random ablations (noise, patch mask) of prompt ``prompt`` (0-based within the
    step) at step ``step``: fixed by the run's seed and the prompt's place in the run, so a resumed
    run and the rollout log see the very image the loss used."""
    return seed * 1_000_003 + step * prompts_per_step + prompt


def ablated_view(cfg: Config, records, prompts: PromptBatch, image_processor, *, step: int,
                 positions: list[int]) -> PromptBatch:
    """``prompts`` with the ablated images (``cfg.loss.ablation``) of ``records`` instead of the clean ones.

    ``positions[i]``: the step-relative prompt index of row ``i`` (its ablation seed); the
    patch grid is checked to stay that of ``prompts``.
    """
    loss = cfg.loss
    images = [ablate(r.image, loss.ablation, seed=ablation_seed(cfg.train.seed, step, cfg.train.prompts_per_step, i),
                     pixelate_factor=loss.pixelate_factor, blur_radius=loss.blur_radius, noise_std=loss.noise_std,
                     patch_size=loss.patch_size, patch_fraction=loss.patch_fraction) for r, i in zip(records, positions)]
    return prompts.with_pixels(prompt_pixels(images, image_processor, prompts.image_grid_thw))


def scoring_padding(prompts: PromptBatch, mask: torch.Tensor, packed: bool) -> tuple[int, int]:
    """``(computed, needed)`` positions of one scoring pass over ``prompts`` and ``[rows, T]`` responses.

    needed: per row its valid prompt tokens plus its first ``n - 1`` response tokens (the inputs
    whose hidden states predict the ``n`` valid response tokens), ``sum(Lp_i + n_i - 1)``. computed:
    that same sum when packed (``vaopd.packing``); padded, ``rows x (Lp + T - 1)`` with ``Lp`` the
    prompts' padded length and ``T`` the responses' (the step trims both to the micro-batch's
    longest valid ones). The step logs ``scoring_padding`` as the sum of ``computed`` over the sum
    of ``needed`` of its passes.
    """
    n = mask.bool().sum(1)
    prompt = prompts.attention_mask.sum(1)
    needed = int((prompt + n - 1).clamp(min=0).sum())
    if packed:
        return needed, needed
    return mask.shape[0] * (prompts.attention_mask.shape[1] + mask.shape[1] - 1), needed


class Scorer:
    """Scores a micro-batch's responses with the teacher (both views) and the student, padded:
    ``[rows, Lp + T - 1]`` per pass (``vaopd.packing.PackedScorer`` packs them instead).

    ``student`` / ``teacher``: ``HiddenAndHead``-style modules (a strategy's, ``vaopd.strategy``)
    whose forward on ``scoring_inputs`` returns ``(final hidden, LM-head weight)``.
    """

    packed = False

    def __init__(self, student: torch.nn.Module, teacher: torch.nn.Module):
        self.student_model, self.teacher_model = student, teacher

    def teacher(self, prompts: PromptBatch, ablated_pixels: torch.Tensor | None, tokens, mask):
        """``(clean [rows, T, Dt], ablated [rows, T, Dt] or None, LM-head weight [V, Dt])``, no grad."""
        with torch.no_grad():
            clean, ablated = teacher_hidden(self.teacher_model, prompts, ablated_pixels, tokens, mask)
            # A sharded teacher's root stays gathered after its forward: this is the full weight.
            weight = self.teacher_model.model.get_output_embeddings().weight
        return clean, ablated, weight

    def student(self, prompts: PromptBatch, tokens, mask) -> tuple[torch.Tensor, torch.Tensor]:
        """``(hidden [rows, T, Ds], LM-head weight [V, Ds])`` with gradients."""
        hidden, weight = self.student_model(**scoring_inputs(prompts, tokens, mask))
        return response_states(hidden, prompts), weight

    def padding(self, prompts: PromptBatch, mask: torch.Tensor) -> tuple[int, int]:
        """``(computed, needed)`` positions of one pass of this scorer (``scoring_padding``)."""
        return scoring_padding(prompts, mask, packed=self.packed)
