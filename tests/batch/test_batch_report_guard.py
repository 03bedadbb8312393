"""Metric report equals scikit-learn's numbers; CSV cells are safe to open in a spreadsheet."""

from __future__ import annotations

import csv
import json
import re

import numpy as np
import pytest
from click.testing import CliRunner
from sklearn import metrics as skm

from cxr_deploy.reporting.cli import evaluate_command
from cxr_deploy.batch.results_file import (COLUMNS, ResultsWriter, complete_prefix_length, guard, read_results,
                                         repair_tail, unguard)


def _known_csv(tmp_path, n=60, seed=3):
    rng = np.random.default_rng(seed)
    truth = rng.random(n) < 0.45
    prob = np.clip(truth * 0.35 + rng.random(n) * 0.65, 0, 1)
    rows, labels = [], []
    for i in range(n):
        path = f"/pacs/export/{'PNEUMONIA' if truth[i] else 'NORMAL'}/im{i:03d}.dcm"
        rows.append({"path": path, "status": "ok", "probability": prob[i], "threshold": 0.5,
                     "predicted_label": "PNEUMONIA" if prob[i] >= 0.5 else "NORMAL",
                     "model_id": "abc", "backend": "onnx:cpu", "schema_version": 1})
        labels.append((f"{'PNEUMONIA' if truth[i] else 'NORMAL'}/im{i:03d}.dcm",
                       "PNEUMONIA" if truth[i] else "normal"))
    rows.append({"path": "/pacs/export/NORMAL/bad.dcm", "status": "error", "error": "empty file", "schema_version": 1})
    rows.append({"path": "/pacs/export/NORMAL/unlabelled.dcm", "status": "ok", "probability": 0.9, "threshold": 0.5,
                 "predicted_label": "PNEUMONIA", "schema_version": 1})
    results = tmp_path / "results.csv"
    with ResultsWriter(results) as writer:
        writer.write_rows(rows)
    label_file = tmp_path / "labels.csv"
    with open(label_file, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label"])
        w.writerows(labels)
    # read the probabilities back as written (6 decimals), as the report does
    prob = np.array([float(r["probability"]) for r in read_results(results)[:n]])
    return results, label_file, truth, prob


def test_report_metrics_equal_sklearn(tmp_path):
    results, label_file, truth, prob = _known_csv(tmp_path)
    out_dir = tmp_path / "rep"
    result = CliRunner().invoke(evaluate_command, [str(results), "--labels", str(label_file), "--out-dir", str(out_dir)])
    assert result.exit_code == 0, result.output
    report = json.loads((out_dir / "report.json").read_text())
    m = report["metrics"]
    pred = prob >= 0.5
    assert m["n"] == len(truth)
    assert report["counts"]["error"] == 1 and report["counts"]["unlabelled"] == 1
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(truth, pred))
    assert m["precision"] == pytest.approx(skm.precision_score(truth, pred))
    assert m["recall_sensitivity"] == pytest.approx(skm.recall_score(truth, pred))
    assert m["specificity"] == pytest.approx(skm.recall_score(truth, pred, pos_label=0))
    assert m["f1"] == pytest.approx(skm.f1_score(truth, pred))
    assert m["roc_auc"] == pytest.approx(skm.roc_auc_score(truth, prob))
    assert m["average_precision"] == pytest.approx(skm.average_precision_score(truth, prob))
    tn, fp, fn, tp = skm.confusion_matrix(truth, pred).ravel()
    assert m["confusion_matrix"] == {"tn": tn, "fp": fp, "fn": fn, "tp": tp}
    lo, hi = m["ci95"]["roc_auc"]
    assert lo < m["roc_auc"] < hi

    html = (out_dir / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 3  # ROC, PR, reliability diagram
    assert not re.search(r"""(src|href)=['"](?!data:)""", html), "report must be self-contained"
    assert (out_dir / "roc.png").stat().st_size > 1000 and (out_dir / "pr.png").stat().st_size > 1000

    # same numbers from parent-folder labels, and the same again on a second, separate run
    result = CliRunner().invoke(evaluate_command, [str(results), "--labels-from-folders", "--out-dir", str(tmp_path / "r2")])
    assert result.exit_code == 0, result.output
    m2 = json.loads((tmp_path / "r2" / "report.json").read_text())["metrics"]
    assert m2["n"] == m["n"] + 1  # the unlabelled file sits in a NORMAL folder
    (tmp_path / "r2" / "report.json").unlink()
    result = CliRunner().invoke(evaluate_command, [str(results), "--labels-from-folders", "--out-dir",
                                                   str(tmp_path / "r2"), "--overwrite"])
    assert result.exit_code == 0, result.output
    again = json.loads((tmp_path / "r2" / "report.json").read_text())["metrics"]
    assert again == m2


@pytest.mark.parametrize("text", ["=HYPERLINK(\"http://x\",\"y\")", "+1", "-2+3", "@SUM(A1)", "\tx", "\rx", "'quoted"])
def test_formula_cells_are_neutralized_and_round_trip(text, tmp_path):
    assert guard(text).startswith("'")
    assert unguard(guard(text)) == text
    out = tmp_path / "r.csv"
    with ResultsWriter(out) as writer:
        writer.write_rows([{"path": text, "status": "error", "error": text, "probability": None, "threshold": -0.0,
                            "schema_version": 1}])
    with open(out, newline="") as fh:
        raw = list(csv.DictReader(fh))[0]
    assert raw["path"].startswith("'") and raw["error"].startswith("'")
    assert raw["threshold"] == "-0.0", "numbers are not text cells: never prefixed"
    assert read_results(out)[0]["path"] == text


def test_formula_named_file_resumes_without_duplicate(tiny_bundle, tmp_path, make_pngs):
    from cxr_deploy.api import run_batch

    folder = tmp_path / "in"
    (src,) = make_pngs(folder, 1)
    evil = folder / "=cmd.png"
    src.rename(evil)
    out = tmp_path / "r.csv"
    run_batch([folder], model=tiny_bundle, out=out, workers=0)
    with open(out, newline="") as fh:
        cell = list(csv.DictReader(fh))[0]["path"]
    assert cell == "'" + str(evil) if str(evil).startswith("=") else cell == str(evil)
    assert read_results(out)[0]["path"] == str(evil)
    summary = run_batch([folder], model=tiny_bundle, out=out, workers=0, resume=True)
    assert summary.processed == 0 and len(read_results(out)) == 1
    # relative input whose path starts with '=': the cell is guarded
    with ResultsWriter(tmp_path / "g.csv") as writer:
        writer.write_rows([{"path": "=cmd.png", "status": "ok", "probability": 0.5}])
    assert (tmp_path / "g.csv").read_text().splitlines()[1].startswith("'=cmd.png")


def test_torn_tail_is_cut_even_inside_quotes(tmp_path):
    out = tmp_path / "r.csv"
    with ResultsWriter(out) as writer:
        writer.write_rows([{"path": "/a/line\nbreak.png", "status": "ok", "probability": 0.25}])
    whole = out.read_bytes()
    assert complete_prefix_length(whole) == len(whole)
    out.write_bytes(whole + b'"/b/torn\nname.png",ok')  # a crash inside a quoted multi-line cell
    assert repair_tail(out) > 0
    assert out.read_bytes() == whole
    assert [r["path"] for r in read_results(out)] == ["/a/line\nbreak.png"]
    assert tuple(next(csv.reader(open(out, newline="")))) == COLUMNS
