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
from pathlib import Path

from vaopd.atomic_io import atomic_write_text

__all__ = ["BEST_FILE", "read_best", "write_best", "is_better", "resolve_checkpoint"]

BEST_FILE = "best.json"


def read_best(run_dir: str | Path) -> dict | None:
    """The run's best-checkpoint record (``step``, ``val_accuracy``, ``checkpoint``, ...), or None."""
    path = Path(run_dir) / BEST_FILE
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


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
