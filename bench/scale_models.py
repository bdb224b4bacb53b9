"""What ``bench/scale_step.py`` runs the trainer on: the paper's architectures with random weights, a
tokenizer laid out like Qwen's, synthetic image+question records and forced response lengths.

The configurations (the checkpoints cannot be downloaded here; weights are random anyway):

- Qwen3-VL-2B-Instruct (student): ``config.json`` of ``Qwen/Qwen3-VL-2B-Instruct`` (revision
  89644892), as quoted in public test fixtures and model ports found with the code search: text
  hidden 2048, MLP 6144, 28 layers, 16 heads / 8 KV heads of dim 128, tied embeddings; vision depth
  24, hidden 1024, MLP 4096, deepstack layers 5/11/17.
- Qwen3-VL-8B-Instruct (teacher): ``config.json`` of ``Qwen/Qwen3-VL-8B-Instruct``, as quoted in
  the same kind of sources: text hidden 4096, MLP 12288, 36 layers, 32 heads / 8 KV heads of dim
  128, untied LM head; vision depth 27, hidden 1152, MLP 4304, deepstack layers 8/16/24.
- Shared: vocabulary 151,936 rows, RoPE theta 5e6 with interleaved M-RoPE sections 24/20/20,
  context 262,144, RMS eps 1e-6, vision patch 16, temporal patch 2, merge 2, 2304 position
  embeddings, ``gelu_pytorch_tanh``; Qwen's token ids (bos 151643, eos 151645, vision start/end
  151652/151653, image 151655, video 151656).

Check: built on the meta device they have 2,127,532,032 and 8,767,123,696 parameters, the totals
Hugging Face's model API reports for the two checkpoints (``tests/test_scale_step.py``).
"""
from __future__ import annotations

import functools
import json
import math
import random
from dataclasses import dataclass

import torch
from PIL import Image, ImageDraw

from vaopd import torchvision_ops  # noqa: F401  first: its stand-ins must exist before transformers loads (.venv-vllm)
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (LogitsProcessor, LogitsProcessorList, PreTrainedTokenizerFast, Qwen3VLConfig,
                          Qwen3VLForConditionalGeneration)

from vaopd.data import Record
from vaopd.rollout import response_mask
from vaopd.tiny import CHAT_TEMPLATE

__all__ = ["ARCHS", "QWEN_TOKENS", "build_tokenizer", "model_config", "build_model", "synthetic_records", "LengthModel",
           "ForcedLengths", "forced_lengths_vllm"]

# text: hidden, MLP, layers, heads, KV heads, head dim, tied head; vision: depth, hidden, MLP, heads,
# deepstack layers. "small-*" keep the families' shape ratios at CPU size (M-RoPE sections scaled
# to head dim 32).
ARCHS: dict[str, dict] = {
    "qwen3-vl-2b": dict(hidden=2048, mlp=6144, layers=28, heads=16, kv=8, head_dim=128, tied=True,
                        v_depth=24, v_hidden=1024, v_mlp=4096, v_heads=16, deepstack=[5, 11, 17]),
    "qwen3-vl-8b": dict(hidden=4096, mlp=12288, layers=36, heads=32, kv=8, head_dim=128, tied=False,
                        v_depth=27, v_hidden=1152, v_mlp=4304, v_heads=16, deepstack=[8, 16, 24]),
    "small-student": dict(hidden=128, mlp=384, layers=4, heads=4, kv=2, head_dim=32, tied=True,
                          v_depth=2, v_hidden=64, v_mlp=256, v_heads=2, deepstack=[0]),
    "small-teacher": dict(hidden=256, mlp=768, layers=6, heads=8, kv=2, head_dim=32, tied=False,
                          v_depth=3, v_hidden=96, v_mlp=384, v_heads=2, deepstack=[0, 1]),
}
HEAD_ROWS = 151_936  # LM-head rows of every Qwen3-VL checkpoint
REGULAR_TOKENS = 151_643  # byte-level BPE ids 0..151642; the added tokens follow

