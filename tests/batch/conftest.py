"""Fixtures for the batch tests: small synthetic PNGs (the tiny bundle they run through is
``tiny_bundle`` in tests/conftest.py)."""

from __future__ import annotations

import os

from pathlib import Path

import numpy as np
import pytest
from PIL import Image



def smooth_image(seed: int, shape=(96, 80)) -> np.ndarray:
    """Smooth anatomy-like uint8 content (blurred blobs), different per seed."""
    rng = np.random.default_rng(seed)
    h, w = shape
    y, x = np.mgrid[0:h, 0:w]
    img = np.zeros(shape, np.float32)
    for _ in range(4):
        cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(8, 30)
        img += rng.uniform(0.3, 1.0) * np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / (2 * r * r))
    img = img / img.max()
    return np.round(img * 255).astype(np.uint8)


def write_pngs(folder: Path, n: int, start: int = 0) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(start, start + n):
        path = folder / f"img{i:03d}.png"
        Image.fromarray(smooth_image(i)).save(path)
        paths.append(path)
    return paths


@pytest.fixture()
def png_folder(tmp_path) -> Path:
    folder = tmp_path / "images"
    write_pngs(folder / "a", 5)
    write_pngs(folder / "b", 5, start=5)
    return folder


@pytest.fixture(scope="session")
def make_pngs():
    return write_pngs


def session_members(sid: int) -> list[int]:
    """Live (not zombie) processes of session ``sid``: what a batch run started and left behind."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    fields = fh.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[3]) == sid and fields[0] != "Z":  # field 6 of stat: session id
                found.append(int(entry))
    return found
