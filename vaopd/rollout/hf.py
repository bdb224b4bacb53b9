"""The transformers ``generate`` rollout engine (``rollout.engine: hf``).

``compile`` (``rollout.hf.compile``): ``on`` runs ``generate`` with a static KV cache and a
compiled decode step (``vaopd.rollout.decode.StaticDecode``), ``off`` with transformers' dynamic
cache, eagerly; ``auto`` is on for CUDA and off on a CPU. Either way the sampled tokens are the
same for the same weights and seed (tests/test_rollout_compiled.py).
"""
from __future__ import annotations

from contextlib import nullcontext

import torch
from vaopd import torchvision_ops  # noqa: F401  first: transformers may import torchvision (see there)
from transformers import LogitsProcessorList

from vaopd.rollout.decode import DecodeClock, StaticDecode, compile_enabled
from vaopd.rollout.prompts import PromptBatch, response_mask

__all__ = ["HFGenerate"]


class HFGenerate:
    """``RolloutBackend`` on ``model.generate``: sampling with temperature, top-p and top-k (None = off), KV cache.

    ``static``: the static-cache settings (a ``StaticDecode``), None for the dynamic cache.
    ``stats``: figures of the last ``generate`` call (all its chunks): ``decode_ms`` (ms per decode
    step of a batch), ``prefill_s``, ``decode_steps``, and with the static cache ``cache_len`` and
    ``graphs_compiled`` (graphs torch.compile built during the call; 0 once shapes recur).
    """

    def __init__(self, model, *, eos_ids: list[int], pad_id: int, banned_ids: list[int],
                 temperature: float, top_p: float, max_new_tokens: int, batch_prompts: int | None = None,
                 top_k: int | None = None, compile: str = "off", cache_multiple: int = 256):
        self.model, self.eos_ids, self.pad_id, self.banned_ids = model, eos_ids, pad_id, banned_ids
        self.temperature, self.top_p, self.top_k = temperature, top_p, top_k
        self.max_new_tokens, self.batch_prompts = max_new_tokens, batch_prompts
        on = compile_enabled(compile, next(model.parameters()).device)
        self.static = StaticDecode(compile=True, cache_multiple=cache_multiple) if on else None
        self.stats: dict = {}

    @torch.no_grad()
    def generate(self, prompts: PromptBatch, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        was_training = self.model.training
        self.model.eval()
        clock = DecodeClock(next(self.model.parameters()).device)
        graphs = self.static.graphs if self.static else 0
        try:
            step = self.batch_prompts or len(prompts)
            chunks = [self._generate(prompts.select(list(range(s, min(s + step, len(prompts))))).repeat(k), clock)
                      for s in range(0, len(prompts), step)]
        finally:
            self.model.train(was_training)
        self.stats = dict(decode_ms=clock.decode_ms, prefill_s=clock.prefill_s, decode_steps=clock.decode_steps)
        if self.static:
            self.stats.update(cache_len=self.static.cache_len, graphs_compiled=self.static.graphs - graphs)
        width = max(c.shape[1] for c in chunks)
        tokens = torch.cat([torch.nn.functional.pad(c, (0, width - c.shape[1]), value=self.pad_id) for c in chunks])
        return tokens, response_mask(tokens, self.eos_ids)

    def _generate(self, batch: PromptBatch, clock: DecodeClock) -> torch.Tensor:
        device = next(self.model.parameters()).device
        batch = batch.to(device)
        options = self.static.options(device, batch.input_ids.shape[1], self.max_new_tokens) if self.static else {}
        clock.start()
        with self.static.counting() if self.static else nullcontext():
            out = self.model.generate(
                input_ids=batch.input_ids, attention_mask=batch.attention_mask, mm_token_type_ids=batch.mm_token_type_ids,
                pixel_values=batch.pixel_values, image_grid_thw=batch.image_grid_thw,
                # top_k 0: no top-k filter, whatever the model's own generation_config sets
                do_sample=True, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k or 0,
                max_new_tokens=self.max_new_tokens, eos_token_id=self.eos_ids, pad_token_id=self.pad_id,
                suppress_tokens=self.banned_ids or None, use_cache=True, logits_processor=LogitsProcessorList([clock]),
                **options,
            )
        clock.stop()
        return out[:, batch.input_ids.shape[1]:].cpu()
