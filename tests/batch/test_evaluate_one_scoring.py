"""``evaluate`` counts each image once and scores one decision rule: repeated inputs and rows of
different thresholds or models are refused with one line, exit 2 (``--dedupe`` keeps each image's
last row); ``batch --labels`` whose labels match no row exits 2 like ``evaluate``."""

from __future__ import annotations

import csv
import shutil

import pytest

from cxr_deploy.batch.results_file import ResultsWriter, read_results
from tests.support import SAMPLES, run_cli

LABELS = SAMPLES / "labels.csv"


@pytest.fixture(scope="module")
def runs(tiny_bundle, tmp_path_factory):
    """Real results: the sample JPEGs at the bundle's threshold, the sample DICOMs at 0.3."""
    from cxr_deploy.api import run_batch

    folder = tmp_path_factory.mktemp("evaluate")
    images, dicoms = folder / "images.csv", folder / "dicoms.csv"
    assert run_batch([SAMPLES / "images"], model=tiny_bundle, out=images, workers=0).exit_code == 0
    assert run_batch([SAMPLES / "dicom"], model=tiny_bundle, out=dicoms, workers=0, threshold=0.3).exit_code == 0
    return images, dicoms


def _evaluate(*args):
    """``cxr-deploy evaluate`` in this process (the terminal's stdout and stderr, exit code)."""
    from click.testing import CliRunner

    from cxr_deploy.cli import main

    return CliRunner().invoke(main, ["evaluate", *map(str, args), "--labels", str(LABELS)])


def _one_line_error(result) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("cxr-deploy: error: "), result.output
    return lines[0]


def test_the_same_images_twice_are_refused_or_deduplicated(runs, tmp_path):
    images, _ = runs
    copy = tmp_path / "copy.csv"
    shutil.copy(images, copy)
    assert "given more than once" in _one_line_error(_evaluate(images, images, "--out-dir", tmp_path / "r1"))
    line = _one_line_error(_evaluate(images, copy, "--out-dir", tmp_path / "r2"))
    assert "8 rows score an image that another row already scores" in line and "--dedupe" in line
    assert not (tmp_path / "r1").exists() and not (tmp_path / "r2").exists()
    result = _evaluate(images, copy, "--dedupe", "--out-dir", tmp_path / "r3")
    assert result.exit_code == 0, result.output
    assert "report: 8 labelled images" in result.stderr  # not 16: each image counts once
    single = _evaluate(images, "--out-dir", tmp_path / "r4")
    assert single.stderr.splitlines()[0] == result.stderr.splitlines()[0]  # same figures, same CI


def test_rows_of_different_thresholds_are_not_pooled(runs, tmp_path):
    images, dicoms = runs
    line = _one_line_error(_evaluate(images, dicoms, "--out-dir", tmp_path / "r"))
    assert "mix 2 thresholds" in line and "0.3 (4 rows)" in line and "0.5 (8 rows)" in line
    assert not (tmp_path / "r").exists()


def test_rows_of_different_models_are_not_pooled(runs, tmp_path):
    images, _ = runs
    rows = read_results(images)
    for row in rows[:3]:
        row["model_id"] = "0123456789abcdef"  # the same images scored by another bundle
    other = tmp_path / "other.csv"
    with ResultsWriter(other) as writer:
        writer.write_rows(rows)
    assert "mix 2 models" in _one_line_error(_evaluate(other, "--out-dir", tmp_path / "r"))


def test_batch_labels_matching_no_row_exit_2(tiny_bundle, tmp_path):
    labels = tmp_path / "labels.csv"
    with open(labels, "w", newline="") as fh:
        csv.writer(fh).writerows([["path", "label"], ["elsewhere/IM0009.dcm", "PNEUMONIA"]])
    out = tmp_path / "r.csv"
    result = run_cli("batch", SAMPLES / "dicom", "-m", tiny_bundle, "-o", out, "-j", "0", "--no-progress",
                     "--labels", labels)
    assert result.returncode == 2, result.stderr
    assert "cxr-deploy: error: no results row matched a label" in result.stderr
    assert len(read_results(out)) == 4  # the rows are written; the report is what failed
