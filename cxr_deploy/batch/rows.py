"""One results row from a decoded file and the model's output: the one place where rows are made,
for every path that scores images (the local batch engine, :mod:`cxr_deploy.batch.runner`, which
``pacs listen`` runs too; Ray Data, :mod:`cxr_deploy.batch.ray_stages`; the Python API,
:meth:`cxr_deploy.api.Model.predict`), so their rows cannot drift apart."""

from __future__ import annotations

from datetime import datetime, timezone

import numpy as np

from ..decision import decide


def run_threshold(bundle, threshold: float | None) -> float:
    """The decision threshold of a run: ``--threshold`` when given, else the bundle's."""
    return bundle.threshold if threshold is None else float(threshold)


def base_row(threshold: float, model_id: str, backend: str) -> dict:
    """The cells every row of a run shares."""
    return {"threshold": float(threshold), "model_id": model_id, "backend": backend}


def stamp() -> str:
    """``processed_at``: UTC, to the second."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def new_row(base: dict, path: str, status: str, error: str | None, columns: dict, processed_at: str) -> dict:
    """A row before scoring: the decode outcome and the image columns."""
    return dict(base, path=path, status=status, error=error, processed_at=processed_at, **columns)


def score_row(row: dict, probs: np.ndarray, positive: int, threshold: float, class_names) -> float | None:
    """Fill ``probability`` and ``predicted_label``; returns the probability, or None when the model's
    output is not finite (the row becomes an error: never a silent NaN "NORMAL")."""
    if not np.isfinite(probs).all():
        row.update(status="error", error="model returned a non-finite probability")
        return None
    p = float(probs[positive])
    row.update(probability=p, predicted_label=decide(probs, positive, threshold, class_names))
    return p
