"""Assembling a run: models (student trainable, teacher frozen), data, the execution strategy
(one process, or FSDP2 under torchrun: ``vaopd.strategy``) and the rollout engine (``Setup``)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from vaopd import torchvision_ops  # noqa: F401  first: transformers may import torchvision (see there)
from vaopd.config import Config, ConfigError
from vaopd.data import Dataset, load_dataset
from vaopd.distributed import DistEnv, HiddenAndHead, launched_by_torchrun, shard_model
from vaopd.models import (attn_implementation, base_model, check_vocabularies, enable_gradient_checkpointing, eos_token_ids,
                          load_pretrained, use_bf16)
from vaopd.packing import PackedAttention, PackedScorer, choose_packed_attention, use_flex_attention
from vaopd.rollout import HFGenerate, RolloutBackend, banned_token_ids
from vaopd.runs import run_dir_of
from vaopd.scoring import Scorer
from vaopd.strategy import FSDP, SingleProcess, Strategy, inference_copy, rollout_dtype
from vaopd.tiny import is_tiny

__all__ = ["Setup", "build_rollout", "build_scorer", "packed_attention", "apply_packed_attention", "longest_prompt_bound",
           "build_vllm_rollout", "build_setup"]


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
    strategy: Strategy  # one process or FSDP2 under torchrun (vaopd.strategy)
    scorer: Scorer  # teacher and student hidden states of a micro-batch (vaopd.scoring)


def build_rollout(cfg: Config, model, eos_ids: list[int], pad_id: int, banned_ids: list[int]) -> HFGenerate:
    """The ``hf`` engine: transformers ``generate`` on ``model`` (the strategy's sampling model),
    with the static cache and compiled decode step when ``rollout.hf.compile`` turns them on."""
    r = cfg.rollout
    return HFGenerate(model, eos_ids=eos_ids, pad_id=pad_id, banned_ids=banned_ids, temperature=r.temperature, top_p=r.top_p,
                      top_k=r.top_k, max_new_tokens=r.max_new_tokens, batch_prompts=r.batch_prompts,
                      compile=r.hf.compile, cache_multiple=r.hf.cache_multiple)


def build_scorer(cfg: Config, strategy: Strategy) -> Scorer:
    """The scorer over the strategy's models: packed (``train.packed_scoring``) or padded."""
    return (PackedScorer if cfg.train.packed_scoring else Scorer)(strategy.student, strategy.teacher)


def packed_attention(cfg: Config, device: torch.device) -> PackedAttention:
    """The attention of the packed scoring passes of this run (``train.packed_attention``)."""
    # With LoRA on one process the hf engine samples from the trained student itself.
    samples = cfg.rollout.engine == "hf" and cfg.model.lora.enabled
    try:
        return choose_packed_attention(cfg.train.packed_attention, attn_implementation(cfg), device, student_samples=samples)
    except ValueError as e:
        raise ConfigError(f"train.packed_attention: {e}") from None


def apply_packed_attention(cfg: Config, device: torch.device, student, teacher) -> None:
    """Switch the text models to FlexAttention where ``packed_attention`` says so (with
    ``train.packed_scoring``). Call it after taking the rollout replica, which keeps the models'
    own attention for generating with a KV cache."""
    if not cfg.train.packed_scoring:
        return
    attention = packed_attention(cfg, device)
    if attention.teacher == "flex":
        use_flex_attention(teacher)
    if attention.student == "flex":
        use_flex_attention(base_model(student))


def longest_prompt_bound(cfg: Config, data: Dataset, tokenizer, image_processor) -> int:
    """An upper bound on the tokens of any prompt of ``data``: its longest chat-formatted question
    (with ``data.instruction``) plus the most image tokens an image within ``data.max_pixels`` gets.

    The image processor resizes to multiples of ``patch_size * merge_size`` with at most
    ``max_pixels`` pixels, so an image yields at most ``max_pixels // (patch_size * merge_size)**2``
    tokens; no image is processed here.
    """
    factor = int(image_processor.patch_size) * int(getattr(image_processor, "merge_size", 2))
    texts = [tokenizer.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": r.question + cfg.data.instruction}]}],
        tokenize=False, add_generation_prompt=True) for r in data.records]
    text_tokens = max(len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"])
    return text_tokens - 1 + cfg.data.max_pixels // factor**2  # the placeholder becomes the image tokens


def build_vllm_rollout(cfg: Config, student, tokenizer, image_processor, source: str, device: torch.device, bf16: bool,
                       eos_ids: list[int], banned_ids: list[int]) -> RolloutBackend:
    """The ``vllm`` engine (``vaopd.rollout.vllm``), built from the student's model folder ``source``.

    vLLM reads a model folder: a ``tiny:`` student is first saved (model, tokenizer with its chat
    template, image processor) to ``<run dir>/rollout_model``. The folder's weights only matter
    until the first rollout, which loads the student's own.
    """
    from vaopd.rollout.vllm import VLLM_INSTALL_HINT, VLLMGenerate, vllm_available

    r, v = cfg.rollout, cfg.rollout.vllm
    if not vllm_available():
        raise ConfigError(f"rollout.engine: vllm is not installed in this environment; {VLLM_INSTALL_HINT}")
    if v.sleep_mode and device.type != "cuda":
        raise ConfigError(f"rollout.vllm.sleep_mode: vLLM's sleep mode needs a CUDA GPU (the trainer runs on {device}); "
                          "set it to false")
    folder = Path(source)
    if is_tiny(source):
        folder = run_dir_of(cfg) / "rollout_model"
        torchrun = launched_by_torchrun()
        if not torchrun or dist.get_rank() == 0:  # one writer; every rank's engine reads it
            base_model(student).save_pretrained(folder)
            tokenizer.save_pretrained(folder)
            image_processor.save_pretrained(folder)
        if torchrun:
            dist.barrier()
    return VLLMGenerate(
        folder, device=device, dtype=torch.bfloat16 if bf16 else torch.float32, eos_ids=eos_ids,
        pad_id=tokenizer.pad_token_id, image_pad_id=tokenizer.convert_tokens_to_ids("<|image_pad|>"), banned_ids=banned_ids,
        lm_head_rows=base_model(student).get_output_embeddings().weight.shape[0], temperature=r.temperature, top_p=r.top_p,
        top_k=r.top_k, max_new_tokens=r.max_new_tokens, gpu_memory_utilization=v.gpu_memory_utilization,
        sleep_mode=v.sleep_mode, kv_cache_gib=v.kv_cache_gib, max_model_len=v.max_model_len,
        enforce_eager=v.enforce_eager, seed=cfg.train.seed,
        image_size={"shortest_edge": cfg.data.min_pixels, "longest_edge": cfg.data.max_pixels})


def build_setup(cfg: Config, device: torch.device, student_source: str | None = None,
                env: DistEnv | None = None) -> Setup:
    """Models (student trainable, teacher frozen), data, vocabulary checks, banned ids, the
    execution strategy and the rollout engine.

    ``env`` (under torchrun): the student (and, with ``distributed.teacher: fsdp``, the teacher) is
    sharded with FSDP2 over the ranks (``FSDP`` strategy); otherwise the ``SingleProcess`` one.
    """
    if env is not None:
        _check_distributed(cfg, env)
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
        enable_gradient_checkpointing(base_model(student))
    student.train()
    eos = eos_token_ids(student, tokenizer)
    banned = banned_token_ids(tokenizer, s_rows, eos)
    # vLLM is built before sharding: a tiny student's folder is saved from the full model.
    vllm = (build_vllm_rollout(cfg, student, tokenizer, image_processor, source, device, bf16, eos, banned)
            if cfg.rollout.engine == "vllm" else None)
    # The hf engine samples from an inference copy refreshed in place before every rollout
    # (vaopd.strategy); vLLM keeps its own weights, and LoRA on one process samples from the student.
    replica = (inference_copy(student, rollout_dtype(bf16))
               if cfg.rollout.engine == "hf" and (env is not None or not cfg.model.lora.enabled) else None)
    apply_packed_attention(cfg, device, student, teacher)  # after the copy: it generates with the models' own
    if env is None:
        strategy = SingleProcess(student, teacher, replica, device)
    else:
        sharded = shard_model(student, param_dtype=torch.bfloat16 if bf16 else None, device=device)
        t_root = shard_model(teacher, param_dtype=None, device=device) if cfg.distributed.teacher == "fsdp" else None
        strategy = FSDP(env, sharded, t_root if t_root is not None else HiddenAndHead(teacher), replica)
    rollout = vllm if vllm is not None else build_rollout(cfg, strategy.sampling_model(), eos, tokenizer.pad_token_id,
                                                          banned)
    if getattr(rollout, "static", None) is not None:
        # One static cache length (one compiled decode graph) for every rollout of the run.
        longest = longest_prompt_bound(cfg, train_data, tokenizer, image_processor)
        rollout.static.reserve(longest, cfg.rollout.max_new_tokens)
    return Setup(student, teacher, tokenizer, image_processor, vocab, eos, banned, train_data, val_data, device, bf16,
                 rollout, strategy, build_scorer(cfg, strategy))


def _check_distributed(cfg: Config, env: DistEnv) -> None:
    """What torchrun does not support, refused before anything is loaded."""
    K, mb = cfg.rollout.samples_per_prompt, cfg.train.micro_batch_prompts or cfg.train.prompts_per_step
    if mb * K < env.world_size:
        raise ConfigError(f"train.micro_batch_prompts: a micro-batch of {mb} prompts x {K} responses has fewer responses "
                          f"than the {env.world_size} ranks; every rank needs one")
    if cfg.model.lora.enabled:
        raise ConfigError("model.lora.enabled: LoRA is not supported under torchrun; train it on one process")
