"""Per-image out-of-population flag: is this film like the ones the model was trained on?

The population-shift alarm (:mod:`cxr_deploy.population`) judges a whole run; this judges each
image, with two independent checks:

- **features**: every exported graph has a third output, ``population_score``: the Mahalanobis
  distance of the image's pooled ``layer3`` and ``layer4`` features (:data:`FEATURE`) from the
  nearest class mean of the training images, under one covariance shared by the classes (within
  its 256 leading principal components), all fitted at training on the training split. Computed inside the graph,
  so TorchScript, ONNX, fp16 and INT8 give it alike and the parity gate compares it. An image scoring
  above the bundle's threshold (a quantile of the validation split's scores) is outside;
- **age**: where the DICOM header gives the patient's age (``PatientAge``, else ``StudyDate`` minus
  ``PatientBirthDate``) and the bundle knows its training data's age range (Kermany: children aged
  1-5, ``age_range`` at training), an age outside that range is outside too. Unknown age: not judged.

An image outside is still scored: the CSV says ``in_population`` = ``no`` and why
(``population_reason``), and overlays, structured reports and the run report carry the caveat.

The statistics are the artifact :data:`STATS_NAME` (numpy ``.npz``, sha256-verified like every
artifact); its manifest entry holds the threshold, how it was chosen, and the age range. Bundles
written before it still load and run: no score, the columns stay empty and nothing is flagged.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .artifacts import POPULATION_OUTPUT as SCORE_OUTPUT  # the graph output's name
from .artifacts import WEIGHTS as WEIGHTS_NAME
from .errors import BundleError

STATS_NAME = "population_features.npz"
KIND = "population_features"
# Features the distance is measured on. Measured on the docs/site-trust.md model (AUROC, adult films
# vs held-out pediatric ones, 256 principal components): layer3 and layer4 together 0.971 (4.3 % of
# held-out films flagged), layer4 alone 0.952 (6.6 %); with all dimensions 0.988 against 0.960
# (see training/population_fit.py for why not all).
FEATURE = "global average pools of layer3 and layer4, concatenated (3072 values)"
YES, NO = "yes", "no"


@dataclass(frozen=True)
class PopulationModel:
    """What the graph needs (``centres``, ``whiten``) and what the rows need (threshold, ages).

    ``whiten``: ``(D, k)``: the k leading principal axes of the shared covariance, each divided by
    its standard deviation, so the squared Mahalanobis distance (within those axes) of ``f`` from
    centre ``m`` is ``|(f - m) @ whiten|^2``."""

    centres: np.ndarray  # (C, D) float32: class means of the training features
    whiten: np.ndarray  # (D, k) float32
    threshold: float
    age_range: tuple[float, float] | None  # years, inclusive; None: not known
    info: dict  # the manifest entry

    def judge(self, score: float | None, age_years: float | None) -> tuple[str, str]:
        """(``in_population``, ``population_reason``) for one scored image."""
        return judge(score, age_years, self.threshold, self.age_range)


def judge(score: float | None, age_years: float | None, threshold: float | None,
          age_range: tuple[float, float] | None) -> tuple[str, str]:
    """``("yes", "")``, ``("no", why)`` or ``("", "")`` when nothing could be judged."""
    reasons = []
    if score is not None and threshold is not None and score > threshold:
        reasons.append(f"image unlike the training population (score {score:.2f} > {threshold:.2f})")
    if age_years is not None and age_range is not None and not age_range[0] <= age_years <= age_range[1]:
        reasons.append(f"patient age {format_years(age_years)} outside the training ages {format_range(age_range)}")
    if reasons:
        return NO, "; ".join(reasons)
    judged = (score is not None and threshold is not None) or (age_years is not None and age_range is not None)
    return (YES, "") if judged else ("", "")


def format_years(value: float) -> str:
    """``45 y``, ``1.5 y``, ``8 months``: whole years from 2 on, as a radiology request says them."""
    if value >= 2 or value == 0:
        return f"{int(value)} y"
    return f"{round(value, 1):g} y" if value >= 1 else f"{round(value * 12):d} months"


def format_range(ages: tuple[float, float]) -> str:
    return f"{ages[0]:g}-{ages[1]:g} y"


def caveat(reason: str) -> str:
    """The one line overlays, SR and reports carry for an image outside the population."""
    return f"Outside the model's training population ({reason}): the result is less reliable."


def row_caveat(row: dict) -> str:
    """The caveat of a results row (``""`` unless ``in_population`` is ``no``)."""
    return caveat(row.get("population_reason") or "?") if row.get("in_population") == NO else ""


def parse_age_range(text) -> tuple[float, float] | None:
    """``"1-5"`` / ``[1, 5]`` (years) -> ``(1.0, 5.0)``; ``None``/``""`` -> ``None``; ValueError otherwise."""
    if text is None or text == "" or text == []:
        return None
    try:
        low, high = (text.split("-") if isinstance(text, str) else text)
        low, high = float(low), float(high)
    except (TypeError, ValueError):
        raise ValueError(f"age range {text!r}: expected LOW-HIGH in years, e.g. 1-5") from None
    if not 0 <= low <= high < 150:
        raise ValueError(f"age range {text!r}: expected 0 <= LOW <= HIGH < 150 (years)")
    return low, high


_AGE_UNITS = {"D": 1 / 365.25, "W": 7 / 365.25, "M": 1 / 12, "Y": 1.0}


def age_years(patient_age: str | None, study_date: str | None = None, birth_date: str | None = None) -> float | None:
    """The patient's age in years from DICOM ``PatientAge`` (``"045Y"``, ``"018M"``, ``"003W"``,
    ``"010D"``), else ``StudyDate - PatientBirthDate`` (``YYYYMMDD``); ``None`` when neither gives one.
    Only the age leaves the reader, never the birth date."""
    text = (patient_age or "").strip().upper()
    if len(text) >= 2 and text[:-1].isdigit() and text[-1] in _AGE_UNITS:
        return round(int(text[:-1]) * _AGE_UNITS[text[-1]], 3)
    import datetime as dt

    try:
        study = dt.datetime.strptime((study_date or "").strip()[:8], "%Y%m%d").date()
        birth = dt.datetime.strptime((birth_date or "").strip()[:8], "%Y%m%d").date()
    except ValueError:
        return None
    days = (study - birth).days
    return round(days / 365.25, 3) if 0 <= days < 150 * 366 else None


# -- the artifact ----------------------------------------------------------------------------------

def stats_bytes(centres: np.ndarray, whiten: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, centres=np.asarray(centres, np.float32), whiten=np.asarray(whiten, np.float32))
    return buffer.getvalue()


def write(bundle, centres: np.ndarray, whiten: np.ndarray, *, threshold: float, record: dict) -> None:
    """Write (or replace) the statistics into ``bundle``, registered with their sha256; ``record``
    (how they were fitted, the age range) goes into the manifest entry."""
    from . import atomic

    atomic.write_bytes(Path(bundle.directory) / STATS_NAME, stats_bytes(centres, whiten))
    bundle.add_artifact(STATS_NAME, kind=KIND, feature=FEATURE, threshold=float(threshold),
                        weights_sha256=bundle.manifest.artifacts[WEIGHTS_NAME]["sha256"], **record)


def copy(parent, bundle) -> bool:
    """Give ``bundle`` (same weights, e.g. a site calibration) the parent's statistics; False if none."""
    model = load(parent)
    if model is None:
        return False
    info = {k: v for k, v in model.info.items() if k not in ("sha256", "bytes", "kind", "feature", "threshold",
                                                             "weights_sha256")}
    write(bundle, model.centres, model.whiten, threshold=model.threshold, record=info)
    return True


