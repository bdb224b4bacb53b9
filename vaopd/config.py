"""Typed trainer configuration: pydantic sections, YAML files and dotted ``--set`` overrides.

Each field states its type, default and bounds, whether ``--resume`` may change it (``safe=True``:
it changes how the run logs, validates, checkpoints, how long it runs or where, not the
optimisation being continued; a section with ``resume_safe = True`` is safe as a whole), and for an
optional field the older spelling of "not set" that still reads as ``None`` (``was=0``, ``-1`` or
``""``). ``None`` (YAML ``null``) always means "not set": the feature is off, or the value is
derived as the field's comment says. Every number is taken literally.

``load_config`` merges defaults < YAML file < overrides; every error is a ``ConfigError`` whose
message starts with the dotted key at fault (``optim.lr: must be > 0, got -1``).
"""
from __future__ import annotations

import difflib
import re
import typing
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from vaopd.kernels.spec import LossSpec

__all__ = [
    "ConfigError", "ModelConfig", "LoraConfig", "DataConfig", "HFConfig", "VLLMConfig", "RolloutConfig", "LossConfig",
    "OptimConfig", "TrainConfig", "SubsetConfig", "EvalConfig", "LogConfig", "DistributedConfig", "Config",
    "load_config", "read_config_file", "to_dict", "to_yaml", "resume_changes",
]


class ConfigError(ValueError):
    """A bad configuration key or value; the message names the dotted key (or the file)."""


_UNSET = object()


def setting(default: Any = _UNSET, *, safe: bool = False, was: Any = _UNSET, **bounds: Any) -> Any:
    """A config field: its default, pydantic ``bounds`` (``ge``, ``gt``, ``le``, ``lt``,
    ``min_length``), ``safe``: whether ``--resume`` may change it, ``was``: the value that meant
    "not set" before ``None`` did (read as ``None``). A section class as ``default`` gives each
    config its own instance."""
    extra = {"resume_safe": safe} | ({} if was is _UNSET else {"was": was})
    if isinstance(default, type):
        return Field(default_factory=default, json_schema_extra=extra, **bounds)
    return Field(default, json_schema_extra=extra, **bounds)


class Section(BaseModel):
    """A config section: strict types (an int is accepted for a float, nothing else is coerced),
    finite numbers, no unknown keys."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)
    resume_safe: ClassVar[bool] = False  # True: --resume may change every field of this section

    @model_validator(mode="before")
    @classmethod
    def _read_old_unset(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        out = dict(data)
        for name, value in data.items():
            if _is_old_unset(value, _extra(cls, name).get("was", _UNSET)):
                out[name] = None
        return out


def _is_old_unset(value: Any, was: Any) -> bool:
    """Whether ``value`` is a field's older spelling of "not set" (``was``; never a bool)."""
    return was is not _UNSET and not isinstance(value, bool) and value == was


def _extra(section: type[BaseModel] | None, name: Any) -> dict:
    """A field's ``setting`` flags (``resume_safe``, ``was``); empty for anything else."""
    info = section.model_fields.get(name) if section is not None and isinstance(name, str) else None
    return (info.json_schema_extra or {}) if info is not None else {}


class LoraConfig(Section):
    enabled: bool = False
    r: int = setting(16, gt=0)
    alpha: int = setting(32, gt=0)
    dropout: float = setting(0.0, ge=0, lt=1)
    target_modules: list[str] = setting(["q_proj", "k_proj", "v_proj", "o_proj"], min_length=1)


class ModelConfig(Section):
    # "tiny:student" / "tiny:teacher" build random tiny models in code (vaopd.tiny); anything
    # else is a local directory or hub id for AutoModelForImageTextToText.from_pretrained.
    student: str = setting("tiny:student", min_length=1)
    teacher: str = setting("tiny:teacher", min_length=1)
    # auto: flash_attention_2 when transformers reports it available, else sdpa.
    attn_implementation: Literal["auto", "flash_attention_2", "sdpa", "eager"] = setting("auto", safe=True)
    gradient_checkpointing: bool = setting(False, safe=True)
    freeze_vision: bool = False
    lora: LoraConfig = setting(LoraConfig)


