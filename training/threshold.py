"""Validation metrics and the decision threshold stored in the bundle. The operating-point rules
(Youden's J, target sensitivity, target specificity) live in :mod:`cxr_deploy.operating_points`,
shared with ``cxr-deploy calibrate``; they are re-exported here."""

from __future__ import annotations

import math

import numpy as np

from ..decision import positive_decisions
from ..operating_points import (OPERATING_POINTS, SPECIFICITY_POINTS, choose_threshold,  # noqa: F401
                                operating_points)


def classification_metrics(labels: np.ndarray, scores: np.ndarray, threshold: float = 0.5,
                           ranking: np.ndarray | None = None) -> dict:
    """AUC plus confusion-matrix metrics at ``threshold`` (positive when score >= threshold).

    ``ranking``: what the AUC is computed from, when given; training passes the logit margins
    (positive − other logit), so one epoch has one validation AUC wherever it is reported. The
    probability ranks images the same way at every temperature, but in float32 it saturates: every
    margin above about 17 gives exactly 1.0, and those images tie (the demo's random-init model logged
    AUC 0.75 from its float32 probabilities for an epoch whose bundle then said 1.0).
    """
    from sklearn.metrics import roc_auc_score

    labels = np.asarray(labels).astype(int)
    scores = np.asarray(scores, dtype=np.float64)
    pred = positive_decisions(scores, threshold)
    pos, neg = labels == 1, labels == 0
    tp, tn = int((pred & pos).sum()), int((~pred & neg).sum())
    fp, fn = int((pred & neg).sum()), int((~pred & pos).sum())
    ranked = scores if ranking is None else np.asarray(ranking, dtype=np.float64)
    auc = float(roc_auc_score(labels, ranked)) if pos.any() and neg.any() else math.nan
    return {
        "auc": auc,
        "accuracy": (tp + tn) / max(1, len(labels)),
        "sensitivity": tp / (tp + fn) if tp + fn else math.nan,
        "specificity": tn / (tn + fp) if tn + fp else math.nan,
        "threshold": float(threshold),
        "tp": tp, "fp": fp, "tn": tn, "fn": fn, "n": int(len(labels)),
    }


def calibrate(labels, margins, enabled: bool) -> tuple[float, np.ndarray, dict]:
    """Temperature, calibrated validation scores, and the record that goes into the manifest."""
    from cxr_deploy.calibration import (MIN_IMAGES_TO_FIT, expected_calibration_error, fit_temperature, nll,
                                        sigmoid)

    temperature = fit_temperature(labels, margins) if enabled else 1.0
    scores = sigmoid(np.asarray(margins, float) / temperature)
    record = {"method": "temperature scaling, NLL on the validation split", "temperature": temperature,
              "validation_images": int(len(labels)),
              "nll_before": nll(labels, margins), "nll_after": nll(labels, margins, temperature),
              "ece_before": expected_calibration_error(labels, sigmoid(margins)),
              "ece_after": expected_calibration_error(labels, scores)}
    if not enabled:
        record["note"] = "calibration turned off (--no-calibrate)"
    elif temperature == 1.0:
        record["note"] = (f"not fitted: fewer than {MIN_IMAGES_TO_FIT} validation images, one class, "
                          "or no temperature beat 1.0")
    return temperature, scores, record
