"""Rollout engines: sample ``K`` responses per prompt from the student.

Every engine implements ``RolloutBackend.generate(prompts, k) -> (tokens, mask)`` with the same
layout, so scoring, the loss and the distributed path never see which engine ran.
``vaopd.rollout.hf`` wraps transformers ``generate``; ``vaopd.rollout.vllm`` an in-process vLLM
engine (imported only when ``rollout.engine: vllm`` builds it: vLLM is an optional dependency).
"""
from vaopd.rollout.hf import HFGenerate
from vaopd.rollout.prompts import (PromptBatch, RolloutBackend, banned_token_ids, encode_prompts, prompt_pixels,
                                   response_mask)

__all__ = ["PromptBatch", "RolloutBackend", "HFGenerate", "encode_prompts", "prompt_pixels", "banned_token_ids",
           "response_mask"]