def load(bundle) -> PopulationModel | None:
    """The bundle's statistics (verified), or ``None`` for a bundle without them."""

    if not bundle.has(STATS_NAME):
        return None
    info = bundle.manifest.artifacts[STATS_NAME]
    path = bundle.verified_path(STATS_NAME)
    if info.get("weights_sha256") != bundle.manifest.artifacts[WEIGHTS_NAME]["sha256"]:
        raise BundleError(f"{path} was fitted on other weights than this bundle's; fit it again")
    try:
        with np.load(path) as data:
            centres, whiten = data["centres"].astype(np.float32), data["whiten"].astype(np.float32)
        age = parse_age_range(info.get("age_range"))
        threshold = float(info["threshold"])
    except (OSError, KeyError, ValueError, TypeError) as exc:
        raise BundleError(f"cannot read {path}: {type(exc).__name__}: {exc}") from None
    if centres.ndim != 2 or whiten.ndim != 2 or whiten.shape[0] != centres.shape[1]:
        raise BundleError(f"{path}: centres {centres.shape} and whitening {whiten.shape} do not fit")
    return PopulationModel(centres, whiten, threshold, age, dict(info))


def threshold_of(bundle) -> float | None:
    """The bundle's population threshold, or ``None`` without statistics (what the gates compare at)."""
    model = load(bundle)
    return None if model is None else model.threshold


def describe(bundle) -> list[str]:
    """What ``inspect`` says about the bundle's flag: its statistics, and graphs that lack the score."""
    from .artifacts import MODEL_ARTIFACTS

    try:
        model = load(bundle)
    except BundleError as exc:
        return [f"out-of-population flag: unusable ({exc})"]
    if model is None:
        return ["out-of-population flag: none (a bundle made before it: population_score and in_population "
                "stay empty, nothing is flagged)"]
    info = model.info
    ages = (f"training ages {format_range(model.age_range)}" if model.age_range else "training ages unknown (no age check)")
    lines = [f"out-of-population flag: threshold {model.threshold:.4g} ({info.get('threshold_rule', '?')}), "
             f"fitted on {info.get('train_images', '?')} training images; {ages}"]
    for name in MODEL_ARTIFACTS:
        entry = bundle.manifest.artifacts.get(name)
        if entry is not None and SCORE_OUTPUT not in (entry.get("output_names") or ()):
            lines.append(f"WARNING: {name} was exported before the statistics and gives no population_score; "
                         "run `cxr-deploy export` again")
    return lines
