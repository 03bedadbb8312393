"""Operating-point rules, defined once: which threshold a named point (``youden``, ``sens90/95/98``,
``spec90/95/98``) is on a labelled set of scores. Training picks them on its validation split
(:mod:`cxr_deploy.training.threshold`), ``cxr-deploy calibrate`` on a site's images
(:mod:`cxr_deploy.site_calibration`).

The bundle's rule is: predict PNEUMONIA when P(PNEUMONIA) >= threshold. Thresholds come from
scikit-learn's ROC curve:

- default, Youden's J: the threshold maximising sensitivity + specificity - 1;
- ``target_sensitivity`` (e.g. 0.95 for screening): the highest threshold whose sensitivity
  reaches the target, i.e. the best specificity that still meets it;
- ``target_specificity`` (e.g. 0.95, few false alarms): the lowest threshold whose specificity
  reaches the target, i.e. the best sensitivity that still meets it.
"""

from __future__ import annotations

import numpy as np


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
