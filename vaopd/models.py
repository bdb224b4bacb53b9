"""Loading the student and teacher: devices, precision, attention, models, tokenizers, vocabularies.

A model spec is ``tiny:<preset>`` (built from a config in code, ``vaopd.tiny``), a local model
folder, or a checkpoint's ``model/`` folder (a LoRA adapter folder loads onto ``model.student``).
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch

from vaopd import torchvision_ops  # noqa: F401  first: transformers may import torchvision (see there)
from vaopd.config import Config, ConfigError
from vaopd.tiny import build_image_processor, build_model, build_tokenizer, is_tiny

__all__ = ["VocabularyError", "resolve_device", "use_bf16", "attn_implementation", "load_pretrained", "loading",
           "base_model", "enable_gradient_checkpointing", "eos_token_ids", "check_vocabularies"]


class VocabularyError(ValueError):
    """Student and teacher do not share a tokenizer vocabulary."""


def resolve_device(cfg: Config) -> torch.device:
    if cfg.train.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if cfg.train.device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"train.device: {cfg.train.device} requested but CUDA is not available")
    return torch.device(cfg.train.device)


def use_bf16(cfg: Config, device: torch.device) -> bool:
    return cfg.train.precision == "bf16" or (cfg.train.precision == "auto" and device.type == "cuda")


def attn_implementation(cfg: Config) -> str:
    if cfg.model.attn_implementation != "auto":
        return cfg.model.attn_implementation
    from transformers.utils import is_flash_attn_2_available

    return "flash_attention_2" if is_flash_attn_2_available() else "sdpa"


def load_pretrained(cfg: Config, source: str, device: torch.device, *, trainable: bool, dtype=torch.float32, seed: int = 0):
    """``(model, tokenizer, image_processor)`` for a model spec: ``tiny:<preset>``, a model folder,
    or a checkpoint's ``model/`` folder (a LoRA adapter folder is loaded onto ``model.student``)."""
    impl = attn_implementation(cfg)
    if is_tiny(source):
        tokenizer = build_tokenizer()
        image_processor = build_image_processor(cfg.data.min_pixels, cfg.data.max_pixels)
        model = build_model(source.split(":", 1)[1], tokenizer, seed).to(dtype)
        model.set_attn_implementation(impl)
    else:
        from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer

        if (Path(source) / "adapter_config.json").is_file():
            from peft import PeftModel

            base, tokenizer, image_processor = load_pretrained(cfg, cfg.model.student, torch.device("cpu"), trainable=False, dtype=dtype, seed=seed)
            model = PeftModel.from_pretrained(base, source, is_trainable=trainable)
            return model.to(device), tokenizer, image_processor
        with loading(source, "model.teacher" if source == cfg.model.teacher else "model.student"):
            model = AutoModelForImageTextToText.from_pretrained(source, dtype=dtype, attn_implementation=impl)
            tokenizer = AutoTokenizer.from_pretrained(source)
            image_processor = AutoImageProcessor.from_pretrained(
                source, backend="pil", size={"shortest_edge": cfg.data.min_pixels, "longest_edge": cfg.data.max_pixels})
    tokenizer.padding_side = "left"
    return model.to(device), tokenizer, image_processor


@contextmanager
def loading(source: str, key: str):
    """Turn a failed model/tokenizer load (missing folder, no hub access, a damaged weights file)
    into a ConfigError naming the key (and the damaged file)."""
    from safetensors import SafetensorError, safe_open

    try:
        yield
    except OSError as e:
        raise ConfigError(f"{key}: cannot load {source!r} (a local model folder or a cached hub id is needed): {e}") from None
    except SafetensorError as e:
        damaged = []
        for file in sorted(Path(source).glob("*.safetensors")):
            try:
                with safe_open(file, framework="pt"):
                    pass
            except SafetensorError:
                damaged.append(str(file))
        raise ConfigError(f"{key}: cannot load {source!r}: damaged weights {', '.join(damaged) or '(a .safetensors file)'} "
                          f"({e})") from None


def base_model(model):
    """The transformers model under a peft wrapper (LoRA layers are injected into it in place)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def enable_gradient_checkpointing(model) -> None:
    """Recompute each transformer block's activations in backward (non-reentrant checkpoints)."""
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x renamed it
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def eos_token_ids(model, tokenizer) -> list[int]:
    eos = base_model(model).generation_config.eos_token_id
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in eos:
        eos.append(tokenizer.eos_token_id)
    if not eos:
        raise ConfigError("model.student: neither the generation config nor the tokenizer defines an EOS token")
    return eos


def check_vocabularies(student_tok, teacher_tok, student_rows: int, teacher_rows: int) -> int:
    """The shared vocabulary size; ``VocabularyError`` when the tokenizers or heads disagree."""
    s_vocab, t_vocab = student_tok.get_vocab(), teacher_tok.get_vocab()
    if s_vocab != t_vocab:
        differ = sorted(set(s_vocab.items()) ^ set(t_vocab.items()))[:3]
        raise VocabularyError(
            f"student and teacher tokenizers differ (sizes {len(s_vocab)} vs {len(t_vocab)}; e.g. {differ}): "
            "distillation needs the same tokenizer vocabulary (use a teacher of the student's family)")
    vocab = len(student_tok)
    for name, rows in (("student", student_rows), ("teacher", teacher_rows)):
        if rows < vocab:
            raise VocabularyError(f"the {name} LM head has {rows} rows but the tokenizer has {vocab} tokens")
    return vocab
