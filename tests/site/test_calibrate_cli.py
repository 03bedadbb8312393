"""Issue 20: ``cxr-deploy calibrate`` end to end on real images (Kermany 224² JPEGs, patients'
real labels) with the tiny bundle; the calibrated bundle through batch, the API and the alarm."""

from __future__ import annotations

import csv
import json
import os
import shutil

import numpy as np
import pytest

from cxr_deploy import population
from cxr_deploy.bundle import ModelBundle
from cxr_deploy.calibration import sigmoid
from cxr_deploy.site_calibration import margins_from_probabilities


def _kermany(shared_data, per_class: int, offset: int = 0) -> list[tuple[str, str]]:
    with open(shared_data / "kermany224" / "manifest.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    out = []
    for label in ("NORMAL", "PNEUMONIA"):
        picked = [r for r in rows if r["label"] == label][offset:offset + per_class]
        out += [(str(shared_data / "kermany224" / r["path"]), label) for r in picked]
    return out


def _reviews_csv(path, items, unsure):
    """A REVIEWS.csv as `cxr-deploy review` appends it: agree verdicts (the decision was right),
    disagree verdicts (the reviewer's class), and unsure ones, which give no label."""
    from cxr_deploy.labels import REVIEW_COLUMNS

    other = {"NORMAL": "PNEUMONIA", "PNEUMONIA": "NORMAL"}
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=REVIEW_COLUMNS)
        writer.writeheader()
        for i, (p, label) in enumerate(items + unsure):
            verdict = "unsure" if i >= len(items) else ("agree" if i % 2 else "disagree")
            writer.writerow({"review_version": "1", "path": p, "model_id": "m", "verdict": verdict,
                             "decision": label if verdict == "agree" else other[label],
                             "correct_class": label if verdict == "disagree" else "", "reviewer": "r"})
    return path


def _labels_csv(path, items, path_column="path"):
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow([path_column, "label", "reviewer"])
        writer.writerows([p, label, "x"] for p, label in items)
    return path


@pytest.fixture(scope="module")
def site_run(shared_data, tiny_bundle, tmp_path_factory, cli):
    tmp = tmp_path_factory.mktemp("site")
    parent = tmp / "parent"
    shutil.copytree(tiny_bundle, parent, copy_function=os.link)
    items = _kermany(shared_data, 30)
    labels = _reviews_csv(tmp / "REVIEWS.csv", items, _kermany(shared_data, 2, offset=300))  # cxr-deploy review's file
    out = tmp / "site-bundle"
    proc = cli("calibrate", parent, "--labels", labels, "--out", out, timeout=600)
    return proc, parent, out, items, tmp


def test_calibrate_writes_a_verified_bundle_that_records_its_origin(site_run):
    proc, parent, out, items, _ = site_run
    assert proc.returncode == 0, proc.stderr
    new, old = ModelBundle.load(out), ModelBundle.load(parent)  # verifies every artifact's sha256
    site = new.manifest.site
    assert site["parent_bundle"] == old.model_id != new.model_id and len(site["data_sha256"]) == 64
    assert site["date"] and site["images"] == len(items) and site["positives"] == site["negatives"] == 30
    assert set(site["operating_points"]) == {"youden", "sens90", "sens95", "sens98", "spec90", "spec95", "spec98"}
    for p in site["operating_points"].values():
        assert p["sensitivity_ci95"][0] <= p["sensitivity"] <= p["sensitivity_ci95"][1] + 1e-12 and p["positives"] == 30
    assert new.manifest.temperature == site["temperature"]["used"]
    assert new.threshold == site["operating_points"]["youden"]["threshold"]  # the parent's rule (youden) at the site
    assert "only 60 labelled site images" in proc.stderr and "wider than" in proc.stderr  # honest warnings
    assert "site:sens95" in proc.stdout and "how they moved" in proc.stdout
    assert new.has("model.onnx") and new.has("model.ts") and new.has(population.REFERENCE_NAME)
    assert population.load_reference(new)["images"] == 60


def test_the_calibrated_artifacts_apply_the_site_temperature(site_run, shared_data):
    import cxr_deploy

    _, parent, out, items, _ = site_run
    paths = [p for p, _ in items[:6]]
    old, new = cxr_deploy.load(parent), cxr_deploy.load(out, operating_point="site:sens95")
    p_old = np.array([r["probability"] for r in old.predict(paths)])
    p_new = np.array([r["probability"] for r in new.predict(paths)])
    t_old, t_new = old.bundle.manifest.temperature, new.bundle.manifest.temperature
    expected = sigmoid(margins_from_probabilities(p_old, t_old) / t_new)
    assert np.abs(p_new - expected).max() < 1e-4
    assert new.threshold == new.bundle.manifest.site["operating_points"]["sens95"]["threshold"]
    assert new.operating_point == "site:sens95"
    check = new.check_population(new.predict([p for p, _ in items]))  # the API's population check
    assert check.status in ("same", "differs") and check.record["images"] == len(items)