class DataConfig(Section):
    # "tiny" generates the tiny data set; otherwise a .jsonl/.json or .parquet file.
    train: str = setting("tiny", min_length=1)
    # Validation file or "tiny" (generated with another seed); null: no validation.
    val: str | None = setting("tiny", safe=True, was="", min_length=1)
    question_key: str = setting("problem", min_length=1)
    answer_key: str = setting("answer", min_length=1)
    image_key: str = setting("images", min_length=1)
    id_key: str | None = setting(None, was="", min_length=1)  # null: the record's line/row number
    image_root: str | None = setting(None, was="", min_length=1)  # relative image paths; null: the data file's folder
    skip_bad_records: bool = False
    tiny_train_size: int = setting(64, gt=0)
    tiny_val_size: int = setting(8, safe=True, gt=0)
    # Image pixel bounds given to the Qwen-VL image processor (it resizes into them).
    min_pixels: int = setting(32 * 32, gt=0)
    max_pixels: int = setting(64 * 64, gt=0)
    # Appended to every question (the usual boxed-answer instruction).
    instruction: str = " Put the final answer in \\boxed{}."


class VLLMConfig(Section):
    # Read only with rollout.engine: vllm (docs/training.md, "Rollout engines").
    resume_safe: ClassVar[bool] = True
    # GPU: the share of the card vLLM takes for its weights and KV cache (the trainer needs the rest).
    gpu_memory_utilization: float = setting(0.3, gt=0, le=1)
    # GPU: free vLLM's weights and KV cache while the trainer scores and updates (not on a CPU).
    sleep_mode: bool = False
    # GPU: false captures CUDA graphs (faster decoding, slower start). A CPU always runs eagerly.
    enforce_eager: bool = False
    # CPU: the KV cache size in GiB.
    kv_cache_gib: float = setting(1.0, gt=0)
    # Longest prompt + response the engine accepts; null: the model's context length (its KV cache
    # must hold one such sequence: set this for long-context models on a small memory share).
    max_model_len: int | None = setting(None, was=0, gt=0)


class HFConfig(Section):
    # Read only with rollout.engine: hf (docs/training.md, "Rollout engines").
    resume_safe: ClassVar[bool] = True
    # Static KV cache and a compiled decode step (vaopd.rollout.decode): on, off, or auto (on for
    # CUDA, off on a CPU, where the first compile costs seconds and a step gains little). The
    # sampled tokens are the same either way for the same weights and seed.
    compile: Literal["auto", "on", "off"] = "auto"
    # With the static cache: its length is prompt + max_new_tokens rounded up to this multiple
    # (one cache shape, hence one compiled graph, per cap).
    cache_multiple: int = setting(256, gt=0)

    @field_validator("compile", mode="before")
    @classmethod
    def _yaml_on_off(cls, value: Any) -> Any:
        # YAML reads a bare on / off as true / false.
        return {True: "on", False: "off"}.get(value, value) if isinstance(value, bool) else value


class RolloutConfig(Section):
    # hf: transformers generate on the student itself. vllm: an in-process vLLM engine whose
    # weights follow the student (needs the vllm extra in its own environment: README, "Three commands").
    engine: Literal["hf", "vllm"] = setting("hf", safe=True)
    samples_per_prompt: int = setting(4, gt=0)
    temperature: float = setting(0.7, gt=0)
    top_p: float = setting(0.95, gt=0, le=1)
    top_k: int | None = setting(None, was=0, gt=0)  # null: no top-k filter
    max_new_tokens: int = setting(16, gt=0)
    # Prompts per generate() call (hf engine); null: all prompts of the optimizer step in one call.
    batch_prompts: int | None = setting(None, was=0, gt=0)
    hf: HFConfig = setting(HFConfig)
    vllm: VLLMConfig = setting(VLLMConfig)


