"""Both DICOM results of one scored radiograph, written into ``--dicom-out``: the SR and the SC.

File names are built from validated UIDs only (never from strings read from a file):
``<source SOP Instance UID>.<model id>.sr.dcm`` and ``….sc.dcm``. A rerun rewrites the same files
with the same UIDs; a file at that name that is not the object we would write (another SOP
Instance UID, or not DICOM) is never replaced. Writes are atomic (:mod:`cxr_deploy.atomic`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import atomic
from ..errors import CxrDeployError
from .uids import DEFAULT_UID_ROOT, UidError, is_uid_file_name

_MODEL_ID = re.compile(r"^[0-9a-f]{16}$")


class ResultConflict(CxrDeployError, OSError):
    """The target file exists and is not the object cxr-deploy would write there."""


@dataclass(frozen=True)
class DicomResultSpec:
    """What the worker needs to write the DICOM results of one row (small, picklable)."""

    out_dir: str
    model_id: str
    model_name: str
    version: str
    backend: str
    threshold: float
    operating_point: str = "default"  # where the threshold comes from (cxr_deploy.run_settings.Decision)
    uid_root: str = DEFAULT_UID_ROOT


def result_paths(out_dir: str | Path, source_uid: str, model_id: str) -> tuple[Path, Path]:
    if not is_uid_file_name(source_uid):  # digits and dots: a leading zero, as devices send, names a file safely
        raise UidError(f"source SOP Instance UID {source_uid!r} is not a valid UID; no DICOM result written")
    if not _MODEL_ID.match(model_id):
        raise UidError(f"model id {model_id!r} is not 16 hex digits")
    base = Path(out_dir) / f"{source_uid}.{model_id}"
    return base.with_name(base.name + ".sr.dcm"), base.with_name(base.name + ".sc.dcm")


def write_dicom_results(source_path: str, spec: DicomResultSpec, *, probability: float, positive: bool,
                        overlay_rgb: np.ndarray, caveat: str = "") -> tuple[str, str]:
    """Read ``source_path``'s header, build and write the SR and the SC; returns their paths."""
    import pydicom

    from .capture import build_capture
    from .report import build_report
    from .sanitize import declare_charset, sanitize_source

    source = pydicom.dcmread(source_path, stop_before_pixels=True, force=True)
    sr_path, sc_path = result_paths(spec.out_dir, str(source.SOPInstanceUID), spec.model_id)
    sanitize_source(source, Path(source_path).name)  # everything below copies from it: one gate
    report = build_report(source, probability=probability, threshold=spec.threshold,
                          operating_point=spec.operating_point, positive=positive,
                          model_id=spec.model_id, model_name=spec.model_name, version=spec.version,
                          backend=spec.backend, uid_root=spec.uid_root, caveat=caveat)
    capture = build_capture(source, overlay_rgb, model_id=spec.model_id, uid_root=spec.uid_root)
    for result in (report, capture):
        declare_charset(result)
    _write(report, sr_path)
    _write(capture, sc_path)
    return str(sr_path), str(sc_path)


def _write(dataset, path: Path) -> None:
    if path.exists() and not _is_same_object(path, dataset.SOPInstanceUID):
        raise ResultConflict(f"{path} exists and is not this result (another SOP instance); not replaced")
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic.temp_for(path) as tmp:
        dataset.save_as(tmp, enforce_file_format=True)


def _is_same_object(path: Path, sop_instance_uid: str) -> bool:
    import pydicom

    try:
        existing = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID"])
    except Exception:  # noqa: BLE001 - not DICOM, or unreadable: not ours to replace
        return False
    return str(existing.get("SOPInstanceUID", "")) == str(sop_instance_uid)
