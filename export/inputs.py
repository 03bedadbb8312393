"""Real images for the parity gate, INT8 calibration and the INT8 evaluation.

Everything goes through the runtime's reader (:func:`cxr_deploy.imaging.read_image`) and the
bundle's :class:`~cxr_deploy.preprocessing.PreprocessSpec`, exactly as ``batch`` will feed the
exported models; nothing here resizes or normalizes on its own.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np

from cxr_deploy.errors import CxrDeployError, UnreadableImage
from cxr_deploy.labels import class_of_folder, read_labels_csv
from cxr_deploy.imaging import read_image, scan_paths
from cxr_deploy.preprocessing import PreprocessSpec

LABEL_CSV_NAMES = ("labels.csv", "manifest.csv")


class InputError(CxrDeployError, ValueError):
    """A folder or labels file given to export cannot be used (message says why)."""


@dataclass
class ImageSet:
    """Preprocessed images (N, C, S, S) float32 with where they came from."""

    tensors: np.ndarray
    paths: list[str]
    labels: list[int] | None = None
    unreadable: list[dict] = field(default_factory=list)
    available: int | None = None  # files found before a limit picked some of them
    kind: str = "images"  # what they are, for messages ("labelled images")

    def __len__(self) -> int:
        return len(self.paths)

    def left_out(self, limit: int | None, option: str) -> str | None:
        """One line when ``limit`` left files out (None when it did not)."""
        picked = min(self.available or 0, limit) if limit is not None else self.available
        if not self.available or picked == self.available:
            return None
        return (f"{option} {limit}: {self.available - picked} of {self.available} {self.kind} left out "
                f"(the {picked} used are spread over the list)")


def image_files(inputs: Iterable[str | Path]) -> tuple[list[str], list[dict]]:
    """Readable-looking image files under files/folders (deterministic order) and skipped ones."""
    files, skipped = [], []
    for entry in scan_paths([str(p) for p in inputs]):
        if entry.skipped:
            skipped.append({"path": entry.path, "reason": entry.skip_reason})
        else:
            files.append(entry.path)
    return files, skipped


def evenly_spaced(items: list, limit: int | None) -> list:
    """At most ``limit`` items spread over the whole list (folders are often sorted by class)."""
    if limit is None or len(items) <= limit:
        return list(items)
    idx = np.linspace(0, len(items) - 1, num=limit).round().astype(int)
    return [items[i] for i in dict.fromkeys(idx.tolist())]


def load_images(paths: list[str], spec: PreprocessSpec, labels: list[int] | None = None) -> ImageSet:
    """Read and preprocess; unreadable files are recorded (with the reader's reason), not fatal."""
    tensors, used, used_labels, unreadable = [], [], [], []
    for i, path in enumerate(paths):
        try:
            pixels = read_image(path).pixels
        except UnreadableImage as exc:
            unreadable.append({"path": str(path), "reason": exc.reason})
            continue
        tensors.append(spec.apply(pixels))
        used.append(str(path))
        if labels is not None:
            used_labels.append(labels[i])
    array = (np.stack(tensors).astype(np.float32, copy=False) if tensors
             else np.zeros((0, *spec.input_shape), np.float32))
    return ImageSet(array, used, used_labels if labels is not None else None, unreadable)


def collect_images(inputs: Iterable[str | Path], spec: PreprocessSpec, limit: int | None = None) -> ImageSet:
    files, skipped = image_files(inputs)
    result = load_images(evenly_spaced(files, limit), spec)
    result.unreadable.extend(skipped)
    result.available = len(files)
    return result


def labelled_files(source: str | Path, class_names: tuple[str, ...], positive: str) -> list[tuple[str, int]]:
    """(path, class index) pairs from a labelled folder or CSV.

    Accepted: a folder with one sub-folder per class name (``NORMAL/``, ``PNEUMONIA/``; case-
    insensitive); a CSV with ``file`` (or ``path``) and ``label`` columns (paths relative to the CSV's folder); or a
    folder holding such a CSV named ``labels.csv`` or ``manifest.csv``.
    """
    source = Path(source)
    if source.is_file():
        return _labelled_from_csv(source, class_names, positive)
    if not source.is_dir():
        raise InputError(f"{source}: no such folder or labels CSV")
    subdirs = {class_of_folder(p.name, class_names): p for p in sorted(source.iterdir())
               if p.is_dir() and not p.name.startswith(".")}
    if any(name in subdirs for name in class_names):
        pairs = []
        for index, name in enumerate(class_names):
            if name in subdirs:
                files, _ = image_files([subdirs[name]])
                pairs.extend((f, index) for f in files)
        return pairs
    for csv_name in LABEL_CSV_NAMES:
        if (source / csv_name).is_file():
            return _labelled_from_csv(source / csv_name, class_names, positive)
    raise InputError(f"{source}: expected sub-folders named {', '.join(class_names)} or a labels CSV "
                     f"({' / '.join(LABEL_CSV_NAMES)}) with 'file' and 'label' columns")


def _labelled_from_csv(path: Path, class_names: tuple[str, ...], positive: str) -> list[tuple[str, int]]:
    """Through the runtime's one labels reader (cxr_deploy.labels), as batch and train read it."""
    return [(row.path, list(class_names).index(row.label)) for row in read_labels_csv(path, class_names, positive)]


def load_labelled(source: str | Path, spec: PreprocessSpec, class_names: tuple[str, ...], positive: str,
                  limit: int | None = None) -> ImageSet:
    every = labelled_files(source, class_names, positive)
    pairs = evenly_spaced(every, limit)
    result = load_images([p for p, _ in pairs], spec, labels=[y for _, y in pairs])
    result.available, result.kind = len(every), "labelled images"
    return result
