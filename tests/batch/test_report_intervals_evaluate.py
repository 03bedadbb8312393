"""Confidence intervals that do not collapse on small samples (issue 9, item 8), and `evaluate`
refusing to report nothing or to replace another report (item 9)."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from click.testing import CliRunner
from scipy.stats import binomtest

from cxr_deploy.batch.cli import batch_command
from cxr_deploy.reporting.cli import evaluate_command
from cxr_deploy.batch.results_file import ResultsWriter
from cxr_deploy.reporting.report import AUC_CI_MIN_PER_CLASS, auc_interval, delong_auc, wilson_interval


@pytest.mark.parametrize("k, n", [(6, 6), (0, 5), (3, 10), (81, 263), (1, 29)])
def test_wilson_matches_scipy(k, n):
    expected = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    assert wilson_interval(k, n) == pytest.approx([expected.low, expected.high], abs=1e-9)


def test_six_of_six_is_not_certain():
    lo, hi = wilson_interval(6, 6)  # the demo report printed "1.000 (95% CI 1.000-1.000)"
    assert hi == 1.0 and lo < 0.65


def _brute_force_delong(y, p):
    """DeLong 1988 from its definition: psi over every (positive, negative) pair, O(m n)."""
    pos, neg = p[y], p[~y]
    psi = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])
    v10, v01 = psi.mean(axis=1), psi.mean(axis=0)
    return psi.mean(), v10.var(ddof=1) / len(pos) + v01.var(ddof=1) / len(neg)


def test_delong_equals_its_definition_with_ties():
    rng = np.random.default_rng(0)
    y = rng.random(90) < 0.4
    p = np.round(np.clip(0.3 * y + rng.random(90) * 0.7, 0, 1), 1)  # rounded: many ties
    auc, var = delong_auc(y, p)
    ref_auc, ref_var = _brute_force_delong(y, p)
    assert auc == pytest.approx(ref_auc) and var == pytest.approx(ref_var)
    from sklearn.metrics import roc_auc_score

    assert auc == pytest.approx(roc_auc_score(y, p))
    lo, hi = auc_interval(y, p)
    assert lo == pytest.approx(auc - 1.959964 * np.sqrt(var), abs=1e-6) and hi == pytest.approx(auc + 1.959964 * np.sqrt(var), abs=1e-6)


def test_auc_interval_not_estimable_on_small_samples_and_not_collapsed_when_separable():
    y = np.array([1, 1, 0, 0, 1], bool)
    assert auc_interval(y, np.array([0.9, 0.8, 0.1, 0.2, 0.7])) is None  # the 5-image shard
    n = AUC_CI_MIN_PER_CLASS + 2
    y = np.array([1] * n + [0] * n, bool)
    p = np.concatenate([np.linspace(0.6, 0.9, n), np.linspace(0.1, 0.4, n)])  # perfectly separated
    lo, hi = auc_interval(y, p)
    assert hi == 1.0 and lo == pytest.approx(0.025 ** (1 / n))  # exact bound for n of n successes


def _write(path, rows):
    with ResultsWriter(path) as writer:
        writer.write_rows(rows)


def _ok(path, p):
    return {"path": path, "status": "ok", "probability": p, "threshold": 0.5,
            "predicted_label": "PNEUMONIA" if p >= 0.5 else "NORMAL", "model_id": "m", "backend": "onnx:cpu"}


def test_small_shard_report_says_not_estimable(tmp_path):
    results = tmp_path / "shard.csv"
    _write(results, [_ok(f"/x/{'PNEUMONIA' if i % 2 else 'NORMAL'}/{i}.png", 0.9 if i % 2 else 0.1) for i in range(5)])
    result = CliRunner().invoke(evaluate_command, [str(results), "--labels-from-folders"])
    assert result.exit_code == 0, result.output
    assert "ROC AUC 1.000 [CI not estimable]" in result.output
    report = json.loads((tmp_path / "shard_report" / "report.json").read_text())
    assert report["metrics"]["ci95"]["roc_auc"] is None
    lo, hi = report["metrics"]["ci95"]["recall_sensitivity"]
    assert lo < 0.5 and hi == 1.0  # 2 of 2 positives found
    assert "not estimable" in (tmp_path / "shard_report" / "report.html").read_text()


def test_evaluate_with_no_matching_label_exits_2_and_names_both_sides(tmp_path):
    results = tmp_path / "r.csv"
    _write(results, [_ok("/pacs/2026-11-25/IM0001", 0.7), {"path": "/pacs/x", "status": "error", "error": "empty"}])
    labels = tmp_path / "labels.csv"
    labels.write_text("path,label\nother/IM0009.dcm,PNEUMONIA\n")
    result = CliRunner().invoke(evaluate_command, [str(results), "--labels", str(labels)])
    assert result.exit_code == 2
    text = " ".join(result.output.split())
    assert "2 rows read (1 ok), 1 labels read, 0 matched" in text
    assert "row /pacs/2026-11-25/IM0001 has no label" in text and "IM0009.dcm matched no row" in text
    assert not (tmp_path / "r_report").exists()


def test_an_existing_report_folder_is_never_replaced_without_overwrite(tmp_path, tiny_bundle, make_pngs):
    shard1, shard2 = tmp_path / "shard1.csv", tmp_path / "shard2.csv"
    _write(shard1, [_ok(f"/x/NORMAL/{i}.png", 0.2) for i in range(3)] + [_ok("/x/PNEUMONIA/9.png", 0.8)])
    _write(shard2, [_ok("/x/PNEUMONIA/8.png", 0.6)])
    runner = CliRunner()
    assert runner.invoke(evaluate_command, [str(shard1), "--labels-from-folders"]).exit_code == 0
    report = tmp_path / "shard1_report" / "report.json"
    before = report.read_bytes()
    result = runner.invoke(evaluate_command, [str(shard1), str(shard2), "--labels-from-folders"])
    assert result.exit_code == 2 and "already exists" in result.output and "--overwrite" in result.output
    assert report.read_bytes() == before
    result = runner.invoke(evaluate_command, [str(shard1), str(shard2), "--labels-from-folders", "--overwrite"])
    assert result.exit_code == 0 and json.loads(report.read_text())["metrics"]["n"] == 5

    # batch --labels: checked before any work (no CSV written), same rule
    images = make_pngs(tmp_path / "NORMAL", 2)
    labels = tmp_path / "labels.csv"
    with open(labels, "w", newline="") as fh:
        csv.writer(fh).writerows([["path", "label"], *[[str(p), "NORMAL"] for p in images]])
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    result = runner.invoke(batch_command, [str(tmp_path / "NORMAL"), "--model", str(tiny_bundle), "--out",
                                           str(tmp_path / "b.csv"), "--labels", str(labels), "--report-dir",
                                           str(tmp_path / "mine"), "-j", "0"])
    assert result.exit_code == 2 and "already exists" in result.output
    assert not (tmp_path / "b.csv").exists() and (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_ece_matches_sklearns_calibration_curve():
    from sklearn.calibration import calibration_curve

    from cxr_deploy.calibration import expected_calibration_error, reliability

    rng = np.random.default_rng(5)
    prob = rng.random(400) ** 0.7
    y = rng.random(400) < prob ** 1.5  # miscalibrated on purpose
    observed, predicted = calibration_curve(y, prob, n_bins=10, strategy="uniform")
    counts = np.bincount(np.minimum((prob * 10).astype(int), 9), minlength=10)
    counts = counts[counts > 0]
    expected = float(np.sum(counts / counts.sum() * np.abs(observed - predicted)))
    assert expected_calibration_error(y, prob) == pytest.approx(expected, abs=1e-9)
    assert [b["n"] for b in reliability(y, prob)] == counts.tolist()
    assert expected_calibration_error(y, y.astype(float)) == pytest.approx(0.0)  # perfectly calibrated


def test_report_shows_the_bundles_operating_points_on_these_images(tmp_path):
    from cxr_deploy.reporting.label_match import FolderLabels
    from cxr_deploy.reporting.report import build_report

    probs = [0.1, 0.35, 0.5, 0.7, 0.2, 0.4, 0.6, 0.9]  # first four NORMAL, last four PNEUMONIA
    from cxr_deploy.batch.results_file import read_results

    _write(tmp_path / "r.csv", [_ok(f"/x/{'NORMAL' if i < 4 else 'PNEUMONIA'}/{i}.png", p) for i, p in enumerate(probs)])
    rows = read_results(tmp_path / "r.csv")  # as the report reads them
    points = {"youden": {"threshold": 0.55, "sensitivity": 0.9, "specificity": 0.8},
              "sens95": {"threshold": 0.3, "sensitivity": 0.96, "specificity": 0.6}}
    report = build_report(rows, FolderLabels(("NORMAL", "PNEUMONIA"), "PNEUMONIA"), class_names=("NORMAL", "PNEUMONIA"),
                          positive="PNEUMONIA", out_dir=tmp_path / "rep", operating_points=points)
    table = report["metrics"]["operating_points"]
    # counted by hand: at 0.55, positives 0.6 and 0.9 are found (2/4), negatives below: 0.1, 0.35, 0.5 (3/4)
    assert (table["youden"]["here_sensitivity"], table["youden"]["here_specificity"]) == (0.5, 0.75)
    # at 0.3: positives 0.4, 0.6, 0.9 (3/4); negatives below 0.3: 0.1 only (1/4)
    assert (table["sens95"]["here_sensitivity"], table["sens95"]["here_specificity"]) == (0.75, 0.25)
    html = (tmp_path / "rep" / "report.html").read_text()
    assert "Operating points" in html and "sens95" in html and "<td>0.3</td>" in html  # the threshold, exact
