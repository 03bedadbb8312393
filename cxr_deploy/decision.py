"""The decision rule, defined once: an image is called positive when ``p[positive] >= threshold``.

Every place that turns probabilities into a label (batch rows, the Python API, overlays) calls
:func:`decide`; every place that accepts a threshold checks it with :func:`check_threshold`.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np


def check_threshold(value: float, what: str = "threshold") -> float:
    """A usable decision threshold: a finite number in [0, 1]; ``ValueError`` with one line else."""
    try:
        t = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a number in [0, 1], got {value!r}") from None
    if not math.isfinite(t) or not 0.0 <= t <= 1.0:
        raise ValueError(f"{what} must be within [0, 1], got {value!r}")
    return t


def is_positive(probability: float, threshold: float) -> bool:
    return float(probability) >= float(threshold)


def positive_decisions(scores, threshold: float) -> np.ndarray:
    """Vectorized rule over positive-class scores: ``True`` where an image is called positive."""
    return np.asarray(scores, dtype=np.float64) >= float(threshold)


def decide(probabilities: Sequence[float] | np.ndarray, positive: int, threshold: float,
           class_names: Sequence[str]) -> str:
    """Class name for one image's probability row: the positive class when its probability reaches
    the threshold, else the most probable of the other classes."""
    if is_positive(probabilities[positive], threshold):
        return class_names[positive]
    others = [i for i in range(len(class_names)) if i != positive]
    return class_names[max(others, key=lambda i: probabilities[i])]


def operating_point(manifest, name: str) -> float:
    """The threshold of a named operating point recorded at training (``sens95``, ``youden`` ...)."""
    points = (manifest.training or {}).get("operating_points") or {}
    if name not in points:
        known = ", ".join(sorted(points)) or "none (this bundle predates operating points)"
        raise ValueError(f"operating point {name!r} is not in this bundle; it has: {known}")
    return check_threshold(points[name]["threshold"], f"operating point {name}")


def threshold_warning(threshold: float) -> str | None:
    """A one-line warning for a threshold that makes the model useless, else ``None``.

    A threshold of 1.0 comes out of threshold selection when the validation AUC is below 0.5 (the
    model ranks backwards) or every score is identical: only p == 1 would then be called positive.
    """
    t = float(threshold)
    if t >= 1.0:
        return ("decision threshold is 1.0: practically nothing will be called positive (validation AUC "
                "below 0.5, or scores saturated at 1); do not deploy this bundle")
    if t <= 0.0:
        return "decision threshold is 0.0: every image will be called positive (a degenerate model); do not deploy"
    return None
