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

Weights are checked for NaN and infinity both ways: a save refuses a model holding any (the
newest checkpoint stays the last good one), and ``verify_checkpoint`` refuses a checkpoint whose
safetensors hold any, naming the file and the tensor. A save that fails (a full disk) removes its
temporary folder and says so; the checkpoints already written are untouched. Old checkpoints are
pruned by renaming them to a temporary name first, so a kill mid-delete never leaves a half-deleted
``step_*``.
"""
from __future__ import annotations

import ctypes
import errno
import json
import os
import re
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors import SafetensorError, safe_open
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.tensor import DTensor

from vaopd.manifest import CheckpointError, verify_manifest, write_manifest
from vaopd.safe_dcp import SafeFileSystemReader, SafeLoadPlanner, read_dcp_metadata

__all__ = ["save_checkpoint", "save_sharded_checkpoint", "is_sharded_checkpoint", "load_sharded_state", "latest_checkpoint",
           "step_checkpoints", "verify_checkpoint", "CheckpointError", "remove_stale_temporaries",
           "remove_later_checkpoints", "load_trainer_state", "check_finite_weights", "rng_state", "set_rng_state"]

_STEP_DIR = re.compile(r"^step_(\d{8})$")
# A save's temporary folder; "_replaced": a checkpoint being replaced, "_pruned": one being deleted.
_TMP_DIR = re.compile(r"^\.tmp_step_\d{8}(?:_(\d+))?(?:_replaced|_pruned)?$")
# What a failed save can raise: OSError (a full disk), torch.save's RuntimeError, safetensors' own.
_WRITE_ERRORS = (OSError, RuntimeError, SafetensorError)
_NEARLY_FULL = 1 << 20  # bytes free on the checkpoint's filesystem after a failed write: it ran full


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
    final = checkpoints_dir / f"step_{step:08d}"
    _refuse_non_finite(model, final)
    checkpoints_dir.mkdir(parents=True, exist_ok=True)
    tmp = checkpoints_dir / f".tmp_step_{step:08d}_{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        tmp.mkdir()
        model.save_pretrained(tmp / "model", safe_serialization=True)
        tokenizer.save_pretrained(tmp / "model")
        image_processor.save_pretrained(tmp / "model")
        with open(tmp / "trainer_state.pt", "wb") as f:  # through Python's file: a full disk raises OSError(ENOSPC)
            torch.save(trainer_state, f)
        (tmp / "config.yaml").write_text(config_yaml, encoding="utf-8")
        meta = {"step": step, "data_position": trainer_state.get("data_position")}
        (tmp / "meta.json").write_text(json.dumps(meta) + "\n", encoding="utf-8")
        _fsync_tree(tmp)
        write_manifest(tmp)
    except _WRITE_ERRORS as e:
        _failed_save(tmp, final, e)
    _publish(tmp, final)
    _prune(checkpoints_dir, keep, protect)
    return final


def _failed_save(tmp: Path, final: Path, error: Exception) -> None:
    """Remove the temporary folder of a failed save and raise ``CheckpointError`` saying why."""
    # torch's writer reports a full disk as "unexpected pos": ask the filesystem too, before freeing the space.
    full = (isinstance(error, OSError) and error.errno == errno.ENOSPC or "No space left" in str(error)
            or shutil.disk_usage(final.parent).free < _NEARLY_FULL)
    shutil.rmtree(tmp, ignore_errors=True)
    reason = "no space left on the device" if full else f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
    raise CheckpointError(
        f"cannot write checkpoint {final}: {reason}; its temporary folder was removed and the checkpoints already "
        f"in {final.parent} are intact. {'Free some space, then' if full else 'Fix that, then'} continue with --resume."
    ) from None


def _non_finite(tensor: torch.Tensor) -> bool:
    return tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())


def _first_non_finite(model) -> str | None:
    """The name of the first weight of ``model`` holding NaN or infinity, or None. Under torchrun
    each rank checks its own shards and every rank gets the same answer."""
    bad = next((name for name, t in model.state_dict().items()
                if _non_finite(t.to_local() if isinstance(t, DTensor) else t)), None)
    if dist.is_initialized():
        names = [None] * dist.get_world_size()
        dist.all_gather_object(names, bad)
        bad = next((n for n in names if n is not None), None)
    return bad


def _refuse_non_finite(model, final: Path) -> None:
    """Raise ``CheckpointError`` before saving ``final`` if a weight of ``model`` is not finite."""
    bad = _first_non_finite(model)
    if bad is not None:
        good = latest_checkpoint(final.parent)
        raise CheckpointError(
            f"refusing to save {final}: the weight {bad} holds NaN or infinity. The last good checkpoint "
            f"({good if good else 'none'}) is left intact; lower optim.lr or check the data, then --resume.")


def check_finite_weights(model_dir: Path) -> None:
    """Raise ``CheckpointError`` naming the file and tensor if a ``*.safetensors`` file of ``model_dir``
    holds NaN or infinity, or is not a readable safetensors file (a crafted or damaged header)."""
    for file in sorted(Path(model_dir).glob("*.safetensors")):
        try:
            with safe_open(file, framework="pt") as f:
                bad = next((name for name in f.keys() if _non_finite(f.get_tensor(name))), None)
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"{file}: not a readable safetensors file ({type(e).__name__}: {e})") from None
        if bad is not None:
            raise CheckpointError(f"{file}: the weight {bad} holds NaN or infinity; refusing to load it "
                                  "(resume or evaluate an earlier checkpoint)")


def _prune(checkpoints_dir: Path, keep: int | None, protect: tuple[int, ...] = ()) -> None:
    """Delete all but the newest ``keep`` checkpoints and the ``protect`` steps; ``keep = None`` keeps all."""
    if keep is None:
        return
    for old in sorted(p for p in checkpoints_dir.iterdir() if _STEP_DIR.match(p.name))[:-keep]:
        if int(_STEP_DIR.match(old.name).group(1)) not in protect:
            _delete(old)


def _delete(checkpoint: Path) -> None:
    """Delete a checkpoint folder: renamed to a temporary name first (one atomic step), so a kill
    while deleting leaves a temporary that ``remove_stale_temporaries`` removes, never a partial ``step_*``."""
    doomed = checkpoint.with_name(f".tmp_{checkpoint.name}_{os.getpid()}_pruned")
    os.rename(checkpoint, doomed)
    shutil.rmtree(doomed)


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
    _refuse_non_finite(model, final)
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
    Raises ``CheckpointError`` (on every rank) if a loaded weight holds NaN or infinity.
    """
    if optimizer is None:
        state = {"model": model.state_dict()}
        _dcp_load(state, checkpoint)
        model.load_state_dict(state["model"])
    else:
        model_state, optim_state = get_state_dict(model, optimizer)
        state = {"model": model_state, "optim": optim_state}
        _dcp_load(state, checkpoint)
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    bad = _first_non_finite(model)
    if bad is not None:
        raise CheckpointError(f"{Path(checkpoint) / 'dcp'}: the weight {bad} holds NaN or infinity; refusing to load "
                              "it (resume or export an earlier checkpoint)")


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
    for a sharded checkpoint, its DCP index passes the allowlist unpickler, else its safetensors
    are readable and finite (``check_finite_weights``; a ``vaopd.export`` folder is checked alike)."""
    checkpoint = Path(checkpoint)
    if not checkpoint.is_dir():
        raise CheckpointError(f"{checkpoint}: no such checkpoint folder")
    verify_manifest(checkpoint)
    if is_sharded_checkpoint(checkpoint):
        read_dcp_metadata(checkpoint / "dcp" / ".metadata")
    else:
        check_finite_weights(checkpoint / "model" if (checkpoint / "model").is_dir() else checkpoint)


def remove_stale_temporaries(checkpoints_dir: Path) -> list[Path]:
    """Remove ``.tmp_step_*`` folders whose writing process is gone (or is this one: it is not
    saving now); returns them. A live process's folder is left alone."""
    checkpoints_dir = Path(checkpoints_dir)
    removed = []
    for p in (checkpoints_dir.iterdir() if checkpoints_dir.is_dir() else ()):
        m = _TMP_DIR.match(p.name)
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
            _delete(p)
            removed.append(p)
    return removed, set_aside


_TRAINER_STATE_KEYS = ("step", "data_position", "bad_steps", "scheduler")


def load_trainer_state(checkpoint: Path, map_location="cpu") -> dict:
    """The trainer state of a checkpoint, loaded with ``weights_only=True``; ``CheckpointError``
    naming the file if it is not one (damaged, crafted, or missing a key the trainer reads)."""
    path = Path(checkpoint) / "trainer_state.pt"
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except Exception as e:  # a damaged or crafted file fails in many ways (UnpicklingError, EOFError, RuntimeError, ...)
        # torch's message advises weights_only=False, which would run whatever the file holds: not repeated here.
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        reason = next((line for line in lines if line.startswith("WeightsUnpickler error")), type(e).__name__)
        raise CheckpointError(f"{path}: not a trainer state vaopd can load ({reason}); nothing from it was run. "
                              "Resume from another checkpoint of the run (--resume CHECKPOINT).") from None
    missing = [k for k in _TRAINER_STATE_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise CheckpointError(f"{path}: not a vaopd trainer state (no {', '.join(missing)}). "
                              "Resume from another checkpoint of the run (--resume CHECKPOINT).")
    return state
