"""Population-shift alarm: does a run's population look like the one the model was validated on?

At training the bundle stores a **reference** (artifact ``population.json``, sha256-verified like
every artifact): the positive-class probabilities the model gave its validation images. ``cxr-deploy
calibrate`` replaces it with the site's own images, scored at the site temperature.

A run (``batch``, ``evaluate --model``, the listener's metrics, :func:`check_scores` from Python)
is compared with it by two tests, each at ``ALPHA / 2`` (Bonferroni: at most ``ALPHA`` = 5 % false
alarms for the pair on a population that does not differ):

- the **score distribution**: two-sample Kolmogorov–Smirnov test of the run's probabilities
  against the reference's (``scipy.stats.ks_2samp``);
- the **predicted-positive rate** at the run's threshold: Fisher's exact test of the run's
  positives/negatives against the reference's at the same threshold; the run's rate is reported
  with its Wilson 95 % interval.

Runs of fewer than :data:`MIN_IMAGES` scored images are not tested (too little to tell a shift from
chance; the result says so). The false-alarm rate was measured on batches of held-out patients
(``benchmarks/site_trust.py``): see docs/site-trust.md for the batch sizes it holds for.
Image statistics are not part of the test: the results CSV holds only what the model output.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np


REFERENCE_NAME = "population.json"
FORMAT = "cxr-deploy-population"
ALPHA = 0.05
MIN_IMAGES = 30
MIN_REFERENCE = 50
ADVICE = "re-check the operating point with `cxr-deploy calibrate`"


def build_reference(scores, *, source: str, temperature: float) -> dict:
    """The reference record for these positive-class probabilities."""
    s = np.sort(np.asarray(scores, np.float64))
    if len(s) < MIN_REFERENCE or not np.isfinite(s).all():
        raise ValueError(f"a population reference needs at least {MIN_REFERENCE} finite scores, got {len(s)}")
    return {"format": FORMAT, "version": 1, "source": source, "images": int(len(s)), "temperature": float(temperature),
            "test": {"scores": "two-sample Kolmogorov-Smirnov", "positive_rate": "Fisher exact",
                     "alpha": ALPHA, "per_test_alpha": ALPHA / 2, "min_images": MIN_IMAGES},
            "scores": [float(v) for v in s]}


def write_reference(bundle, scores, *, source: str) -> dict:
    """Write (or replace) the bundle's reference, registered with its sha256 in the manifest."""
    from . import atomic

    record = build_reference(scores, source=source, temperature=bundle.manifest.temperature)
    atomic.write_json(Path(bundle.directory) / REFERENCE_NAME, record)
    bundle.add_artifact(REFERENCE_NAME, kind="population_reference", images=record["images"])
    return record


def load_reference(bundle) -> dict | None:
    """The bundle's reference (verified), or ``None`` for a bundle written before references."""
    if not bundle.has(REFERENCE_NAME):
        return None
    return json.loads(bundle.verified_path(REFERENCE_NAME).read_text())


@dataclass(frozen=True)
class PopulationCheck:
    status: str  # "same", "differs", "too_few", "no_reference"
    record: dict

    @property
    def differs(self) -> bool:
        return self.status == "differs"

    def lines(self) -> list[str]:
        return describe(self.record)


def compare(reference: dict, scores, threshold: float, alpha: float = ALPHA) -> dict:
    """The two tests of this run's ``scores`` against ``reference`` at ``threshold``."""
    from scipy.stats import fisher_exact, ks_2samp

    from .decision import positive_decisions
    from .site_calibration import wilson

    s = np.asarray([v for v in scores if v is not None and np.isfinite(v)], np.float64)
    ref = np.asarray(reference["scores"], np.float64)
    n, n_ref = len(s), len(ref)
    record = {"images": n, "reference_images": n_ref, "reference_source": reference.get("source"),
              "threshold": float(threshold), "alpha": alpha, "min_images": MIN_IMAGES}
    if n < MIN_IMAGES:
        return {**record, "status": "too_few"}
    pos, ref_pos = int(positive_decisions(s, threshold).sum()), int(positive_decisions(ref, threshold).sum())
    ks = ks_2samp(s, ref)
    fisher = fisher_exact([[pos, n - pos], [ref_pos, n_ref - ref_pos]]).pvalue
    differs = bool(ks.pvalue < alpha / 2 or fisher < alpha / 2)
    return {**record, "status": "differs" if differs else "same",
            "ks_statistic": float(ks.statistic), "ks_pvalue": float(ks.pvalue),
            "positive_rate": pos / n, "positive_rate_ci95": wilson(pos, n),
            "reference_positive_rate": ref_pos / n_ref, "fisher_pvalue": float(fisher),
            "median_score": float(np.median(s)), "reference_median_score": float(np.median(ref))}


