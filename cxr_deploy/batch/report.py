"""Metric report from a results CSV + labels: JSON, ROC/PR PNGs, one self-contained HTML page.

Every metric comes from scikit-learn. Only rows with status ``ok`` and a known label are scored;
the report states how many rows were left out and why (errors, skipped, unlabelled), because a
metric over "the files that happened to decode" can hide a systematic failure.

Confidence intervals: 95 % percentile bootstrap over images (``BOOTSTRAP_ROUNDS`` resamples, fixed
seed, so two runs on the same CSV give the same numbers).
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

from .. import __version__

BOOTSTRAP_ROUNDS = 1000
BOOTSTRAP_SEED = 0


def collect(rows: Iterable[dict], labels, positive: str):
    """Join rows with labels. Returns (y_true, probability, y_pred, info) — only what metrics need."""
    y_true, prob, y_pred = [], [], []
    counts = Counter()
    thresholds, models, backends = set(), set(), set()
    for row in rows:
        counts["rows"] += 1
        status = row.get("status", "")
        if status != "ok":
            counts[status or "unknown"] += 1
            continue
        counts["ok"] += 1
        label = labels.lookup(row["path"])
        if label is None:
            counts["unlabelled"] += 1
            continue
        y_true.append(label == positive)
        prob.append(float(row["probability"]))
        y_pred.append(row.get("predicted_label") == positive)
        thresholds.add(row.get("threshold", ""))
        models.add(row.get("model_id", ""))
        backends.add(row.get("backend", ""))
    info = {"counts": dict(counts), "thresholds": sorted(thresholds), "model_ids": sorted(models),
            "backends": sorted(backends)}
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
    out["ci95"] = bootstrap_ci(y_true, prob, y_pred)
    return out


def bootstrap_ci(y_true, prob, y_pred, rounds: int = BOOTSTRAP_ROUNDS, seed: int = BOOTSTRAP_SEED) -> dict:
    """95 % percentile bootstrap CIs for ROC AUC, sensitivity and specificity."""
    from scipy.stats import rankdata

    rng = np.random.default_rng(seed)
    n = len(y_true)
    aucs, sens, spec = [], [], []
    for _ in range(rounds):
        idx = rng.integers(0, n, n)
        t, p, d = y_true[idx], prob[idx], y_pred[idx]
        if t.min() != t.max():
            # Mann-Whitney form of the ROC AUC (midranks for ties): identical to sklearn's
            # roc_auc_score, without its per-call input validation x 1000.
            ranks = rankdata(p)
            n_pos = int(t.sum())
            aucs.append((ranks[t.astype(bool)].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * (n - n_pos)))
        # sensitivity/specificity are plain proportions: numpy is 100x faster than re-validating
        # inputs in sklearn 2000 times, and the point estimates above come from sklearn.
        if t.any():
            sens.append(d[t == 1].mean())
        if not t.all():
            spec.append(1.0 - d[t == 0].mean())

    def interval(values):
        if len(values) < rounds // 2:  # too few resamples with both classes to say anything
            return None
        lo, hi = np.percentile(values, [2.5, 97.5])
        return [float(lo), float(hi)]

    return {"roc_auc": interval(aucs), "recall_sensitivity": interval(sens), "specificity": interval(spec),
            "method": f"percentile bootstrap, {rounds} resamples, seed {seed}"}


def _curve_png(kind: str, y_true, prob, metrics: dict) -> bytes | None:
    if metrics.get("roc_auc") is None:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import precision_recall_curve, roc_curve

    fig, ax = plt.subplots(figsize=(4.5, 4.5), dpi=100)
    if kind == "roc":
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
    ax.legend(loc="lower right" if kind == "roc" else "lower left")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def build_report(rows: Iterable[dict], labels, *, class_names: Sequence[str], positive: str,
                 results_path: str = "", out_dir: str | Path) -> dict:
    """Score ``rows`` against ``labels``; write report.json, report.html, roc.png, pr.png into
    ``out_dir``; return the report dict (with ``files``)."""
    y_true, prob, y_pred, info = collect(rows, labels, positive)
    metrics = compute_metrics(y_true, prob, y_pred)
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
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {}
    images = {}
    for kind in ("roc", "pr"):
        png = _curve_png(kind, y_true, prob, metrics)
        if png:
            (out_dir / f"{kind}.png").write_bytes(png)
            files[kind] = str(out_dir / f"{kind}.png")
            images[kind] = png
    files["json"] = str(out_dir / "report.json")
    files["html"] = str(out_dir / "report.html")
    report["files"] = files
    (out_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out_dir / "report.html").write_text(_html(report, images))
    return report


def _fmt(value, ci=None) -> str:
    if value is None:
        return "n/a"
    text = f"{value:.3f}"
    if ci:
        text += f" <span class=ci>(95% CI {ci[0]:.3f}–{ci[1]:.3f})</span>"
    return text


def _html(report: dict, images: dict[str, bytes]) -> str:
    m = report["metrics"]
    e = html.escape
    c = report["counts"]
    left_out = ", ".join(f"{c.get(k, 0)} {k}" for k in ("error", "skipped", "unlabelled") if c.get(k))
    parts = [
        "<!doctype html><html><head><meta charset=utf-8><title>cxr-deploy report</title><style>",
        "body{font-family:system-ui,sans-serif;margin:2em;max-width:980px;color:#222}",
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:.3em .7em;text-align:right}",
        "th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}.ci{color:#666;font-size:.9em}",
        ".warn{background:#fff3cd;padding:.6em;border:1px solid #e0c36c}img{margin-right:1em}</style></head><body>",
        "<h1>cxr-deploy metric report</h1>",
        f"<p>Results <code>{e(report['results'])}</code>; labels from {e(report['labels'])}; positive class "
        f"<b>{e(report['positive_class'])}</b>; model {e(', '.join(report['model_ids']) or '-')}; backend "
        f"{e(', '.join(report['backends']) or '-')}; threshold {e(', '.join(report['thresholds']) or '-')}; "
        f"generated {e(report['generated'])} by cxr-deploy {e(report['cxr_deploy_version'])}.</p>",
        f"<p>{c.get('rows', 0)} rows, {m.get('n', 0)} scored"
        + (f"; left out: {e(left_out)}" if left_out else "") + ".</p>",
    ]
    if len(report["model_ids"]) > 1 or len(report["thresholds"]) > 1:
        parts.append("<p class=warn>These results mix several models or thresholds.</p>")
    if m.get("note"):
        parts.append(f"<p class=warn>{e(m['note'])}</p>")
    if m.get("n"):
        ci = m["ci95"]
        rows = [("Accuracy", _fmt(m["accuracy"])), ("Sensitivity (recall)", _fmt(m["recall_sensitivity"], ci["recall_sensitivity"])),
                ("Specificity", _fmt(m["specificity"], ci["specificity"])), ("Precision (PPV)", _fmt(m["precision"])),
                ("F1", _fmt(m["f1"])), ("ROC AUC", _fmt(m["roc_auc"], ci["roc_auc"])),
                ("Average precision", _fmt(m["average_precision"]))]
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
    if images:
        parts.append("<h2>Curves</h2><p>")
        for kind, png in images.items():
            data = base64.b64encode(png).decode()
            parts.append(f"<img alt='{kind} curve' src='data:image/png;base64,{data}'>")
        parts.append("</p>")
    parts.append("<p class=ci>Decision support only. Metrics on a local sample are not a clinical validation.</p>"
                 "</body></html>\n")
    return "\n".join(parts)
