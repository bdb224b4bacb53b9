"""Tiny Qwen3-VL-style models and a tokenizer built in code: the offline default of the trainer.

Nothing is downloaded. The tokenizer is a byte-level BPE trained in milliseconds on the tiny data
set's own vocabulary, with Qwen's chat and vision special tokens and a Qwen-like chat template, so
the trainer's prompt code is the same for these models and for real Qwen-VL checkpoints.

Model specs are named ``tiny:<preset>`` in a config (``tiny:student``, ``tiny:teacher``). The
teacher is larger than the student and uses ``initializer_range=0.2``: with the default 0.02 a
random model barely looks at the image and the visual advantage would be ~0 (see ENV.md).
"""
from __future__ import annotations

import torch
from vaopd import torchvision_ops  # noqa: F401  first: transformers may import torchvision (see there)
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast, Qwen3VLConfig, Qwen3VLForConditionalGeneration

try:  # transformers >= 5.2x: explicit PIL backend (the default one needs torchvision)
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil as _ImageProcessor
except ImportError:  # older 5.x (the GPU machine's 5.17): the plain class is the PIL/numpy one
    from transformers import Qwen2VLImageProcessor as _ImageProcessor

__all__ = ["PRESETS", "SPECIAL_TOKENS", "CHAT_TEMPLATE", "build_tokenizer", "build_image_processor", "build_model", "is_tiny"]

# Qwen's special tokens, in Qwen's order, so the vision ids play the same roles as in real models.
SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>",
    "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>",
]

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Text corpus for the BPE: the words of the generated questions and answers plus digits and
# the reasoning phrases of tiny_data; a tiny vocabulary keeps the LM head (the loss's cost) small.
_CORPUS = [
    "How many squares are in the image? Answer with a number.",
    "How many circles are in the image? Think step by step and put the final answer in \\boxed{}.",
    "What is the sum of the red and blue shapes? The answer is \\boxed{7}.",
    "I count the shapes one by one: 1 2 3 4 5 6 7 8 9 0 so the answer is 12.",
    "red green blue yellow square circle triangle shape image answer number count",
]

# vocab: BPE target size; head_pad: extra LM-head rows (Qwen heads carry padding rows, and the
# trainer must never sample them). Student and teacher share the tokenizer, widths may differ.
# head_dim 32 (not hidden / heads): vLLM's CPU attention rejects head dims below 32, and the same
# tiny models must run under both rollout engines.
PRESETS: dict[str, dict] = {
    "student": dict(hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, head_dim=32, head_pad=64,
                    vision_hidden=32, vision_depth=1, init_range=0.02),
    "teacher": dict(hidden=96, intermediate=192, layers=3, heads=4, kv_heads=2, head_dim=32, head_pad=96,
                    vision_hidden=48, vision_depth=2, init_range=0.2),
}
TOKENIZER_VOCAB = 384
PATCH_SIZE = 16
MERGE_SIZE = 2


def is_tiny(spec: str) -> bool:
    """True for a ``tiny:<preset>`` model spec."""
    return spec.startswith("tiny:")


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with Qwen's special tokens and a Qwen-like chat template."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        additional_special_tokens=SPECIAL_TOKENS[1:],
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.padding_side = "left"
    return fast


def build_image_processor(min_pixels: int = 32 * 32, max_pixels: int = 64 * 64):
    """The PIL Qwen-VL image processor with Qwen3-VL's patch size (16) and merge size (2)."""
    return _ImageProcessor(
        patch_size=PATCH_SIZE, merge_size=MERGE_SIZE, temporal_patch_size=2,
        size={"shortest_edge": min_pixels, "longest_edge": max_pixels},
    )


def build_model(preset: str, tokenizer: PreTrainedTokenizerFast, seed: int) -> Qwen3VLForConditionalGeneration:
    """A random-init tiny Qwen3-VL model for ``preset`` ("student" or "teacher"), fp32, deterministic in ``seed``."""
    if preset not in PRESETS:
        raise ValueError(f"unknown tiny model preset {preset!r}: choose one of {sorted(PRESETS)}")
    p = PRESETS[preset]
    vocab = len(tokenizer)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    head_dim = p["head_dim"]
    # mrope sections (t, h, w) sum to head_dim / 2.
    half = head_dim // 2
    mrope = [half - 2 * (half // 3), half // 3, half // 3]
    config = Qwen3VLConfig(
        text_config=dict(
            vocab_size=vocab + p["head_pad"], hidden_size=p["hidden"], intermediate_size=p["intermediate"],
            num_hidden_layers=p["layers"], num_attention_heads=p["heads"], num_key_value_heads=p["kv_heads"],
            head_dim=head_dim, max_position_embeddings=1024, initializer_range=p["init_range"],
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": mrope, "mrope_interleaved": True},
            pad_token_id=ids["<|endoftext|>"], bos_token_id=ids["<|im_start|>"], eos_token_id=ids["<|im_end|>"],
        ),
        vision_config=dict(
            depth=p["vision_depth"], hidden_size=p["vision_hidden"], intermediate_size=2 * p["vision_hidden"],
            num_heads=2, patch_size=PATCH_SIZE, spatial_merge_size=MERGE_SIZE, temporal_patch_size=2,
            out_hidden_size=p["hidden"], num_position_embeddings=64, deepstack_visual_indexes=[0],
            initializer_range=p["init_range"],
        ),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    config.pad_token_id = ids["<|endoftext|>"]
    config.eos_token_id = ids["<|im_end|>"]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen3VLForConditionalGeneration(config)
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    return model
