"""One writer per output: an exclusive lock held for a whole run (torch-free, Linux/macOS).

``with hold(path): ...`` takes ``fcntl.flock`` on a lock file and records this process's id in it;
a second process asking for the same ``path`` gets :class:`InUse` at once (``<path> is in use by
process N``), never a wait. The kernel drops the lock when the holder exits, also on ``kill -9``, so
a lock is never stale; the small lock file stays behind (hidden; removing it would race with a new
holder).

Where the lock file is: beside the locked path (``.<name>.lock`` in its folder) by default, so
results files and report folders that do not exist yet can be locked; ``inside=True`` puts it in the
locked folder (``<folder>/.cxr-deploy.lock``) for a spool whose parent may not be writable.

Re-entrant within a process: the runner, the CLI around it and the report writer may each hold the
same path (``flock`` on a second descriptor of the same file would otherwise refuse its own holder).
"""

from __future__ import annotations

import os
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .errors import CxrDeployError

INSIDE_NAME = ".cxr-deploy.lock"

_held: dict[str, list] = {}  # lock file (real path) -> [fd, depth]
_guard = threading.Lock()


class InUse(CxrDeployError):
    """Another process holds the lock (its id is in the message)."""


def lock_file(path: str | Path, *, inside: bool = False) -> Path:
    path = Path(os.path.abspath(path))
    return path / INSIDE_NAME if inside else path.with_name(f".{path.name}.lock")


def holder(path: str | Path, *, inside: bool = False) -> int | None:
    """The process id recorded in ``path``'s lock file (the last holder: it may have exited)."""
    try:
        return int(lock_file(path, inside=inside).read_text().strip() or 0) or None
    except (OSError, ValueError):
        return None


@contextmanager
def hold(path: str | Path, *, inside: bool = False, what: str | None = None) -> Iterator[Path]:
    """Hold ``path`` exclusively for the ``with`` block; raises :class:`InUse` when another process
    holds it, ``OSError`` when the lock file cannot be created (an unwritable folder)."""
    import fcntl

    file = lock_file(path, inside=inside)
    key = os.path.realpath(file)
    with _guard:
        entry = _held.get(key)
        if entry is None:
            fd = os.open(file, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pid = os.pread(fd, 32, 0).decode(errors="replace").strip()
                os.close(fd)
                who = f"process {pid}" if pid.isdigit() else "another process"
                raise InUse(f"{what or path} is in use by {who} (lock {file}); wait for it to finish") from None
            except BaseException:
                os.close(fd)
                raise
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            entry = _held[key] = [fd, 0]
        entry[1] += 1
    try:
        yield file
    finally:
        with _guard:
            entry[1] -= 1
            if entry[1] == 0:
                del _held[key]
                os.close(entry[0])  # closing the last descriptor releases the flock
