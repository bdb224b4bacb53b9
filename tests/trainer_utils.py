"""Shared helpers for the trainer tests: tiny, fast configs in a temporary run dir, run folders,
data files, and the config spellings written before null meant "not set"."""
from __future__ import annotations

import hashlib
import io
import json

import torch
from PIL import Image

from vaopd.config import load_config


# The tiny default shrunk for tests, without a run folder: 2 steps of 2 prompts x 2 responses, no
# validation. Pinned to the CPU in fp32 so the equalities the tests check hold on a GPU machine too.
# The run-folder tests use it as is (responses of at most 4 new tokens, the default checkpointing,
# optimiser and warm-up).
TINY = ["train.device=cpu", "train.precision=fp32", "train.prompts_per_step=2", "train.max_steps=2",
        "rollout.samples_per_prompt=2", "rollout.max_new_tokens=4", "data.tiny_train_size=8", "data.val=",
        "log.progress=false"]


def tiny_overrides(tmp_path, name: str = "run") -> list[str]:
    """``TINY`` in ``tmp_path / name`` with 6 new tokens, checkpoints only at the end, lr 1e-3 and
    no warm-up (a visible update in a step or two)."""
    return [*TINY, f"train.run_dir={tmp_path / name}", "train.checkpoint_every=0", "rollout.max_new_tokens=6",
            "optim.lr=1e-3", "optim.warmup_ratio=0"]


def tiny_config(tmp_path, *overrides: str, name: str = "run"):
    """``tiny_overrides`` then ``overrides``, loaded."""
    return load_config(None, tiny_overrides(tmp_path, name) + list(overrides))


def tiny_cli(tmp_path, *overrides: str, name: str = "run") -> list[str]:
    """The same settings as ``--set`` arguments of ``python -m vaopd.train``."""
    return [a for o in tiny_overrides(tmp_path, name) + list(overrides) for a in ("--set", o)]


def validating_config(tmp_path, *overrides: str):
    """``tiny_config`` validating on 2 tiny questions (1 sample each) after every one of 3 steps."""
    return tiny_config(tmp_path, "data.val=tiny", "data.tiny_val_size=2", "eval.samples=1", "train.max_steps=3",
                       "eval.every=1", *overrides)


def folder_hash(path) -> dict:
    """Every file under ``path`` with its SHA-256: equal before and after means nothing changed."""
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def assert_adam_close(a: dict, b: dict) -> None:
    """Weights of two runs that computed the same gradients up to float rounding, after AdamW steps
    at the tests' lr 1e-3: every entry within 1e-4 and at most one in 10,000 beyond 1e-5.

    AdamW moves an entry by about ``lr * g / (|g| + eps)``: where ``g`` is as small as its rounding
    (an embedding row a batch barely touches) two summation orders can move it differently by up
    to a step, so a flat 1e-5 bound fails on some CPUs (seen: 2e-5 and 4e-5 on one entry).
    """
    assert a.keys() == b.keys()
    beyond = total = 0
    for k in a:
        d = (a[k].float() - b[k].float()).abs()
        assert float(d.max()) < 1e-4, (k, float(d.max()))
        beyond += int((d > 1e-5).sum())
        total += d.numel()
    assert beyond <= 1e-4 * total, (beyond, total)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (for a local process group)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def png_bytes(color=(200, 30, 30), size=(40, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


# Every optional field's older spelling of "not set" (what a config.yaml written before null holds).
OLD_UNSET = {
    "data.val": "", "data.id_key": "", "data.image_root": "", "rollout.top_k": 0, "rollout.batch_prompts": 0,
    "rollout.vllm.max_model_len": 0, "loss.chunk_size": 0, "optim.grad_clip": 0, "train.run_dir": "",
    "train.micro_batch_prompts": 0, "train.max_steps": 0, "train.epochs": 0, "train.stop_after": 0,
    "train.checkpoint_every": 0, "train.keep_checkpoints": -1, "eval.every": 0, "eval.max_questions": 0,
    "eval.subset.count": 0, "log.wandb_project": "", "log.rollouts_every": 0,
}


def flatten(d: dict, prefix: str = "") -> dict:
    """A nested dict as one level of dotted keys (``{"a": {"b": 1}}`` -> ``{"a.b": 1}``)."""
    out = {}
    for k, v in d.items():
        out.update(flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def unflatten(d: dict) -> dict:
    """The inverse of ``flatten``."""
    out: dict = {}
    for key, value in d.items():
        *parents, leaf = key.split(".")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out
