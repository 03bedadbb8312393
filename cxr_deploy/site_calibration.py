"""Site calibration (``cxr-deploy calibrate``): what can be fitted on a new site's labelled images
without retraining, and the record a calibrated bundle keeps of it.

Fitted on the site's images, scored by the parent bundle exactly as ``batch`` scores them:

- the **temperature** (temperature scaling, NLL; :mod:`cxr_deploy.calibration`): the probabilities
  the artifacts output are then calibrated for this site. Margins are recovered from the parent's
  probabilities (``margin = T_parent * logit(p)``); dividing by a temperature never changes the
  ranking, so the parent's own operating points keep making the same decisions, re-expressed at the
  new temperature (:func:`rescale_threshold`);
- the **named operating points** by the training rules (:func:`cxr_deploy.operating_points.operating_points`:
  ``youden``, ``sens90/95/98``, ``spec90/95/98``), each with its local sensitivity and specificity,
  their Wilson 95 % intervals and the numbers of local positives and negatives behind them. A point
  whose targeted interval is wider than :data:`MAX_HALF_WIDTH` either side gets a warning that says
  how many images of that class would be needed.

Torch-free: it works on probabilities (the command scores through the runtime).
"""

from __future__ import annotations

import datetime as _dt
import hashlib

import numpy as np

from .calibration import MIN_IMAGES_TO_FIT, expected_calibration_error, fit_temperature, nll, sigmoid

SITE_PREFIX = "site:"  # --operating-point site:sens95 reads the calibrated bundle's site profile
MAX_HALF_WIDTH = 0.05  # a local sensitivity/specificity known to worse than ±0.05 gets a warning
RECOMMENDED_IMAGES = 300  # fewer labelled site images than this: a warning in every case
# float32 probabilities saturate: p = 1 - 6e-8 is the last step below 1 (logit 16.6)
_EPS = 1e-7


def margins_from_probabilities(probabilities, temperature: float) -> np.ndarray:
    """The logit margins (positive − other logit) behind probabilities an artifact output at
    ``temperature`` (two classes: ``p = sigmoid(margin / T)``)."""
    p = np.clip(np.asarray(probabilities, np.float64), _EPS, 1 - _EPS)
    return temperature * (np.log(p) - np.log1p(-p))


def rescale_threshold(threshold: float, old_temperature: float, new_temperature: float) -> float:
    """The threshold at ``new_temperature`` that makes the decisions ``threshold`` made at ``old_temperature``."""
    t = min(max(float(threshold), 0.0), 1.0)
    if t in (0.0, 1.0) or old_temperature == new_temperature:
        return t
    margin = margins_from_probabilities([t], old_temperature)[0]
    return float(sigmoid(margin / new_temperature))


def fit_site_temperature(labels, margins, parent_temperature: float) -> dict:
    """The temperature with the lower NLL on the site's images: the fitted one or the parent's."""
    y = np.asarray(labels, int)
    fitted = fit_temperature(y, margins)
    candidates = {"parent": float(parent_temperature), "site": float(fitted)}
    losses = {k: nll(y, margins, t) for k, t in candidates.items()}
    chosen = "site" if losses["site"] < losses["parent"] else "parent"
    record = {"parent": candidates["parent"], "fitted": candidates["site"], "used": candidates[chosen],
              "nll_parent": losses["parent"], "nll_used": losses[chosen],
              "ece_parent": expected_calibration_error(y, sigmoid(np.asarray(margins) / candidates["parent"])),
              "ece_used": expected_calibration_error(y, sigmoid(np.asarray(margins) / candidates[chosen]))}
    if len(y) < MIN_IMAGES_TO_FIT or y.min() == y.max():
        record["note"] = f"not fitted: fewer than {MIN_IMAGES_TO_FIT} images or one class; the parent's temperature is kept"
    elif chosen == "parent":
        record["note"] = "the parent's temperature fits these images at least as well; kept"
    return record


def wilson(successes: int, n: int) -> list[float] | None:
    from .reporting.report import wilson_interval  # the project's one Wilson interval

    return wilson_interval(successes, n)


