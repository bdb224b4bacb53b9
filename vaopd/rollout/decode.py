"""transformers ``generate`` with a static KV cache and a compiled decode step (``rollout.hf.compile``).

Everything here is transformers' own machinery, configured so that shapes recur:

- ``cache_implementation="static"``: the KV cache is allocated once per ``generate`` call at
  ``max_cache_len`` positions; ``StaticDecode`` keeps that length fixed per cap (the prompt plus
  ``max_new_tokens``, rounded up to ``cache_multiple`` and never shrinking), so the decode step
  sees one cache shape per cap and batch size. The decode graph does not depend on the prompt's
  length (only on the cache's), so prompts are not padded further.
- ``compile_config``: ``generate`` then runs every decode step through ``torch.compile`` of the
  model's forward (``model.get_compiled_call``); the prefill, where a Qwen-VL model encodes the
  image and builds its 3-D rope positions, runs uncompiled. On CUDA the compile mode is
  ``reduce-overhead`` (CUDA graphs: the weights and the cache are static addresses, so weights
  must be refreshed in place, never re-allocated); on a CPU ``default``, and transformers must
  be told to compile there at all (``CompileConfig._compile_all_devices``, which it otherwise
  skips with "unable to meet the criteria for compilation").

``graphs`` counts the graphs torch.compile built during this engine's ``generate`` calls (the first
compile, recompiles after a guard failure, and fragments after a graph break): it should stop
growing after the first call at each (batch size, cap).
"""
from __future__ import annotations

import math
import time

import torch
from vaopd import torchvision_ops  # noqa: F401  first: transformers may import torchvision (see there)
from transformers import CompileConfig, LogitsProcessor

__all__ = ["COMPILE_MODES", "compile_enabled", "StaticDecode", "DecodeClock"]

COMPILE_MODES = ("auto", "on", "off")


def compile_enabled(mode: str, device: torch.device) -> bool:
    """``rollout.hf.compile``: ``auto`` compiles on CUDA only (on a CPU the first compile costs seconds
    and a decode step gains little), ``on`` / ``off`` force it."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"rollout.hf.compile: {mode!r} is not one of {', '.join(COMPILE_MODES)}")
    return device.type == "cuda" if mode == "auto" else mode == "on"


def _graphs_built() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


class StaticDecode:
    """The ``generate`` options of the static-cache path, with or without the compiled decode step.

    ``cache_len``: the static cache's positions, fixed per cap: ``ceil((prompt + max_new_tokens) /
    cache_multiple) * cache_multiple``, the largest seen so far (a longer prompt grows it by a
    multiple, a shorter one reuses it). ``graphs``: graphs compiled during ``generate`` calls made
    through ``counting``.
    """

    def __init__(self, *, compile: bool, cache_multiple: int = 256):
        if cache_multiple < 1:
            raise ValueError(f"cache_multiple must be at least 1, got {cache_multiple}")
        self.compile, self.cache_multiple = compile, cache_multiple
        self.cache_len, self.graphs = 0, 0

    def reserve(self, prompt_len: int, max_new_tokens: int) -> int:
        """Grow ``cache_len`` to hold ``prompt_len + max_new_tokens`` (rounded up); returns it.

        Calling it once with the longest expected prompt and the run's cap before the first
        rollout makes every later call (shorter caps and prompts included) use that one cache shape.
        """
        need = math.ceil((prompt_len + max_new_tokens) / self.cache_multiple) * self.cache_multiple
        self.cache_len = max(self.cache_len, need)
        return self.cache_len

    def options(self, device: torch.device, prompt_len: int, max_new_tokens: int) -> dict:
        """Keyword arguments for ``model.generate`` for a batch of ``prompt_len``-token prompts."""
        self.reserve(prompt_len, max_new_tokens)
        options = dict(cache_implementation="static", max_cache_len=self.cache_len)
        if self.compile:
            cuda = device.type == "cuda"
            # fullgraph off: a graph break shows up in `graphs` instead of failing the rollout.
            config = CompileConfig(fullgraph=False, dynamic=False, mode="reduce-overhead" if cuda else "default")
            if not cuda:
                config._compile_all_devices = True
            options["compile_config"] = config
        return options

    def counting(self):
        """Context manager adding the graphs compiled inside it to ``graphs``."""
        return _GraphCount(self)


class _GraphCount:
    def __init__(self, owner: StaticDecode):
        self.owner = owner

    def __enter__(self):
        self.start = _graphs_built()

    def __exit__(self, *exc):
        self.owner.graphs += _graphs_built() - self.start


class DecodeClock(LogitsProcessor):
    """Times a ``generate`` call's prefill and decode steps from inside its loop.

    ``generate`` calls logits processors once per new token, right after that token's forward: the
    first call follows the prefill, every later one a decode step. ``start()`` before ``generate``,
    ``stop()`` after it; on CUDA the device is synchronised at those three points only.
    Adds ``prefill_s``, ``decode_s`` and ``decode_steps`` (tokens after the first) to its totals.
    """

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device
        self.prefill_s = self.decode_s = 0.0
        self.decode_steps = 0
        self._start = self._first = None
        self._calls = 0

    def _now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def start(self) -> None:
        self._calls, self._first, self._start = 0, None, self._now()

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self._calls == 0:
            self._first = self._now()
        self._calls += 1
        return scores

    def stop(self) -> None:
        end = self._now()
        if self._first is None:  # nothing generated
            return
        self.prefill_s += self._first - self._start
        self.decode_s += end - self._first
        self.decode_steps += self._calls - 1

    @property
    def decode_ms(self) -> float | None:
        """Milliseconds per decode step (all rows of the batch advance one token), None before any."""
        return 1000 * self.decode_s / self.decode_steps if self.decode_steps else None
