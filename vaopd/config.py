"""Typed trainer configuration: dataclasses, YAML files and dotted ``--set`` overrides.

Every section is a dataclass; ``load_config`` merges defaults < YAML file < overrides, checks
types, rejects unknown keys and validates values. Every error is a ``ConfigError`` whose message
starts with the dotted key at fault (``optim.lr: must be > 0, got -1``).
"""
from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

__all__ = [
    "ConfigError", "ModelConfig", "LoraConfig", "DataConfig", "VLLMConfig", "RolloutConfig", "LossConfig",
    "OptimConfig", "TrainConfig", "SubsetConfig", "EvalConfig", "LogConfig", "DistributedConfig", "Config", "load_config", "to_dict", "to_yaml",
    "RESUME_SAFE", "resume_changes",
]


class ConfigError(ValueError):
    """A bad configuration key or value; the message names the dotted key."""


@dataclass
class LoraConfig:
    enabled: bool = False
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


@dataclass
class ModelConfig:
    # "tiny:student" / "tiny:teacher" build random tiny models in code (vaopd.tiny); anything
    # else is a local directory or hub id for AutoModelForImageTextToText.from_pretrained.
    student: str = "tiny:student"
    teacher: str = "tiny:teacher"
    # auto: flash_attention_2 when transformers reports it available, else sdpa.
    attn_implementation: Literal["auto", "flash_attention_2", "sdpa", "eager"] = "auto"
    gradient_checkpointing: bool = False
    freeze_vision: bool = False
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class DataConfig:
    # "tiny" generates the tiny data set; otherwise a .jsonl/.json or .parquet file.
    train: str = "tiny"
    # Validation file, "tiny" (generated with another seed) or "" for no validation.
    val: str = "tiny"
    question_key: str = "problem"
    answer_key: str = "answer"
    image_key: str = "images"
    id_key: str = ""  # "" uses the record's line/row number
    image_root: str = ""  # relative image paths resolve here; "" = the data file's folder
    skip_bad_records: bool = False
    tiny_train_size: int = 64
    tiny_val_size: int = 8
    # Image pixel bounds given to the Qwen-VL image processor (it resizes into them).
    min_pixels: int = 32 * 32
    max_pixels: int = 64 * 64
    # Appended to every question (the usual boxed-answer instruction).
    instruction: str = " Put the final answer in \\boxed{}."


@dataclass
class VLLMConfig:
    # Read only with rollout.engine: vllm (docs/training.md, "Rollout engines").
    # GPU: the share of the card vLLM takes for its weights and KV cache (the trainer needs the rest).
    gpu_memory_utilization: float = 0.3
    # GPU: free vLLM's weights and KV cache while the trainer scores and updates (not on a CPU).
    sleep_mode: bool = False
    # GPU: false captures CUDA graphs (faster decoding, slower start). A CPU always runs eagerly.
    enforce_eager: bool = False
    # CPU: the KV cache size in GiB.
    kv_cache_gib: float = 1.0
    # Longest prompt + response the engine accepts; 0 = the model's context length (its KV cache
    # must hold one such sequence: set this for long-context models on a small memory share).
    max_model_len: int = 0


@dataclass
class RolloutConfig:
    # hf: transformers generate on the student itself. vllm: an in-process vLLM engine whose
    # weights follow the student (needs the vllm extra in its own environment: README, "Three commands").
    engine: Literal["hf", "vllm"] = "hf"
    samples_per_prompt: int = 4
    temperature: float = 0.7
    top_p: float = 0.95
    top_k: int = 0  # 0 = off
    max_new_tokens: int = 16
    # Prompts per generate() call (hf engine); 0 = all prompts of the optimizer step in one call.
    batch_prompts: int = 0
    vllm: VLLMConfig = field(default_factory=VLLMConfig)


@dataclass
class LossConfig:
    method: Literal["va_opd", "opd"] = "va_opd"
    kl_estimator: Literal["full", "sampled"] = "full"
    high_fraction: float = 0.2
    high_weight: float = 0.5
    weight_temperature: float = 1.0
    backend: Literal["auto", "triton", "torch"] = "auto"
    chunk_size: int = 0  # 0 = the kernel's default
    ablation: Literal["pixelate", "blur", "noise", "patch_mask"] = "pixelate"
    pixelate_factor: float = 0.1
    blur_radius: float = 4.0
    noise_std: float = 64.0  # in 0..255 pixel units
    patch_size: int = 16
    patch_fraction: float = 0.5


