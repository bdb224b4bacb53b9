"""Atomic, resumable checkpoints.

Layout of ``<run_dir>/checkpoints/step_<NNNNNNNN>/``:

- ``model/``: the student via ``save_pretrained`` (safetensors; a LoRA adapter when LoRA is on),
  with its tokenizer and image processor, so ``from_pretrained`` and ``vaopd.eval`` can load it;
- ``trainer_state.pt``: optimizer, scheduler, torch RNG states, step, data position, counters.
  Only tensors, numbers, strings, lists and dicts: it loads with ``torch.load(weights_only=True)``;
- ``config.yaml``: the resolved run config; ``meta.json``: step and data position, for people.

A checkpoint is written into a hidden temporary folder next to its final place and then renamed,
so a crash mid-save leaves every earlier checkpoint intact and never a half-written ``step_*``.
The temporary folder is named after the writing process (``.tmp_step_<NNNNNNNN>_<pid>``): one left
by a killed process is removed at the next start (``remove_stale_temporaries``). Saving a step that
already exists replaces it atomically. Last before the rename, ``manifest.json`` records the size and
SHA-256 of every file (``vaopd.manifest``); ``verify_checkpoint`` checks it before a load.

A distributed run (torchrun) writes the *sharded* layout instead (``save_sharded_checkpoint``):

- ``dcp/``: ``torch.distributed.checkpoint`` files, ``{"model": ..., "optim": ...}`` keyed by
  parameter name; every rank writes its own shards and DCP reshards on load, so any number of
  ranks (or one plain process) can resume it;
- ``model/``: the model's ``config.json``, tokenizer and image processor, no weights
  (``python -m vaopd.export`` writes consolidated safetensors);
- ``trainer_state.pt`` (scheduler, step, data position, counters; no RNG: each rank reseeds its
  sampling from the step), ``config.yaml``, ``meta.json`` (with ``"format": "dcp"`` and the
  world size). Rank 0 renames the temporary folder once every rank has written its shards.

DCP files are read with ``vaopd.safe_dcp`` (an allowlist unpickler), never with plain ``pickle``.
"""
from __future__ import annotations

import ctypes
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

from vaopd.manifest import CheckpointError, verify_manifest, write_manifest
from vaopd.safe_dcp import SafeFileSystemReader, SafeLoadPlanner, read_dcp_metadata

__all__ = ["save_checkpoint", "save_sharded_checkpoint", "is_sharded_checkpoint", "load_sharded_state", "latest_checkpoint",
           "step_checkpoints", "verify_checkpoint", "CheckpointError", "remove_stale_temporaries",
           "remove_later_checkpoints", "load_trainer_state", "rng_state", "set_rng_state"]

_STEP_DIR = re.compile(r"^step_(\d{8})$")
_TMP_DIR = re.compile(r"^\.tmp_step_\d{8}(?:_(\d+))?$")


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


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``); False if unsupported."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def _publish(tmp: Path, final: Path) -> None:
    """Make the complete folder ``tmp`` the checkpoint ``final``, replacing an existing one atomically."""
    if not final.exists():
        os.rename(tmp, final)  # atomic on POSIX within one filesystem
    elif _exchange(tmp, final):
        shutil.rmtree(tmp)  # the replaced checkpoint, now under the temporary name
    else:  # no atomic exchange here: a crash between the renames leaves both folders, hidden and complete
        old = tmp.with_name(tmp.name + "_replaced")
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old)
    _fsync_dir(final.parent)


def save_checkpoint(
    checkpoints_dir: Path, step: int, *, model, tokenizer, image_processor, trainer_state: dict,
    config_yaml: str, keep: int | None, protect: tuple[int, ...] = (),
) -> Path:
    """Write checkpoint ``step`` atomically; keep the newest ``keep`` checkpoints (None: all) and the
    steps in ``protect`` (the best checkpoint). Returns its path."""
    checkpoints_dir = Path(checkpoints_dir)
    checkpoints_dir.mkdir(parents=True, exist_ok=True)
    final = checkpoints_dir / f"step_{step:08d}"
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
    write_manifest(tmp)
    _publish(tmp, final)
    _prune(checkpoints_dir, keep, protect)
    return final


def _prune(checkpoints_dir: Path, keep: int | None, protect: tuple[int, ...] = ()) -> None:
    """Delete all but the newest ``keep`` checkpoints and the ``protect`` steps; ``keep = None`` keeps all."""
    if keep is None:
        return
    for old in sorted(p for p in checkpoints_dir.iterdir() if _STEP_DIR.match(p.name))[:-keep]:
        if int(_STEP_DIR.match(old.name).group(1)) not in protect:
            shutil.rmtree(old)


