"""The transformers ``generate`` rollout engine (``rollout.engine: hf``)."""
from __future__ import annotations

import torch

from vaopd.rollout.prompts import PromptBatch, response_mask

__all__ = ["HFGenerate"]


class HFGenerate:
    """``RolloutBackend`` on ``model.generate``: sampling with temperature, top-p and top-k (None = off), KV cache."""

    def __init__(self, model, *, eos_ids: list[int], pad_id: int, banned_ids: list[int],
                 temperature: float, top_p: float, max_new_tokens: int, batch_prompts: int | None = None,
                 top_k: int | None = None):
        self.model, self.eos_ids, self.pad_id, self.banned_ids = model, eos_ids, pad_id, banned_ids
        self.temperature, self.top_p, self.top_k = temperature, top_p, top_k
        self.max_new_tokens, self.batch_prompts = max_new_tokens, batch_prompts

    @torch.no_grad()
    def generate(self, prompts: PromptBatch, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        was_training = self.model.training
        self.model.eval()
        try:
            step = self.batch_prompts or len(prompts)
            chunks = [self._generate(prompts.select(list(range(s, min(s + step, len(prompts))))).repeat(k))
                      for s in range(0, len(prompts), step)]
        finally:
            self.model.train(was_training)
        width = max(c.shape[1] for c in chunks)
        tokens = torch.cat([torch.nn.functional.pad(c, (0, width - c.shape[1]), value=self.pad_id) for c in chunks])
        return tokens, response_mask(tokens, self.eos_ids)

    def _generate(self, batch: PromptBatch) -> torch.Tensor:
        device = next(self.model.parameters()).device
        batch = batch.to(device)
        out = self.model.generate(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, mm_token_type_ids=batch.mm_token_type_ids,
            pixel_values=batch.pixel_values, image_grid_thw=batch.image_grid_thw,
            # top_k 0: no top-k filter, whatever the model's own generation_config sets
            do_sample=True, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k or 0,
            max_new_tokens=self.max_new_tokens, eos_token_id=self.eos_ids, pad_token_id=self.pad_id,
            suppress_tokens=self.banned_ids or None, use_cache=True,
        )
        return out[:, batch.input_ids.shape[1]:].cpu()
