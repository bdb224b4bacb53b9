"""Step metrics: a JSONL file in the run directory, plus TensorBoard or W&B when configured.

Both loggers are optional imports: asking for one that is not installed is an error at start-up,
not a silent no-op.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from vaopd.atomic_io import RunWriteError, atomic_write_text
from vaopd.objective import high_group

__all__ = ["MetricsLogger", "JsonlError", "check_jsonl", "truncate_jsonl", "token_stats", "PEAK_SUMS", "add_sums"]


class JsonlError(ValueError):
    """A line of a run's JSONL file that is not JSON (other than a torn last line); names file and line."""


def _kept_lines(path: Path, step: int) -> tuple[list[str], int, bool, bool]:
    """The lines of ``path`` whose ``step`` is at most ``step``, the count dropped, whether the last
    line was torn, and whether the file must be rewritten; raises ``JsonlError`` (reads only)."""
    # surrogateescape: bytes that are not UTF-8 (a torn multi-byte character) survive a rewrite as they were.
    text = Path(path).read_text(encoding="utf-8", errors="surrogateescape")
    lines = text.splitlines()
    keep, torn = [], False
    for n, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError("not a JSON object")
        except ValueError as e:
            if n == len(lines) - 1:
                torn = True
                continue
            raise JsonlError(f"{path}: line {n + 1} is not a JSON record ({e}); fix or remove that line") from None
        if record.get("step", 0) <= step:
            keep.append(line)
    dropped = sum(1 for line in lines if line.strip()) - len(keep)
    return keep, dropped, torn, bool(dropped) or not text.endswith("\n")  # the next append starts a line


def check_jsonl(path: Path) -> None:
    """Raise ``JsonlError`` if ``path`` holds an invalid line before its last (reads only: a resume
    checks its logs with this before it changes anything in the run folder)."""
    if Path(path).exists():
        _kept_lines(path, 0)


def truncate_jsonl(path: Path, step: int) -> tuple[int, bool]:
    """Keep the lines of ``path`` whose ``step`` is at most ``step``; returns (lines dropped, torn).

    A last line that is not valid JSON is a write cut short by a crash (torn): it is dropped. An
    invalid line anywhere else is damage this cannot explain and raises ``JsonlError``.
    """
    path = Path(path)
    keep, dropped, torn, rewrite = _kept_lines(path, step)
    if rewrite:  # atomic: a crash here leaves the old file, never a half-written one
        atomic_write_text(path, "".join(k + "\n" for k in keep), errors="surrogateescape")
    return dropped, torn


def token_stats(stats: dict[str, torch.Tensor], mask: torch.Tensor, high_fraction: float) -> dict[str, float]:
    """Sums for a micro-batch's step summary from the loss's ``[B, T]`` stats.

    ``va_high`` is the VA carried by each response's high group (the ``ceil(high_fraction * L)``
    largest-VA tokens, as in the loss), so ``va_high / va_sum`` is the high group's share.
    """
    mask = mask.bool()
    va = stats["va"].float()
    high = high_group(va, mask, high_fraction)
    return {
        "tokens": float(mask.sum()),
        "kl_sum": float(stats["kl"].float()[mask].sum()),
        "va_sum": float(va[mask].sum()),
        "va_high": float(va[high].sum()),
        "va_max": float(va[mask].max()) if mask.any() else 0.0,
        "responses": float(mask.shape[0]),
    }


# Sums of ``token_stats`` that are maxima, not sums: micro-batches and ranks combine them by max.
PEAK_SUMS = frozenset({"va_max"})


def add_sums(total: dict[str, float], part: dict[str, float]) -> None:
    """Add ``part``'s sums into ``total`` in place (the ``PEAK_SUMS`` by maximum)."""
    for k, v in part.items():
        total[k] = max(total.get(k, 0.0), v) if k in PEAK_SUMS else total.get(k, 0.0) + v


class MetricsLogger:
    """Appends one JSON line per step to ``<run_dir>/metrics.jsonl``; mirrors scalars to TB/W&B.

    ``enabled=False`` (every rank but 0 of a distributed run) touches no file and logs nothing.
    On resume (``resume_step``) the lines of later steps and a torn last line are dropped first:
    ``self.dropped`` and ``self.torn`` say how many and whether.
    """

    def __init__(self, run_dir: Path, *, tensorboard: bool = False, wandb_project: str = "", config: dict | None = None,
                 resume_step: int | None = None, enabled: bool = True):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.enabled = enabled
        self.dropped, self.torn = 0, False
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.exists():
            # Drop lines of steps after the checkpoint: they will be redone.
            self.dropped, self.torn = truncate_jsonl(self.path, resume_step)
        elif resume_step is None and self.path.exists():
            self.path.unlink()
        self._tb = self._wandb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise RuntimeError("log.tensorboard is true but tensorboard is not installed (pip install 'vaopd[tensorboard]')") from None
            self._tb = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))
        if wandb_project:
            try:
                import wandb
            except ImportError:
                raise RuntimeError("log.wandb_project is set but wandb is not installed (pip install 'vaopd[wandb]')") from None
            self._wandb = wandb.init(project=wandb_project, config=config, dir=str(run_dir))
        self._file = open(self.path, "a", encoding="utf-8")

    def log(self, record: dict) -> None:
        """Write ``record`` (must hold ``step``); non-finite floats are written as null."""
        if not self.enabled:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        try:
            self._file.write(json.dumps(clean) + "\n")
            self._file.flush()
        except OSError as e:  # a line cut short here is dropped as torn by the next --resume
            raise RunWriteError(e.errno, f"cannot append to {self.path}: {e.strerror}; the checkpoints are intact, "
                                "continue with --resume once it can be written") from None
        scalars = {k: v for k, v in clean.items() if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"}
        if self._tb is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(k, v, record["step"])
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(scalars, step=record["step"])

    def close(self) -> None:
        if not self.enabled:
            return
        self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
