"""Fit the out-of-population statistics of a bundle (:mod:`cxr_deploy.in_population`).

After the last epoch, on the best model: the features (:func:`cxr_deploy.cam.pooled_features`,
the same code the graph runs) of every training-split image, read and preprocessed as inference
reads them; one mean per class and one covariance shared by the classes, of which the distance
uses the leading principal components (:data:`COMPONENTS`); the threshold at a percentile of the
validation split's scores (95 by default: about 5 % of in-population images are flagged).

Measured on the docs/site-trust.md model (``benchmarks/ood_feasibility.py``): all training images
instead of 1,000, and layer3's features beside layer4's, each raised the AUROC of adult films
against held-out pediatric ones; see docs/site-trust.md for the figures.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch

from cxr_deploy import in_population
from cxr_deploy.cam import ClassifierWithCAM

BATCH = 32
# Principal components the distance is measured in. Measured on the docs/site-trust.md model (AUROC
# adult vs held-out pediatric films / INT8's in-population flag agreeing with fp32's): all 3072
# dimensions under Ledoit-Wolf shrinkage 0.988 / 5.6 % (INT8's 8-bit layer4 activations swamp the
# thousands of low-variance directions that distance weighs most); 64 components 0.929 / 99.4 %;
# 128 0.960 / 97.8 %; 256 0.971 / 98.9 %; 512 0.983 / 98.3 %.
COMPONENTS = 256
# Below these the statistics are not fitted (the bundle works without the flag). Far more are needed
# for a threshold worth its name: the measured figures (docs/site-trust.md) used 3,576 and 895.
MIN_TRAIN, MIN_VALIDATION = 20, 10


@torch.no_grad()
def image_features(wrapper: ClassifierWithCAM, paths: Sequence[str], spec, device="cpu",
                   progress: Callable[[str], None] | None = None) -> tuple[np.ndarray, list[int]]:
    """Population features of the readable ``paths`` (float64) and the indices of those read."""
    from cxr_deploy.errors import UnreadableImage
    from cxr_deploy.imaging import read_image

    wrapper = wrapper.eval().to(device)
    out, kept = [], []
    for start in range(0, len(paths), BATCH):
        tensors = []
        for i in range(start, min(start + BATCH, len(paths))):
            try:
                tensors.append(spec.apply(read_image(paths[i]).pixels))
            except UnreadableImage:
                continue
            kept.append(i)
        if tensors:
            x = torch.from_numpy(np.stack(tensors)).to(device)
            out.append(wrapper.population_features(x).double().cpu().numpy())
        if progress and (start // BATCH) % 20 == 0:
            progress(f"population features: {min(start + BATCH, len(paths))}/{len(paths)}")
    return (np.concatenate(out) if out else np.zeros((0, 0))), kept


def fit_statistics(train: np.ndarray, labels: np.ndarray, val: np.ndarray, quantile: float = 95.0,
                   components: int = COMPONENTS):
    """(centres (C, D), whiten (D, k), threshold, validation scores) from training features with
    their class labels and validation features: the Mahalanobis distance within the ``k`` leading
    principal components of the within-class covariance (k = ``components``, fewer when the
    training images are fewer)."""
    classes = np.unique(labels)
    centres = np.stack([train[labels == c].mean(axis=0) for c in classes])
    centred = np.concatenate([train[labels == c] - centres[i] for i, c in enumerate(classes)])
    values, vectors = principal_axes(centred, max(1, len(centred) - len(classes)))
    k = int(min(components, len(centred) - len(classes), np.sum(values > values[0] * 1e-9)))
    whiten = vectors[:, :k] / np.sqrt(values[:k])
    val_scores = distances(val, centres, whiten)
    return centres, whiten, float(np.percentile(val_scores, quantile)), val_scores


def principal_axes(centred: np.ndarray, dof: int) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues (descending) and eigenvectors (columns) of ``centred.T @ centred / dof``.

    With fewer images than features (N < D = 3072: a small site or a short run) the axes come from
    the SVD of the (N, D) data itself, the same axes and variances without forming and decomposing
    the D x D covariance: measured here (2 cores), N = 120 took 3.9 s by ``eigh`` on the covariance
    and 0.03 s by SVD. With N >= D, the covariance is the smaller matrix."""
    n, d = centred.shape
    if n < d:
        _, singular, vt = np.linalg.svd(centred, full_matrices=False)
        return singular ** 2 / dof, vt.T
    values, vectors = np.linalg.eigh(centred.T @ centred / dof)  # ascending
    return values[::-1], vectors[:, ::-1]


def distances(features: np.ndarray, centres: np.ndarray, whiten: np.ndarray) -> np.ndarray:
    """What the graph computes, in float64 (for fitting and benchmarks)."""
    return np.sqrt(np.min([(((features - c) @ whiten) ** 2).sum(axis=1) for c in centres], axis=0))


def fit_bundle(bundle, train_paths: Sequence[str], train_labels: Sequence[int], val_paths: Sequence[str], *,
               quantile: float = 95.0, age_range=None, device="cpu",
               progress: Callable[[str], None] | None = None) -> dict:
    """Fit and write ``bundle``'s statistics; returns the manifest record. An exported bundle must
    be exported again for its graphs to compute the score."""
    age = in_population.parse_age_range(age_range)
    wrapper = bundle.classifier()
    train, kept = image_features(wrapper, list(train_paths), bundle.spec, device, progress)
    labels = np.asarray(train_labels)[kept]
    val, _ = image_features(wrapper, list(val_paths), bundle.spec, device, progress)
    if len(val) < MIN_VALIDATION or len(train) < MIN_TRAIN or len(np.unique(labels)) < 2:
        raise ValueError(f"population statistics need >= {MIN_TRAIN} training images of both classes and >= "
                         f"{MIN_VALIDATION} validation images; got {len(train)} and {len(val)}")
    centres, whiten, threshold, _ = fit_statistics(train, labels, val, quantile)
    record = {"train_images": int(len(train)), "validation_images": int(len(val)),
              "threshold_rule": f"validation percentile {quantile:g}", "components": int(whiten.shape[1]),
              "covariance": "shared by the classes (within-class), leading principal components",
              "age_range": [age[0], age[1]] if age else None}
    in_population.write(bundle, centres, whiten, threshold=threshold, record=record)
    return {**record, "threshold": threshold}


def fit_run(config, samples, best_dir, device, log: Callable[[str], None]) -> None:
    """After training: the best bundle's statistics from its training split, the threshold at
    ``config.population_quantile`` of the validation split's scores, ``config.age_range``."""
    from cxr_deploy.bundle import ModelBundle

    train = [s for s in samples if s.split == "train"]
    val = [s.path for s in samples if s.split == "val"]
    try:
        record = fit_bundle(ModelBundle.load(best_dir), [s.path for s in train], [s.label for s in train], val,
                            quantile=config.population_quantile, age_range=config.age_range or None,
                            device=device, progress=log if config.progress else None)
    except ValueError as exc:  # too few images: the bundle works without the flag
        log(f"WARNING: no out-of-population statistics: {exc}")
        return
    ages = record["age_range"]
    log(f"out-of-population statistics: {record['train_images']} training images, {record['components']} "
        f"components, threshold {record['threshold']:.4g} ({record['threshold_rule']})"
        + (f", training ages {ages[0]:g}-{ages[1]:g} y" if ages else ", training ages unknown"))
