"""Crash-safe writes, one way for every writer (torch-free: decode workers import it).

Each write goes to a hidden temporary file in the target's own folder (same file system, and
folder scans skip hidden names), is flushed and fsync'ed, renamed over the target, and the folder
is fsync'ed so the rename itself survives a power cut. A reader, a crash or a full disk leaves the
old file or the new one, never half of one, and never a temporary file behind on an error.

- :func:`write_bytes`, :func:`write_text`, :func:`write_json`, :func:`copy`: whole files;
- :func:`open_atomic`: a context manager for writers that stream (CSV rows, ``json.dump``);
- :func:`temp_for`: a temporary path for libraries that write by name (``torch.save``,
  ``np.save``, ``Image.save``, ``savefig``), committed when the block ends without error;
- :func:`exchange`: swap two folders in one step (Linux ``renameat2(RENAME_EXCHANGE)``);
- :func:`check_writable`: create and remove a file, the only test that also holds for root.
"""

from __future__ import annotations

import errno
import json
import os
import secrets
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Iterator

TEMP_MARK = ".tmp-"  # in every temporary name: ``.<name>.tmp-<pid>-<random>``


def temp_name(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(f".{path.name}{TEMP_MARK}{os.getpid()}-{secrets.token_hex(4)}")


def fsync_path(path: str | Path) -> None:
    """fsync a file written by name (e.g. by a library) before it is renamed or registered."""
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def fsync_dir(folder: str | Path) -> None:
    """fsync a folder, so renames and new names in it are on disk (a no-op where folders cannot be
    opened or fsync'ed, e.g. some network file systems)."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def commit(tmp: str | Path, path: str | Path, *, fsync: bool = True) -> None:
    """Make the finished file ``tmp`` appear as ``path`` (fsync, rename, fsync the folder); ``tmp``
    is removed whatever happens."""
    try:
        if fsync:
            fsync_path(tmp)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    if fsync:
        fsync_dir(Path(path).absolute().parent)


def move_into_place(tmp: str | Path, path: str | Path, *, fsync: bool = True) -> None:
    """:func:`commit` for a file whose folder may be missing, or removed between its ``mkdir`` and
    the rename (the listener's retention removes emptied study folders): the folder is made, and
    made again once if it went. ``tmp`` is removed whatever happens."""
    path = Path(path)
    try:
        if fsync:
            fsync_path(tmp)
        for last in (False, True):
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.replace(tmp, path)
                break
            except FileNotFoundError:
                if last or not Path(tmp).exists():
                    raise
    finally:
        Path(tmp).unlink(missing_ok=True)
    if fsync:
        fsync_dir(path.parent)


@contextmanager
def temp_for(path: str | Path, *, fsync: bool = True) -> Iterator[Path]:
    """A temporary path to write ``path``'s new content to by name; committed when the block ends
    without an exception, removed otherwise."""
    tmp = temp_name(path)
    try:
        yield tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    commit(tmp, path, fsync=fsync)


@contextmanager
def open_atomic(path: str | Path, mode: str = "wb", *, fsync: bool = True, **kwargs) -> Iterator[IO]:
    """``open`` for writing a whole new ``path``: the content appears at ``path`` only when the
    block ends without an exception."""
    if not mode.startswith("w"):
        raise ValueError(f"open_atomic writes whole files (mode 'w' or 'wb'), not {mode!r}")
    with temp_for(path, fsync=fsync) as tmp:
        with open(tmp, mode, **kwargs) as fh:
            yield fh
            fh.flush()


def write_bytes(path: str | Path, data: bytes, *, fsync: bool = True) -> None:
    with open_atomic(path, "wb", fsync=fsync) as fh:
        fh.write(data)


def write_text(path: str | Path, text: str, *, encoding: str = "utf-8", newline: str | None = None,
               fsync: bool = True) -> None:
    with open_atomic(path, "w", encoding=encoding, newline=newline, fsync=fsync) as fh:
        fh.write(text)


def write_json(path: str | Path, data: Any, *, default=None, fsync: bool = True) -> None:
    with open_atomic(path, "w", encoding="utf-8", fsync=fsync) as fh:
        json.dump(data, fh, indent=2, default=default)
        fh.write("\n")


def copy(source: str | Path, path: str | Path, *, fsync: bool = True) -> None:
    """Copy ``source`` to ``path``, streamed (memory does not grow with the file)."""
    with open(source, "rb") as src, open_atomic(path, "wb", fsync=fsync) as dst:
        shutil.copyfileobj(src, dst, 1 << 20)


def check_writable(folder: str | Path) -> None:
    """Raise ``OSError`` unless a file can be created in ``folder`` (it is removed again).
    ``os.access`` says yes to root on a read-only mount; creating a file does not lie."""
    fd = None
    probe = temp_name(Path(folder) / "write-check")
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    finally:
        if fd is not None:
            os.close(fd)
            probe.unlink(missing_ok=True)


# renameat2(2) flags and syscall numbers (glibc < 2.28 has no wrapper)
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
_SYS_RENAMEAT2 = {"x86_64": 316, "aarch64": 276, "ppc64le": 357, "s390x": 347}


def exchange(a: str | Path, b: str | Path) -> bool:
    """Swap the paths ``a`` and ``b`` (files or folders, both existing) in one atomic step, so a
    crash leaves either the old or the new one at each. ``False`` where the system or file system
    cannot (then nothing changed); ``OSError`` for any other failure."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes
    import platform

    libc = ctypes.CDLL(None, use_errno=True)
    args = (_AT_FDCWD, os.fsencode(str(a)), _AT_FDCWD, os.fsencode(str(b)), _RENAME_EXCHANGE)
    if hasattr(libc, "renameat2"):
        rc = libc.renameat2(ctypes.c_int(args[0]), ctypes.c_char_p(args[1]), ctypes.c_int(args[2]),
                            ctypes.c_char_p(args[3]), ctypes.c_uint(args[4]))
    elif platform.machine() in _SYS_RENAMEAT2:
        rc = libc.syscall(ctypes.c_long(_SYS_RENAMEAT2[platform.machine()]), ctypes.c_int(args[0]),
                          ctypes.c_char_p(args[1]), ctypes.c_int(args[2]), ctypes.c_char_p(args[3]),
                          ctypes.c_uint(args[4]))
    else:
        return False
    if rc == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(a), None, str(b))
