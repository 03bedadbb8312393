"""Imperfect sources still get a valid SR and SC: every source attribute goes through one sanitizer
(:mod:`cxr_deploy.pacs.sanitize`) before highdicom copies it. Checked with dicom3tools' ``dciodvfy``
on the results of every scored chest DICOM of the shared data (RG1_J2KI, a CR chest; 966_fixed, a
real anonymized DX whose PatientBirthDate is a 56-character hash, as is its AccessionNumber;
highdicom's dx_image, a DX thorax; the other chest-like files there are Secondary Captures, skipped,
or a blank image, not scored; the samples' four are checked in test_dicom_results) and of sources
with non-ASCII names and no SpecificCharacterSet (Latin-1 and UTF-8 bytes)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pydicom
import pytest

from cxr_deploy.batch.results_file import read_results

from tests.support import SAMPLES

SHARED_CHEST = ["pydicom_data/RG1_J2KI.dcm", "pylibjpeg_data/JPEG2000Lossless/966_fixed.dcm", "highdicom/dx_image.dcm"]
NAMES = {"PatientName": "Müller^Jürgen", "InstitutionName": "Hôpital Saint-Étienne",
         "ReferringPhysicianName": "Dür^Zoë", "StudyDescription": "Thorax p.a. Röntgen"}


def _undeclared(path: Path, charset: str) -> None:
    """A copy of a sample radiograph with ``NAMES`` in ``charset`` and no SpecificCharacterSet."""
    from pydicom.uid import generate_uid

    ds = pydicom.dcmread(SAMPLES / "dicom" / "normal_jpeg_baseline.dcm")
    ds.SpecificCharacterSet = charset
    for keyword, value in NAMES.items():
        setattr(ds, keyword, value)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.save_as(path.with_suffix(".tmp"))
    raw = pydicom.dcmread(path.with_suffix(".tmp"))  # values stay the bytes written above
    del raw[0x00080005]
    raw.save_as(path)
    path.with_suffix(".tmp").unlink()


@pytest.fixture(scope="module")
def scored(tiny_bundle, shared_data, tmp_path_factory):
    from tests.support import run_cli

    root = tmp_path_factory.mktemp("sanitize")
    inputs = root / "in"
    inputs.mkdir()
    for name in SHARED_CHEST:
        shutil.copy(shared_data / "dicom" / name, inputs / Path(name).name)
    _undeclared(inputs / "latin1.dcm", "ISO_IR 100")
    _undeclared(inputs / "utf8.dcm", "ISO_IR 192")
    proc = run_cli("batch", inputs, "--model", tiny_bundle, "--out", root / "r.csv", "--dicom-out", root / "dcm",
                   "-j", "0")
    rows = {Path(r["path"]).name: r for r in read_results(root / "r.csv")}
    return {"proc": proc, "rows": rows, "dir": root / "dcm", "inputs": inputs, "bundle": tiny_bundle, "root": root}


def _results(run, name) -> list[Path]:
    row = run["rows"][name]
    return [run["dir"] / f"{row['sop_instance_uid']}.{row['model_id']}.{kind}.dcm" for kind in ("sr", "sc")]


def test_every_scored_source_gets_its_sr_and_sc(scored):
    assert scored["proc"].returncode == 0, scored["proc"].stderr
    assert {name: row["status"] for name, row in scored["rows"].items()} == dict.fromkeys(scored["rows"], "ok")
    assert all(row["error"] == "" for row in scored["rows"].values())
    for name in scored["rows"]:
        assert all(path.is_file() for path in _results(scored, name)), name


@pytest.mark.skipif(shutil.which("dciodvfy") is None,
                    reason="dicom3tools' dciodvfy not installed (.ci/run installs it)")
def test_dciodvfy_finds_no_error_in_results_of_imperfect_sources(scored):
    for name in scored["rows"]:
        for path in _results(scored, name):
            proc = subprocess.run(["dciodvfy", str(path)], capture_output=True, timeout=60)
            text = (proc.stdout + proc.stderr).decode("latin-1")
            errors = [line for line in text.splitlines() if line.startswith("Error")]
            assert errors == [], (name, path.name[-6:], errors)


def test_invalid_values_are_emptied_and_listed_without_their_values(scored):
    source = pydicom.dcmread(scored["inputs"] / "966_fixed.dcm", stop_before_pixels=True)
    for path in _results(scored, "966_fixed.dcm"):
        result = pydicom.dcmread(path, stop_before_pixels=True)
        assert result.PatientBirthDate == "" and result.AccessionNumber == ""  # present (Type 2), empty
        assert result.PatientID == source.PatientID and result.StudyInstanceUID == source.StudyInstanceUID
    stderr = scored["proc"].stderr
    assert ("966_fixed.dcm: 2 attribute(s) not copied as they were into the SR and SC: AccessionNumber: too long "
            "SH, emptied; PatientBirthDate: not a valid DA, emptied") in stderr
    assert str(source.PatientBirthDate) not in stderr


def test_non_ascii_text_is_decoded_and_declared_as_utf8(scored):
    for name in ("latin1.dcm", "utf8.dcm"):
        for path in _results(scored, name):
            result = pydicom.dcmread(path, stop_before_pixels=True)
            assert result.SpecificCharacterSet == "ISO_IR 192", (name, path.name[-6:])
            assert str(result.PatientName) == NAMES["PatientName"]
            assert str(result.ReferringPhysicianName) == NAMES["ReferringPhysicianName"]


def test_a_scored_dicom_without_its_results_fails_the_run(scored, tmp_path):
    """Exit 4 (outputs missing, see the exit-code table) when a scored DICOM's SR cannot be written."""
    from tests.support import run_cli

    folder = tmp_path / "dcm"
    folder.mkdir()
    blocked = _results(scored, "latin1.dcm")[0]
    (folder / blocked.name).write_bytes(b"someone else's file")
    proc = run_cli("batch", scored["inputs"] / "latin1.dcm", "--model", scored["bundle"], "--out", tmp_path / "r.csv",
                   "--dicom-out", folder, "-j", "0")
    assert proc.returncode == 4, proc.stderr
    assert "OUTPUTS MISSING: 1 rows" in proc.stderr