@dataclass
class OptimConfig:
    lr: float = 1e-3
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    weight_decay: float = 0.1
    eps: float = 1e-8
    warmup_ratio: float = 0.05
    min_lr_ratio: float = 0.0
    grad_clip: float = 1.0


@dataclass
class TrainConfig:
    name: str = "tiny"
    run_dir: str = ""  # "" = runs/<name>
    seed: int = 0
    device: str = "auto"  # auto: cuda when available, else cpu
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 on cuda, fp32 on cpu
    prompts_per_step: int = 4
    # Prompts per micro-batch (whole sibling groups); 0 = the whole optimizer step at once.
    micro_batch_prompts: int = 0
    # Single process: fill micro-batches with sibling groups of similar response length (less
    # padding in teacher scoring and the student's passes; the step's gradient is unchanged).
    length_buckets: bool = True
    max_steps: int = 0  # 0 = epochs * (train records // prompts_per_step)
    epochs: float = 1.0
    # End this run after this many steps (checkpoint saved) without changing the schedule,
    # e.g. to fit a job's time limit; 0 = run to max_steps.
    stop_after: int = 0
    checkpoint_every: int = 0  # 0 = only at the end
    # Newest checkpoints kept (the best one, see eval, is kept as well); -1 = keep every checkpoint.
    keep_checkpoints: int = 2
    max_bad_steps: int = 3  # consecutive non-finite steps before aborting


@dataclass
class SubsetConfig:
    # Validate on `count` questions of data.val drawn without replacement with random.Random(seed)
    # (kept in file order); 0 = every question.
    count: int = 0
    seed: int = 42


@dataclass
class EvalConfig:
    every: int = 0  # 0 = only at the end (when data.val is set)
    samples: int = 2
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 16
    max_questions: int = 0  # 0 = all
    batch_prompts: int = 8
    subset: SubsetConfig = field(default_factory=SubsetConfig)
    # first_boxed_mathruler: the first \boxed{} or answer marker, mathruler's grade_answer (the
    # method authors' rule); math_verify: math-verify on the whole response (vaopd.grading).
    grader: Literal["first_boxed_mathruler", "math_verify"] = "math_verify"


@dataclass
class LogConfig:
    progress: bool = True
    tensorboard: bool = False
    wandb_project: str = ""
    # Warn loudly when every token's VA of a step is below this (the teacher may not see images).
    va_warn_threshold: float = 1e-4
    # Every N steps (and at the first), per-token data of the step's first `rollouts_per_log`
    # rollouts go to <run_dir>/rollouts.jsonl for `python -m vaopd.inspect`; 0 = off.
    # Single-process runs only (not under torchrun).
    rollouts_every: int = 0
    rollouts_per_log: int = 4


