"""Metric report from a results CSV + labels: JSON, ROC/PR PNGs, one self-contained HTML page.

Every metric comes from scikit-learn. Only rows with status ``ok`` and a known label are scored;
the report states how many rows were left out and why (errors, skipped, unlabelled), because a
metric over "the files that happened to decode" can hide a systematic failure.

Confidence intervals (95 %), chosen so they never collapse to a point on small samples:

- sensitivity and specificity: **Wilson score** intervals (6 of 6 positives found gives
  0.61–1.00, not the 1.00–1.00 a bootstrap reports);
- ROC AUC: **DeLong**'s variance, and "not estimable" below :data:`AUC_CI_MIN_PER_CLASS` images in
  either class. With perfect separation DeLong's variance is 0, so the interval is the exact
  (Clopper–Pearson) one for ``k`` of ``k`` concordant pairs, ``k`` = the smaller class: that many
  disjoint (positive, negative) pairs are independent trials whose success rate is the AUC.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import io
import json
from collections import Counter
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from .. import __version__, atomic
from ..calibration import BINS
from ..decision import number_text, positive_decisions
from ..errors import CxrDeployError
from .report_dir import CURVES, HTML_HEAD, REPORT_HTML, REPORT_JSON, SOFTWARE

AUC_CI_MIN_PER_CLASS = 10
Z95 = 1.959963984540054


class NoMatch(CxrDeployError):
    """No results row is both ``ok`` and labelled: there is nothing to score."""


def collect(rows: Iterable[dict], labels, positive: str):
    """Join rows with labels. Returns (y_true, probability, y_pred, info) — only what metrics need."""
    y_true, prob, y_pred = [], [], []
    counts = Counter()
    thresholds, models, backends, points = set(), set(), set(), set()
    unlabelled_example = None
    for row in rows:
        counts["rows"] += 1
        status = row.get("status", "")
        if status != "ok":
            counts[status or "unknown"] += 1
            continue
        counts["ok"] += 1
        if row.get("in_population") == "no":  # cxr_deploy.in_population: scored, less reliable
            counts["outside_population"] += 1
        label = labels.lookup(row["path"])
        if label is None:
            counts["unlabelled"] += 1
            unlabelled_example = unlabelled_example or row["path"]
            continue
        y_true.append(label == positive)
        prob.append(float(row["probability"]))
        y_pred.append(row.get("predicted_label") == positive)
        thresholds.add(row.get("threshold", ""))
        models.add(row.get("model_id", ""))
        backends.add(row.get("backend", ""))
        points.add(row.get("operating_point") or "(not recorded)")  # results files before schema v3
    info = {"counts": dict(counts), "thresholds": sorted(thresholds), "operating_point": sorted(points),
            "model_ids": sorted(models), "backends": sorted(backends), "unlabelled_example": unlabelled_example}
    return np.array(y_true, bool), np.array(prob, float), np.array(y_pred, bool), info


def compute_metrics(y_true: np.ndarray, prob: np.ndarray, y_pred: np.ndarray) -> dict:
    from sklearn.metrics import (accuracy_score, average_precision_score, confusion_matrix, f1_score,
                                 precision_score, recall_score, roc_auc_score)

    y_true, y_pred = np.asarray(y_true, int), np.asarray(y_pred, int)
    n = len(y_true)
    if n == 0:
        return {"n": 0, "note": "no row is both ok and labelled: nothing to score"}
    tn, fp, fn, tp = (int(v) for v in confusion_matrix(y_true, y_pred, labels=[0, 1]).ravel())
    both = len(set(y_true.tolist())) == 2
    out = {
        "n": n,
        "n_positive": int(y_true.sum()),
        "n_negative": int(n - y_true.sum()),
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "precision": float(precision_score(y_true, y_pred, zero_division=0)),
        "recall_sensitivity": float(recall_score(y_true, y_pred, zero_division=0)),
        "specificity": float(recall_score(y_true, y_pred, pos_label=0, zero_division=0)),
        "f1": float(f1_score(y_true, y_pred, zero_division=0)),
        "roc_auc": float(roc_auc_score(y_true, prob)) if both else None,
        "average_precision": float(average_precision_score(y_true, prob)) if both else None,
        "confusion_matrix": {"tn": tn, "fp": fp, "fn": fn, "tp": tp},
    }
    if not both:
        out["note"] = "only one class among the labelled rows: ROC AUC and PR are undefined"
    out["ci95"] = confidence_intervals(y_true, prob, y_pred)
    from ..calibration import expected_calibration_error, reliability

    out["calibration"] = {"ece": expected_calibration_error(y_true, prob), "bins": reliability(y_true, prob),
                          "method": f"{BINS} equal-width bins of p(positive); ECE = image-weighted mean "
                                    "|observed positive rate - mean p|"}
    return out


def operating_point_table(points: dict, y_true, prob) -> dict:
    """Per named threshold: its validation figures (from training) and the sensitivity and
    specificity the same threshold gives on these labelled images."""
    y, p = np.asarray(y_true, bool), np.asarray(prob, float)
    table = {}
    for name, point in points.items():
        called = positive_decisions(p, point["threshold"])
        table[name] = {**point, "here_sensitivity": float(called[y].mean()) if y.any() else None,
                       "here_specificity": float((~called[~y]).mean()) if (~y).any() else None}
    return table


def wilson_interval(successes: int, n: int, z: float = Z95) -> list[float] | None:
    """Wilson score interval for a proportion (Wilson 1927; Newcombe 1998, method 3)."""
    if n <= 0:
        return None
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return [float(max(0.0, centre - half)), float(min(1.0, centre + half))]


def delong_auc(y_true: np.ndarray, prob: np.ndarray) -> tuple[float, float]:
    """ROC AUC and DeLong's variance (DeLong et al. 1988), in the midrank form of Sun & Xu (2014)."""
    from scipy.stats import rankdata

    y = np.asarray(y_true, bool)
    pos, neg = np.asarray(prob, float)[y], np.asarray(prob, float)[~y]
    m, n = len(pos), len(neg)
    tz = rankdata(np.concatenate([pos, neg]))
    v10 = (tz[:m] - rankdata(pos)) / n  # per positive: share of negatives scored below it (ties 1/2)
    v01 = 1.0 - (tz[m:] - rankdata(neg)) / m  # per negative: share of positives scored above it
    auc = float(v10.mean())
    variance = float(np.var(v10, ddof=1) / m + np.var(v01, ddof=1) / n) if m > 1 and n > 1 else float("nan")
    return auc, variance


