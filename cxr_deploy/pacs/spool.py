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


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` so that ``path`` only ever holds a whole, fsync'ed file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)  # the rename itself survives a power cut
        finally:
            os.close(directory)
    finally:
        if tmp.exists():
            tmp.unlink()
