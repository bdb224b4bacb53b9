"""``--dry-run``: validate models, vocabularies and data, and print the plan and a memory estimate."""
from __future__ import annotations

import torch

from vaopd import torchvision_ops  # noqa: F401  first: transformers may import torchvision (see there)
from vaopd.build import packed_attention
from vaopd.config import Config
from vaopd.data import load_dataset
from vaopd.models import attn_implementation, base_model, check_vocabularies, load_pretrained, loading, resolve_device, use_bf16
from vaopd.optim import total_steps
from vaopd.rollout import encode_prompts
from vaopd.rollout.decode import compile_enabled
from vaopd.runs import run_dir_of
from vaopd.tiny import is_tiny

__all__ = ["build_plan"]


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

            with loading(spec, f"model.{role}"), torch.device("meta"):
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
    compiled = cfg.rollout.engine == "hf" and compile_enabled(cfg.rollout.hf.compile, device)
    multiple = cfg.rollout.hf.cache_multiple
    cache_len = -(-seq // multiple) * multiple  # the static cache's positions (vaopd.rollout.decode)
    rollout_rows = (cfg.rollout.batch_prompts or P) * K
    act_bytes = 2 if bf16 else 4
    kv = (2 * sc.num_hidden_layers * sc.num_key_value_heads * sc.head_dim * act_bytes * rollout_rows
          * (cache_len if compiled else seq))
    hidden = mb * K * seq * (sc.hidden_size + 2 * tc.hidden_size) * act_bytes
    mem = {
        "student weights+grads+AdamW (fp32)": (s_total * 4 + s_train * 12) / gib,
        f"teacher weights ({'bf16' if bf16 else 'fp32'})": t_total * act_bytes / gib,
        **({"rollout KV cache": kv / gib} if cfg.rollout.engine == "hf" else {"vLLM weight copy": s_total * act_bytes / gib}),
        # The hf engine samples from an inference copy in the rollout dtype (vaopd.strategy);
        # with LoRA on one process it samples from the student itself.
        **({f"rollout replica ({'bf16' if bf16 else 'fp32'})": s_total * act_bytes / gib}
           if cfg.rollout.engine == "hf" and not cfg.model.lora.enabled else {}),
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
        f"  method: {cfg.loss.method} (kl {cfg.loss.kl_estimator}, "
        + (f"va {cfg.loss.va}, ablation {cfg.loss.ablation})" if cfg.loss.method == "va_opd" else "ablation none)"),
        f"  sequence: prompt ~{prompt_len} tokens + up to {cfg.rollout.max_new_tokens} new",
        "  rollout: " + (("transformers generate on the student itself (LoRA; the KV cache below)" if cfg.model.lora.enabled
                          else "transformers generate on an inference copy of the student (its weights and KV cache below)")
                         if cfg.rollout.engine == "hf" else
                         f"in-process vLLM (its weight copy below; its KV cache, not below: what is left of "
                         f"{cfg.rollout.vllm.gpu_memory_utilization:g} of the GPU, or {cfg.rollout.vllm.kv_cache_gib:g} GiB "
                         "on a CPU)"),
        *([f"  decode: {'compiled, static KV cache of ' + str(cache_len) + ' positions' if compiled else 'eager, dynamic KV cache'}"
           f" (rollout.hf.compile: {cfg.rollout.hf.compile})"] if cfg.rollout.engine == "hf" else []),
        ("  scoring: packed (valid positions only; attention: "
         f"{packed_attention(cfg, device).describe(attn_implementation(cfg))}) (train.packed_scoring, train.packed_attention)"
         if cfg.train.packed_scoring else "  scoring: padded (train.packed_scoring)"),
        "  memory estimate (GiB, excluding activations and allocator slack):",
        *[f"    {k}: {v:.3f}" for k, v in mem.items()],
        f"    total: {sum(mem.values()):.3f}",
        f"  run dir: {run_dir_of(cfg)}",
    ]
    return "\n".join(lines)
