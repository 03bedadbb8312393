"""Validation metrics and the decision threshold stored in the bundle.

The bundle's rule is: predict PNEUMONIA when P(PNEUMONIA) >= threshold. Thresholds come from
scikit-learn's ROC curve on the validation set at the best epoch:

- default, Youden's J: the threshold maximising sensitivity + specificity - 1;
- ``target_sensitivity`` (e.g. 0.95 for screening): the highest threshold whose validation
  sensitivity reaches the target, i.e. the best specificity that still meets it;
- ``target_specificity`` (e.g. 0.95, few false alarms): the lowest threshold whose specificity
  reaches the target, i.e. the best sensitivity that still meets it.

The same rules pick a site's operating points (``cxr-deploy calibrate``, :mod:`cxr_deploy.site_calibration`).
"""

from __future__ import annotations

import math

import numpy as np

from ..decision import positive_decisions


def choose_threshold(labels: np.ndarray, scores: np.ndarray, target_sensitivity: float | None = None,
                     target_specificity: float | None = None) -> dict:
    """``{"threshold", "rule", "sensitivity", "specificity"}`` on these validation scores.

    With a single class present the ROC curve is undefined; the threshold falls back to 0.5 and
    the rule says so.
    """
    from sklearn.metrics import roc_curve

    labels = np.asarray(labels).astype(int)
    scores = np.asarray(scores, dtype=np.float64)
    if len(np.unique(labels)) < 2:
        return {"threshold": 0.5, "rule": "fallback_0.5 (validation has one class)",
                "sensitivity": None, "specificity": None}
    fpr, tpr, thresholds = roc_curve(labels, scores, drop_intermediate=False)
    thresholds = np.clip(thresholds, 0.0, 1.0)  # the first threshold is +inf ("predict nothing")
    if target_specificity is not None:
        reaching = np.flatnonzero(1 - fpr >= target_specificity - 1e-12)
        i = int(reaching[-1])  # the lowest threshold that still reaches it (the first one always does)
        rule = f"target_specificity={target_specificity:g}"
    elif target_sensitivity is None:
        i = int(np.argmax(tpr - fpr))
        rule = "youden_j"
    else:
        reaching = np.flatnonzero(tpr >= target_sensitivity - 1e-12)
        i = int(reaching[0])  # thresholds decrease along the curve: the first is the highest
        rule = f"target_sensitivity={target_sensitivity:g}"
    return {"threshold": float(thresholds[i]), "rule": rule,
            "sensitivity": float(tpr[i]), "specificity": float(1 - fpr[i])}


OPERATING_POINTS = {"sens90": 0.90, "sens95": 0.95, "sens98": 0.98}
SPECIFICITY_POINTS = {"spec90": 0.90, "spec95": 0.95, "spec98": 0.98}


def operating_points(labels: np.ndarray, scores: np.ndarray) -> dict:
    """Thresholds named for what they buy on validation: ``youden`` (max sensitivity + specificity),
    ``sens90``/``sens95``/``sens98`` (the highest threshold reaching that validation sensitivity) and
    ``spec90``/``spec95``/``spec98`` (the lowest threshold reaching that specificity), each with its
    validation sensitivity and specificity. Empty with a single class."""
    labels = np.asarray(labels).astype(int)
    if len(np.unique(labels)) < 2:
        return {}
    points = {"youden": choose_threshold(labels, scores)}
    for name, target in OPERATING_POINTS.items():
        points[name] = choose_threshold(labels, scores, target)
    for name, target in SPECIFICITY_POINTS.items():
        points[name] = choose_threshold(labels, scores, target_specificity=target)
    return {name: {k: p[k] for k in ("threshold", "sensitivity", "specificity")} for name, p in points.items()}


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
