"""The rows ``evaluate`` scores together: each image once, one model, one threshold.

``evaluate a.csv b.csv`` over two files that score the same 624 images reported "1248 labelled
images" with a CI too narrow by a factor of about 1.4, and over files of different thresholds it
pooled their sensitivities into a figure that belongs to no threshold. Such input is refused with
one line (exit 2), or de-duplicated on request (``--dedupe``).
"""

from __future__ import annotations

from collections import Counter
from typing import Iterable

from ..decision import number_text
from ..errors import CxrDeployError


class MixedResults(CxrDeployError):
    """The rows to score count an image twice, or mix models or thresholds: one pooled figure
    would be wrong (twice the images and a narrower CI; sensitivities of different thresholds)."""


# Rows of one evaluation share these; a second value means another model or decision rule.
SAME_RUN_COLUMNS = (("model_id", "models"), ("threshold", "thresholds"))


def one_scoring(sources: Iterable[tuple[str, Iterable[dict]]], *, dedupe: bool = False) -> list[dict]:
    """The rows of several results files (``(name, rows)``) as one evaluation set: each image once,
    one model, one threshold. Raises :class:`MixedResults` with a one-line reason. ``dedupe``: an
    image scored in several rows keeps its last one (the files' order: a rerun given last wins)."""
    rows: dict[str, dict] = {}
    where: dict[str, str] = {}
    repeated, example = 0, None
    for name, source in sources:
        for row in source:
            path = row.get("path", "")
            if path in rows:
                repeated += 1
                example = example or f"{path} in {where[path]} and {name}"
            rows[path], where[path] = row, name
    if repeated and not dedupe:
        raise MixedResults(f"{repeated} rows score an image that another row already scores (e.g. {example}): "
                           "each image must count once; give each file once, or add --dedupe to keep each "
                           "image's last row")
    scored = [r for r in rows.values() if r.get("status") == "ok"]
    for column, what in SAME_RUN_COLUMNS:
        # an empty cell (a hand-made row) names no model or threshold: nothing to mix up
        counts = Counter(_same_value(r[column]) for r in scored if r.get(column))
        if len(counts) > 1:
            listed = ", ".join(f"{value or '(none)'} ({n} rows)" for value, n in sorted(counts.items()))
            raise MixedResults(f"the results mix {len(counts)} {what}: {listed}; evaluate the rows of one model and "
                               "one threshold at a time")
    return list(rows.values())


def _same_value(cell: str) -> str:
    """A threshold cell as a number (``0.5`` and ``0.500000`` are the same threshold)."""
    try:
        return number_text(float(cell))
    except (TypeError, ValueError):
        return cell
