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


# -- one SOP Instance UID, one image --------------------------------------------------------------
REUSED_ERROR = "SOP Instance UID reused for a different patient/study"


def reused_dir(spool: str | Path) -> Path:
    """``<spool>/reused``: instances whose SOP Instance UID the spool already holds for another
    patient, study or image, kept apart (never scanned, never scored, no result written)."""
    return Path(spool) / "reused"


def same_instance(a, b) -> bool:
    """Whether two data sets carrying one SOP Instance UID are the same instance: same patient
    (Patient ID), same study, same pixel data (bytes; decoded pixels where the transfer syntaxes
    differ, e.g. a re-send compressed)."""
    if str(a.get("PatientID", "")) != str(b.get("PatientID", "")) or \
            str(a.get("StudyInstanceUID", "")) != str(b.get("StudyInstanceUID", "")):
        return False
    pixels_a, pixels_b = a.get("PixelData"), b.get("PixelData")
    if pixels_a == pixels_b:
        return True
    if pixels_a is None or pixels_b is None or a.file_meta.TransferSyntaxUID == b.file_meta.TransferSyntaxUID:
        return False
    try:
        import numpy as np

        return bool(np.array_equal(a.pixel_array, b.pixel_array))
    except Exception:  # noqa: BLE001 - cannot decode one of them: not shown to be the same
        return False


def place(spool: str | Path, study_uid: str, sop_uid: str, data: bytes | Path) -> tuple[str, Path]:
    """Where an instance received or pulled into the spool goes (the rule ``pacs listen`` and
    ``pacs pull`` share). ``data``: the instance's encoded bytes (Part 10) or its file; read whole
    only when the spool holds its SOP Instance UID already.

    - ``("new", target)``: no instance with this SOP Instance UID is spooled; store it at ``target``;
    - ``("same", spooled)``: the same instance is spooled already; nothing to do (a re-send);
    - ``("reused", apart)``: the spool holds this SOP Instance UID for another patient, study or
      image: the instance goes to ``apart`` under ``<spool>/reused`` (named by a digest of its
      bytes, so the same re-send is kept once), never over the spooled one: its results would
      replace the first patient's under the UIDs the PACS already has.

    ``UidError`` for UIDs that are not valid file names."""
    import hashlib

    import pydicom

    incoming = Path(spool) / "incoming"
    target = spool_path(incoming, study_uid, sop_uid)
    spooled = [target] if target.is_file() else sorted(incoming.glob(f"*/{sop_uid}.dcm"))
    if not spooled:
        return "new", target
    from io import BytesIO

    try:
        arrived = pydicom.dcmread(BytesIO(data) if isinstance(data, bytes) else data, force=True)
        same = same_instance(pydicom.dcmread(spooled[0], force=True), arrived)
    except Exception:  # noqa: BLE001 - one of them cannot be read whole: not shown to be the same
        same = False
    if same:
        return "same", spooled[0]
    digest = hashlib.sha256()
    if isinstance(data, bytes):
        digest.update(data)
    else:
        with open(data, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    apart = spool_path(reused_dir(spool), study_uid, sop_uid)
    return "reused", apart.with_name(f"{sop_uid}.{digest.hexdigest()[:16]}.dcm")


def spooled_for_another_patient(spooled: Path, patient_id: str | None) -> bool:
    """Whether the spooled instance ``spooled`` belongs to another patient than ``patient_id`` (as a
    search names it; ``None``: not named, so not known to differ). ``pacs pull`` fetches such an
    instance, and :func:`place` keeps it apart, instead of counting it as already there."""
    import pydicom

    if patient_id is None:
        return False
    try:
        header = pydicom.dcmread(spooled, stop_before_pixels=True, specific_tags=["PatientID"])
    except Exception:  # noqa: BLE001 - unreadable: let place() compare it in full
        return True
    return str(header.get("PatientID", "")) != patient_id
