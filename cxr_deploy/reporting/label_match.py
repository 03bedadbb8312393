"""Ground-truth labels for the metric report: from a CSV, or from NORMAL/PNEUMONIA folder names.

Labels CSV: read by :func:`cxr_deploy.labels.read_labels_csv` (the one reader for batch, train and
export). A results row matches a label by absolute path, or else by
the longest trailing part of its path (``images/NORMAL/IM-0147.jpeg`` matches
``/data/run1/images/NORMAL/IM-0147.jpeg``), so a labels file written on another machine still
lines up.
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath
from typing import Sequence

from ..labels import class_of_folder, read_labels_csv


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
        for row in read_labels_csv(path, class_names, positive):
            index._absolute[row.path] = row.label
            index._relative[_norm_rel(row.written)] = row.path
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
        return class_of_folder(Path(path).parent.name, self.class_names)

    def __len__(self) -> int:
        return 0  # labels come from the rows' own paths: there is no list to count

    def unmatched_example(self) -> str | None:
        return None