class LossConfig(Section):
    method: Literal["va_opd", "opd"] = "va_opd"
    kl_estimator: Literal["full", "sampled"] = "full"
    # The token visual advantage (vaopd.kernels.objective.visual_advantage): "sampled" (the paper),
    # "two_sided" or "distribution". Part of the objective (--resume refuses a change); like
    # high_fraction/high_weight it does nothing under method "opd".
    va: Literal["sampled", "two_sided", "distribution"] = "sampled"
    high_fraction: float = setting(0.2, gt=0, le=1)
    high_weight: float = setting(0.5, ge=0, le=1)
    weight_temperature: float = setting(1.0, gt=0)
    backend: Literal["auto", "triton", "torch"] = "auto"
    chunk_size: int | None = setting(None, was=0, gt=0)  # token rows per chunk; null: the kernel's default
    ablation: Literal["pixelate", "blur", "noise", "patch_mask"] = "pixelate"
    pixelate_factor: float = setting(0.1, gt=0, le=1)
    blur_radius: float = setting(4.0, ge=0)
    noise_std: float = setting(64.0, ge=0)  # in 0..255 pixel units
    patch_size: int = setting(16, gt=0)
    patch_fraction: float = setting(0.5, gt=0, le=1)

    def spec(self) -> LossSpec:
        """The objective's settings as the fused loss and the reference take them."""
        return LossSpec(method=self.method, kl_estimator=self.kl_estimator, weight_temperature=self.weight_temperature,
                        high_fraction=self.high_fraction, high_weight=self.high_weight, va=self.va)


class OptimConfig(Section):
    lr: float = setting(1e-3, gt=0)
    betas: list[float] = [0.9, 0.95]
    weight_decay: float = setting(0.1, ge=0)
    eps: float = setting(1e-8, gt=0)
    warmup_ratio: float = setting(0.05, ge=0, le=1)
    min_lr_ratio: float = setting(0.0, ge=0, le=1)
    grad_clip: float | None = setting(1.0, was=0, gt=0)  # max global gradient norm; null: no clipping

    @field_validator("betas")
    @classmethod
    def _two_betas(cls, betas: list[float]) -> list[float]:
        if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
            raise ConfigError(f"must be two numbers in [0, 1), got {betas!r}")
        return betas


_PLAIN_NAME = re.compile(r"[A-Za-z0-9._-]+")
_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")


class TrainConfig(Section):
    name: str = setting("tiny", safe=True)
    run_dir: str | None = setting(None, safe=True, was="", min_length=1)  # null: runs/<name>
    seed: int = 0
    device: str = setting("auto", safe=True)  # auto: cuda when available, else cpu
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 on cuda, fp32 on cpu
    prompts_per_step: int = setting(4, gt=0)
    # Prompts per micro-batch (whole sibling groups); null: the whole optimizer step at once.
    micro_batch_prompts: int | None = setting(None, was=0, gt=0)
    # Single process: fill micro-batches with sibling groups of similar response length (less
    # padding in teacher scoring and the student's passes; the step's gradient is unchanged).
    length_buckets: bool = True
    # Score prompt + response of a micro-batch's rows as one packed sequence (vaopd.packing: only
    # valid positions); false: the padded [rows, prompt + response] batch. Both give the same
    # hidden states and gradient up to float rounding, hence safe to change on --resume. Off by
    # default until FlexAttention's packed passes are measured on a GPU (bench/gpu_check.sh).
    packed_scoring: bool = setting(False, safe=True)
    # The attention of the packed passes (vaopd.packing.choose_packed_attention). auto: the models'
    # own when it is flash-attention 2 (variable length), else FlexAttention on CUDA, else the
    # models' own (a CPU: SDPA with a dense [total x total] block mask, small at a CPU's sizes).
    # flex: FlexAttention (a block mask), CUDA only. model: always the models' own.
    packed_attention: Literal["auto", "flex", "model"] = setting("auto", safe=True)
    # Optimizer steps of the run (the schedule's length); null: epochs * (train records // prompts_per_step).
    max_steps: int | None = setting(None, safe=True, was=0, gt=0)
    epochs: float | None = setting(1.0, safe=True, was=0, gt=0)  # read when max_steps is null
    # End this run after this many steps (checkpoint saved) without changing the schedule,
    # e.g. to fit a job's time limit; null: run to max_steps.
    stop_after: int | None = setting(None, safe=True, was=0, gt=0)
    checkpoint_every: int | None = setting(None, safe=True, was=0, gt=0)  # null: only at the end
    # Newest checkpoints kept (the best one, see eval, is kept as well); null: keep every checkpoint.
    keep_checkpoints: int | None = setting(2, safe=True, was=-1, gt=0)
    max_bad_steps: int = setting(3, safe=True, gt=0)  # consecutive non-finite steps before aborting

    @field_validator("name")
    @classmethod
    def _plain_name(cls, name: str) -> str:
        if not _PLAIN_NAME.fullmatch(name) or set(name) == {"."}:
            raise ConfigError(f"must be a plain folder name (letters, digits, '.', '_', '-'), got {name!r}; "
                              "set train.run_dir to write elsewhere")
        return name

    @field_validator("device")
    @classmethod
    def _device(cls, device: str) -> str:
        if not _DEVICE.fullmatch(device):
            raise ConfigError(f"must be auto, cpu or cuda[:N], got {device!r}")
        return device


