"""``python -m vaopd.train``: on-policy distillation of a vision-language student (VA-OPD or OPD).

One optimizer step, end to end:

1. take the step's ``P`` prompts (a seeded permutation per epoch: the order depends only on the
   seed and the step, which is what makes ``--resume`` exact);
2. sample ``K`` responses per prompt from the student (``generate``, KV cache, banned ids);
3. per micro-batch of whole sibling groups: run the frozen teacher's body once on a doubled
   batch (clean image rows, then ablated image rows) for final hidden states only; run the
   student's body with gradients; hand both hidden states and the LM-head weights to
   ``vaopd.kernels.va_opd_loss`` and backpropagate;
4. clip, AdamW, cosine schedule; skip the update if anything is non-finite.

Gradient accumulation. The VA-OPD weights need complete sibling groups (the z-score is over a
prompt's K responses) and the loss divides by the prompt count of the optimizer step. So each
micro-batch holds whole groups (``train.micro_batch_prompts`` prompts, all their responses); the
weights computed inside a micro-batch are then exactly those of the full batch, and every
micro-batch divides by the step's total ``P`` (``num_prompts=P``). The summed micro-batch
gradients equal one big batch's gradient, with no cross-micro-batch pass.

Run ``python -m vaopd.train --help`` for the command line.
"""
from __future__ import annotations

import argparse
import math
import os
import signal
import sys
import time
import traceback
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from vaopd.ablate import ablate
from vaopd.checkpoint import (is_sharded_checkpoint, latest_checkpoint, load_sharded_state, load_trainer_state, rng_state,
                              save_checkpoint, save_sharded_checkpoint, set_rng_state)
from vaopd.config import Config, ConfigError, load_config, to_dict, to_yaml
from vaopd.data import Dataset, DataError, load_records, step_indices, tiny_records
from vaopd.distributed import (DistEnv, HiddenAndHead, Parallel, any_rank, clip_grad_norm, generate_slots, init_distributed,
                               launched_by_torchrun, load_full_optimizer_state, reduce_sums, replicate, rollout_seed,
                               shard_model, shutdown, slot_layout)
from vaopd.eval import evaluate
from vaopd.inspect import write_rollouts
from vaopd.kernels import fused_linear_logprobs, va_opd_loss
from vaopd.metrics import MetricsLogger, token_stats
from vaopd.rollout import HFGenerate, PromptBatch, RolloutBackend, banned_token_ids, encode_prompts, prompt_pixels
from vaopd.tiny import build_image_processor, build_model, build_tokenizer, is_tiny

__all__ = ["train", "main", "TrainResult", "TrainingAborted", "VocabularyError", "load_pretrained", "load_dataset",
           "eos_token_ids", "build_plan"]


class VocabularyError(ValueError):
    """Student and teacher do not share a tokenizer vocabulary."""


class TrainingAborted(RuntimeError):
    """Too many non-finite steps in a row; the last good checkpoint is left as it was."""


# ----------------------------------------------------------------------------------------------
# Set-up: device, models, data


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
        with _loading(source, "model.teacher" if source == cfg.model.teacher else "model.student"):
            model = AutoModelForImageTextToText.from_pretrained(source, dtype=dtype, attn_implementation=impl)
            tokenizer = AutoTokenizer.from_pretrained(source)
            image_processor = AutoImageProcessor.from_pretrained(
                source, backend="pil", size={"shortest_edge": cfg.data.min_pixels, "longest_edge": cfg.data.max_pixels})
    tokenizer.padding_side = "left"
    return model.to(device), tokenizer, image_processor


@contextmanager
def _loading(source: str, key: str):
    """Turn a failed model/tokenizer load (missing folder, no hub access) into a ConfigError."""
    try:
        yield
    except OSError as e:
        raise ConfigError(f"{key}: cannot load {source!r} (a local model folder or a cached hub id is needed): {e}") from None


