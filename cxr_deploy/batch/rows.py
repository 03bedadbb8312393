"""One results row from a decoded file and the model's output: the one place where rows are made,
for every path that scores images (the local batch engine, :mod:`cxr_deploy.batch.runner`, which
``pacs listen`` runs too; Ray Data, :mod:`cxr_deploy.batch.ray_stages`; the Python API,
:meth:`cxr_deploy.api.Model.predict`), so their rows cannot drift apart."""

from __future__ import annotations

from datetime import datetime, timezone

import numpy as np

from ..decision import decide
from ..run_settings import Decision


def run_decision(bundle, config) -> Decision:
    """The threshold a batch run decides with (and its operating point), from its config's
    ``threshold`` / ``operating_point`` and the bundle (:mod:`cxr_deploy.run_settings`); raises
    :class:`~cxr_deploy.batch.inputs.BatchUsageError` with one line."""
    from ..run_settings import RunSettings, RunSettingsError, resolve_decision
    from .inputs import BatchUsageError

    try:
        return resolve_decision(bundle.manifest, RunSettings(threshold=config.threshold,
                                                             operating_point=config.operating_point))
    except RunSettingsError as exc:
        raise BatchUsageError(str(exc)) from None


def base_row(decision: Decision, model_id: str, backend: str) -> dict:
    """The cells every row of a run shares."""
    return {"threshold": float(decision.threshold), "operating_point": decision.operating_point,
            "model_id": model_id, "backend": backend}


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


def population_cells(row: dict, score, population) -> None:
    """Fill ``population_score``, ``in_population`` and ``population_reason`` of a scored row from the
    graph's score (``None``: a graph without it) and the row's DICOM age, judged by the bundle's
    :class:`~cxr_deploy.in_population.PopulationModel` (``None``: a bundle without statistics; nothing
    is judged)."""
    from ..in_population import judge
    from .results_file import AGE_KEY

    if row.get("status") != "ok":
        return
    value = float(score) if score is not None and np.isfinite(score) else None
    threshold = population.threshold if population is not None and value is not None else None
    age_range = population.age_range if population is not None else None
    verdict, reason = judge(value, row.get(AGE_KEY), threshold, age_range)
    row.update(population_score=None if value is None else round(value, 4), in_population=verdict or None,
               population_reason=reason or None)
