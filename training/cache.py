"""On-disk cache of the spec's resized images for training (``--cache-dir``)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from cxr_deploy import atomic
from cxr_deploy.preprocessing import PreprocessSpec


class ResizedCache:
    """On-disk cache of ``spec.resize_gray`` outputs (float16 .npy; training images as 16-bit
    integers, see :class:`CXRDataset`), for repeated epochs over large originals. The key covers the file's identity (resolved path, size, mtime) and the spec, so
    editing a file or changing the input size never serves a stale image. float16 keeps ~3 decimal
    digits in [0, 1], finer than the 8-bit steps of the PNG/JPEG sources."""

    def __init__(self, directory: str | Path, spec: PreprocessSpec):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._spec_key = spec.to_json()

    def _file(self, path: str, kind: str) -> Path:
        st = os.stat(path)
        key = f"{os.path.realpath(path)}|{st.st_size}|{st.st_mtime_ns}|{self._spec_key}"
        key += "" if kind == "float16" else f"|{kind}"  # float16 entries keep their 0.1 keys
        digest = hashlib.sha256(key.encode()).hexdigest()
        return self.directory / digest[:2] / f"{digest}.npy"

    def get(self, path: str, kind: str = "float16") -> np.ndarray | None:
        """The cached array as stored (``kind``: ``float16`` for validation/test images, ``stored``
        for training images kept as the 16-bit integers of :mod:`.device_batches`)."""
        file = self._file(path, kind)
        try:
            return np.load(file)
        except (OSError, ValueError):  # missing or half-written by a killed worker
            return None

    def put(self, path: str, array: np.ndarray, kind: str = "float16") -> None:
        file = self._file(path, kind)
        file.parent.mkdir(exist_ok=True)
        # atomic: concurrent workers may write the same entry. No fsync: a cache entry lost to a
        # power cut is simply recomputed (np.load fails on it), and fsync per image would cost more.
        with atomic.open_atomic(file, "wb", fsync=False) as fh:
            np.save(fh, array.astype(np.float16) if kind == "float16" else array)
