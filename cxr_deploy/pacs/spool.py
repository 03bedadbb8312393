"""The local spool of pulled or received instances:
``<spool>/incoming/<StudyInstanceUID>/<SOPInstanceUID>.dcm`` (results go to ``<spool>/results.csv``
and ``<spool>/results/``, outside the scanned folder).

Paths are built from UIDs that passed :func:`~cxr_deploy.pacs.uids.is_uid_file_name` (digits and
dots; a leading zero in a component, which real devices send, is fine in a file name), never from
other strings of a received data set, so nothing received can steer a write outside the spool
(``../`` is not a UID). Files are written to a hidden temporary name, fsync'ed, then renamed
(:mod:`cxr_deploy.atomic`): a file with its final name is complete.
"""

from __future__ import annotations

from pathlib import Path

from .. import atomic
from .uids import UidError, is_uid_file_name


def incoming_dir(spool: str | Path) -> Path:
    return Path(spool) / "incoming"


def spool_path(spool: str | Path, study_uid: str, sop_uid: str) -> Path:
    for what, uid in (("StudyInstanceUID", study_uid), ("SOPInstanceUID", sop_uid)):
        if not is_uid_file_name(str(uid)):
            raise UidError(f"{what} {str(uid)[:80]!r} is not a valid DICOM UID; instance refused")
    return Path(spool) / str(study_uid) / f"{sop_uid}.dcm"


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (:mod:`cxr_deploy.atomic`), creating its folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_bytes(path, data)


def copy_atomic(path: Path, source: Path) -> None:
    """Copy ``source`` to ``path`` atomically, streamed: memory does not grow with the file's size."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic.copy(source, path)
