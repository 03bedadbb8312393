"""The written numbers reproduce the decision: in the results CSV, the report, the overlay caption and
the DICOM SR, ``probability >= threshold`` as written gives the label that was written."""

from __future__ import annotations

import json
import os
import re
import shutil

import pytest

from cxr_deploy.batch.results_file import read_results
from tests.support import SAMPLES, run_cli

POSITIVE = "PNEUMONIA"


def assert_rows_consistent(rows) -> int:
    """Every ok row: the written probability and threshold, read back, give the written label."""
    checked = 0
    for row in rows:
        if row["status"] != "ok":
            continue
        p, t = float(row["probability"]), float(row["threshold"])
        assert (p >= t) == (row["predicted_label"] == POSITIVE), row
        checked += 1
    return checked


def _batch(bundle, out, *extra):
    result = run_cli("batch", SAMPLES / "images", SAMPLES / "dicom", "-m", bundle, "-o", out, "-j", "0",
                     "--no-progress", *extra)
    assert result.returncode == 0, result.stderr
    return result


@pytest.mark.parametrize("threshold", ["0.99999993", "1e-7"])
def test_thresholds_next_to_0_and_1_give_consistent_rows_and_a_warning(tiny_bundle, tmp_path, threshold):
    out = tmp_path / "r.csv"
    result = _batch(tiny_bundle, out, "--threshold", threshold)
    rows = read_results(out)
    assert assert_rows_consistent(rows) == 12
    assert {float(r["threshold"]) for r in rows} == {float(threshold)}
    assert f"WARNING: decision threshold is {float(threshold)!r}" in result.stderr


def _linked_copy(bundle, target):
    """A copy of the bundle (hard links: fast) whose manifest can be changed (``update`` writes a new
    file and renames it over the link: the original stays untouched)."""
    shutil.copytree(bundle, target, copy_function=os.link)
    return target


def test_a_threshold_between_two_written_decimals_is_reproduced_everywhere(tiny_bundle, tmp_path):
    import pydicom

    from cxr_deploy.bundle import ModelBundle

    import cxr_deploy

    # A DICOM's probability to 6 decimals; a threshold just above that, closer than 6 decimals
    # resolve (and than ``:g`` writes): the row must stay NORMAL *as written*, in every output.
    dicom = SAMPLES / "dicom" / "IM000004"
    p = cxr_deploy.load(tiny_bundle).predict([dicom])[0]["probability"]
    threshold = float(f"{p:.6f}") + 4.99e-7
    bundle = _linked_copy(tiny_bundle, tmp_path / "bundle")
    ModelBundle.load(bundle).update(training={"operating_points": {
        "here": {"threshold": threshold, "sensitivity": 0.9, "specificity": 0.5}}})
    out, sr_dir, cams = tmp_path / "r.csv", tmp_path / "sr", tmp_path / "cams"
    _batch(bundle, out, "--threshold", repr(threshold), "--labels", SAMPLES / "labels.csv", "--dicom-out", sr_dir,
           "--cam-dir", cams)
    rows = read_results(out)
    assert assert_rows_consistent(rows) == 12
    same = next(r for r in rows if r["path"] == str(dicom))
    assert same["predicted_label"] == "NORMAL" and float(same["threshold"]) == threshold

    # The report: the operating point at the run's threshold gives the main table's figures.
    report = json.loads((tmp_path / "r_report" / "report.json").read_text())
    m = report["metrics"]
    point = m["operating_points"]["here"]
    assert (point["here_sensitivity"], point["here_specificity"]) == (m["recall_sensitivity"], m["specificity"])
    assert report["thresholds"] == [repr(threshold)]

    # The SR: its probability and threshold measurements, read back, give its Present/Absent.
    srs = sorted(sr_dir.glob("*.sr.dcm"))
    assert len(srs) == 4
    for path in srs:
        ds = pydicom.dcmread(path)
        values, finding, params = {}, None, ""
        for item in _walk(ds.ContentSequence):
            name = item.ConceptNameCodeSequence[0].CodeValue if "ConceptNameCodeSequence" in item else ""
            if "MeasuredValueSequence" in item:
                values[name] = float(item.MeasuredValueSequence[0].FloatingPointValue)
                assert float(item.MeasuredValueSequence[0].NumericValue) == pytest.approx(values[name], abs=1e-12)
            if name == "233604007":
                finding = item.ConceptCodeSequence[0].CodeMeaning
            if item.get("TextValue", "").startswith("threshold="):
                params = item.TextValue
        assert (values["PNEUMONIA_PROB"] >= values["DECISION_THRESH"]) == (finding == "Present"), path
        assert values["DECISION_THRESH"] == threshold
        assert params == f"threshold={threshold!r}"

    # The overlay caption (in the PNG's text chunk) of that row.
    from PIL import Image

    caption = Image.open(same["overlay_path"]).text["Description"]
    assert_caption_consistent(caption)


def _walk(sequence):
    for item in sequence:
        yield item
        if "ContentSequence" in item:
            yield from _walk(item.ContentSequence)


def assert_caption_consistent(caption: str) -> None:
    label, shown_p, shown_t = re.search(r"(\w+)\s+p\(PNEUMONIA\)=([0-9.e-]+)\s+threshold ([0-9.e-]+)", caption).groups()
    assert (float(shown_p) >= float(shown_t)) == (label == POSITIVE), caption


@pytest.mark.parametrize("p, t", [(0.99999994, 0.99999993), (0.99999993, 0.99999994), (1e-7, 1.5e-7),
                                  (2e-7, 1e-7), (0.5, 0.5)])
def test_caption_reproduces_the_decision_next_to_0_and_1(p, t):
    from cxr_deploy.batch.overlay import decision_caption

    caption = decision_caption(POSITIVE if p >= t else "NORMAL", p, t, POSITIVE)
    assert_caption_consistent(caption)
    if p != t:
        assert "p(PNEUMONIA)=" + caption.split("=")[1].split()[0] != f"p(PNEUMONIA)={caption.split()[-1]}", caption


def test_report_figures_come_from_full_precision_probabilities(tmp_path):
    """Rows written exactly: the operating-point table at the run's threshold is the main table."""
    from cxr_deploy.reporting.label_match import FolderLabels
    from cxr_deploy.reporting.report import build_report

    t = 0.99999993
    probabilities = [0.9999999403953552, 0.99999992, 0.9999999, 0.99999995, 0.2, 0.99999994]
    rows = [{"path": f"/x/{'PNEUMONIA' if i % 2 else 'NORMAL'}/{i}.png", "status": "ok", "probability": repr(p),
             "predicted_label": POSITIVE if p >= t else "NORMAL", "threshold": repr(t)} for i, p in enumerate(probabilities)]
    report = build_report(rows, FolderLabels(("NORMAL", POSITIVE), POSITIVE), class_names=("NORMAL", POSITIVE),
                          positive=POSITIVE, out_dir=tmp_path / "rep", operating_points={"run": {"threshold": t}})
    m = report["metrics"]
    point = m["operating_points"]["run"]
    assert (point["here_sensitivity"], point["here_specificity"]) == (m["recall_sensitivity"], m["specificity"])
