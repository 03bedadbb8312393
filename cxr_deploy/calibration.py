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


# -- temperature scaling (Guo et al. 2017) -----------------------------------------------------------
MIN_IMAGES_TO_FIT = 20  # fewer validation images than this: no fit, temperature 1


def sigmoid(x) -> np.ndarray:
    x = np.asarray(x, float)
    return np.where(x >= 0, 1 / (1 + np.exp(-np.abs(x))), np.exp(-np.abs(x)) / (1 + np.exp(-np.abs(x))))


def nll(y_true, margins, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of labels under p = sigmoid(margin / T) (margin = logit difference)."""
    z = np.asarray(margins, float) / temperature
    y = np.asarray(y_true, float)
    return float(np.mean(np.logaddexp(0.0, -z) * y + np.logaddexp(0.0, z) * (1 - y)))


def fit_temperature(y_true, margins) -> float:
    """The temperature T > 0 minimising validation NLL of sigmoid(margin / T); 1.0 when there is too
    little to fit on (one class, or fewer than MIN_IMAGES_TO_FIT images). Dividing by T never changes
    the ranking, so AUC and the order of the operating points are unchanged."""
    from scipy.optimize import minimize_scalar

    y = np.asarray(y_true, float)
    if len(y) < MIN_IMAGES_TO_FIT or y.min() == y.max():
        return 1.0
    result = minimize_scalar(lambda log_t: nll(y, margins, float(np.exp(log_t))), bounds=(np.log(0.05), np.log(50.0)),
                             method="bounded", options={"xatol": 1e-6})
    best = float(np.exp(result.x))
    return best if nll(y, margins, best) <= nll(y, margins, 1.0) else 1.0
