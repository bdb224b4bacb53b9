"""Prompts, the rollout interface and response masks (shared by every rollout engine).

- ``encode_prompts`` turns records into a left-padded Qwen-VL batch (``PromptBatch``), expanding
  each image placeholder to the number of image tokens its grid needs (as the Qwen processor
  does, without its torchvision-bound video processor).
- ``RolloutBackend`` is the small interface a generation engine implements (``vaopd.rollout.hf``,
  ``vaopd.rollout.vllm``).
- ``response_mask`` implements the objective's valid tokens: up to and including the first EOS; a
  truncated response keeps all its tokens.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Protocol

import torch
from PIL import Image

__all__ = ["PromptBatch", "encode_prompts", "prompt_pixels", "banned_token_ids", "response_mask", "RolloutBackend"]

_VISION_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>", "<|vision_pad|>")


@dataclass
class PromptBatch:
    """A left-padded batch of N prompts with one image each.

    input_ids, attention_mask, mm_token_type_ids: ``[N, Lp]`` int64 (mm type 1 at image tokens).
    pixel_values: ``[sum of patches, C * t * p * p]`` float, the images' patches in row order.
    image_grid_thw: ``[N, 3]`` int64 patch grid per image.
    images: the N PIL images themselves (engines that process images on their own, e.g. vLLM,
    take these); None for a batch whose pixels were replaced (``with_pixels``).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    mm_token_type_ids: torch.Tensor
    pixel_values: torch.Tensor
    image_grid_thw: torch.Tensor
    images: list[Image.Image] | None = None

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def select(self, rows: torch.Tensor | list[int]) -> "PromptBatch":
        """The prompts at ``rows`` (in that order, repeats allowed), with their image patches."""
        rows = torch.as_tensor(rows, dtype=torch.long)
        sizes = self.image_grid_thw.prod(dim=1)
        starts = torch.cumsum(sizes, 0) - sizes
        patches = torch.cat([torch.arange(int(starts[r]), int(starts[r] + sizes[r])) for r in rows.tolist()])
        return PromptBatch(
            input_ids=self.input_ids[rows], attention_mask=self.attention_mask[rows],
            mm_token_type_ids=self.mm_token_type_ids[rows], pixel_values=self.pixel_values[patches.to(self.pixel_values.device)],
            image_grid_thw=self.image_grid_thw[rows],
            images=None if self.images is None else [self.images[r] for r in rows.tolist()],
        )

    def repeat(self, k: int) -> "PromptBatch":
        """Each prompt ``k`` times in a row (the sibling layout: prompt-major)."""
        return self.select(torch.arange(len(self)).repeat_interleave(k))

    def with_pixels(self, pixel_values: torch.Tensor) -> "PromptBatch":
        return replace(self, pixel_values=pixel_values, images=None)

    def to(self, device) -> "PromptBatch":
        tensors = {k: getattr(self, k).to(device) for k in self.__dataclass_fields__ if k != "images"}
        return PromptBatch(**tensors, images=self.images)


def _processed(images: list[Image.Image], image_processor) -> tuple[torch.Tensor, torch.Tensor]:
    out = image_processor(images=images, return_tensors="pt")
    return out["pixel_values"], out["image_grid_thw"].long()


def encode_prompts(questions: list[str], images: list[Image.Image], tokenizer, image_processor) -> PromptBatch:
    """Chat-format ``questions`` with their ``images`` into a left-padded ``PromptBatch``."""
    pixel_values, grid = _processed(images, image_processor)
    merge = int(getattr(image_processor, "merge_size", 2))
    image_pad = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    rows = []
    for i, question in enumerate(questions):
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if ids.count(image_pad) != 1:
            raise ValueError(f"the chat template put {ids.count(image_pad)} image placeholders in prompt {i}; expected 1")
        n_image_tokens = int(grid[i].prod()) // (merge * merge)
        at = ids.index(image_pad)
        rows.append(ids[:at] + [image_pad] * n_image_tokens + ids[at + 1:])
    length = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id
    input_ids = torch.full((len(rows), length), pad, dtype=torch.long)
    attention = torch.zeros((len(rows), length), dtype=torch.long)
    for i, r in enumerate(rows):
        input_ids[i, length - len(r):] = torch.tensor(r)
        attention[i, length - len(r):] = 1
    mm = ((input_ids == image_pad) & (attention == 1)).long()
    return PromptBatch(input_ids, attention, mm, pixel_values, grid, images=list(images))


def prompt_pixels(images: list[Image.Image], image_processor, grid: torch.Tensor) -> torch.Tensor:
    """Pixel patches of ``images`` (e.g. ablated copies), checked to have the same ``grid``."""
    pixel_values, other = _processed(images, image_processor)
    if not torch.equal(other, grid.cpu()):
        raise ValueError("an ablated image changed the patch grid; ablations must keep the image size")
    return pixel_values


def banned_token_ids(tokenizer, lm_head_rows: int, eos_ids: list[int]) -> list[int]:
    """Ids never to sample: LM-head padding rows, vision special tokens, and pad when it is not an EOS."""
    banned = set(range(len(tokenizer), lm_head_rows))
    vocab = tokenizer.get_vocab()
    banned.update(vocab[t] for t in _VISION_TOKENS if t in vocab)
    if tokenizer.pad_token_id is not None and tokenizer.pad_token_id not in eos_ids:
        banned.add(tokenizer.pad_token_id)
    return sorted(banned)


def response_mask(tokens: torch.Tensor, eos_ids: list[int]) -> torch.Tensor:
    """``[B, T]`` bool: True up to and including the first EOS of each row; all True without EOS."""
    is_eos = torch.isin(tokens, torch.tensor(eos_ids, device=tokens.device))
    # Number of EOS strictly before each position: a token is valid while none came before it.
    before = torch.cumsum(is_eos.long(), dim=1) - is_eos.long()
    return before == 0


class RolloutBackend(Protocol):
    """Samples ``k`` responses per prompt. Returns ``tokens [N*k, T]`` int64 (prompt-major rows,
    padding after the first EOS) and their ``response_mask``.

    An engine that keeps its own copy of the weights also has ``load_weights(named_tensors)``
    (the student's ``(state-dict name, tensor)`` pairs, called before every rollout) and may have
    ``release()`` (free memory once the rollout is done); ``vaopd.strategy`` calls them. An engine
    may expose ``stats`` (a dict of figures of its last ``generate`` call: ``decode_ms``,
    ``graphs_compiled``), which the step copies into its metrics record.
    """

    def generate(self, prompts: PromptBatch, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        ...
