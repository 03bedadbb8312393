"""The local spool of pulled or received instances:
``<spool>/incoming/<StudyInstanceUID>/<SOPInstanceUID>.dcm`` (results go to ``<spool>/results.csv``
and ``<spool>/results/``, outside the scanned folder).

Paths are built from UIDs that passed :func:`~cxr_deploy.pacs.uids.is_valid_uid` (digits and dots),
never from other strings of a received data set, so nothing received can steer a write outside
the spool (``../`` is not a UID). Files are written to a temporary name, fsync'ed, then renamed:
a file with its final name is complete.
"""

from __future__ import annotations

import os
from pathlib import Path

from .uids import UidError, is_valid_uid


def incoming_dir(spool: str | Path) -> Path:
    return Path(spool) / "incoming"


def spool_path(spool: str | Path, study_uid: str, sop_uid: str) -> Path:
    for what, uid in (("StudyInstanceUID", study_uid), ("SOPInstanceUID", sop_uid)):
        if not is_valid_uid(str(uid)):
            raise UidError(f"{what} {str(uid)[:80]!r} is not a valid DICOM UID; instance refused")
    return Path(spool) / str(study_uid) / f"{sop_uid}.dcm"


def temp_path(path: Path) -> Path:
    """Where a file for ``path`` is written before :func:`commit` (hidden: scans skip it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.with_name(f".{path.name}.partial-{os.getpid()}")


def commit(tmp: Path, path: Path) -> None:
    """fsync ``tmp``, rename it to ``path``, fsync the folder: ``path`` only ever holds a whole file,
    and the rename itself survives a power cut. (``cxr_deploy.bundle.fsync_file`` does the first step
    for bundles, but importing it would load torch into the decode workers that write results.)"""
    try:
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`commit`)."""
    tmp = temp_path(path)
    try:
        tmp.write_bytes(data)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    commit(tmp, path)


def copy_atomic(path: Path, source: Path) -> None:
    """Copy ``source`` to ``path`` atomically, streamed: memory does not grow with the file's size."""
    import shutil

    tmp = temp_path(path)
    try:
        with open(source, "rb") as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    commit(tmp, path)
