"""Run folders: where a run's checkpoints, metrics and config live, and who may write there.

``runs/<train.name>`` (``train.name`` is a plain name) or ``train.run_dir``. A folder that already
holds a run (any of ``RUN_FILES``) is never written into by accident: a new run there is refused
unless it continues the run (``--resume``) or replaces it (``--overwrite``, which removes the old
run's files first). Nothing else in the folder is touched.

``start_run`` makes these decisions before anything is built or written. On ``--resume`` it picks
the checkpoint: the newest one whose files match their manifest (a damaged one is named,
skipped with a warning, and later set aside as ``step_N.damaged``, never deleted), and refuses config changes that would alter the optimisation being
continued (``vaopd.config.resume_changes``).

``lock_run_folder`` makes one process the folder's only writer for the whole run: an exclusive
``flock`` on ``<run_dir>/.lock``, taken before anything in the folder is read. The OS drops it
when its process ends, however it ends, so a killed run never blocks the next one.
"""
from __future__ import annotations

import errno
import fcntl
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from vaopd.checkpoint import CheckpointError, step_checkpoints, verify_checkpoint
from vaopd.config import Config, read_config_file, resume_changes
from vaopd.metrics import check_jsonl
from vaopd.selection import read_best

__all__ = ["RunFolderError", "RUN_FILES", "LOCK_FILE", "run_dir_of", "lock_run_folder", "run_files", "check_new_run",
           "clear_run", "choose_checkpoint", "start_run"]

# What a run writes into its folder (best.json: vaopd.selection's record of the best checkpoint).
RUN_FILES = ("checkpoints", "metrics.jsonl", "config.yaml", "rollouts.jsonl", "best.json", "tensorboard")
# Hidden and not a run file: a folder holding only the lock of a live run is still a new run's folder.
LOCK_FILE = ".lock"


class RunFolderError(ValueError):
    """A run folder that may not be written as asked; the message says what to pass instead."""


def run_dir_of(cfg: Config) -> Path:
    """``train.run_dir`` when set, else ``runs/<train.name>``."""
    return Path(cfg.train.run_dir or Path("runs") / cfg.train.name)


@contextmanager
def lock_run_folder(run_dir: Path) -> Iterator[None]:
    """Hold ``run_dir`` for this process until the block ends; raise ``RunFolderError`` naming the
    holder's pid if another process holds it (nothing in the folder is changed then).

    The folder (and missing parents) is created to hold the lock file and removed again on exit if
    it is still empty, so a run refused for another reason leaves no trace. The lock file is
    deleted while still locked; a process that opened it before then finds, once it gets the lock,
    that the path no longer names its file, and starts again on the new one.
    """
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise RunFolderError(f"{run_dir}: the run folder is a file; set train.run_dir (or train.name) to a folder")
    created = [p for p in (run_dir, *run_dir.parents) if not p.exists()][::-1]
    path = run_dir / LOCK_FILE
    while True:
        run_dir.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except FileNotFoundError:  # the previous holder removed its just-emptied folder: make it again
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise RunFolderError(f"{path}: cannot lock the run folder ({e.strerror})") from None
            raise RunFolderError(
                f"{run_dir} is in use by another run (pid {holder}); one process per run folder: wait for it "
                "to finish or stop it, or pick another folder (--set train.name=NAME)") from None
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        path.unlink(missing_ok=True)
        os.close(fd)
        for folder in reversed(created):
            try:
                folder.rmdir()
            except OSError:  # not empty: the run wrote into it
                break


def run_files(run_dir: Path) -> list[str]:
    """The names of ``RUN_FILES`` present in ``run_dir`` (an empty ``checkpoints/`` does not count)."""
    run_dir = Path(run_dir)
    found = []
    for name in RUN_FILES:
        path = run_dir / name
        if name == "checkpoints":
            steps = step_checkpoints(path)
            if steps:
                found.append(f"checkpoints/{steps[0].name}" + (f" .. {steps[-1].name}" if len(steps) > 1 else ""))
        elif path.exists():
            found.append(name)
    return found