def check_scores(bundle, scores, threshold: float | None = None) -> PopulationCheck:
    """Compare a run's positive-class probabilities with ``bundle``'s reference (Python API)."""
    reference = load_reference(bundle)
    t = bundle.threshold if threshold is None else float(threshold)
    record = {"status": "no_reference", "threshold": t} if reference is None else compare(reference, scores, t)
    record["lines"] = describe(record)  # what the terminal and the report say
    return PopulationCheck(record["status"], record)


def check_rows(bundle, rows: Iterable[dict], threshold: float | None = None) -> PopulationCheck:
    """:func:`check_scores` over results rows (CSV rows or API records): the ``ok`` rows' probabilities."""
    scores = []
    for row in rows:
        if row.get("model_id") not in (None, "", bundle.model_id):  # a resumed CSV of another model
            continue
        if row.get("status") == "ok" and row.get("probability") not in (None, ""):
            scores.append(float(row["probability"]))
            if threshold is None and row.get("threshold") not in (None, ""):
                threshold = float(row["threshold"])
    return check_scores(bundle, scores, threshold)


def describe(record: dict) -> list[str]:
    """What the terminal and the report say about a check."""
    status = record.get("status")
    if status == "no_reference":
        return ["population: this bundle has no population reference (trained before references existed); "
                "`cxr-deploy calibrate --reference-only` adds one"]
    if status == "too_few":
        return [f"population: {record['images']} scored images, fewer than {record['min_images']}: not compared "
                "with the model's reference population"]
    ci = record["positive_rate_ci95"]
    source = str(record.get("reference_source") or "")
    what = "validation population" if source.startswith("validation") else "reference population"
    facts = (f"scores KS D={record['ks_statistic']:.3f} p={record['ks_pvalue']:.2g}; positive rate "
             f"{record['positive_rate']:.3f} (95% CI {ci[0]:.3f}-{ci[1]:.3f}) vs {record['reference_positive_rate']:.3f}, "
             f"Fisher p={record['fisher_pvalue']:.2g}; {record['images']} images vs {record['reference_images']} "
             f"({record['reference_source']}); each test at {record['alpha'] / 2:g}")
    if status == "differs":
        return [f"WARNING: this population differs from the model's {what} ({facts}); {ADVICE}"]
    return [f"population: no shift detected from the model's {what} ({facts})"]


def announce_run(bundle, results_path, threshold: float) -> dict | None:
    """After a ``batch`` run: check its results CSV, say the outcome on the terminal; the record
    (for the report), ``None`` when the check itself could not be made."""
    import click

    from .batch.results_file import iter_results

    try:
        check = check_rows(bundle, iter_results(results_path), threshold)
    except Exception as exc:  # noqa: BLE001 - the check must never cost a finished run its exit code
        click.echo(f"population: not checked ({type(exc).__name__}: {exc})", err=True)
        return None
    for line in check.lines():
        click.echo(line, err=True)
    return check.record


def spool_check(config, target: Path, log, bundle=None) -> dict | None:
    """The listener's metric after each scoring pass: every image its spool's results CSV holds
    (this model's rows), compared with the reference; logged (a warning when it differs) and
    written to ``target`` (``SPOOL/population.json``) for monitoring. ``bundle``: the one the pass
    scored with (else ``config.model`` is loaded and verified again)."""
    from . import atomic
    from .batch.results_file import iter_results
    from .batch.rows import run_decision
    from .bundle import ModelBundle

    try:
        bundle = bundle or ModelBundle.load(config.model)
        check = check_rows(bundle, iter_results(config.out), run_decision(bundle, config).threshold)
        atomic.write_json(Path(target), check.record)
    except Exception as exc:  # noqa: BLE001 - a metric must never stop the listener
        log.warning("population: not checked (%s: %s)", type(exc).__name__, exc)
        return None
    for line in check.lines():
        (log.warning if check.differs else log.info)(line)
    return check.record