class SubsetConfig(Section):
    # Validate on `count` questions of data.val drawn without replacement with random.Random(seed)
    # (kept in file order); null: every question.
    count: int | None = setting(None, was=0, gt=0)
    seed: int = 42


class EvalConfig(Section):
    resume_safe: ClassVar[bool] = True
    every: int | None = setting(None, was=0, gt=0)  # null: only at the end (when data.val is set)
    samples: int = setting(2, gt=0)
    temperature: float = setting(1.0, gt=0)
    top_p: float = setting(1.0, gt=0, le=1)
    max_new_tokens: int = setting(16, gt=0)
    max_questions: int | None = setting(None, was=0, gt=0)  # the first N of the subset; null: all
    batch_prompts: int = setting(8, gt=0)
    subset: SubsetConfig = setting(SubsetConfig)
    # first_boxed_mathruler: the first \boxed{} or answer marker, mathruler's grade_answer (the
    # method authors' rule); math_verify: math-verify on the whole response (vaopd.grading).
    grader: Literal["first_boxed_mathruler", "math_verify"] = "math_verify"


class LogConfig(Section):
    resume_safe: ClassVar[bool] = True
    progress: bool = True
    tensorboard: bool = False
    wandb_project: str | None = setting(None, was="", min_length=1)  # null: no W&B
    # Warn loudly when every token's VA of a step is below this (the teacher may not see images).
    va_warn_threshold: float = setting(1e-4, ge=0)
    # Every N steps (and at the first), per-token data of the step's first `rollouts_per_log`
    # rollouts go to <run_dir>/rollouts.jsonl for `python -m vaopd.inspect`; null: off.
    # Single-process runs only (not under torchrun).
    rollouts_every: int | None = setting(None, was=0, gt=0)
    rollouts_per_log: int = setting(4, gt=0)


class DistributedConfig(Section):
    # Read only under torchrun (RANK and WORLD_SIZE set); a plain process ignores this section.
    resume_safe: ClassVar[bool] = True
    # The student is always sharded with FSDP2. The frozen teacher is either a full copy on every
    # rank ("replica": no communication, full memory) or sharded like the student ("fsdp").
    teacher: Literal["replica", "fsdp"] = "replica"
    # Bound on every collective (init_process_group timeout): when a rank dies or hangs, the
    # others fail after this many seconds instead of waiting forever.
    timeout_s: float = setting(600.0, gt=0)


