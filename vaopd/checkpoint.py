"""Atomic, resumable checkpoints.

Layout of ``<run_dir>/checkpoints/step_<NNNNNNNN>/``:

- ``model/``: the student via ``save_pretrained`` (safetensors; a LoRA adapter when LoRA is on),
  with its tokenizer and image processor, so ``from_pretrained`` and ``vaopd.eval`` can load it;
- ``trainer_state.pt``: optimizer, scheduler, torch RNG states, step, data position, counters.
  Only tensors, numbers, strings, lists and dicts: it loads with ``torch.load(weights_only=True)``;
- ``config.yaml``: the resolved run config; ``meta.json``: step and data position, for people.

A checkpoint is written into a hidden temporary folder next to its final place and then renamed,
so a crash mid-save leaves every earlier checkpoint intact and never a half-written ``step_*``.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch

__all__ = ["save_checkpoint", "latest_checkpoint", "load_trainer_state", "rng_state", "set_rng_state"]

_STEP_DIR = re.compile(r"^step_(\d{8})$")


def rng_state() -> dict:
    """Torch CPU and CUDA generator states (the only RNGs the trainer draws from)."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync_tree(path: Path) -> None:
    for f in path.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())


def save_checkpoint(
    checkpoints_dir: Path, step: int, *, model, tokenizer, image_processor, trainer_state: dict,
    config_yaml: str, keep: int,
) -> Path:
    """Write checkpoint ``step`` atomically; keep the newest ``keep`` checkpoints. Returns its path."""
    checkpoints_dir = Path(checkpoints_dir)
    checkpoints_dir.mkdir(parents=True, exist_ok=True)
    final = checkpoints_dir / f"step_{step:08d}"
    if final.exists():
        return final  # this step is already saved (e.g. periodic save followed by the final one)
    tmp = checkpoints_dir / f".tmp_step_{step:08d}_{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    model.save_pretrained(tmp / "model", safe_serialization=True)
    tokenizer.save_pretrained(tmp / "model")
    image_processor.save_pretrained(tmp / "model")
    torch.save(trainer_state, tmp / "trainer_state.pt")
    (tmp / "config.yaml").write_text(config_yaml, encoding="utf-8")
    meta = {"step": step, "data_position": trainer_state.get("data_position")}
    (tmp / "meta.json").write_text(json.dumps(meta) + "\n", encoding="utf-8")
    _fsync_tree(tmp)
    os.rename(tmp, final)  # atomic on POSIX within one filesystem
    for old in sorted(p for p in checkpoints_dir.iterdir() if _STEP_DIR.match(p.name))[:-keep]:
        shutil.rmtree(old)
    return final


def latest_checkpoint(checkpoints_dir: Path) -> Path | None:
    """The newest complete ``step_*`` checkpoint (temporary folders are ignored), or None."""
    checkpoints_dir = Path(checkpoints_dir)
    if not checkpoints_dir.is_dir():
        return None
    steps = sorted(p for p in checkpoints_dir.iterdir() if _STEP_DIR.match(p.name) and (p / "trainer_state.pt").is_file())
    return steps[-1] if steps else None


def load_trainer_state(checkpoint: Path, map_location="cpu") -> dict:
    """The trainer state of a checkpoint, loaded with ``weights_only=True``."""
    return torch.load(Path(checkpoint) / "trainer_state.pt", map_location=map_location, weights_only=True)
