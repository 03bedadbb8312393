"""Outputs never destroy an input or a file the tool did not write: ``--overwrite`` replaces only a
results CSV of ours; no output path (``--out``, report folder and files, ``--cam-dir``, ``--dicom-out``,
parts) may land on an input, a ``--labels`` CSV, or inside an input folder."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest

from cxr_deploy.batch.results_file import COLUMNS, read_results

SAMPLES = Path(__file__).resolve().parents[2] / "samples"


def _digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _refused(proc, *words: str) -> None:
    """Exit 2 with one line naming the problem."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cxr-deploy: error:"), proc.stderr
    for word in words:
        assert word in lines[0], lines[0]


@pytest.fixture()
def dicom_copy(tmp_path) -> Path:
    folder = tmp_path / "s"
    folder.mkdir()
    return Path(shutil.copy(SAMPLES / "dicom" / "IM000004", folder / "IM000004"))


def test_overwrite_onto_the_input_dicom_is_refused_and_the_dicom_kept(tiny_bundle, dicom_copy, cli):
    before = _digest(dicom_copy)
    proc = cli("batch", dicom_copy, "-m", tiny_bundle, "-o", dicom_copy, "--overwrite")
    _refused(proc, "is the input")
    assert _digest(dicom_copy) == before


def test_out_through_a_symlink_or_hard_link_to_an_input_is_refused(tiny_bundle, dicom_copy, tmp_path, cli):
    before = _digest(dicom_copy)
    (tmp_path / "link.csv").symlink_to(dicom_copy)
    os.link(dicom_copy, tmp_path / "hard.csv")
    for out in ("link.csv", "hard.csv"):
        _refused(cli("batch", dicom_copy, "-m", tiny_bundle, "-o", tmp_path / out, "--overwrite"), "is the input")
    assert _digest(dicom_copy) == before


def test_out_on_a_labels_csv_inside_the_input_folder_is_refused(tiny_bundle, tmp_path, cli):
    data = tmp_path / "data"
    shutil.copytree(SAMPLES / "images", data / "images")
    labels = Path(shutil.copy(SAMPLES / "labels.csv", data / "labels.csv"))
    before = _digest(labels)
    _refused(cli("batch", data, "-m", tiny_bundle, "-o", labels, "--overwrite"), "inside the input folder")
    # the labels file outside the input folder, given as --labels: still an input
    other = Path(shutil.copy(labels, tmp_path / "labels.csv"))
    _refused(cli("batch", data / "images", "-m", tiny_bundle, "-o", other, "--overwrite", "--labels", other),
             "is the input")
    assert _digest(labels) == before and _digest(other) == before


def test_overwrite_replaces_only_a_results_csv_of_ours(tiny_bundle, png_folder, tmp_path, cli):
    foreign = tmp_path / "notes.csv"
    foreign.write_text("patient,comment\nA,do not lose\n")
    before = _digest(foreign)
    _refused(cli("batch", png_folder, "-m", tiny_bundle, "-o", foreign, "--overwrite", "-j", "0"),
             "not a cxr-deploy results CSV")
    # --resume must not even cut a "torn" tail off it
    foreign.write_bytes(b"patient,comment\nA,half a line")
    torn = _digest(foreign)
    _refused(cli("batch", png_folder, "-m", tiny_bundle, "-o", foreign, "--resume", "-j", "0"))
    assert _digest(foreign) == torn != before
    out = tmp_path / "r.csv"
    assert cli("batch", png_folder, "-m", tiny_bundle, "-o", out, "-j", "0").returncode == 0
    proc = cli("batch", png_folder, "-m", tiny_bundle, "-o", out, "--overwrite", "-j", "0")
    assert proc.returncode == 0, proc.stderr
    assert len(read_results(out)) == 10 and tuple(next(iter(read_results(out))).keys()) == COLUMNS


def test_output_folders_inside_an_input_folder_are_refused_hidden_names_allowed(tiny_bundle, png_folder, cli):
    for option, value in (("--cam-dir", png_folder / "overlays"), ("--dicom-out", png_folder / "a" / "sr"),
                          ("--out", png_folder / "r.csv")):
        args = ["-o", png_folder.parent / "r.csv"] if option != "--out" else []
        _refused(cli("batch", png_folder, "-m", tiny_bundle, *args, option, value, "-j", "0"),
                 option, "inside the input folder")
    assert not (png_folder / "overlays").exists() and not (png_folder / "r.csv").exists()
    proc = cli("batch", png_folder, "-m", tiny_bundle, "-o", png_folder / ".r.csv", "-j", "0")
    assert proc.returncode == 0, proc.stderr  # hidden: never scanned


def test_report_files_never_land_on_inputs_or_files_not_ours(tiny_bundle, tmp_path, cli):
    data = tmp_path / "data"
    shutil.copytree(SAMPLES / "images", data)
    _refused(cli("batch", data, "-m", tiny_bundle, "-o", tmp_path / "r.csv", "--labels-from-folders",
                 "--report-dir", data / "NORMAL", "-j", "0"), "--report-dir", "inside the input folder")
    report = tmp_path / "rep"
    report.mkdir()
    (report / "report.json").write_text('{"study": "not a cxr-deploy report"}\n')
    (report / "roc.png").write_bytes((SAMPLES / "dicom" / "IM000004").read_bytes()[:100])
    before = {p.name: _digest(p) for p in report.iterdir()}
    _refused(cli("batch", data, "-m", tiny_bundle, "-o", tmp_path / "r.csv", "--labels-from-folders",
                 "--report-dir", report, "--overwrite", "-j", "0"), "not written by cxr-deploy")
    assert {p.name: _digest(p) for p in report.iterdir()} == before
    # evaluate: a results CSV (its input) named like a report file in the report folder
    results = tmp_path / "r2.csv"
    assert cli("batch", data, "-m", tiny_bundle, "-o", results, "-j", "0").returncode == 0
    inside = Path(shutil.copy(results, tmp_path / "ev" / "report.json") if (tmp_path / "ev").mkdir() is None else "")
    _refused(cli("evaluate", inside, "--labels-from-folders", "--out-dir", tmp_path / "ev", "--overwrite"),
             "is the input")
    assert _digest(inside) == _digest(results)
