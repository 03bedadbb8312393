"""Calibration of the positive-class probability: does p = 0.8 mean "positive 8 times in 10"?

Binary reliability over ``BINS`` equal-width bins of p(positive) ([0, 0.1), …, [0.9, 1.0]); the
expected calibration error (ECE) is the image-weighted mean of |observed positive rate − mean p|
over the non-empty bins. One home for these, used by the metric report (and by training when
probabilities are calibrated).
"""

from __future__ import annotations

import numpy as np

BINS = 10


def reliability(y_true, prob, bins: int = BINS) -> list[dict]:
    """Per non-empty bin: its range, image count, mean predicted p and observed positive rate."""
    y, p = np.asarray(y_true, float), np.clip(np.asarray(prob, float), 0.0, 1.0)
    index = np.minimum((p * bins).astype(int), bins - 1)  # p == 1.0 goes into the last bin
    out = []
    for b in range(bins):
        inside = index == b
        if inside.any():
            out.append({"lo": b / bins, "hi": (b + 1) / bins, "n": int(inside.sum()),
                        "mean_probability": float(p[inside].mean()), "observed_rate": float(y[inside].mean())})
    return out


def expected_calibration_error(y_true, prob, bins: int = BINS) -> float:
    table = reliability(y_true, prob, bins)
    total = sum(b["n"] for b in table)
    if total == 0:
        return float("nan")
    return float(sum(b["n"] / total * abs(b["observed_rate"] - b["mean_probability"]) for b in table))
