"""The decision rule, defined once: an image is called positive when ``p[positive] >= threshold``.

Every place that turns probabilities into a label (batch rows, the Python API, overlays) calls
:func:`decide`; every place that accepts a threshold checks it with :func:`check_threshold`.
Every place that *writes* a probability or a threshold (results CSV, report, DICOM SR) writes
:func:`number_text`, and captions read by people use :func:`decision_texts`: the written numbers,
read back, always give the decision that was made.
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
    """The threshold of a named operating point: recorded at training (``sens95``, ``youden`` ...),
    or, with the ``site:`` prefix (``site:sens95``), chosen on a site's images by ``cxr-deploy calibrate``."""
    if name.startswith("site:"):
        points = (getattr(manifest, "site", None) or {}).get("operating_points") or {}
        key = name[len("site:"):]
        if key not in points:
            known = ", ".join(f"site:{p}" for p in sorted(points)) or "none (this bundle is not site-calibrated: run cxr-deploy calibrate)"
            raise ValueError(f"operating point {name!r} is not in this bundle; its site points: {known}")
        return check_threshold(points[key]["threshold"], f"operating point {name}")
    points = (manifest.training or {}).get("operating_points") or {}
    if name not in points:
        known = ", ".join(sorted(points)) or "none (this bundle predates operating points)"
        raise ValueError(f"operating point {name!r} is not in this bundle; it has: {known}")
    return check_threshold(points[name]["threshold"], f"operating point {name}")


def number_text(value: float) -> str:
    """A probability or a threshold as every output writes it: the shortest decimal that reads back
    as the very same float (Python's ``repr``; ``0.9999999302``, ``1e-07``).

    Why not a fixed number of decimals: with 6 decimals a probability of 0.99999994 was written
    ``1.000000`` next to a threshold of 0.99999993 written ``1`` (``:g``), and the row said
    ``NORMAL``; any rounding of either number can make the written pair contradict ``p >= t``.
    Exact values never do: ``float(number_text(p)) >= float(number_text(t))`` is ``p >= t``.
    """
    return repr(float(value))


def decision_texts(probability: float, threshold: float, decimals: int = 3) -> tuple[str, str]:
    """Probability and threshold for texts read by people (overlay captions): both with the same
    number of decimals, the fewest (at least ``decimals``) at which the two written numbers, read
    back, give the same decision and print equal only when they are equal; exact
    (:func:`number_text`) when no fixed number of decimals does."""
    p, t = float(probability), float(threshold)
    for digits in range(decimals, 18):
        shown_p, shown_t = f"{p:.{digits}f}", f"{t:.{digits}f}"
        if (float(shown_p) >= float(shown_t)) == (p >= t) and (shown_p == shown_t) == (p == t):
            return shown_p, shown_t
    return number_text(p), number_text(t)


# Closer than this to 0 or 1, a threshold calls (almost) every image positive, or (almost) none.
EXTREME_THRESHOLD_MARGIN = 1e-3


def threshold_warning(threshold: float) -> str | None:
    """A one-line warning for a threshold within :data:`EXTREME_THRESHOLD_MARGIN` of 0 or 1, else ``None``.

    A threshold at (or next to) 1.0 comes out of threshold selection when the validation AUC is
    below 0.5 (the model ranks backwards) or the scores are saturated: only images scored at the
    very top would then be called positive. Next to 0.0, nearly every image is called positive.
    Shown by training (log and manifest), ``inspect`` and at the start of a batch run.
    """
    t = float(threshold)
    if t >= 1.0 - EXTREME_THRESHOLD_MARGIN:
        return (f"decision threshold is {number_text(t)}, within {EXTREME_THRESHOLD_MARGIN:g} of 1: practically "
                "nothing will be called positive (validation AUC below 0.5, or scores saturated at 1); "
                "do not deploy this threshold")
    if t <= EXTREME_THRESHOLD_MARGIN:
        return (f"decision threshold is {number_text(t)}, within {EXTREME_THRESHOLD_MARGIN:g} of 0: practically "
                "every image will be called positive (a degenerate model); do not deploy this threshold")
    return None