@dataclass
class DistributedConfig:
    # Read only under torchrun (RANK and WORLD_SIZE set); a plain process ignores this section.
    # The student is always sharded with FSDP2. The frozen teacher is either a full copy on every
    # rank ("replica": no communication, full memory) or sharded like the student ("fsdp").
    teacher: Literal["replica", "fsdp"] = "replica"
    # Bound on every collective (init_process_group timeout): when a rank dies or hangs, the
    # others fail after this many seconds instead of waiting forever.
    timeout_s: float = 600.0


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)

    def validate(self) -> None:
        """Value checks beyond types; raises ``ConfigError`` naming the key."""
        positive = {
            "rollout.samples_per_prompt": self.rollout.samples_per_prompt,
            "rollout.temperature": self.rollout.temperature,
            "rollout.max_new_tokens": self.rollout.max_new_tokens,
            "loss.weight_temperature": self.loss.weight_temperature,
            "optim.lr": self.optim.lr,
            "optim.eps": self.optim.eps,
            "train.prompts_per_step": self.train.prompts_per_step,
            "eval.samples": self.eval.samples,
            "eval.temperature": self.eval.temperature,
            "eval.max_new_tokens": self.eval.max_new_tokens,
            "eval.batch_prompts": self.eval.batch_prompts,
            "data.min_pixels": self.data.min_pixels,
            "data.max_pixels": self.data.max_pixels,
            "loss.patch_size": self.loss.patch_size,
            "model.lora.r": self.model.lora.r,
            "train.max_bad_steps": self.train.max_bad_steps,
            "log.rollouts_per_log": self.log.rollouts_per_log,
            "distributed.timeout_s": self.distributed.timeout_s,
            "rollout.vllm.kv_cache_gib": self.rollout.vllm.kv_cache_gib,
        }
        for key, value in positive.items():
            if not value > 0:
                raise ConfigError(f"{key}: must be > 0, got {value!r}")
        non_negative = {
            "rollout.batch_prompts": self.rollout.batch_prompts,
            "rollout.top_k": self.rollout.top_k,
            "rollout.vllm.max_model_len": self.rollout.vllm.max_model_len,
            "loss.chunk_size": self.loss.chunk_size,
            "optim.weight_decay": self.optim.weight_decay,
            "optim.grad_clip": self.optim.grad_clip,
            "train.micro_batch_prompts": self.train.micro_batch_prompts,
            "train.max_steps": self.train.max_steps,
            "train.epochs": self.train.epochs,
            "train.stop_after": self.train.stop_after,
            "train.checkpoint_every": self.train.checkpoint_every,
            "eval.every": self.eval.every,
            "eval.max_questions": self.eval.max_questions,
            "eval.subset.count": self.eval.subset.count,
            "log.rollouts_every": self.log.rollouts_every,
            "data.tiny_train_size": self.data.tiny_train_size,
            "data.tiny_val_size": self.data.tiny_val_size,
            "loss.blur_radius": self.loss.blur_radius,
            "loss.noise_std": self.loss.noise_std,
            "model.lora.dropout": self.model.lora.dropout,
        }
        for key, value in non_negative.items():
            if not value >= 0:
                raise ConfigError(f"{key}: must be >= 0, got {value!r}")
        unit = {
            "rollout.top_p": (self.rollout.top_p, False),
            "rollout.vllm.gpu_memory_utilization": (self.rollout.vllm.gpu_memory_utilization, False),
            "eval.top_p": (self.eval.top_p, False),
            "loss.high_fraction": (self.loss.high_fraction, False),
            "loss.pixelate_factor": (self.loss.pixelate_factor, False),
            "loss.patch_fraction": (self.loss.patch_fraction, False),
            "loss.high_weight": (self.loss.high_weight, True),
            "optim.warmup_ratio": (self.optim.warmup_ratio, True),
            "optim.min_lr_ratio": (self.optim.min_lr_ratio, True),
        }
        for key, (value, closed) in unit.items():
            if not ((0 <= value <= 1) if closed else (0 < value <= 1)):
                raise ConfigError(f"{key}: must be in {'[0, 1]' if closed else '(0, 1]'}, got {value!r}")
        if len(self.optim.betas) != 2 or not all(0 <= b < 1 for b in self.optim.betas):
            raise ConfigError(f"optim.betas: must be two numbers in [0, 1), got {self.optim.betas!r}")
        if self.train.keep_checkpoints != -1 and self.train.keep_checkpoints < 1:
            raise ConfigError(f"train.keep_checkpoints: must be >= 1, or -1 to keep all, got {self.train.keep_checkpoints!r}")
        if self.data.min_pixels > self.data.max_pixels:
            raise ConfigError(f"data.min_pixels: {self.data.min_pixels} exceeds data.max_pixels {self.data.max_pixels}")
        mb = self.train.micro_batch_prompts
        if mb and self.train.prompts_per_step % mb:
            raise ConfigError(
                f"train.micro_batch_prompts: {mb} must divide train.prompts_per_step {self.train.prompts_per_step} "
                "(micro-batches hold whole sibling groups)"
            )
        if not self.train.max_steps and not self.train.epochs:
            raise ConfigError("train.max_steps: set train.max_steps or train.epochs (both are 0)")
        if not self.data.train:
            raise ConfigError("data.train: a data file or 'tiny' is required")
        if not self.data.question_key or not self.data.answer_key or not self.data.image_key:
            raise ConfigError("data.question_key: question_key, answer_key and image_key must be non-empty")
        if not _PLAIN_NAME.fullmatch(self.train.name) or set(self.train.name) == {"."}:
            raise ConfigError(f"train.name: must be a plain folder name (letters, digits, '.', '_', '-'), got "
                              f"{self.train.name!r}; set train.run_dir to write elsewhere")
        if self.train.device not in ("auto", "cpu") and not self.train.device.startswith("cuda"):
            raise ConfigError(f"train.device: must be auto, cpu or cuda[:N], got {self.train.device!r}")
        if self.rollout.engine == "vllm" and self.model.lora.enabled:
            raise ConfigError("rollout.engine: vllm does not sample from a LoRA student (its adapter weights are not "
                              "merged into the engine); use rollout.engine: hf with model.lora.enabled")
        if self.rollout.vllm.sleep_mode and self.train.device == "cpu":
            raise ConfigError("rollout.vllm.sleep_mode: vLLM's sleep mode needs a CUDA GPU; set it to false on a CPU")


