"""Checkpoint selection: the run's best checkpoint by validation accuracy.

The rule (the method authors' protocol): among the checkpoints at whose step validation ran, the
best is the one with the highest validation accuracy; on a tie the earliest step wins. Only a
saved checkpoint can be chosen, so a validation at a step without a checkpoint (``eval.every``
not a multiple of ``train.checkpoint_every``, a skipped step) is logged but is no candidate; the
last step of a run is always validated and saved (a run stopped early by ``train.stop_after`` or a
signal saves without validating). The trainer writes the choice to
``<run_dir>/best.json`` (atomically) and never prunes that checkpoint; ``best`` then names it on
the command lines of ``vaopd.export`` and ``vaopd.eval`` (``--checkpoint best --run RUN_DIR``).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from vaopd.atomic_io import atomic_write_text
from vaopd.manifest import CheckpointError

__all__ = ["BEST_FILE", "read_best", "write_best", "is_better", "resolve_checkpoint"]

BEST_FILE = "best.json"
# The only checkpoint a record may name: one of its own run's (never a path leading elsewhere).
_RUN_CHECKPOINT = re.compile(r"checkpoints/step_(\d{8})")


def read_best(run_dir: str | Path) -> dict | None:
    """The run's best-checkpoint record (``step``, ``val_accuracy``, ``checkpoint``, ...), or None.

    Raises ``CheckpointError`` naming the file if it is not such a record, or if its ``checkpoint``
    is not ``checkpoints/step_<step>`` of this run (a record is never followed out of its run)."""
    path = Path(run_dir) / BEST_FILE
    if not path.is_file():
        return None
    fix = "restore it, or delete it (later validations choose the best checkpoint again)"
    try:
        record = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not a JSON record ({e}); {fix}") from None
    if not isinstance(record, dict):
        raise CheckpointError(f"{path}: holds a {type(record).__name__}, not a record; {fix}")
    for key, kinds, kind in (("step", int, "an integer"), ("val_accuracy", (int, float), "a number"),
                             ("checkpoint", str, "a string")):
        if not isinstance(record.get(key), kinds) or isinstance(record.get(key), bool):
            raise CheckpointError(f"{path}: {key!r} is missing or not {kind}; {fix}")
    m = _RUN_CHECKPOINT.fullmatch(record["checkpoint"])
    if m is None or int(m.group(1)) != record["step"]:
        raise CheckpointError(f"{path}: 'checkpoint' is {record['checkpoint']!r}, not checkpoints/step_"
                              f"{record['step']:08d} of this run; refusing to follow it ({fix})")
    return record


def write_best(run_dir: str | Path, record: dict) -> None:
    """Replace ``<run_dir>/best.json`` atomically: readers see the old record or the new one."""
    atomic_write_text(Path(run_dir) / BEST_FILE, json.dumps(record) + "\n")


def is_better(accuracy: float, best: dict | None) -> bool:
    """Strictly higher than the best so far (validations arrive in step order: earliest wins ties)."""
    return best is None or accuracy > best["val_accuracy"]


def resolve_checkpoint(checkpoint: str, run: str | None = None) -> Path:
    """The checkpoint folder named on a command line: a path, or ``best`` with the run folder ``run``."""
    if checkpoint != "best":
        return Path(checkpoint)
    if not run:
        raise ValueError("--checkpoint best: name the run folder with --run RUN_DIR")
    best = read_best(run)
    if best is None:
        raise FileNotFoundError(f"--checkpoint best: {Path(run) / BEST_FILE} does not exist (no validation "
                                "ran at a checkpoint step of this run)")
    path = Path(run) / best["checkpoint"]
    if not path.is_dir():
        raise FileNotFoundError(f"--checkpoint best: {path} (step {best['step']}) is missing")
    return path