def check_new_run(run_dir: Path, *, overwrite: bool) -> None:
    """Raise ``RunFolderError`` if ``run_dir`` holds a run and ``overwrite`` is false."""
    found = run_files(run_dir)
    if found and not overwrite:
        raise RunFolderError(
            f"{run_dir} already holds a run ({', '.join(found)}). Pass --resume to continue it, --overwrite to "
            "start again (removes its checkpoints and metrics), or pick another folder (--set train.name=NAME).")


def clear_run(run_dir: Path) -> list[str]:
    """Remove the ``RUN_FILES`` of ``run_dir`` (``--overwrite``); returns what was removed."""
    removed = []
    for name in RUN_FILES:
        path = Path(run_dir) / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
        else:
            continue
        removed.append(name)
    return removed


def choose_checkpoint(run_dir: Path, resume: str | bool, warn: Callable[[str], None]) -> tuple[Path, list[Path]]:
    """The checkpoint ``--resume`` continues, and the newer checkpoints skipped as damaged:
    ``resume`` itself (a path), verified, or with ``resume=True`` the newest intact one of
    ``run_dir/checkpoints``. Raises ``CheckpointError`` naming the bad files when none is intact."""
    if resume is not True:
        ckpt = Path(resume)
        try:
            verify_checkpoint(ckpt)
        except CheckpointError as e:
            raise CheckpointError(f"--resume {ckpt}: {e}") from None
        return ckpt, []
    checkpoints = Path(run_dir) / "checkpoints"
    candidates = step_checkpoints(checkpoints)[::-1]
    if not candidates:
        hint = " (the folder holds a run without one: --overwrite starts it again)" if run_files(run_dir) else ""
        raise RunFolderError(f"--resume: no checkpoint in {checkpoints}{hint}")
    problems, damaged = [], []
    for ckpt in candidates:
        try:
            verify_checkpoint(ckpt)
        except CheckpointError as e:
            problems.append(str(e))
            damaged.append(ckpt)
            warn(f"WARNING: --resume: {ckpt.name} is damaged: {e}")
            continue
        if problems:
            warn(f"WARNING: --resume: falling back to {ckpt}, the newest intact checkpoint")
        return ckpt, damaged
    raise CheckpointError(f"--resume: no intact checkpoint in {checkpoints}:\n  " + "\n  ".join(problems))


def start_run(cfg: Config, *, resume: str | bool | None, overwrite: bool,
              warn: Callable[[str], None]) -> tuple[Path | None, list[Path]]:
    """Check that ``cfg``'s run may start as asked; returns the checkpoint to resume (or None) and
    the newer checkpoints skipped as damaged (``vaopd.checkpoint.remove_later_checkpoints`` sets
    them aside instead of deleting them).

    Writes nothing: a refusal (``RunFolderError``, ``CheckpointError``, ``JsonlError``) leaves the
    folder as it was. Call it holding the folder's lock (``lock_run_folder``).
    """
    run_dir = run_dir_of(cfg)
    if resume and overwrite:
        raise RunFolderError("--resume continues a run and --overwrite starts it again: pass one of them")
    if not resume:
        check_new_run(run_dir, overwrite=overwrite)
        return None, []
    ckpt, damaged = choose_checkpoint(run_dir, resume, warn)
    if ckpt.resolve().parent != (run_dir / "checkpoints").resolve() and run_files(run_dir):
        # A checkpoint of another run continues into a folder of its own: resuming into this one
        # would cut its checkpoints and metrics back to the other run's step.
        raise RunFolderError(
            f"--resume {ckpt}: that checkpoint belongs to another run folder, and {run_dir} already holds a run "
            f"({', '.join(run_files(run_dir))}). Continue it in an empty folder (--set train.name=NAME) or resume "
            f"from one of {run_dir / 'checkpoints'}.")
    refused, allowed = resume_changes(read_config_file(ckpt / "config.yaml"), cfg)
    if refused:
        raise RunFolderError(
            f"--resume: {ckpt} was trained with other settings, and these change the optimisation it continues:\n  "
            + "\n  ".join(refused) + "\nResume with the checkpoint's values, or start a new run "
            "(--set train.name=NAME, or --overwrite).")
    for log in ("metrics.jsonl", "rollouts.jsonl"):  # a damaged log stops the resume before anything changes
        check_jsonl(run_dir / log)
    read_best(run_dir)  # and so does a damaged best.json
    if allowed:
        warn("--resume: changed settings (allowed): " + "; ".join(allowed))
    return ckpt, damaged