# Qwen3's added tokens in id order from 151643 (True: special, skipped when decoding).
QWEN_TOKENS = [
    ("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True), ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True), ("<|box_start|>", True), ("<|box_end|>", True), ("<|quad_start|>", True),
    ("<|quad_end|>", True), ("<|vision_start|>", True), ("<|vision_end|>", True), ("<|vision_pad|>", True),
    ("<|image_pad|>", True), ("<|video_pad|>", True), ("<tool_call>", False), ("</tool_call>", False),
    ("<|fim_prefix|>", True), ("<|fim_middle|>", True), ("<|fim_suffix|>", True), ("<|fim_pad|>", True),
    ("<|repo_name|>", True), ("<|file_sep|>", True), ("<tool_response>", False), ("</tool_response>", False),
    ("<think>", False), ("</think>", False),
]
_IDS = {name: REGULAR_TOKENS + i for i, (name, _) in enumerate(QWEN_TOKENS)}

_WORDS = ("triangle circle square angle side length area radius point line segment parallel perpendicular "
          "the of in is and what find value shown figure chart bar table number total how many given if then "
          "degrees units answer compute ratio sum difference product each between largest smallest").split()


def _sentences(rng: random.Random, n: int) -> str:
    return " ".join(" ".join(rng.choice(_WORDS) for _ in range(rng.randint(6, 14))).capitalize() + "?"
                    for _ in range(n))


@functools.lru_cache(maxsize=1)  # a couple of seconds to build; treat the result as read-only
def build_tokenizer(merges: int = 4000, seed: int = 0) -> PreTrainedTokenizerFast:
    """A byte-level BPE with Qwen's layout: 151,643 regular ids, then Qwen3's 26 added tokens (151,669).

    The merges are learned on synthetic question text (so questions take a realistic number of
    tokens); the remaining regular ids are unused fillers: the weights are random, only the sizes
    and the special ids matter.
    """
    rng = random.Random(seed)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=merges, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator([_sentences(rng, 4) for _ in range(2000)], trainer=trainer)
    vocab = tok.get_vocab()
    learned = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in json.loads(tok.to_str())["model"]["merges"]]
    filler = (f"unused{i}" for i in range(REGULAR_TOKENS))
    while len(vocab) < REGULAR_TOKENS:
        word = next(filler)
        if word not in vocab:
            vocab[word] = len(vocab)
    full = Tokenizer(models.BPE(vocab=vocab, merges=learned))
    full.pre_tokenizer, full.decoder = tok.pre_tokenizer, tok.decoder
    for name, special in QWEN_TOKENS:  # one at a time: ids follow Qwen's order
        (full.add_special_tokens if special else full.add_tokens)([AddedToken(name, special=special, normalized=False)])
    fast = PreTrainedTokenizerFast(tokenizer_object=full, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE
    fast.padding_side = "left"
    wrong = {n: fast.convert_tokens_to_ids(n) for n in _IDS if fast.convert_tokens_to_ids(n) != _IDS[n]}
    if wrong or len(fast) != REGULAR_TOKENS + len(QWEN_TOKENS):
        raise AssertionError(f"tokenizer layout differs from Qwen's: {wrong}, {len(fast)} tokens")
    return fast


def model_config(arch: str) -> Qwen3VLConfig:
    """The ``Qwen3VLConfig`` of ``arch`` (a key of ``ARCHS``), with Qwen's vocabulary and token ids."""
    a = ARCHS[arch]
    # Interleaved M-RoPE sections (t, h, w) sum to head_dim / 2: Qwen's 24/20/20 at 128, scaled below.
    hw = a["head_dim"] // 2 * 20 // 64
    mrope = [a["head_dim"] // 2 - 2 * hw, hw, hw]
    text = dict(vocab_size=HEAD_ROWS, hidden_size=a["hidden"], intermediate_size=a["mlp"], num_hidden_layers=a["layers"],
                num_attention_heads=a["heads"], num_key_value_heads=a["kv"], head_dim=a["head_dim"],
                max_position_embeddings=262_144, rms_norm_eps=1e-6, hidden_act="silu", attention_bias=False,
                rope_parameters={"rope_type": "default", "rope_theta": 5_000_000.0, "mrope_section": mrope,
                                 "mrope_interleaved": True},
                tie_word_embeddings=a["tied"], bos_token_id=_IDS["<|endoftext|>"], eos_token_id=_IDS["<|im_end|>"],
                pad_token_id=_IDS["<|endoftext|>"])
    vision = dict(depth=a["v_depth"], hidden_size=a["v_hidden"], intermediate_size=a["v_mlp"], num_heads=a["v_heads"],
                  in_channels=3, patch_size=16, temporal_patch_size=2, spatial_merge_size=2, out_hidden_size=a["hidden"],
                  num_position_embeddings=2304, deepstack_visual_indexes=a["deepstack"], hidden_act="gelu_pytorch_tanh")
    return Qwen3VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=a["tied"],
                         image_token_id=_IDS["<|image_pad|>"], video_token_id=_IDS["<|video_pad|>"],
                         vision_start_token_id=_IDS["<|vision_start|>"], vision_end_token_id=_IDS["<|vision_end|>"])


def build_model(arch: str, device: torch.device, dtype: torch.dtype, attn: str, seed: int):
    """Random-init ``arch`` created directly on ``device`` in ``dtype`` (no CPU copy of a big model)."""
    config = model_config(arch)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        with torch.device(device):
            model = Qwen3VLForConditionalGeneration._from_config(config, dtype=dtype, attn_implementation=attn)
    g = model.generation_config  # Qwen3-VL's generation config: both end tokens stop, pad is <|endoftext|>
    g.eos_token_id, g.pad_token_id, g.bos_token_id = [_IDS["<|im_end|>"], _IDS["<|endoftext|>"]], _IDS["<|endoftext|>"], _IDS["<|endoftext|>"]
    return model


_COLORS = [(220, 40, 40), (40, 180, 60), (40, 70, 220), (230, 210, 40), (120, 120, 120)]


def synthetic_records(n: int, side: tuple[int, int], seed: int) -> list[Record]:
    """``n`` image+question records: images with sides drawn in ``side`` (so the image token counts
    vary like a real data set's), a few shapes each, and 1 to 4 sentences of question."""
    rng = random.Random(seed)
    records = []
    for i in range(n):
        w, h = rng.randint(*side), rng.randint(*side)
        image = Image.new("RGB", (w, h), (250, 250, 250))
        draw = ImageDraw.Draw(image)
        for _ in range(rng.randint(2, 8)):
            x, y = rng.randrange(w), rng.randrange(h)
            r = rng.randint(4, max(5, min(w, h) // 4))
            shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
            shape([x - r, y - r, x + r, y + r], fill=rng.choice(_COLORS))
        records.append(Record(id=f"scale-{i}", image=image, question=_sentences(rng, rng.randint(1, 4)), answer="0"))
    return records


@dataclass
class LengthModel:
    """Response lengths ``ceil(median * exp(a_prompt + e_response))``, ``a ~ N(0, prompt_sigma)``
    shared by a prompt's siblings, ``e ~ N(0, sample_sigma)``: a log-normal with a long right tail
    and siblings of correlated length. Lengths at or above ``max_new_tokens`` end truncated."""

    median: float
    prompt_sigma: float
    sample_sigma: float
    seed: int

    def __post_init__(self):
        self.generator = torch.Generator().manual_seed(self.seed)

    def reseed(self, step: int) -> None:
        self.generator.manual_seed(self.seed * 1_000_003 + step)

    def draw(self, prompts: int, k: int) -> torch.Tensor:
        """``[prompts * k]`` int64 lengths, prompt-major (the rollout's row order)."""
        a = torch.randn(prompts, generator=self.generator).repeat_interleave(k) * self.prompt_sigma
        e = torch.randn(prompts * k, generator=self.generator) * self.sample_sigma
        return torch.ceil(self.median * torch.exp(a + e)).long().clamp(min=1)

    def mean(self, cap: int, samples: int = 100_000) -> float:
        """Expected valid length with truncation at ``cap`` (Monte Carlo, its own generator)."""
        g = torch.Generator().manual_seed(12345)
        z = torch.randn(samples, generator=g) * math.hypot(self.prompt_sigma, self.sample_sigma)
        return float(torch.ceil(self.median * torch.exp(z)).clamp(1, cap).mean())


class _EndAt(LogitsProcessor):
    """Keeps every end token out until row ``r`` has ``ends[r] - 1`` tokens, then forces the first one."""

    def __init__(self, ends: torch.Tensor, prompt_len: int, eos_ids: list[int]):
        self.ends, self.prompt_len, self.eos_ids = ends, prompt_len, eos_ids
        self.eos = torch.tensor(eos_ids)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.ends.device != scores.device:  # once: no host-device copy per decode step
            self.ends, self.eos = self.ends.to(scores.device), torch.tensor(self.eos_ids, device=scores.device)
        done = input_ids.shape[1] - self.prompt_len  # tokens generated so far
        scores = scores.index_fill(1, self.eos, -math.inf)
        at_end = (self.ends == done + 1).unsqueeze(1)
        forced = torch.full_like(scores, -math.inf).index_fill_(1, self.eos[:1], 0.0)
        return torch.where(at_end, forced, scores)


class ForcedLengths:
    """Stands in for the student inside the HF rollout engine: every ``generate`` call runs the real
    sampling loop (a decode step per token, KV cache, top-p) but ends each row at a length drawn
    from ``lengths``. Everything else is the student's own (``__getattr__``)."""

    def __init__(self, model, lengths: LengthModel, eos_ids: list[int], k: int):
        self.model, self.lengths, self.eos_ids, self.k = model, lengths, eos_ids, k
        self.drawn: list[torch.Tensor] = []  # the lengths of each call (a benchmark reads them)

    def __getattr__(self, name):
        return getattr(self.model, name)

    def generate(self, **kwargs):
        rows, prompt_len = kwargs["input_ids"].shape
        ends = self.lengths.draw(rows // self.k, self.k)
        self.drawn.append(ends)
        processors = LogitsProcessorList([*kwargs.pop("logits_processor", []), _EndAt(ends, prompt_len, self.eos_ids)])
        return self.model.generate(**kwargs, logits_processor=processors)


def forced_lengths_vllm(lengths: LengthModel, **engine_options):
    """A ``VLLMGenerate`` whose responses end at lengths drawn from ``lengths``, as ``ForcedLengths``
    makes them in the HF engine: one request per response, ``max_tokens`` = its drawn length capped
    at ``max_new_tokens``, the end tokens kept out (``ignore_eos`` and not allowed) until then, and
    the last token of a response that ends under the cap set to the first end id. ``drawn``: the
    lengths of each call. ``engine_options``: ``VLLMGenerate``'s arguments."""
    from vaopd.rollout.vllm import VLLMGenerate

    class ForcedLengthsVLLM(VLLMGenerate):
        def requests(self, prompts: list[dict], k: int):
            ends = lengths.draw(len(prompts), k)
            self.drawn.append(ends)
            self._ends = ends.tolist()
            rows = len(prompts) * k
            seeds = torch.randint(0, 2**31 - 1, (rows,)).tolist()
            allowed = [i for i in self.allowed_ids if i not in self.eos_ids]
            params = [self.sampling_params(n=1, seed=seed, max_tokens=min(end, self.max_new_tokens), ignore_eos=True,
                                           allowed_token_ids=allowed) for seed, end in zip(seeds, self._ends)]
            return [prompts[r // k] for r in range(rows)], params, [r // k for r in range(rows)]

        def generate(self, prompts, k):
            tokens, _ = super().generate(prompts, k)
            for row, end in enumerate(self._ends):
                if end <= self.max_new_tokens:
                    tokens[row, end - 1] = self.eos_ids[0]
            return tokens, response_mask(tokens, self.eos_ids)

    engine = ForcedLengthsVLLM(**engine_options)
    engine.lengths, engine.drawn = lengths, []
    return engine
