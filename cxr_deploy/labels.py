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
    """Every labelled row of a labels CSV, in file order; :class:`LabelsError` with one line else.
    A reviews file (``cxr-deploy review``) is read by :func:`labels_from_reviews`."""
    path = Path(path)
    if is_reviews_file(path):
        return labels_from_reviews(path, class_names, positive)
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


# -- reviews (cxr-deploy review) as labels ---------------------------------------------------------
REVIEW_VERSION = "1"
# REVIEWS.csv, in file order. One line per verdict, appended (never rewritten); a verdict is about
# one row of a results file: input path + SOP Instance UID + model id. The latest line of a key wins.
REVIEW_COLUMNS = (
    "review_version", "path", "sop_instance_uid", "model_id", "verdict", "decision", "correct_class",
    "probability", "threshold", "operating_point", "reviewer", "comment", "reviewed_at",
)
VERDICTS = ("agree", "disagree", "unsure")


def review_class(verdict: str, decision: str, correct_class: str) -> str | None:
    """The class a verdict establishes: the model's decision for ``agree``, the class the reviewer
    gave for ``disagree``; ``None`` for ``unsure`` (or an incomplete line)."""
    if verdict == "agree":
        return decision or None
    if verdict == "disagree":
        return correct_class or None
    return None


def review_key(row: dict) -> tuple[str, str, str]:
    """What a verdict is about: (input path, SOP Instance UID, model id)."""
    return (row.get("path") or "", row.get("sop_instance_uid") or "", row.get("model_id") or "")


def is_reviews_file(path: str | Path) -> bool:
    try:
        with open(path, newline="", encoding="utf-8-sig", errors="surrogateescape") as fh:
            header = next(csv.reader(fh), [])
    except (OSError, csv.Error):
        return False
    return tuple(h.strip() for h in header[:len(REVIEW_COLUMNS)]) == REVIEW_COLUMNS


def latest_reviews(path: str | Path) -> dict[tuple[str, str, str], dict]:
    """The verdict in force per key (the latest complete line; a line torn by a crash is ignored).
    Cells are unguarded (text cells starting ``= + - @`` were written with a leading ``'``)."""
    from .batch.results_file import complete_prefix_length, unguard

    with open(path, "rb") as fh:
        data = fh.read()
    text = data[:complete_prefix_length(data)].decode("utf-8-sig", errors="surrogateescape")
    latest: dict[tuple[str, str, str], dict] = {}
    reader = csv.DictReader(text.splitlines(keepends=True))
    for record in reader:
        row = {k: unguard(v or "") for k, v in record.items() if k is not None}
        if row.get("verdict") in VERDICTS:
            row["line"] = reader.line_num
            latest.pop(review_key(row), None)  # re-inserted: dict order = order of the verdicts in force
            latest[review_key(row)] = row
    return latest


def labels_from_reviews(path: str | Path, class_names: Sequence[str], positive: str) -> list[LabelRow]:
    """REVIEWS.csv → labels: the verdict in force per (path, SOP Instance UID, model id); ``agree``
    gives the decision reviewed, ``disagree`` the class given, ``unsure`` nothing. An image reviewed
    under several models keeps its latest verdict that gives a class. :class:`LabelsError` when no
    verdict gives a class, or one names an unknown class."""
    path = Path(path)
    try:
        latest = latest_reviews(path)
    except OSError as exc:
        raise LabelsError(f"cannot read reviews {path}: {exc.strerror or exc}") from None
    by_image: dict[str, LabelRow] = {}
    for row in latest.values():
        value = review_class(row["verdict"], row.get("decision", ""), row.get("correct_class", ""))
        if value is None:
            continue
        label = parse_label(value, class_names, positive)
        if label is None:
            raise LabelsError(f"{path} line {row['line']}: class {value!r} is not one of {', '.join(class_names)}")
        absolute = os.path.normpath(row["path"])
        by_image.pop(absolute, None)
        extra = {k: row.get(k, "") for k in ("verdict", "model_id", "sop_instance_uid", "reviewer")}
        by_image[absolute] = LabelRow(absolute, row["path"], label, row["line"], extra)
    if not by_image:
        raise LabelsError(f"{path} holds no agree/disagree verdict (unsure verdicts give no label)")
    return list(by_image.values())