def auc_interval(y_true: np.ndarray, prob: np.ndarray) -> list[float] | None:
    """95 % CI of the ROC AUC, or ``None`` (not estimable) below AUC_CI_MIN_PER_CLASS per class."""
    y = np.asarray(y_true, bool)
    smaller = int(min(y.sum(), (~y).sum()))
    if smaller < AUC_CI_MIN_PER_CLASS:
        return None
    auc, variance = delong_auc(y, prob)
    if variance > 0:
        half = Z95 * np.sqrt(variance)
        return [float(max(0.0, auc - half)), float(min(1.0, auc + half))]
    # Perfect separation: k of k independent disjoint pairs concordant -> Clopper-Pearson bound.
    from scipy.stats import beta

    bound = float(beta.ppf(0.025, smaller, 1))  # exact lower limit for k successes in k trials
    return [bound, 1.0] if auc >= 0.5 else [0.0, 1.0 - bound]


def confidence_intervals(y_true, prob, y_pred) -> dict:
    """95 % CIs for ROC AUC (DeLong), sensitivity and specificity (Wilson)."""
    y_true, y_pred = np.asarray(y_true, bool), np.asarray(y_pred, bool)
    positives, negatives = int(y_true.sum()), int((~y_true).sum())
    both = positives > 0 and negatives > 0
    return {
        "roc_auc": auc_interval(y_true, prob) if both else None,
        "recall_sensitivity": wilson_interval(int((y_pred & y_true).sum()), positives),
        "specificity": wilson_interval(int((~y_pred & ~y_true).sum()), negatives),
        "method": (f"Wilson score intervals for sensitivity and specificity; DeLong for ROC AUC, not estimable "
                   f"below {AUC_CI_MIN_PER_CLASS} images per class (exact binomial bound on disjoint pairs "
                   "when the classes are perfectly separated)"),
    }


