"""Fixtures for the batch tests: a tiny random-init bundle exported by the real export step, small images."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

INPUT_SIZE = 64  # ResNet50 at 64 px: a few ms per image, CAM grid 2x2


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory) -> Path:
    import torch

    from cxr_deploy.bundle import save_bundle
    from cxr_deploy.model import build_model
    from cxr_deploy.preprocessing import PreprocessSpec

    torch.manual_seed(0)
    model = build_model(None)
    # Random init puts every probability near 0 or 1 for every image; spread the positive logit
    # so thresholds and labels vary across the test images.
    with torch.no_grad():
        model.fc.weight.mul_(0.05)
    directory = tmp_path_factory.mktemp("bundle") / "tiny"
    save_bundle(directory, model, spec=PreprocessSpec(input_size=INPUT_SIZE))
    from cxr_deploy.export import export_bundle

    export_bundle(directory, torchscript=True, onnx=True)  # the real export step: model.ts, model.onnx
    return directory


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


def run_cli(*args, cwd=None, timeout=120) -> subprocess.CompletedProcess:
    """``cxr-deploy`` as a real subprocess (the way cron runs it)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "cxr_deploy.cli", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def cli():
    return run_cli


@pytest.fixture(scope="session")
def make_pngs():
    return write_pngs