def save_sharded_checkpoint(
    checkpoints_dir: Path, step: int, *, model, optimizer, tokenizer, image_processor, trainer_state: dict,
    config_yaml: str, keep: int | None, protect: tuple[int, ...] = (),
) -> Path:
    """Collective (every rank calls it): write checkpoint ``step`` in the sharded layout.

    ``model`` is the transformers model whose blocks are FSDP2-sharded and ``optimizer`` its
    optimizer. Rank 0 prepares a temporary folder, every rank writes its DCP shards into it, rank 0
    adds the small files; after a barrier (every rank's shards are complete) rank 0 writes the
    manifest and renames the folder; a last barrier keeps every rank until the checkpoint is visible.
    """
    checkpoints_dir = Path(checkpoints_dir)
    final = checkpoints_dir / f"step_{step:08d}"
    main = dist.get_rank() == 0
    name = [f".tmp_step_{step:08d}_{os.getpid()}"]
    dist.broadcast_object_list(name, src=0)  # rank 0's pid: whose folder it is, for stale-folder cleanup
    tmp = checkpoints_dir / name[0]
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
    dist.barrier()  # every rank's shards are written before they are hashed and made visible
    if main:
        _fsync_tree(tmp)
        write_manifest(tmp)
        _publish(tmp, final)
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
    folder = Path(checkpoint) / "dcp"
    read_dcp_metadata(folder / ".metadata")  # refuse a crafted index here, with a clear error, not inside DCP
    with warnings.catch_warnings():
        # DCP warns that it "assumes" a single process even when told so (no_dist).
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, storage_reader=SafeFileSystemReader(folder), planner=SafeLoadPlanner(), no_dist=single)


def step_checkpoints(checkpoints_dir: Path) -> list[Path]:
    """The ``step_*`` folders of ``checkpoints_dir``, oldest first (temporary folders are ignored)."""
    checkpoints_dir = Path(checkpoints_dir)
    if not checkpoints_dir.is_dir():
        return []
    return sorted(p for p in checkpoints_dir.iterdir() if _STEP_DIR.match(p.name) and p.is_dir())


def latest_checkpoint(checkpoints_dir: Path) -> Path | None:
    """The newest ``step_*`` checkpoint with a trainer state, or None (not verified: ``verify_checkpoint``)."""
    steps = [p for p in step_checkpoints(checkpoints_dir) if (p / "trainer_state.pt").is_file()]
    return steps[-1] if steps else None


def verify_checkpoint(checkpoint: Path) -> None:
    """Raise ``CheckpointError`` naming the bad file unless every file matches ``manifest.json`` and,
    for a sharded checkpoint, its DCP index passes the allowlist unpickler."""
    checkpoint = Path(checkpoint)
    if not checkpoint.is_dir():
        raise CheckpointError(f"{checkpoint}: no such checkpoint folder")
    verify_manifest(checkpoint)
    if is_sharded_checkpoint(checkpoint):
        read_dcp_metadata(checkpoint / "dcp" / ".metadata")


def remove_stale_temporaries(checkpoints_dir: Path) -> list[Path]:
    """Remove ``.tmp_step_*`` folders whose writing process is gone (or is this one: it is not
    saving now); returns them. A live process's folder is left alone."""
    checkpoints_dir = Path(checkpoints_dir)
    removed = []
    for p in (checkpoints_dir.iterdir() if checkpoints_dir.is_dir() else ()):
        m = _TMP_DIR.match(p.name.removesuffix("_replaced"))
        if m and p.is_dir() and (m.group(1) is None or not _alive(int(m.group(1)))):
            shutil.rmtree(p)
            removed.append(p)
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by another user
        return True
    return True


def remove_later_checkpoints(checkpoints_dir: Path, step: int, damaged: list[Path] = ()) -> tuple[list[Path], list[Path]]:
    """Remove the ``step_*`` folders after ``step`` (a resume from an older checkpoint abandons
    them); those in ``damaged`` (skipped by ``--resume`` as failing their manifest, which a passing
    read error can cause too) are renamed ``step_N.damaged`` instead, out of the checkpoint list
    but kept. Returns (removed, set aside)."""
    damaged_names = {Path(p).name for p in damaged}
    removed, set_aside = [], []
    for p in step_checkpoints(checkpoints_dir):
        if int(p.name[5:]) <= step:
            continue
        if p.name in damaged_names:
            target = p.with_name(p.name + ".damaged")
            n = 1
            while target.exists():
                target, n = p.with_name(f"{p.name}.damaged{n}"), n + 1
            p.rename(target)
            set_aside.append(target)
        else:
            shutil.rmtree(p)
            removed.append(p)
    return removed, set_aside


def load_trainer_state(checkpoint: Path, map_location="cpu") -> dict:
    """The trainer state of a checkpoint, loaded with ``weights_only=True``."""
    return torch.load(Path(checkpoint) / "trainer_state.pt", map_location=map_location, weights_only=True)
