"""Ground-truth labels, read one way everywhere: ``batch --labels``, ``evaluate``, ``train --data``
and ``export --int8-eval`` all call :func:`read_labels_csv` and :func:`class_of_folder`.

Labels CSV: UTF-8 (an Excel byte-order mark is fine), a header with ``path`` (or ``file``) and
``label`` columns, any case, surrounding spaces ignored; other columns (``split``, ``patient``) are
passed through. Paths are stripped and taken relative to the CSV's folder unless absolute. A label
is a class name (any case), or for two classes ``1``/``true``/``yes``/``positive`` (the positive
class) and ``0``/``false``/``no``/``negative`` (the other one).
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from .errors import CxrDeployError

POSITIVE_WORDS = frozenset({"1", "true", "yes", "positive"})
NEGATIVE_WORDS = frozenset({"0", "false", "no", "negative"})


class LabelsError(CxrDeployError, ValueError):
    """A labels file that cannot be used (missing columns, unknown label values, no labels)."""


@dataclass(frozen=True)
class LabelRow:
    path: str  # absolute, normalized
    written: str  # the path as written in the file (stripped)
    label: str  # a class name
    line: int
    extra: dict = field(default_factory=dict)  # other columns, lower-cased names


def parse_label(value: str, class_names: Sequence[str], positive: str) -> str | None:
    """The class name ``value`` stands for, or ``None``."""
    text = (value or "").strip().lower()
    for name in class_names:
        if text == name.lower():
            return name
    negatives = [c for c in class_names if c != positive]
    if len(negatives) == 1:
        if text in POSITIVE_WORDS:
            return positive
        if text in NEGATIVE_WORDS:
            return negatives[0]
    return None


def class_of_folder(name: str, class_names: Sequence[str]) -> str | None:
    """The class a folder name stands for (``normal/``, ``PNEUMONIA/``: any case), or ``None``."""
    return next((c for c in class_names if c.lower() == name.strip().lower()), None)


def read_labels_csv(path: str | Path, class_names: Sequence[str], positive: str) -> list[LabelRow]:
    """Every labelled row of a labels CSV, in file order; :class:`LabelsError` with one line else."""
    path = Path(path)
    base = path.resolve().parent
    try:
        fh = open(path, newline="", encoding="utf-8-sig", errors="surrogateescape")
    except OSError as exc:
        raise LabelsError(f"cannot read labels {path}: {exc.strerror or exc}") from None
    rows = []
    with fh:
        reader = csv.DictReader(fh)
        fields = {(f or "").strip().lower(): f for f in reader.fieldnames or ()}
        path_col, label_col = fields.get("path") or fields.get("file"), fields.get("label")
        if not path_col or not label_col:
            raise LabelsError(f"{path}: needs a header with 'path' (or 'file') and 'label' columns, "
                              f"found {list(reader.fieldnames or [])}")
        for record in reader:
            written = (record.get(path_col) or "").strip()
            if not written:
                continue
            value = record.get(label_col) or ""
            label = parse_label(value, class_names, positive)
            if label is None:
                raise LabelsError(f"{path} line {reader.line_num}: label {value.strip()!r} is not one of "
                                  f"{', '.join(class_names)} (any case) or 1/0")
            absolute = os.path.normpath(written if os.path.isabs(written) else str(base / written))
            extra = {k: (record.get(f) or "").strip() for k, f in fields.items() if f not in (path_col, label_col)}
            rows.append(LabelRow(absolute, written, label, reader.line_num, extra))
    if not rows:
        raise LabelsError(f"{path} holds no labels")
    return rows