def test_batch_uses_site_points_and_reports_the_population(site_run, shared_data, cli):
    _, _, out, items, tmp = site_run
    folder = tmp / "batch-in"
    folder.mkdir()
    for path, _ in _kermany(shared_data, 20, offset=100):
        os.symlink(path, folder / os.path.basename(path))
    csv_out = tmp / "site-results.csv"
    proc = cli("batch", folder, "--model", out, "--out", csv_out, "--operating-point", "site:sens95", "--workers", 0,
               timeout=300)
    assert proc.returncode == 0, proc.stderr
    with open(csv_out, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert {r["operating_point"] for r in rows} == {"site:sens95"}
    threshold = ModelBundle.load(out).manifest.site["operating_points"]["sens95"]["threshold"]
    assert {float(r["threshold"]) for r in rows} == {threshold}
    assert "population:" in proc.stderr or "this population differs" in proc.stderr


def test_the_alarm_fires_in_batch_and_evaluate_reports(site_run, shared_data, cli):
    """A reference unlike these images (all scores near 1): the terminal and the report say so."""
    _, parent, _, items, tmp = site_run
    shifted = tmp / "shifted-bundle"
    shutil.copytree(parent, shifted, copy_function=shutil.copy2)
    population.write_reference(ModelBundle.load(shifted), np.linspace(0.999, 1.0, 200), source="validation split (test)")
    labels = _labels_csv(tmp / "labels-batch.csv", items)
    csv_out = tmp / "shift-results.csv"
    proc = cli("batch", *[p for p, _ in items], "--model", shifted, "--out", csv_out, "--labels", labels,
               "--workers", 0, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "WARNING: this population differs from the model's validation population" in proc.stderr
    assert "cxr-deploy calibrate" in proc.stderr
    report = json.loads((tmp / "shift-results_report" / "report.json").read_text())
    assert report["population"]["status"] == "differs"
    assert "this population differs" in (tmp / "shift-results_report" / "report.html").read_text()
    proc = cli("evaluate", csv_out, "--labels", labels, "--model", shifted, "--out-dir", tmp / "eval-report")
    assert proc.returncode == 0, proc.stderr
    assert "this population differs" in proc.stderr
    assert json.loads((tmp / "eval-report" / "report.json").read_text())["population"]["status"] == "differs"


def test_reference_only_and_errors(site_run, cli, tmp_path):
    _, parent, _, items, tmp = site_run
    copy = tmp_path / "b"
    shutil.copytree(parent, copy, copy_function=shutil.copy2)
    labels = _labels_csv(tmp_path / "val.csv", items)
    proc = cli("calibrate", copy, "--labels", labels, "--reference-only", timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert population.load_reference(ModelBundle.load(copy))["images"] == len(items)
    proc = cli("calibrate", copy, "--labels", tmp_path / "missing.csv")
    assert proc.returncode == 2 and proc.stderr.startswith("cxr-deploy: error: cannot read labels")
    proc = cli("calibrate", copy, "--labels", labels, "--out", parent)  # an existing folder, no --overwrite
    assert proc.returncode == 2 and "--overwrite" in proc.stderr


def test_a_site_bundle_keeps_the_parents_out_of_population_flag(shared_data, population_bundle, tmp_path, cli):
    """Same weights, same features: calibrate carries the statistics into the site bundle."""
    from cxr_deploy import in_population

    labels = _labels_csv(tmp_path / "site.csv", _kermany(shared_data, 30, offset=400))
    site = tmp_path / "site-bundle"
    result = cli("calibrate", population_bundle, "--labels", labels, "--out", site, "--no-export",
                 "--backend", "onnx", timeout=300)
    assert result.returncode == 0, result.stderr
    parent, child = (in_population.load(ModelBundle.load(b)) for b in (population_bundle, site))
    assert child is not None and child.threshold == parent.threshold and child.age_range == (1.0, 5.0)
    np.testing.assert_array_equal(child.whiten, parent.whiten)
    assert "training ages 1-5 y" in cli("inspect", site).stdout