class Config(Section):
    model: ModelConfig = setting(ModelConfig)
    data: DataConfig = setting(DataConfig)
    rollout: RolloutConfig = setting(RolloutConfig)
    loss: LossConfig = setting(LossConfig)
    optim: OptimConfig = setting(OptimConfig)
    train: TrainConfig = setting(TrainConfig)
    eval: EvalConfig = setting(EvalConfig)
    log: LogConfig = setting(LogConfig)
    distributed: DistributedConfig = setting(DistributedConfig)

    @model_validator(mode="after")
    def _across_fields(self) -> Config:
        """Checks that involve several fields (or the file system); messages name the keys."""
        t = self.train
        if self.data.min_pixels > self.data.max_pixels:
            raise ConfigError(f"data.min_pixels: {self.data.min_pixels} exceeds data.max_pixels {self.data.max_pixels}")
        if t.micro_batch_prompts is not None and t.prompts_per_step % t.micro_batch_prompts:
            raise ConfigError(f"train.micro_batch_prompts: {t.micro_batch_prompts} must divide train.prompts_per_step "
                              f"{t.prompts_per_step} (micro-batches hold whole sibling groups)")
        if t.max_steps is None and t.epochs is None:
            raise ConfigError("train.max_steps: set train.max_steps or train.epochs (both are null)")
        if self.rollout.engine == "vllm" and self.model.lora.enabled:
            raise ConfigError("rollout.engine: vllm does not sample from a LoRA student (its adapter weights are not "
                              "merged into the engine); use rollout.engine: hf with model.lora.enabled")
        if self.rollout.vllm.sleep_mode and t.device == "cpu":
            raise ConfigError("rollout.vllm.sleep_mode: vLLM's sleep mode needs a CUDA GPU; set it to false on a CPU")
        key, run_dir = ("train.run_dir", Path(t.run_dir)) if t.run_dir else ("train.name", Path("runs") / t.name)
        blocking = next((p for p in (run_dir, *run_dir.parents) if p.exists() and not p.is_dir()), None)
        if blocking is not None:
            raise ConfigError(f"{key}: the run folder {run_dir} cannot be created: {blocking} is a file; "
                              "name another folder (train.run_dir or train.name)")
        return self


_EXP_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _yaml_value(text: str, where: str) -> Any:
    """Plain YAML only: a tag (``!!python/...``) or a syntax error is a ``ConfigError`` naming ``where``."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        raise ConfigError(f"{where} is not valid YAML{at}: {getattr(e, 'problem', None) or e}") from None


def read_config_file(path: str | Path) -> dict:
    """The mapping in a YAML config file (``--config``, or a run's or checkpoint's ``config.yaml``);
    a missing, non-UTF-8, malformed or non-mapping file is a ``ConfigError`` naming it."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path}: no such file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {path} is not UTF-8 text (byte {e.start}); save it as UTF-8") from None
    data = _yaml_value(text, f"config file {path}")
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: must hold a mapping of sections (model:, data:, ...), "
                          f"got {type(data).__name__}")
    return data


def _parse_override(text: str) -> dict:
    """``"optim.lr=1e-5"`` -> ``{"optim": {"lr": 1e-05}}``; the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"{text}: an override must look like section.key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"{text}: an override needs a key before '='")
    value = _yaml_value(raw, f"{key}: the value {raw!r}") if raw.strip() else ""
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


def _merge(base: dict, updates: dict) -> dict:
    """``updates`` laid over ``base`` key by key (nested mappings merge; anything else replaces)."""
    out = dict(base)
    for k, v in updates.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _section_at(loc: tuple) -> type[BaseModel] | None:
    """The section class that holds the field at ``loc`` (a pydantic error location)."""
    section: type[BaseModel] = Config
    for name in loc[:-1]:
        info = section.model_fields.get(name) if isinstance(name, str) else None
        if info is None or not (isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel)):
            return None
        section = info.annotation
    return section


def _bounds(section: type[BaseModel] | None, name: Any) -> str | None:
    """``"> 0"``, ``"in (0, 1]"``, ... from the field's bounds, or None when it has none."""
    info = section.model_fields.get(name) if section is not None and isinstance(name, str) else None
    if info is None:
        return None
    b = {k: getattr(m, k) for m in info.metadata for k in ("gt", "ge", "lt", "le") if hasattr(m, k)}
    low = ("(", b["gt"]) if "gt" in b else ("[", b["ge"]) if "ge" in b else None
    high = (")", b["lt"]) if "lt" in b else ("]", b["le"]) if "le" in b else None
    if low and high:
        return f"in {low[0]}{low[1]}, {high[1]}{high[0]}"
    if low:
        return f"{'>' if low[0] == '(' else '>='} {low[1]}"
    if high:
        return f"{'<' if high[0] == ')' else '<='} {high[1]}"
    return None


_PLAIN_MESSAGES = {
    "finite_number": "must be a finite number", "int_type": "must be an integer", "int_from_float": "must be an integer",
    "float_type": "must be a number", "bool_type": "must be true or false", "string_type": "must be a string",
    "list_type": "must be a list", "model_type": "must be a mapping",
}


