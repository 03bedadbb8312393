"""Ground-truth labels for the metric report: from a CSV, or from NORMAL/PNEUMONIA folder names.

Labels CSV: a header with ``path`` (or ``file``) and ``label`` columns. Relative paths are taken
relative to the labels file's folder; a results row matches a label by absolute path, or else by
the longest trailing part of its path (``images/NORMAL/IM-0147.jpeg`` matches
``/data/run1/images/NORMAL/IM-0147.jpeg``), so a labels file written on another machine still
lines up. Label values: a class name (any case), or ``1``/``0`` (positive/negative class).
"""

from __future__ import annotations

import csv
import os
from pathlib import Path, PurePosixPath
from typing import Sequence


from ..errors import CxrDeployError


class LabelsError(CxrDeployError):
    """A labels file that cannot be used (missing columns, unknown label values, no labels)."""


def _parse_label(value: str, class_names: Sequence[str], positive: str) -> str | None:
    text = (value or "").strip()
    for name in class_names:
        if text.lower() == name.lower():
            return name
    negatives = [c for c in class_names if c != positive]
    if len(negatives) == 1:
        if text.lower() in ("1", "true", "positive", "yes"):
            return positive
        if text.lower() in ("0", "false", "negative", "no"):
            return negatives[0]
    return None


def _norm_rel(path: str) -> str:
    return str(PurePosixPath(os.path.normpath(path.replace("\\", "/"))))


class LabelIndex:
    def __init__(self, class_names: Sequence[str], positive: str):
        self.class_names, self.positive = tuple(class_names), positive
        self._absolute: dict[str, str] = {}
        self._relative: dict[str, str] = {}  # relative path as written -> its absolute key
        self._matched: set[str] = set()  # absolute keys some results row matched
        self.source = ""

    @classmethod
    def from_csv(cls, path: str | Path, class_names: Sequence[str], positive: str) -> "LabelIndex":
        index = cls(class_names, positive)
        index.source = str(path)
        base = Path(path).resolve().parent
        try:
            fh = open(path, newline="", encoding="utf-8-sig", errors="surrogateescape")
        except OSError as exc:
            raise LabelsError(f"cannot read labels {path}: {exc.strerror or exc}") from None
        with fh:
            reader = csv.DictReader(fh)
            fields = {f.lower().strip(): f for f in reader.fieldnames or ()}
            path_col = fields.get("path") or fields.get("file")
            label_col = fields.get("label")
            if not path_col or not label_col:
                raise LabelsError(f"{path}: needs a header with 'path' (or 'file') and 'label' columns, "
                                  f"found {list(reader.fieldnames or [])}")
            for row in reader:
                raw, value = row.get(path_col) or "", row.get(label_col) or ""
                if not raw.strip():
                    continue
                label = _parse_label(value, class_names, positive)
                if label is None:
                    raise LabelsError(f"{path} line {reader.line_num}: label {value!r} is not one of "
                                      f"{', '.join(class_names)} (or 1/0)")
                absolute = raw if os.path.isabs(raw) else str(base / raw)
                key = os.path.normpath(absolute)
                index._absolute[key] = label
                index._relative[_norm_rel(raw)] = key
        if not index._absolute:
            raise LabelsError(f"{path} holds no labels")
        return index

    def __len__(self) -> int:
        return len(self._absolute)

    def lookup(self, path: str) -> str | None:
        key = os.path.normpath(path)
        if key not in self._absolute:
            key = None
            parts = PurePosixPath(path.replace("\\", "/")).parts
            for start in range(len(parts)):  # longest trailing match first
                key = self._relative.get("/".join(parts[start:]).lstrip("/"))
                if key is not None:
                    break
        if key is None:
            return None
        self._matched.add(key)
        return self._absolute[key]

    def unmatched_example(self) -> str | None:
        """A labelled path that no results row has matched so far (for error messages)."""
        return next((k for k in self._absolute if k not in self._matched), None)


class FolderLabels:
    """Label = the name of the file's parent folder when it is a class name (any case)."""

    def __init__(self, class_names: Sequence[str], positive: str):
        self.class_names, self.positive = tuple(class_names), positive
        self.source = "parent folder names"

    def lookup(self, path: str) -> str | None:
        parent = Path(path).parent.name
        return next((c for c in self.class_names if c.lower() == parent.lower()), None)

    def __len__(self) -> int:
        return 0  # labels come from the rows' own paths: there is no list to count

    def unmatched_example(self) -> str | None:
        return None
