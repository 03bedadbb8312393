"""Patients (groups) for the validation split: a child's films must all sit on one side.

Carving validation per image puts films of the same patient into train *and* validation (the
Kermany train split has 3,875 PNEUMONIA images from 1,635 patients): validation AUC then measures
recognition of children already seen, and the threshold chosen on it does not carry over.

Where a sample's group comes from, first match wins:

1. a ``patient`` (or ``group``) column of the labels CSV;
2. ``--group-regex``: a regular expression on the file name whose first capture group (or whole
   match) names the patient. ``--group-regex kermany`` is the Kermany/Kaggle naming:
   ``person1000_bacteria_2931.jpeg`` → ``person1000``, ``IM-0115-0001.jpeg`` → ``IM-0115``,
   ``NORMAL2-IM-1427-0001.jpeg`` → ``NORMAL2-IM-1427`` (it reproduces the ``patient`` column of
   ``shared/data/kermany224/manifest.csv`` for all 5,216 files);
3. a DICOM file's PatientID, hashed in memory with a per-run random salt: the ID itself is never
   written anywhere, and the recorded group cannot be linked to the patient or across runs.

A sample with no group is a group of its own. With no group information at all a warning says so.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import sys
from dataclasses import replace

import numpy as np

KERMANY_GROUP_REGEX = r"^((?:NORMAL2-)?IM-\d+|person\d+)"
PRESETS = {"kermany": KERMANY_GROUP_REGEX}


def compile_group_regex(value: str | None) -> re.Pattern | None:
    if not value:
        return None
    pattern = PRESETS.get(value.strip().lower(), value)
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise ValueError(f"--group-regex {value!r} is not a valid regular expression: {exc}") from None


def group_from_name(path: str, regex: re.Pattern) -> str:
    match = regex.search(os.path.basename(path))
    if not match:
        return ""
    return match.group(1) if match.groups() and match.group(1) else match.group(0)


def attach_groups(samples: list, regex: re.Pattern | None) -> list:
    """Fill in missing groups from the file name (regex) or a DICOM PatientID (salted hash)."""
    salt = secrets.token_bytes(16)
    out = []
    named = sum(1 for s in samples if s.group)
    if regex is not None and named:
        print(f"warning: --group-regex ignored for {named} of {len(samples)} images: the labels CSV's "
              "'patient'/'group' column names their patient, and the column wins", file=sys.stderr)
    for sample in samples:
        group = sample.group
        if not group and regex is not None:
            group = group_from_name(sample.path, regex)
        if not group:
            group = _dicom_patient_group(sample.path, salt)
        out.append(replace(sample, group=group) if group != sample.group else sample)
    return out


def _dicom_patient_group(path: str, salt: bytes) -> str:
    from cxr_deploy.imaging import detect

    try:
        if detect.sniff_file(path) != detect.DICOM:
            return ""
        import pydicom

        patient = str(pydicom.dcmread(path, stop_before_pixels=True, force=True,
                                      specific_tags=["PatientID"]).get("PatientID", "") or "").strip()
    except Exception:  # noqa: BLE001 - unreadable here: the reader reports it later
        return ""
    if not patient:
        return ""
    return "pid-" + hashlib.blake2b(patient.encode(), key=salt, digest_size=8).hexdigest()


def carve_by_group(pool: list, val_fraction: float, seed: int) -> set[int]:
    """Indices of ``pool`` for validation: about ``val_fraction`` of the images, whole groups only,
    classes in proportion (scikit-learn's StratifiedGroupKFold, one fold)."""
    from sklearn.model_selection import StratifiedGroupKFold

    labels = np.array([s.label for s in pool])
    # Groups numbered in order of first appearance (the pool's order is deterministic): the fold
    # must not depend on group *names*, since DICOM groups are salted hashes that change every run
    # (sorted by name, the same seed gave a different split, hence a different model, each run).
    names = [s.group or f"image:{s.path}" for s in pool]
    codes: dict[str, int] = {}
    groups = np.array([codes.setdefault(name, len(codes)) for name in names])
    folds = max(2, round(1 / val_fraction))
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    _, val_idx = next(splitter.split(np.zeros(len(pool)), labels, groups))
    return set(val_idx.tolist())


def warn_without_groups() -> None:
    print("warning: no patient information (a 'patient'/'group' column, --group-regex, or DICOM PatientID): "
          "validation is carved per image, so one patient's films can sit in train and validation and "
          "inflate validation AUC (Kermany files: --group-regex kermany)", file=sys.stderr)