def _message(err: dict) -> str:
    """One line for one pydantic error: the dotted key, what is wrong, the value given."""
    loc = err["loc"]
    key = ".".join(str(p) if isinstance(p, str) else f"[{p}]" for p in loc).replace(".[", "[")
    kind, got = err["type"], err.get("input")
    section = _section_at(loc)
    if kind == "value_error" and isinstance(err["ctx"].get("error"), ConfigError):
        text = str(err["ctx"]["error"])
        return f"{key}: {text}" if key else text
    if kind == "extra_forbidden":
        names = list(section.model_fields) if section is not None else []
        close = difflib.get_close_matches(str(loc[-1]), names, n=1)
        hint = f"did you mean {'.'.join([*map(str, loc[:-1]), close[0]])}? " if close else ""
        return f"{key}: unknown config key ({hint}valid keys here: {', '.join(sorted(names))})"
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        what = f"must be {_bounds(section, loc[-1]) or err['msg']}"
        if "was" in _extra(section, loc[-1]):
            what += " (or null: not set)"
    elif kind == "literal_error":
        what = f"must be one of {list(typing.get_args(section.model_fields[loc[-1]].annotation))}"
    elif kind in _PLAIN_MESSAGES:
        what = _PLAIN_MESSAGES[kind]
    elif kind == "string_too_short":
        what = "must not be empty" + (" (null: not set)" if "was" in _extra(section, loc[-1]) else "")
    elif kind == "too_short":
        what = f"must have at least {err['ctx']['min_length']} item(s)"
    else:
        what = err["msg"][0].lower() + err["msg"][1:]
    return f"{key or 'config'}: {what}, got {got!r}"


def _validate(data: dict) -> Config:
    """A ``Config`` from a nested mapping (missing keys keep their defaults); raises ``ConfigError``
    with one line per problem, the first starting with its dotted key."""
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        raise ConfigError("\n".join(_message(err) for err in e.errors(include_url=False))) from None


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults, then the YAML file at ``path``, then ``overrides`` ("a.b=value"); validated."""
    data = read_config_file(path) if path is not None else {}
    for text in overrides:
        data = _merge(data, _parse_override(text))
    return _validate(data)


def _fields(section: type[BaseModel], prefix: str = "", safe: bool = False) -> dict[str, tuple[bool, Any]]:
    """Every leaf field below ``section``: dotted key -> (resume-safe, its old "not set" value)."""
    out = {}
    for name, info in section.model_fields.items():
        extra = info.json_schema_extra or {}
        field_safe = safe or section.resume_safe or extra.get("resume_safe", False)
        if isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel):
            out.update(_fields(info.annotation, f"{prefix}{name}.", field_safe))
        else:
            out[f"{prefix}{name}"] = (field_safe, extra.get("was", _UNSET))
    return out


_FIELDS = _fields(Config)


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
    ``cfg``, as ``"key: old -> new"`` lines: (refused, allowed); a field's ``safe`` flag decides.

    A saved value in an older "not set" spelling (``chunk_size: 0``) equals ``None``. A key the
    saved config lacks (added to vaopd since) counts only when ``cfg`` moves it off its default.
    """
    new, default = _flatten(to_dict(cfg)), _flatten(to_dict(Config.model_construct()))
    old = {}
    for key, value in _flatten(saved).items():
        old[key] = None if _is_old_unset(value, _FIELDS.get(key, (False, _UNSET))[1]) else value
    refused, allowed = [], []
    for key in sorted(old.keys() | new.keys()):
        if key not in old and new.get(key) == default.get(key):
            continue
        if old.get(key, "(absent)") == new.get(key, "(absent)"):
            continue
        line = f"{key}: {_show(old.get(key, '(absent)'))} -> {_show(new.get(key, '(absent)'))}"
        (allowed if _FIELDS.get(key, (False,))[0] else refused).append(line)
    return refused, allowed


def _show(value: Any) -> str:
    return "null" if value is None else repr(value)


def to_dict(cfg: Config) -> dict:
    return cfg.model_dump()


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