def _curve_png(kind: str, y_true, prob, metrics: dict) -> bytes | None:
    if metrics.get("roc_auc") is None:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import precision_recall_curve, roc_curve

    fig, ax = plt.subplots(figsize=(4.5, 4.5), dpi=100)
    if kind == "calibration":
        bins = metrics["calibration"]["bins"]
        ax.plot([0, 1], [0, 1], ls="--", c="gray", lw=1, label="perfectly calibrated")
        ax.plot([b["mean_probability"] for b in bins], [b["observed_rate"] for b in bins], "o-", lw=2,
                label=f"ECE {metrics['calibration']['ece']:.3f}")
        ax.set_xlabel("mean predicted p(positive) in the bin")
        ax.set_ylabel("observed positive rate")
        ax.set_title("Reliability diagram")
    elif kind == "roc":
        fpr, tpr, _ = roc_curve(y_true, prob)
        ax.plot(fpr, tpr, lw=2, label=f"AUC {metrics['roc_auc']:.3f}")
        ax.plot([0, 1], [0, 1], ls="--", c="gray", lw=1)
        ax.set_xlabel("1 - specificity (false positive rate)")
        ax.set_ylabel("sensitivity (true positive rate)")
        ax.set_title("ROC curve")
    else:
        precision, recall, _ = precision_recall_curve(y_true, prob)
        ax.plot(recall, precision, lw=2, label=f"AP {metrics['average_precision']:.3f}")
        ax.axhline(y_true.mean(), ls="--", c="gray", lw=1, label="prevalence")
        ax.set_xlabel("recall (sensitivity)")
        ax.set_ylabel("precision (PPV)")
        ax.set_title("Precision-recall curve")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left" if kind == "pr" else "lower right")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": f"{SOFTWARE} {__version__}"})
    plt.close(fig)
    return buf.getvalue()


def build_report(rows: Iterable[dict], labels, *, class_names: Sequence[str], positive: str,
                 results_path: str = "", out_dir: str | Path, operating_points: dict | None = None,
                 population: dict | None = None) -> dict:
    """Score ``rows`` against ``labels``; write report.json, report.html, roc.png, pr.png into
    ``out_dir``; return the report dict (with ``files``). ``operating_points``: the bundle's named
    thresholds (chosen on validation at training), shown with what they give on these images."""
    y_true, prob, y_pred, info = collect(rows, labels, positive)
    if len(y_true) == 0:
        c = info["counts"]
        examples = []
        if info["unlabelled_example"]:
            examples.append(f"row {info['unlabelled_example']} has no label")
        label_example = labels.unmatched_example() if hasattr(labels, "unmatched_example") else None
        if label_example:
            examples.append(f"label {label_example} matched no row")
        n_labels = len(labels) if len(labels) else "folder-name"
        raise NoMatch(f"no results row matched a label: {c.get('rows', 0)} rows read ({c.get('ok', 0)} ok), "
                      f"{n_labels} labels read, 0 matched" + ("; e.g. " + "; ".join(examples) if examples else ""))
    metrics = compute_metrics(y_true, prob, y_pred)
    if operating_points:
        metrics["operating_points"] = operating_point_table(operating_points, y_true, prob)
    report = {
        "results": str(results_path),
        "labels": getattr(labels, "source", ""),
        "positive_class": positive,
        "class_names": list(class_names),
        "generated": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "cxr_deploy_version": __version__,
        **info,
        "metrics": metrics,
    }
    report.pop("unlabelled_example", None)
    if population:  # the population-shift check (cxr_deploy.population)
        report["population"] = population
    out_dir = Path(out_dir)
    from ..locks import hold

    with hold(out_dir, what=f"report folder {out_dir}"):  # one writer per report folder
        return _write_report(report, out_dir, y_true, prob, metrics)


def _write_report(report: dict, out_dir: Path, y_true, prob, metrics: dict) -> dict:
    out_dir.mkdir(exist_ok=True)
    files = {}
    images = {}
    for kind in CURVES:
        png = _curve_png(kind, y_true, prob, metrics)
        if png:
            atomic.write_bytes(out_dir / f"{kind}.png", png)
            files[kind] = str(out_dir / f"{kind}.png")
            images[kind] = png
    files["json"] = str(out_dir / REPORT_JSON)
    files["html"] = str(out_dir / REPORT_HTML)
    report["files"] = files
    atomic.write_text(out_dir / REPORT_JSON, json.dumps(report, indent=2) + "\n")
    atomic.write_text(out_dir / REPORT_HTML, _html(report, images))
    return report


def _fmt(value, ci=None, estimable: bool = True) -> str:
    if value is None:
        return "n/a"
    text = f"{value:.3f}"
    if ci:
        text += f" <span class=ci>(95% CI {ci[0]:.3f}–{ci[1]:.3f})</span>"
    elif not estimable:
        text += f" <span class=ci>(95% CI not estimable: fewer than {AUC_CI_MIN_PER_CLASS} images per class)</span>"
    return text


def outside_population_line(counts: dict) -> str:
    """The caveat a report carries when some scored images are outside the training population."""
    return (f"{counts['outside_population']} of {counts.get('ok', 0)} scored images are outside the model's "
            "training population (in_population = no in the results; why: population_reason): their results "
            "are less reliable. They are included in the metrics below.")