def base_model(model):
    """The transformers model under a peft wrapper (LoRA layers are injected into it in place)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


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


def load_dataset(cfg: Config, source: str, split_seed: int) -> Dataset:
    """``source`` = "tiny" (generated; ``split_seed`` tells train 0 from validation 1) or a file."""
    if source == "tiny":
        size = cfg.data.tiny_train_size if split_seed == 0 else cfg.data.tiny_val_size
        return Dataset(records=tiny_records(size, seed=2 * cfg.train.seed + split_seed), source="tiny")
    return load_records(source, question_key=cfg.data.question_key, answer_key=cfg.data.answer_key,
                        image_key=cfg.data.image_key, id_key=cfg.data.id_key, image_root=cfg.data.image_root,
                        skip_bad_records=cfg.data.skip_bad_records)


def total_steps(cfg: Config, num_records: int) -> int:
    if cfg.train.max_steps:
        return cfg.train.max_steps
    return max(1, math.floor(cfg.train.epochs * (num_records // cfg.train.prompts_per_step)))


def lr_factor(step: int, total: int, warmup_ratio: float, min_ratio: float) -> float:
    """Linear warmup over ``ceil(warmup_ratio * total)`` steps, then cosine down to ``min_ratio``."""
    warmup = math.ceil(warmup_ratio * total)
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


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


def build_optimizer(cfg: Config, student: torch.nn.Module, steps: int):
    """AdamW (no weight decay on 1-D params: norms and biases) and the warmup-cosine schedule."""
    params = [p for p in student.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    o = cfg.optim
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=o.lr, betas=tuple(o.betas), eps=o.eps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, steps, o.warmup_ratio, o.min_lr_ratio))
    return optimizer, scheduler


# ----------------------------------------------------------------------------------------------
# One optimizer step


def scoring_inputs(prompts: PromptBatch, tokens: torch.Tensor, mask: torch.Tensor) -> dict:
    """Teacher-forcing inputs for ``[rows, T]`` responses: the prompt plus ``tokens[:, :-1]``.

    The final hidden state at prompt position ``Lp - 1 + t`` predicts response token ``t``, so
    ``hidden[:, Lp - 1:]`` is ``[rows, T, D]`` aligned with ``tokens`` as the loss expects.
    """
    prefix = tokens[:, :-1]
    return dict(
        input_ids=torch.cat([prompts.input_ids, prefix], 1),
        attention_mask=torch.cat([prompts.attention_mask, mask[:, :-1].long()], 1),
        # Generated tokens are text: mm type 0 (Qwen-VL needs this tensor with images).
        mm_token_type_ids=torch.cat([prompts.mm_token_type_ids, torch.zeros_like(prefix)], 1),
        pixel_values=prompts.pixel_values, image_grid_thw=prompts.image_grid_thw, use_cache=False,
    )


def teacher_hidden(teacher, prompts: PromptBatch, ablated_pixels: torch.Tensor | None, tokens, mask):
    """Teacher final hidden states ``[rows, T, Dt]`` for the clean and ablated views (or None).

    Both views run as one doubled batch through ``teacher.model`` (no LM head, no logits).
    ``teacher`` may also be an FSDP ``HiddenAndHead`` root over the teacher (its forward gives the
    same hidden states).
    """
    lp = prompts.input_ids.shape[1]
    inputs = scoring_inputs(prompts, tokens, mask)
    if ablated_pixels is not None:
        inputs = {k: (torch.cat([v, v]) if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}
        inputs["pixel_values"] = torch.cat([prompts.pixel_values, ablated_pixels])
    with torch.no_grad():
        if isinstance(teacher, HiddenAndHead):
            hidden = teacher(**inputs)[0][:, lp - 1:]
        else:
            hidden = teacher.model(**inputs).last_hidden_state[:, lp - 1:]
    if ablated_pixels is None:
        return hidden, None
    return hidden.chunk(2)


class Timer:
    """Wall time per phase; synchronises CUDA so GPU work is charged to its phase."""

    def __init__(self, device: torch.device):
        self.device, self.times = device, {}

    @contextmanager
    def __call__(self, name: str):
        start = self._now()
        try:
            yield
        finally:
            self.times[name] = self.times.get(name, 0.0) + self._now() - start

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()


@torch.no_grad()
def log_rollouts(cfg: Config, s: Setup, step: int, records, prompts: PromptBatch, tokens, mask) -> None:
    """Append per-token data of the step's first rollouts to ``rollouts.jsonl`` (``log.rollouts_every``).

    Teacher and student log-probs of each sampled token with the clean and the ablated image
    (the ablation the loss uses, computed here for OPD too), so ``vaopd.inspect`` can show the
    teacher's VA and high group beside the student's own visual reliance. Runs before the
    optimizer step: the student is still the policy that sampled these tokens.
    """
    K, l = cfg.rollout.samples_per_prompt, cfg.loss
    rows = torch.arange(min(cfg.log.rollouts_per_log, tokens.shape[0]))
    owners = (rows // K).tolist()
    images = [ablate(records[i].image, l.ablation, seed=cfg.train.seed * 1_000_003 + step * cfg.train.prompts_per_step + i,
                     pixelate_factor=l.pixelate_factor, blur_radius=l.blur_radius, noise_std=l.noise_std,
                     patch_size=l.patch_size, patch_fraction=l.patch_fraction) for i in owners]
    m_prompts = prompts.select(owners)
    grid = m_prompts.image_grid_thw
    ablated = prompt_pixels(images, s.image_processor, grid).to(s.device)
    m_prompts = m_prompts.to(s.device)
    m_tokens, m_mask = tokens[rows].to(s.device), mask[rows].to(s.device)
    lp = m_prompts.input_ids.shape[1]

    def logp(hidden, weight):  # fused: no [tokens x vocab] logits, even for diagnostics
        return fused_linear_logprobs(hidden.to(weight.dtype), weight, torch.where(m_mask, m_tokens, 0), s.vocab_size)[0]

    t_clean, t_abl = teacher_hidden(s.teacher, m_prompts, ablated, m_tokens, m_mask)
    t_weight = s.teacher.get_output_embeddings().weight
    model = base_model(s.student)
    was_training = s.student.training
    s.student.eval()
    s_clean = model.model(**scoring_inputs(m_prompts, m_tokens, m_mask)).last_hidden_state[:, lp - 1:]
    s_abl = model.model(**scoring_inputs(m_prompts.with_pixels(ablated), m_tokens, m_mask)).last_hidden_state[:, lp - 1:]
    s.student.train(was_training)
    s_weight = model.get_output_embeddings().weight
    write_rollouts(run_dir_of(cfg) / "rollouts.jsonl", step=step + 1, method=cfg.loss.method, tokenizer=s.tokenizer,
                   tokens=m_tokens, mask=m_mask, prompt_ids=owners, records=[records[i] for i in owners],
                   high_fraction=l.high_fraction, teacher_logp=logp(t_clean, t_weight), teacher_ablated_logp=logp(t_abl, t_weight),
                   student_logp=logp(s_clean, s_weight), student_ablated_logp=logp(s_abl, s_weight))


def train_step(cfg: Config, s: Setup, optimizer, scheduler, step: int) -> dict:
    """Run optimizer step ``step`` (0-based) and return its metrics (``skipped`` if non-finite)."""
    P, K = cfg.train.prompts_per_step, cfg.rollout.samples_per_prompt
    timer = Timer(s.device)
    start = time.perf_counter()
    autocast = torch.autocast(s.device.type, dtype=torch.bfloat16) if s.bf16 else nullcontext()
    records = [s.train_data.records[i] for i in step_indices(step, P, len(s.train_data), cfg.train.seed)]
    prompts = encode_prompts([r.question + cfg.data.instruction for r in records], [r.image for r in records],
                             s.tokenizer, s.image_processor)
    mb = cfg.train.micro_batch_prompts or P
    par = s.parallel
    # Global slots (prompt * K + sample) of each micro-batch: all of them on one process, this
    # rank's share under torchrun (vaopd.distributed: groups may continue on a neighbour rank).
    if par is None:
        parts = [range(first * K, (first + mb) * K) for first in range(0, P, mb)]
        with timer("rollout"), autocast:
            tokens, mask = s.rollout.generate(prompts, K)
    else:
        parts = [m[par.env.rank] for m in slot_layout(P, K, mb, par.env.world_size)]
        with timer("rollout"), autocast:
            par.sync_replica()
            torch.manual_seed(rollout_seed(cfg.train.seed, step, par.env.rank))
            tokens, mask = generate_slots(s.rollout, prompts, [j for part in parts for j in part], K)
    ablated = None
    if cfg.loss.method == "va_opd":
        l = cfg.loss
        images = [ablate(r.image, l.ablation, seed=cfg.train.seed * 1_000_003 + step * P + i, pixelate_factor=l.pixelate_factor,
                         blur_radius=l.blur_radius, noise_std=l.noise_std, patch_size=l.patch_size,
                         patch_fraction=l.patch_fraction) for i, r in enumerate(records)]
        ablated = prompts.with_pixels(prompt_pixels(images, s.image_processor, prompts.image_grid_thw))

    body = base_model(s.student).model
    s_weight = base_model(s.student).get_output_embeddings().weight
    teacher = s.teacher if par is None or par.teacher is None else par.teacher
    compute_dtype = torch.bfloat16 if s.bf16 else torch.float32
    loss_options = dict(method=cfg.loss.method, kl_estimator=cfg.loss.kl_estimator, vocab_size=s.vocab_size, num_prompts=P,
                        temperature=cfg.loss.weight_temperature, high_fraction=cfg.loss.high_fraction,
                        high_weight=cfg.loss.high_weight, backend=cfg.loss.backend, chunk_size=cfg.loss.chunk_size or None)
    truncated = ~(torch.isin(tokens, torch.tensor(s.eos_ids)) & mask.bool()).any(dim=1)  # no EOS among the valid tokens
    sums: dict[str, float] = {"truncated": float(truncated.sum())}
    loss_total = 0.0
    row = 0  # this process's rows of tokens/mask are its slots in order
    for part in parts:
        owner = [j // K for j in part]  # the prompt (= sibling group id) of each row
        rows = torch.arange(row, row + len(part))
        row += len(part)
        m_mask = mask[rows]
        width = int(m_mask.sum(1).max())  # trim padding columns shared by the whole micro-batch
        m_tokens, m_mask = tokens[rows, :width].to(s.device), m_mask[:, :width].to(s.device)
        m_prompts = prompts.select(owner).to(s.device)
        m_ablated = ablated.select(owner).pixel_values.to(s.device) if ablated is not None else None
        group_ids = torch.tensor(owner, device=s.device)
        with timer("teacher"):
            t_hidden, t_ablated = teacher_hidden(teacher, m_prompts, m_ablated, m_tokens, m_mask)
            # A sharded teacher's root stays gathered after its forward: this is the full weight.
            t_weight = base_model(s.teacher).get_output_embeddings().weight
        with timer("loss"):
            lp = m_prompts.input_ids.shape[1]
            with autocast:
                if par is None:
                    s_hidden = body(**scoring_inputs(m_prompts, m_tokens, m_mask)).last_hidden_state[:, lp - 1:]
                else:
                    s_hidden, s_weight = par.student(**scoring_inputs(m_prompts, m_tokens, m_mask))
                    s_hidden = s_hidden[:, lp - 1:]
            # Under torchrun a sibling group may continue on another rank: process_group makes the
            # loss gather the responses' mean VA so the weights are those of the whole micro-batch.
            loss, stats = va_opd_loss(
                s_hidden.to(compute_dtype), s_weight.to(compute_dtype), t_hidden, t_ablated, t_weight, m_tokens, m_mask,
                group_ids, **loss_options, process_group=None if par is None else dist.group.WORLD)
            loss.backward()
        if par is not None and par.teacher is not None:
            par.teacher.reshard()
        loss_total += float(loss.detach())
        for k, v in token_stats(stats, m_mask, cfg.loss.high_fraction).items():
            sums[k] = max(sums.get(k, 0.0), v) if k == "va_max" else sums.get(k, 0.0) + v
    if par is not None:  # the step's totals over all ranks: every rank takes the same decisions
        sums["loss"] = loss_total
        sums = reduce_sums(sums, s.device)
        loss_total = sums["loss"]

    # Single process only: under torchrun a rank's rows are not the step's first rollouts.
    if cfg.log.rollouts_every and par is None and step % cfg.log.rollouts_every == 0:
        log_rollouts(cfg, s, step, records, prompts, tokens, mask)
    with timer("optimizer"):
        params = [p for p in s.student.parameters() if p.requires_grad]
        clip = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else math.inf
        if par is None:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, clip))
        else:
            grad_norm = clip_grad_norm(params, clip)
        skipped = not (math.isfinite(loss_total) and math.isfinite(grad_norm))
        lr = optimizer.param_groups[0]["lr"]
        if not skipped:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
    elapsed = time.perf_counter() - start
    va = cfg.loss.method == "va_opd"
    return {
        "step": step + 1, "loss": loss_total, "kl": sums["kl_sum"] / sums["tokens"],
        "va": sums["va_sum"] / sums["tokens"] if va else None,
        "va_high_share": (sums["va_high"] / sums["va_sum"] if sums["va_sum"] > 0 else 0.0) if va else None,
        "va_max": sums["va_max"] if va else None,
        "response_len": sums["tokens"] / sums["responses"],
        "truncated": sums["truncated"] / sums["responses"],
        "tokens_per_s": sums["tokens"] / elapsed, "grad_norm": grad_norm, "lr": lr, "skipped": skipped,
        "time": elapsed, **{f"time_{k}": v for k, v in timer.times.items()},
        "records": [r.id for r in records],
    }


# ----------------------------------------------------------------------------------------------
# The run


@dataclass
class TrainResult:
    student: torch.nn.Module
    teacher: torch.nn.Module
    step: int
    run_dir: Path
    checkpoint: Path | None
    history: list[dict] = field(default_factory=list)
    stopped_by_signal: bool = False


def run_dir_of(cfg: Config) -> Path:
    return Path(cfg.train.run_dir or Path("runs") / cfg.train.name)


def _resume_checkpoint(run_dir: Path, resume: str | bool | None) -> Path | None:
    if not resume:
        return None
    if resume is True:
        ckpt = latest_checkpoint(run_dir / "checkpoints")
        if ckpt is None:
            raise ConfigError(f"--resume: no checkpoint in {run_dir / 'checkpoints'}")
        return ckpt
    ckpt = Path(resume)
    if not (ckpt / "trainer_state.pt").is_file():
        raise ConfigError(f"--resume: {ckpt} is not a checkpoint folder (no trainer_state.pt)")
    return ckpt


def train(cfg: Config, *, resume: str | bool | None = None, handle_signals: bool = False) -> TrainResult:
    """Train with ``cfg``; ``resume`` = True (latest checkpoint of the run dir) or a checkpoint path.

    Under torchrun every rank calls this: the student is FSDP2-sharded (``parallelize``), each
    rank samples and scores its share of the step, checkpoints are sharded (DCP), and only rank 0
    writes metrics, the run dir's files and the progress bar.
    """
    env = init_distributed(cfg.train.device, cfg.distributed.timeout_s) if launched_by_torchrun() else None
    device = env.device if env else resolve_device(cfg)
    main_rank = env is None or env.is_main
    say = tqdm.write if main_rank else (lambda *args, **kwargs: None)
    if env and cfg.log.rollouts_every:
        say("log.rollouts_every: rollouts.jsonl is written by single-process runs only; not under torchrun")
    run_dir = run_dir_of(cfg)
    ckpt = _resume_checkpoint(run_dir, resume)
    sharded_ckpt = ckpt is not None and is_sharded_checkpoint(ckpt)
    torch.manual_seed(cfg.train.seed)
    s = build_setup(cfg, device, student_source=str(ckpt / "model") if ckpt and not sharded_ckpt else None)
    if env:
        parallelize(cfg, s, env)
    steps = total_steps(cfg, len(s.train_data))
    optimizer, scheduler = build_optimizer(cfg, s.student, steps)
    step, bad = 0, 0
    if ckpt:
        state = load_trainer_state(ckpt)
        if sharded_ckpt:
            load_sharded_state(ckpt, s.student, optimizer)
        elif env:
            load_full_optimizer_state(s.student, optimizer, state["optimizer"])
        else:
            optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step, bad = int(state["step"]), int(state["bad_steps"])
        if env is None:
            # A sharded checkpoint has no RNG state (its ranks reseed per step): do the same here.
            if "rng" in state:
                set_rng_state(state["rng"])
            else:
                torch.manual_seed(rollout_seed(cfg.train.seed, step, 0))
        if state["data_position"] != step * cfg.train.prompts_per_step:
            raise ConfigError(f"train.prompts_per_step: the checkpoint was written with another value "
                              f"(data position {state['data_position']} at step {step})")
    first_step = step
    config_yaml = to_yaml(cfg)
    if main_rank:
        run_dir.mkdir(parents=True, exist_ok=True)
        if not ckpt:
            (run_dir / "rollouts.jsonl").unlink(missing_ok=True)
        (run_dir / "config.yaml").write_text(config_yaml, encoding="utf-8")
    logger = MetricsLogger(run_dir, tensorboard=cfg.log.tensorboard, wandb_project=cfg.log.wandb_project,
                           config=to_dict(cfg), resume_step=step if ckpt else None, enabled=main_rank)
    last = step + cfg.train.stop_after if cfg.train.stop_after else steps
    last = min(last, steps)
    result = TrainResult(s.student, s.teacher, step, run_dir, ckpt)

    def save() -> Path:
        state = {"step": step, "data_position": step * cfg.train.prompts_per_step, "bad_steps": bad}
        if env:
            return save_sharded_checkpoint(run_dir / "checkpoints", step, model=s.student, optimizer=optimizer,
                                           tokenizer=s.tokenizer, image_processor=s.image_processor,
                                           trainer_state={**state, "scheduler": scheduler.state_dict()},
                                           config_yaml=config_yaml, keep=cfg.train.keep_checkpoints)
        state.update(optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(), rng=rng_state())
        return save_checkpoint(run_dir / "checkpoints", step, model=s.student, tokenizer=s.tokenizer,
                               image_processor=s.image_processor, trainer_state=state, config_yaml=config_yaml,
                               keep=cfg.train.keep_checkpoints)

    stop = {"signal": None}
    previous = {}
    if handle_signals:
        def on_signal(signum, frame):
            if stop["signal"] is None:
                say(f"received signal {signum}: finishing the current step, then saving a checkpoint")
            stop["signal"] = signum

        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, on_signal)

    def stopping() -> bool:
        # A signal may reach only some ranks, or reach them in different steps: agree first.
        return any_rank(stop["signal"] is not None, device) if env else stop["signal"] is not None

    bar = tqdm(total=steps, initial=step, desc=f"{cfg.loss.method}", disable=not (cfg.log.progress and main_rank),
               dynamic_ncols=True)
    stopped = False
    try:
        while step < last and not (stopped := stopping()):
            record = train_step(cfg, s, optimizer, scheduler, step)
            step += 1
            bad = bad + 1 if record["skipped"] else 0
            logger.log(record)
            result.history.append(record)
            if record["skipped"]:
                say(f"step {step}: non-finite loss ({record['loss']}) or gradient norm ({record['grad_norm']}): update skipped")
                if bad >= cfg.train.max_bad_steps:
                    good = latest_checkpoint(run_dir / "checkpoints")
                    raise TrainingAborted(
                        f"{bad} non-finite steps in a row (steps {step - bad + 1}..{step}); stopping. "
                        f"Last good checkpoint: {good if good else 'none'} (left intact). Lower optim.lr or check the data.")
            if record["va_max"] is not None and record["va_max"] < cfg.log.va_warn_threshold:
                say(f"WARNING: step {step}: visual advantage is ~0 on every token (max {record['va_max']:.2e} < "
                           f"{cfg.log.va_warn_threshold:g}): the teacher may not be seeing the images; VA-OPD reduces to "
                           "uniform weights", file=sys.stderr)
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.4f}", kl=f"{record['kl']:.4f}",
                            va=f"{record['va']:.4f}" if record["va"] is not None else "-",
                            hi=f"{record['va_high_share']:.2f}" if record["va_high_share"] is not None else "-",
                            len=f"{record['response_len']:.1f}", tok_s=f"{record['tokens_per_s']:.0f}")
            if s.val_data is not None and cfg.eval.every and step % cfg.eval.every == 0 and step < steps:
                validate(cfg, s, logger, step, result)
            # No checkpoint right after a skipped step: the last good one must stay the newest.
            if cfg.train.checkpoint_every and step % cfg.train.checkpoint_every == 0 and not record["skipped"]:
                result.checkpoint = save()
        if s.val_data is not None and step == steps and not stopped:
            validate(cfg, s, logger, step, result)
        if step > first_step:
            result.checkpoint = save()
    finally:
        bar.close()
        logger.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    result.step = step
    result.stopped_by_signal = stopped
    return result


def validate(cfg: Config, s: Setup, logger: MetricsLogger, step: int, result: TrainResult) -> None:
    """Sample and grade the validation answers. Under torchrun each rank grades every N-th
    question on the refreshed unsharded replica (seeded by its rank) and the counts are summed."""
    records = s.val_data.records[:cfg.eval.max_questions or None]
    model, seed, par = s.student, cfg.train.seed, s.parallel
    if par is not None:
        par.sync_replica()
        model, seed = par.replica, cfg.train.seed + par.env.rank
        records = records[par.env.rank::par.env.world_size]
    out = {"accuracy": 0.0, "samples": 0}
    if records:
        out = evaluate(model, s.tokenizer, s.image_processor, records, eos_ids=s.eos_ids, banned_ids=s.banned_ids,
                       samples=cfg.eval.samples, temperature=cfg.eval.temperature, top_p=cfg.eval.top_p,
                       max_new_tokens=cfg.eval.max_new_tokens, batch_prompts=cfg.eval.batch_prompts,
                       instruction=cfg.data.instruction, seed=seed)
    s.student.train()
    if par is not None:
        totals = reduce_sums({"correct": out["accuracy"] * out["samples"], "samples": float(out["samples"])}, s.device)
        out = {"accuracy": totals["correct"] / max(totals["samples"], 1.0), "samples": int(totals["samples"])}
        if not par.env.is_main:
            return
    record = {"step": step, "val_accuracy": out["accuracy"], "val_samples": out["samples"]}
    logger.log(record)
    result.history.append(record)
    tqdm.write(f"step {step}: validation accuracy {out['accuracy']:.3f} ({out['samples']} samples, math-verify)")


# ----------------------------------------------------------------------------------------------
# Dry run


def _count(model) -> tuple[int, int]:
    return sum(p.numel() for p in model.parameters()), sum(p.numel() for p in model.parameters() if p.requires_grad)


def build_plan(cfg: Config) -> str:
    """Validate models, vocabularies and data without training; return the plan as text.

    Tiny models are built for real; other models are built on the meta device from their
    config, so planning an 8B teacher costs no memory.
    """
    device = resolve_device(cfg)
    bf16 = use_bf16(cfg, device)
    train_data = load_dataset(cfg, cfg.data.train, split_seed=0)
    val_data = load_dataset(cfg, cfg.data.val, split_seed=1) if cfg.data.val else None
    models, tokenizers = {}, {}
    for role, spec in (("student", cfg.model.student), ("teacher", cfg.model.teacher)):
        if is_tiny(spec):
            models[role], tokenizers[role], image_processor = load_pretrained(cfg, spec, torch.device("cpu"), trainable=False)
        else:
            from transformers import AutoConfig, AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer

            with _loading(spec, f"model.{role}"), torch.device("meta"):
                models[role] = AutoModelForImageTextToText.from_config(AutoConfig.from_pretrained(spec))
                tokenizers[role] = AutoTokenizer.from_pretrained(spec)
                image_processor = AutoImageProcessor.from_pretrained(
                    spec, backend="pil", size={"shortest_edge": cfg.data.min_pixels, "longest_edge": cfg.data.max_pixels})
        if role == "student":
            student_ip = image_processor
    student, teacher = models["student"], models["teacher"]
    vocab = check_vocabularies(tokenizers["student"], tokenizers["teacher"],
                               student.get_output_embeddings().weight.shape[0], teacher.get_output_embeddings().weight.shape[0])
    if cfg.model.lora.enabled:
        from peft import LoraConfig, get_peft_model

        student = get_peft_model(student, LoraConfig(r=cfg.model.lora.r, lora_alpha=cfg.model.lora.alpha,
                                                     target_modules=list(cfg.model.lora.target_modules)))
    if cfg.model.freeze_vision:
        base_model(student).model.visual.requires_grad_(False)
    s_total, s_train = _count(student)
    t_total, _ = _count(teacher)
    r0 = train_data.records[0]
    prompt_len = encode_prompts([r0.question + cfg.data.instruction], [r0.image], tokenizers["student"], student_ip).input_ids.shape[1]
    steps = total_steps(cfg, len(train_data))
    P, K = cfg.train.prompts_per_step, cfg.rollout.samples_per_prompt
    mb = cfg.train.micro_batch_prompts or P
    gib = 1024 ** 3
    tc = teacher.config.get_text_config()
    sc = base_model(student).config.get_text_config()
    seq = prompt_len + cfg.rollout.max_new_tokens
    rollout_rows = (cfg.rollout.batch_prompts or P) * K
    act_bytes = 2 if bf16 else 4
    kv = 2 * sc.num_hidden_layers * sc.num_key_value_heads * sc.head_dim * act_bytes * rollout_rows * seq
    hidden = mb * K * seq * (sc.hidden_size + 2 * tc.hidden_size) * act_bytes
    mem = {
        "student weights+grads+AdamW (fp32)": (s_total * 4 + s_train * 12) / gib,
        f"teacher weights ({'bf16' if bf16 else 'fp32'})": t_total * act_bytes / gib,
        "rollout KV cache": kv / gib,
        "micro-batch final hidden states": hidden / gib,
    }
    lines = [
        "plan (dry run: nothing trained)",
        f"  device: {device}, precision: {'bf16 autocast' if bf16 else 'fp32'}, attention: {attn_implementation(cfg)}",
        f"  student: {cfg.model.student} ({type(base_model(student)).__name__}): {s_total:,} params, {s_train:,} trainable"
        + (f" (LoRA r={cfg.model.lora.r})" if cfg.model.lora.enabled else ""),
        f"  teacher: {cfg.model.teacher} ({type(teacher).__name__}): {t_total:,} params, frozen",
        f"  vocabulary: {vocab} tokens (student head {student.get_output_embeddings().weight.shape[0]} rows, "
        f"teacher head {teacher.get_output_embeddings().weight.shape[0]} rows)",
        f"  data: {len(train_data)} train records from {train_data.source}" + (f" ({train_data.skipped} bad skipped)" if train_data.skipped else "")
        + (f", {len(val_data)} validation records from {val_data.source}" if val_data else ", no validation"),
        f"  steps: {steps} ({P} prompts x {K} responses = {P * K} responses per step, "
        f"{P // mb} micro-batch(es) of {mb} prompts; {steps * P / len(train_data):.2f} epochs)",
        f"  method: {cfg.loss.method} (kl {cfg.loss.kl_estimator}, ablation {cfg.loss.ablation if cfg.loss.method == 'va_opd' else 'none'})",
        f"  sequence: prompt ~{prompt_len} tokens + up to {cfg.rollout.max_new_tokens} new",
        "  memory estimate (GiB, excluding activations and allocator slack):",
        *[f"    {k}: {v:.3f}" for k, v in mem.items()],
        f"    total: {sum(mem.values()):.3f}",
        f"  run dir: {run_dir_of(cfg)}",
    ]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Command line


DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "tiny.yaml"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vaopd.train", description="On-policy distillation (VA-OPD or OPD) of a VLM.")
    parser.add_argument("--config", default=None, help=f"YAML config (default: {DEFAULT_CONFIG.name} when present, else built-in defaults)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="dotted override, e.g. optim.lr=1e-5 (repeatable)")
    parser.add_argument("--method", choices=["va_opd", "opd"], default=None, help="shorthand for --set loss.method=...")
    parser.add_argument("--resume", nargs="?", const=True, default=None, metavar="CHECKPOINT",
                        help="continue from the run dir's latest checkpoint, or from CHECKPOINT")
    parser.add_argument("--dry-run", action="store_true", help="validate, print the resolved config and the plan, exit")
    args = parser.parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # keep the console to our own progress bar
    config_path = args.config or (DEFAULT_CONFIG if DEFAULT_CONFIG.is_file() else None)
    overrides = list(args.set) + ([f"loss.method={args.method}"] if args.method else [])
    distributed = launched_by_torchrun()
    # Under torchrun every rank's messages name it; the first rank to fail exits non-zero and
    # torchrun stops the others (their collectives fail or time out: distributed.timeout_s).
    rank = f"[rank {os.environ['RANK']}] " if distributed else ""
    try:
        cfg = load_config(config_path, overrides)
        if args.dry_run:
            print(to_yaml(cfg))
            print(build_plan(cfg))
            return 0
        result = train(cfg, resume=args.resume, handle_signals=True)
    except (ConfigError, DataError, VocabularyError) as e:
        print(f"{rank}error: {e}", file=sys.stderr)
        return 2
    except TrainingAborted as e:
        print(f"{rank}aborted: {e}", file=sys.stderr)
        return 1
    except Exception:
        if not distributed:
            raise
        trace = traceback.format_exc().rstrip().splitlines()
        print("\n".join(f"{rank}{line}" for line in trace), file=sys.stderr, flush=True)
        return 1
    if distributed:
        shutdown()
    if os.environ.get("RANK", "0") == "0":
        print(f"done: step {result.step}, run dir {result.run_dir}, checkpoint {result.checkpoint}"
              + (" (stopped by signal)" if result.stopped_by_signal else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
