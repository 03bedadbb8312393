"""The operating-point panel: sensitivity, specificity, the confusion matrix and their Wilson 95 %
intervals at any threshold, over the rows that have a truth (labels, or the reviewers' verdicts).

The same rule and the same intervals as the metric report: :func:`cxr_deploy.decision.positive_decisions`
(``p >= threshold``) and :func:`cxr_deploy.reporting.report.wilson_interval`.
"""

from __future__ import annotations

import math

import numpy as np

from ..reporting.report import wilson_interval
from ..decision import positive_decisions


def truth_of(table, source: str) -> np.ndarray:
    """Per row: the true class index (-1 unknown), from the labels file or from the verdicts."""
    return table.label if source == "labels" else table.review_label


def figures(table, threshold: float, source: str) -> dict:
    """What the panel shows at ``threshold`` for the scored rows with a truth from ``source``."""
    positive = table.class_names.index(table.positive)
    truth = truth_of(table, source)
    usable = (table.status == 0) & (truth >= 0) & ~np.isnan(table.probability)
    y = truth[usable] == positive
    called = positive_decisions(table.probability[usable], threshold)
    tp, fn = int((called & y).sum()), int((~called & y).sum())
    tn, fp = int((~called & ~y).sum()), int((called & ~y).sum())
    return {
        "threshold": float(threshold), "source": source, "n": int(usable.sum()),
        "confusion": {"tp": tp, "fn": fn, "tn": tn, "fp": fp},
        "sensitivity": tp / (tp + fn) if tp + fn else None,
        "specificity": tn / (tn + fp) if tn + fp else None,
        "sensitivity_ci": wilson_interval(tp, tp + fn),
        "specificity_ci": wilson_interval(tn, tn + fp),
    }


def named_points(table, operating_points: dict | None) -> list[dict]:
    """The thresholds to mark on the slider: the bundle's named points (``--model``) and the
    thresholds the rows were decided with (``default``, ``sens95``..., as the CSV records them)."""
    marks = {}
    for name, point in (operating_points or {}).items():
        try:
            marks[name] = {"name": name, "threshold": float(point["threshold"]), "from": "bundle"}
        except (KeyError, TypeError, ValueError):
            continue
    thresholds, points = table.columns.get("threshold", []), table.columns.get("operating_point", [])
    seen = set()
    for t, name in zip(thresholds, points or [""] * len(thresholds)):
        if (t, name) in seen or not t:
            continue
        seen.add((t, name))
        value = float(t)
        if math.isfinite(value) and (name or "run") not in marks:
            marks[name or "run"] = {"name": name or "run", "threshold": value, "from": "results"}
        if len(seen) > 20:  # a hand-made file with a threshold per row: enough marks
            break
    return sorted(marks.values(), key=lambda m: m["threshold"])