def _html(report: dict, images: dict[str, bytes]) -> str:
    m = report["metrics"]
    e = html.escape
    c = report["counts"]
    left_out = ", ".join(f"{c.get(k, 0)} {k}" for k in ("error", "skipped", "unlabelled") if c.get(k))
    parts = [
        HTML_HEAD + "<style>",
        "body{font-family:system-ui,sans-serif;margin:2em;max-width:980px;color:#222}",
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:.3em .7em;text-align:right}",
        "th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}.ci{color:#666;font-size:.9em}",
        ".warn{background:#fff3cd;padding:.6em;border:1px solid #e0c36c}img{margin-right:1em}</style></head><body>",
        "<h1>cxr-deploy metric report</h1>",
        f"<p>Results <code>{e(report['results'])}</code>; labels from {e(report['labels'])}; positive class "
        f"<b>{e(report['positive_class'])}</b>; model {e(', '.join(report['model_ids']) or '-')}; backend "
        f"{e(', '.join(report['backends']) or '-')}; threshold {e(', '.join(report['thresholds']) or '-')} "
        f"(operating point {e(', '.join(report['operating_point']) or '-')}); "
        f"generated {e(report['generated'])} by cxr-deploy {e(report['cxr_deploy_version'])}.</p>",
        f"<p>{c.get('rows', 0)} rows, {m.get('n', 0)} scored"
        + (f"; left out: {e(left_out)}" if left_out else "") + ".</p>",
    ]
    if len(report["model_ids"]) > 1 or len(report["thresholds"]) > 1:
        parts.append("<p class=warn>These results mix several models or thresholds.</p>")
    if m.get("note"):
        parts.append(f"<p class=warn>{e(m['note'])}</p>")
    if c.get("outside_population"):
        parts.append(f"<p class=warn>{e(outside_population_line(c))}</p>")
    if m.get("n"):
        ci = m["ci95"]
        rows = [("Accuracy", _fmt(m["accuracy"])), ("Sensitivity (recall)", _fmt(m["recall_sensitivity"], ci["recall_sensitivity"])),
                ("Specificity", _fmt(m["specificity"], ci["specificity"])), ("Precision (PPV)", _fmt(m["precision"])),
                ("F1", _fmt(m["f1"])), ("ROC AUC", _fmt(m["roc_auc"], ci["roc_auc"], estimable=False)),
                ("Average precision", _fmt(m["average_precision"])),
                (f"Calibration error (ECE, {BINS} bins)", _fmt(m["calibration"]["ece"]))]
        parts.append("<h2>Metrics</h2><table><tr><th>metric</th><th>value</th></tr>")
        parts += [f"<tr><td>{name}</td><td>{value}</td></tr>" for name, value in rows]
        parts.append(f"</table><p class=ci>CIs: {e(ci['method'])}.</p>")
        cm = m["confusion_matrix"]
        pos = e(report["positive_class"])
        neg = e(", ".join(n for n in report["class_names"] if n != report["positive_class"]))
        parts.append("<h2>Confusion matrix</h2><table><tr><th>true \\ predicted</th>"
                     f"<th>{neg}</th><th>{pos}</th></tr>"
                     f"<tr><td>{neg} ({m['n_negative']})</td><td>{cm['tn']}</td><td>{cm['fp']}</td></tr>"
                     f"<tr><td>{pos} ({m['n_positive']})</td><td>{cm['fn']}</td><td>{cm['tp']}</td></tr></table>")
    if report.get("population"):  # cxr_deploy.population's check, with the lines it says
        css = " class=warn" if report["population"].get("status") == "differs" else ""
        parts.append("<h2>Population</h2>" + "".join(f"<p{css}>{e(line)}</p>" for line in report["population"]["lines"]))
    if m.get("operating_points"):
        parts.append("<h2>Operating points</h2><p class=ci>Thresholds chosen on the validation split at "
                     "training (<code>batch --operating-point NAME</code>), with what each gives on these images."
                     "</p><table><tr><th>name</th><th>threshold</th><th>validation sensitivity</th><th>validation "
                     "specificity</th><th>sensitivity here</th><th>specificity here</th></tr>")
        for name, row in m["operating_points"].items():
            cells = [e(number_text(row["threshold"]))] + [_fmt(row.get(k)) for k in ("sensitivity", "specificity",
                                                                             "here_sensitivity", "here_specificity")]
            parts.append(f"<tr><td>{e(name)}</td>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
        parts.append("</table>")
    if images:
        parts.append("<h2>Curves</h2><p>")
        for kind, png in images.items():
            data = base64.b64encode(png).decode()
            parts.append(f"<img alt='{kind} curve' src='data:image/png;base64,{data}'>")
        parts.append("</p>")
    parts.append("<p class=ci>Decision support only. Metrics on a local sample are not a clinical validation.</p>"
                 "</body></html>\n")
    return "\n".join(parts)
