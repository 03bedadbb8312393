"""Tiny synthetic "chest X-rays" for the training tests: a learnable task at a few dozen pixels.

NORMAL: a smooth vertical gradient with noise. PNEUMONIA: the same plus one or two bright blobs
(an opacity) at random places in the "lungs". Written as 8-bit PNGs so they go through the real
reader.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from PIL import Image

from cxr_deploy.training import TrainConfig


def synth_image(rng: np.random.Generator, positive: bool, size: int = 48) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size] / size
    img = 0.25 + 0.2 * yy + rng.normal(0, 0.04, (size, size))
    if positive:
        for _ in range(rng.integers(1, 3)):
            cy, cx = rng.uniform(0.25, 0.75, 2)
            r = rng.uniform(0.08, 0.15)
            img += 0.5 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def write_images(folder: Path, n: int, positive: bool, rng, size: int = 48) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        path = folder / f"img{i:03d}.png"
        Image.fromarray(synth_image(rng, positive, size)).save(path)
        paths.append(path)
    return paths


def make_folder_dataset(root: Path, counts: dict, seed: int = 0, size: int = 48) -> Path:
    """counts: {"train": (n_normal, n_pneumonia), "val": (...), ...} in the Kermany layout."""
    rng = np.random.default_rng(seed)
    for split, (n_neg, n_pos) in counts.items():
        write_images(root / split / "NORMAL", n_neg, False, rng, size)
        write_images(root / split / "PNEUMONIA", n_pos, True, rng, size)
    return root


def make_csv_dataset(root: Path, n_per_class: int, seed: int = 0, size: int = 48, path_column: str = "path",
                     with_split: dict | None = None) -> Path:
    """Images under root/imgs/ and root/labels.csv with relative paths."""
    rng = np.random.default_rng(seed)
    rows = []
    for label, positive in (("NORMAL", False), ("PNEUMONIA", True)):
        for p in write_images(root / "imgs" / label.lower(), n_per_class, positive, rng, size):
            rows.append({path_column: str(p.relative_to(root)), "label": label.lower() if positive else label})
    if with_split:
        for row in rows:
            row["split"] = with_split.get(row[path_column], "train")
    with open(root / "labels.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return root / "labels.csv"


def tiny_config(data, out, **overrides) -> TrainConfig:
    base = dict(data=str(data), out=str(out), weights="none", input_size=32, batch_size=8, num_workers=0,
                progress=False, epochs_stage1=1, epochs_stage2=1, amp="off", seed=0, min_val_images=4)
    base.update(overrides)
    return TrainConfig.from_dict(base)


def calibrated_random_weights(image_folder: Path, out_file: Path, input_size: int = 32, seed: int = 0) -> Path:
    """A stand-in for pretrained weights (none can be downloaded here): a random ResNet50 whose
    BatchNorm running statistics are measured on the synthetic images. A random net with default
    statistics (mean 0, var 1) collapses every input onto nearly one feature direction, so a frozen
    backbone would teach the head nothing."""
    import torch

    from cxr_deploy.imaging import read_image
    from cxr_deploy.model import build_model
    from cxr_deploy.preprocessing import PreprocessSpec

    torch.manual_seed(seed)
    model = build_model(None).train()
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None  # cumulative average over the one calibration batch
    spec = PreprocessSpec(input_size=input_size)
    x = torch.stack([torch.from_numpy(spec.apply(read_image(p).pixels)) for p in sorted(image_folder.rglob("*.png"))])
    with torch.no_grad():
        model(x)
    torch.save(model.state_dict(), out_file)
    return out_file
