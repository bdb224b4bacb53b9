"""Atomic, resumable checkpoints.

Layout of ``<run_dir>/checkpoints/step_<NNNNNNNN>/``:

- ``model/``: the student via ``save_pretrained`` (safetensors; a LoRA adapter when LoRA is on),
  with its tokenizer and image processor, so ``from_pretrained`` and ``vaopd.eval`` can load it;
- ``trainer_state.pt``: optimizer, scheduler, torch RNG states, step, data position, counters.
  Only tensors, numbers, strings, lists and dicts: it loads with ``torch.load(weights_only=True)``;
- ``config.yaml``: the resolved run config; ``meta.json``: step and data position, for people.

A checkpoint is written into a hidden temporary folder next to its final place and then renamed,
so a crash mid-save leaves every earlier checkpoint intact and never a half-written ``step_*``.

A distributed run (torchrun) writes the *sharded* layout instead (``save_sharded_checkpoint``):

- ``dcp/``: ``torch.distributed.checkpoint`` files, ``{"model": ..., "optim": ...}`` keyed by
  parameter name; every rank writes its own shards and DCP reshards on load, so any number of
  ranks (or one plain process) can resume it;
- ``model/``: the model's ``config.json``, tokenizer and image processor, no weights
  (``python -m vaopd.export`` writes consolidated safetensors);
- ``trainer_state.pt`` (scheduler, step, data position, counters; no RNG: each rank reseeds its
  sampling from the step), ``config.yaml``, ``meta.json`` (with ``"format": "dcp"`` and the
  world size). Rank 0 renames the temporary folder once every rank has written its shards.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

__all__ = ["save_checkpoint", "save_sharded_checkpoint", "is_sharded_checkpoint", "load_sharded_state", "latest_checkpoint",
           "load_trainer_state", "rng_state", "set_rng_state"]

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
    config_yaml: str, keep: int, protect: tuple[int, ...] = (),
) -> Path:
    """Write checkpoint ``step`` atomically; keep the newest ``keep`` checkpoints (-1: all) and the
    steps in ``protect`` (the best checkpoint). Returns its path."""
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
    _prune(checkpoints_dir, keep, protect)
    return final


def _prune(checkpoints_dir: Path, keep: int, protect: tuple[int, ...] = ()) -> None:
    """Delete all but the newest ``keep`` checkpoints and the ``protect`` steps; ``keep = -1`` keeps all."""
    if keep < 0:
        return
    for old in sorted(p for p in checkpoints_dir.iterdir() if _STEP_DIR.match(p.name))[:-keep]:
        if int(_STEP_DIR.match(old.name).group(1)) not in protect:
            shutil.rmtree(old)


def save_sharded_checkpoint(
    checkpoints_dir: Path, step: int, *, model, optimizer, tokenizer, image_processor, trainer_state: dict,
    config_yaml: str, keep: int, protect: tuple[int, ...] = (),
) -> Path:
    """Collective (every rank calls it): write checkpoint ``step`` in the sharded layout.

    ``model`` is the transformers model whose blocks are FSDP2-sharded and ``optimizer`` its
    optimizer. Rank 0 prepares a temporary folder, every rank writes its DCP shards into it, rank 0
    adds the small files and renames it after a barrier, then every rank returns the final path.
    """
    checkpoints_dir = Path(checkpoints_dir)
    final = checkpoints_dir / f"step_{step:08d}"
    tmp = checkpoints_dir / f".tmp_step_{step:08d}"
    main = dist.get_rank() == 0
    if final.exists():  # every rank sees the same (shared) folder
        return final
    if main:
        checkpoints_dir.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)  # left by a crashed save
        tmp.mkdir()
    dist.barrier()
    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=tmp / "dcp")
    if main:
        model.config.save_pretrained(tmp / "model")
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp / "model")
        tokenizer.save_pretrained(tmp / "model")
        image_processor.save_pretrained(tmp / "model")
        torch.save(trainer_state, tmp / "trainer_state.pt")
        (tmp / "config.yaml").write_text(config_yaml, encoding="utf-8")
        meta = {"step": step, "data_position": trainer_state.get("data_position"), "format": "dcp",
                "world_size": dist.get_world_size()}
        (tmp / "meta.json").write_text(json.dumps(meta) + "\n", encoding="utf-8")
        _fsync_tree(tmp)
    dist.barrier()  # every rank's shards are on disk before the checkpoint becomes visible
    if main:
        os.rename(tmp, final)
        _prune(checkpoints_dir, keep, protect)
    dist.barrier()
    return final


def is_sharded_checkpoint(checkpoint: Path) -> bool:
    return (Path(checkpoint) / "dcp").is_dir()


def load_sharded_state(checkpoint: Path, model, optimizer=None) -> None:
    """Load a sharded checkpoint's weights (and optimizer state) into ``model`` in place.

    Works on any number of ranks, FSDP-sharded or not, and in a plain process without a process
    group: DCP reads each parameter's global shape and copies the pieces this process holds.
    """
    if optimizer is None:
        state = {"model": model.state_dict()}
        _dcp_load(state, checkpoint)
        model.load_state_dict(state["model"])
        return
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optim": optim_state}
    _dcp_load(state, checkpoint)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


def _dcp_load(state: dict, checkpoint: Path) -> None:
    single = not dist.is_initialized()
    with warnings.catch_warnings():
        # DCP warns that it "assumes" a single process even when told so (no_dist).
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=Path(checkpoint) / "dcp", no_dist=single)


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
