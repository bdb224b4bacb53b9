"""Replacing a run's small text files atomically: readers (and a crash) see the old file or the
new one, never half of it."""
from __future__ import annotations

import os
from pathlib import Path

__all__ = ["RunWriteError", "atomic_write_text"]


class RunWriteError(OSError):
    """A file of the run folder that could not be written (a full disk); the message names it."""


def atomic_write_text(path: str | Path, text: str, errors: str = "strict") -> None:
    """Write ``text`` to a temporary file beside ``path``, flush it to disk, then rename it over ``path``.

    On failure the temporary file is removed, ``path`` is left as it was, and ``RunWriteError`` names it."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8", errors=errors) as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise RunWriteError(e.errno, f"cannot write {path}: {e.strerror}; it was left as it was") from None
