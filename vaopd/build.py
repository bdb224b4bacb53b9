"""Assembling a run: models (student trainable, teacher frozen), data, the rollout engine, and,
under torchrun, the FSDP2 sharding (``Setup``)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from vaopd.config import Config, ConfigError
from vaopd.data import Dataset, load_dataset
from vaopd.distributed import DistEnv, Parallel, replicate, shard_model
from vaopd.models import base_model, check_vocabularies, eos_token_ids, load_pretrained, use_bf16
from vaopd.rollout import HFGenerate, RolloutBackend, banned_token_ids

__all__ = ["Setup", "build_rollout", "build_setup", "parallelize"]


@dataclass
class Setup:
    student: torch.nn.Module
    teacher: torch.nn.Module
    tokenizer: object
    image_processor: object
    vocab_size: int
    eos_ids: list[int]
    banned_ids: list[int]
    train_data: Dataset
    val_data: Dataset | None
    device: torch.device
    bf16: bool
    rollout: RolloutBackend  # any engine implementing the interface (HFGenerate by default)
    parallel: Parallel | None = None  # set under torchrun (see parallelize)


def build_rollout(cfg: Config, model, eos_ids: list[int], pad_id: int, banned_ids: list[int]) -> RolloutBackend:
    return HFGenerate(model, eos_ids=eos_ids, pad_id=pad_id, banned_ids=banned_ids, temperature=cfg.rollout.temperature,
                      top_p=cfg.rollout.top_p, max_new_tokens=cfg.rollout.max_new_tokens, batch_prompts=cfg.rollout.batch_prompts)


def build_setup(cfg: Config, device: torch.device, student_source: str | None = None) -> Setup:
    """Models (student trainable, teacher frozen), data, vocabulary checks, banned ids."""
    train_data = load_dataset(cfg, cfg.data.train, split_seed=0)
    val_data = load_dataset(cfg, cfg.data.val, split_seed=1) if cfg.data.val else None
    bf16 = use_bf16(cfg, device)
    resuming = student_source is not None
    source = student_source or cfg.model.student
    lora_adapter = resuming and (Path(source) / "adapter_config.json").is_file()
    student, tokenizer, image_processor = load_pretrained(cfg, source, device, trainable=True, seed=cfg.train.seed)
    teacher, teacher_tok, _ = load_pretrained(cfg, cfg.model.teacher, device, trainable=False,
                                              dtype=torch.bfloat16 if bf16 else torch.float32, seed=cfg.train.seed + 1)
    teacher.eval()
    teacher.requires_grad_(False)
    s_rows = base_model(student).get_output_embeddings().weight.shape[0]
    vocab = check_vocabularies(tokenizer, teacher_tok, s_rows, teacher.get_output_embeddings().weight.shape[0])
    if cfg.model.lora.enabled and not lora_adapter:
        from peft import LoraConfig, get_peft_model

        lora = cfg.model.lora
        student = get_peft_model(student, LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                                     target_modules=list(lora.target_modules)))
    if cfg.model.freeze_vision:
        base_model(student).model.visual.requires_grad_(False)
    if cfg.model.gradient_checkpointing:
        model = base_model(student)
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x renamed it
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    student.train()
    eos = eos_token_ids(student, tokenizer)
    banned = banned_token_ids(tokenizer, s_rows, eos)
    rollout = build_rollout(cfg, student, eos, tokenizer.pad_token_id, banned)
    return Setup(student, teacher, tokenizer, image_processor, vocab, eos, banned, train_data, val_data, device, bf16, rollout)


def parallelize(cfg: Config, s: Setup, env: DistEnv) -> None:
    """Shard the setup's student (and, with ``distributed.teacher: fsdp``, its teacher) over the
    ranks with FSDP2, and sample from an unsharded replica of the student (``vaopd.distributed``)."""
    K, mb = cfg.rollout.samples_per_prompt, cfg.train.micro_batch_prompts or cfg.train.prompts_per_step
    if mb * K < env.world_size:
        raise ConfigError(f"train.micro_batch_prompts: a micro-batch of {mb} prompts x {K} responses has fewer responses "
                          f"than the {env.world_size} ranks; every rank needs one")
    if cfg.model.lora.enabled:
        raise ConfigError("model.lora.enabled: LoRA is not supported under torchrun; train it on one process")
    if cfg.log.rollouts_every:
        raise ConfigError("log.rollouts_every: rollout logging is not supported under torchrun; set it to 0")
    replica = replicate(s.student, torch.bfloat16 if s.bf16 else torch.float32)
    student = shard_model(s.student, param_dtype=torch.bfloat16 if s.bf16 else None, device=s.device)
    teacher = shard_model(s.teacher, param_dtype=None, device=s.device) if cfg.distributed.teacher == "fsdp" else None
    s.rollout = build_rollout(cfg, replica, s.eos_ids, s.tokenizer.pad_token_id, s.banned_ids)
    s.parallel = Parallel(env, student, teacher, replica)
