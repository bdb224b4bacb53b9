"""Run folders: where a run's checkpoints, metrics and config live."""
from __future__ import annotations

from pathlib import Path

from vaopd.config import Config

__all__ = ["run_dir_of"]


def run_dir_of(cfg: Config) -> Path:
    """``train.run_dir`` when set, else ``runs/<train.name>``."""
    return Path(cfg.train.run_dir or Path("runs") / cfg.train.name)