def _check_type(key: str, value: Any, tp: Any) -> Any:
    """Return ``value`` coerced to annotation ``tp`` (int -> float only) or raise ``ConfigError``."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{key}: must be one of {list(choices)}, got {value!r}")
        return value
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: must be a list, got {value!r}")
        return [_check_type(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: must be a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config annotation {tp!r} for {key}")


def _merge(obj: Any, updates: dict, prefix: str = "") -> None:
    """Apply a nested dict of updates onto a dataclass instance in place, checking keys and types."""
    if not isinstance(updates, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: must be a mapping, got {updates!r}")
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for name, value in updates.items():
        key = f"{prefix}{name}"
        if name not in names:
            raise ConfigError(f"{key}: unknown config key (valid keys here: {', '.join(sorted(names))})")
        current = getattr(obj, name)
        if dataclasses.is_dataclass(current):
            _merge(current, value, key + ".")
        else:
            setattr(obj, name, _check_type(key, value, hints[name]))


_PLAIN_NAME = re.compile(r"[A-Za-z0-9._-]+")
_EXP_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _parse_override(text: str) -> dict:
    """``"optim.lr=1e-5"`` -> ``{"optim": {"lr": 1e-05}}``; the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"{text}: an override must look like section.key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"{text}: an override needs a key before '='")
    value = yaml.safe_load(raw) if raw.strip() else ""
    # YAML 1.1 reads 1e-5 (no dot) as a string; that is how users type learning rates.
    if isinstance(value, str) and _EXP_FLOAT.fullmatch(value.strip()):
        value = float(value)
    nested: dict = {}
    node = nested
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return nested


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults, then the YAML file at ``path``, then ``overrides`` ("a.b=value"); validated."""
    cfg = Config()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"--config: no such file {path}")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            where = getattr(e, "problem_mark", None)
            at = f" (line {where.line + 1}, column {where.column + 1})" if where is not None else ""
            raise ConfigError(f"--config: {path} is not valid YAML{at}: {getattr(e, 'problem', None) or e}") from None
        _merge(cfg, data)
    for text in overrides:
        _merge(cfg, _parse_override(text))
    cfg.validate()
    return cfg


# Keys that --resume may change: how the run logs, validates and checkpoints, how long it runs, and
# where (device, number of ranks, the rollout engine and its memory settings). Any other difference
# from the checkpoint's config changes the optimisation being continued and is refused. An entry
# ending in "." covers a whole section.
RESUME_SAFE = (
    "log.", "eval.", "distributed.", "data.val", "data.tiny_val_size",
    "train.name", "train.run_dir", "train.device", "train.max_steps", "train.epochs", "train.stop_after",
    "train.checkpoint_every", "train.keep_checkpoints", "train.max_bad_steps",
    "model.attn_implementation", "model.gradient_checkpointing",
    "rollout.engine", "rollout.vllm.",
)


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def resume_changes(saved: dict, cfg: Config) -> tuple[list[str], list[str]]:
    """Differences between a checkpoint's saved config (a dict read from its ``config.yaml``) and
    ``cfg``, as ``"key: old -> new"`` lines: (refused, allowed), see ``RESUME_SAFE``.

    A key the saved config lacks (added to vaopd since) counts only when ``cfg`` moves it off its default.
    """
    old, new, default = _flatten(saved), _flatten(to_dict(cfg)), _flatten(to_dict(Config()))
    refused, allowed = [], []
    for key in sorted(old.keys() | new.keys()):
        if key not in old and new.get(key) == default.get(key):
            continue
        if old.get(key, "(absent)") == new.get(key, "(absent)"):
            continue
        line = f"{key}: {old.get(key, '(absent)')!r} -> {new.get(key, '(absent)')!r}"
        safe = any(key.startswith(s) if s.endswith(".") else key == s for s in RESUME_SAFE)
        (allowed if safe else refused).append(line)
    return refused, allowed


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