def images_needed(proportion: float, half_width: float = MAX_HALF_WIDTH, start: int = 1) -> int:
    """The fewest images of one class for which a Wilson interval at ``proportion`` is at most
    ``half_width`` either side of it (a doubling search, then bisection)."""
    def narrow(n: int) -> bool:
        lo, hi = wilson(round(proportion * n), n)
        return hi - lo <= 2 * half_width

    hi = max(start, 1)
    while not narrow(hi):
        hi *= 2
    lo = hi // 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if narrow(mid) else (mid, hi)
    return hi


def point_figures(labels, scores, threshold: float) -> dict:
    """Local sensitivity and specificity at ``threshold`` with Wilson intervals and counts."""
    from .decision import positive_decisions

    y = np.asarray(labels, bool)
    called = positive_decisions(scores, threshold)
    tp, tn = int((called & y).sum()), int((~called & ~y).sum())
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    return {"threshold": float(threshold),
            "sensitivity": tp / n_pos if n_pos else None, "sensitivity_ci95": wilson(tp, n_pos),
            "specificity": tn / n_neg if n_neg else None, "specificity_ci95": wilson(tn, n_neg),
            "positives": n_pos, "negatives": n_neg}


def _point_warning(name: str, figures: dict) -> str | None:
    keys = {"sens": ("sensitivity", "positives"), "spec": ("specificity", "negatives")}
    targeted = [keys[name[:4]]] if name[:4] in keys else list(keys.values())
    for metric, count in targeted:
        ci, value = figures[f"{metric}_ci95"], figures[metric]
        if ci is None or value is None:
            return f"{SITE_PREFIX}{name}: no local {count}, so no local {metric}"
        if ci[1] - ci[0] > 2 * MAX_HALF_WIDTH:
            need = images_needed(value, start=figures[count])
            return (f"{SITE_PREFIX}{name}: local {metric} {value:.3f} (95% CI {ci[0]:.3f}-{ci[1]:.3f}) rests on "
                    f"{figures[count]} {count}, wider than ±{MAX_HALF_WIDTH:g}; about {need} {count} would narrow it "
                    "to that")
    return None


def fit_site(labels, probabilities, parent_temperature: float) -> dict:
    """Temperature, operating points (with figures and warnings) fitted on a site's labelled images."""
    from .operating_points import operating_points

    y = np.asarray(labels, int)
    margins = margins_from_probabilities(probabilities, parent_temperature)
    temperature = fit_site_temperature(y, margins, parent_temperature)
    scores = sigmoid(margins / temperature["used"])
    points, warnings = {}, []
    if len(np.unique(y)) < 2:
        warnings.append("the site's images hold one class only: no operating point can be chosen; only the "
                        "population reference is updated")
    for name, chosen in operating_points(y, scores).items():
        points[name] = point_figures(y, scores, chosen["threshold"])
        warning = _point_warning(name, points[name])
        if warning:
            warnings.append(warning)
            points[name]["warning"] = warning
    if len(y) < RECOMMENDED_IMAGES:
        warnings.insert(0, f"only {len(y)} labelled site images ({int(y.sum())} positive, {int((1 - y).sum())} "
                           f"negative); at least {RECOMMENDED_IMAGES} are recommended: the intervals below say how "
                           "little fewer can show, and the population alarm's reference is this set (with about 100 "
                           "images its false alarms were measured at 5-11%, docs/site-trust.md)")
    return {"temperature": temperature, "operating_points": points, "warnings": warnings,
            "images": int(len(y)), "positives": int(y.sum()), "negatives": int((1 - y).sum()),
            "scores": scores}


def parent_points_here(manifest, labels, probabilities) -> dict:
    """The parent's own stored points (chosen on its validation split) on the site's images."""
    points = dict((manifest.training or {}).get("operating_points") or {})
    points.setdefault("default", {"threshold": manifest.threshold})
    return {name: {**point_figures(labels, probabilities, p["threshold"]),
                   "validation_sensitivity": p.get("sensitivity"), "validation_specificity": p.get("specificity")}
            for name, p in points.items()}


def data_hash(items) -> str:
    """sha256 over the site set: each image's content sha256 and label, in sorted order (paths and
    row order do not matter; a changed pixel or label does)."""
    digest = hashlib.sha256()
    for line in sorted(f"{sha}\t{label}" for sha, label in items):
        digest.update(line.encode() + b"\n")
    return digest.hexdigest()


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")

