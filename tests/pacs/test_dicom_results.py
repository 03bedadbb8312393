"""``batch --dicom-out``: a TID 1500 Comprehensive SR and an overlay Secondary Capture per scored DICOM,
in the source's study, with deterministic UIDs; checked by reading them back and, where installed,
by dicom3tools' ``dciodvfy`` (``.ci/run`` installs it)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pydicom
import pytest

from cxr_deploy.batch.results_file import read_results
from cxr_deploy.pacs.uids import derived_uid, is_valid_uid

from tests.support import sr_items

SAMPLES = Path(__file__).resolve().parents[2] / "samples"


def _code(item) -> str:
    if "ConceptNameCodeSequence" not in item:
        return ""
    concept = item.ConceptNameCodeSequence[0]
    return str(concept.get("CodeValue") or concept.get("LongCodeValue") or "")


@pytest.fixture(scope="module")
def run(tiny_bundle, shared_data, tmp_path_factory):
    from cxr_deploy.api import run_batch

    root = tmp_path_factory.mktemp("dicomout")
    inputs = root / "in"
    shutil.copytree(SAMPLES / "dicom", inputs)
    shutil.copy(shared_data / "dicom" / "pydicom_test_files" / "CT_small.dcm", inputs / "ct.dcm")  # not a CXR
    out, dicom_out = root / "r.csv", root / "dcm"
    summary = run_batch([inputs], model=tiny_bundle, out=out, workers=1, dicom_out=dicom_out)
    assert summary.exit_code == 0
    return {"rows": {Path(r["path"]).name: r for r in read_results(out)}, "dir": dicom_out, "inputs": inputs,
            "out": out, "bundle": tiny_bundle}


def test_one_report_and_one_capture_per_scored_radiograph(run):
    rows = run["rows"]
    scored = [r for r in rows.values() if r["status"] == "ok"]
    assert len(scored) == 4 and rows["ct.dcm"]["status"] == "skipped"
    files = sorted(p.name for p in run["dir"].iterdir())
    assert len(files) == 8 and not [f for f in files if rows["ct.dcm"]["sop_instance_uid"] in f]
    for row in scored:
        base = run["dir"] / f"{row['sop_instance_uid']}.{row['model_id']}"
        assert Path(f"{base}.sr.dcm").is_file() and Path(f"{base}.sc.dcm").is_file()


def test_report_content_matches_the_csv_and_sits_in_the_source_study(run):
    import highdicom as hd

    for name, row in run["rows"].items():
        if row["status"] != "ok":
            continue
        source = pydicom.dcmread(run["inputs"] / name, stop_before_pixels=True)
        sr = pydicom.dcmread(run["dir"] / f"{row['sop_instance_uid']}.{row['model_id']}.sr.dcm")
        assert sr.SOPClassUID == hd.sr.ComprehensiveSR.__dict__.get("SOPClassUID", "1.2.840.10008.5.1.4.1.1.88.33")
        assert (sr.StudyInstanceUID, sr.PatientID, sr.PatientName) == \
            (source.StudyInstanceUID, source.PatientID, source.PatientName)
        assert sr.SeriesInstanceUID != source.SeriesInstanceUID and sr.Modality == "SR"
        assert sr.ContentTemplateSequence[0].TemplateIdentifier == "1500"
        items = list(sr_items(sr))
        evaluation = next(i for i in items if _code(i) == "233604007")  # SNOMED CT "Pneumonia"
        present = evaluation.ConceptCodeSequence[0].CodeValue == "52101004"
        assert present == (row["predicted_label"] == "PNEUMONIA")
        values = {_code(i): float(i.MeasuredValueSequence[0].NumericValue) for i in items
                  if i.ValueType == "NUM"}
        assert values["PNEUMONIA_PROB"] == pytest.approx(float(row["probability"]), abs=1e-6)
        assert values["DECISION_THRESH"] == pytest.approx(float(row["threshold"]), abs=1e-6)
        texts = [str(i.get("TextValue", "")) for i in items]
        assert f"model_id={row['model_id']}" in texts  # TID 4019 algorithm parameters
        evidence = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
        assert evidence.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
        # highdicom reads it back as a TID 1500 report
        report = hd.sr.srread(run["dir"] / f"{row['sop_instance_uid']}.{row['model_id']}.sr.dcm")
        assert report.SOPInstanceUID == sr.SOPInstanceUID


def test_capture_is_marked_not_for_diagnosis_and_burned_in(run):
    row = next(r for r in run["rows"].values() if r["status"] == "ok")
    sc = pydicom.dcmread(run["dir"] / f"{row['sop_instance_uid']}.{row['model_id']}.sc.dcm")
    assert sc.BurnedInAnnotation == "YES" and sc.PhotometricInterpretation == "RGB"
    assert sc.StudyInstanceUID == row["study_instance_uid"] and sc.Modality == "OT"
    banner = sc.pixel_array[:12]
    assert (banner.min(axis=2) > 200).any() and (banner.max(axis=2) < 30).mean() > 0.5  # white text on black


def test_uids_are_deterministic_so_a_rerun_replaces(run, tmp_path):
    from cxr_deploy.api import run_batch

    before = {p.name: pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in run["dir"].iterdir()}
    run_batch([run["inputs"]], model=run["bundle"], out=tmp_path / "again.csv", workers=0, dicom_out=run["dir"])
    after = {p.name: pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in run["dir"].iterdir()}
    assert after == before and len(set(after.values())) == 8
    assert all(is_valid_uid(uid) and uid.startswith("2.25.") for uid in after.values())


def test_derived_uids():
    a = derived_uid("1.2.3.4", "0123456789abcdef", "sr-instance")
    assert a == derived_uid("1.2.3.4", "0123456789abcdef", "sr-instance") and is_valid_uid(a)
    assert a != derived_uid("1.2.3.4", "fedcba9876543210", "sr-instance")  # another model
    assert a != derived_uid("1.2.3.4", "0123456789abcdef", "sc-instance")  # another kind
    site = derived_uid("1.2.3.4", "0123456789abcdef", "sr-instance", root="1.2.826.0.1.99999")
    assert site.startswith("1.2.826.0.1.99999.") and is_valid_uid(site)
    with pytest.raises(ValueError):
        derived_uid("1.2.3.4/../x", "0123456789abcdef", "sr-instance")


def test_a_foreign_file_at_the_result_name_is_not_replaced(run, tmp_path):
    from cxr_deploy.api import run_batch

    row = next(r for r in run["rows"].values() if r["status"] == "ok")
    folder = tmp_path / "dcm"
    folder.mkdir()
    foreign = folder / f"{row['sop_instance_uid']}.{row['model_id']}.sr.dcm"
    foreign.write_bytes(b"someone else's file")
    run_batch([run["inputs"]], model=run["bundle"], out=tmp_path / "r.csv", workers=0, dicom_out=folder)
    assert foreign.read_bytes() == b"someone else's file"
    again = {Path(r["path"]).name: r for r in read_results(tmp_path / "r.csv")}
    assert "DICOM results not written" in again[Path(row["path"]).name]["error"]


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dicom3tools' dciodvfy not installed (.ci/run installs it)")
def test_dciodvfy_finds_no_error(run):
    for path in sorted(run["dir"].iterdir()):
        proc = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
        errors = [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("Error")]
        assert errors == [], (path.name, errors)


def test_two_files_with_one_sop_instance_get_one_result(tiny_bundle, tmp_path):
    from cxr_deploy.api import run_batch

    copy = tmp_path / "copy" / "IM000004"
    copy.parent.mkdir()
    shutil.copy(SAMPLES / "dicom" / "IM000004", copy)
    out, folder = tmp_path / "r.csv", tmp_path / "dcm"
    run_batch([SAMPLES / "dicom" / "IM000004", copy], model=tiny_bundle, out=out, workers=0, dicom_out=folder)
    rows = {Path(r["path"]).parent.name: r for r in read_results(out)}
    assert len(list(folder.glob("*.sr.dcm"))) == 1 and len(list(folder.glob("*.sc.dcm"))) == 1
    assert rows["dicom"]["error"] == "" and "already written for" in rows["copy"]["error"]
    assert rows["copy"]["status"] == "ok"  # the prediction stands; only the duplicate objects are not written


def test_dicom_library_warnings_are_logged_once_per_kind_without_names(tiny_bundle, tmp_path):
    """highdicom warns for every single-component patient name it copies into a result object,
    quoting the name; a night's run printed one such line per file. Each kind is logged once, and no
    quoted value (a patient's name) reaches the terminal."""
    import pydicom
    from pydicom.uid import generate_uid

    from tests.support import SAMPLES, run_cli

    folder = tmp_path / "in"
    folder.mkdir()
    names = ["SMITHJOHN", "DOEJANE", "ROEMARY"]
    for i, name in enumerate(names):
        ds = pydicom.dcmread(SAMPLES / "dicom" / "pneumonia_cr_monochrome1.dcm")
        ds.PatientName = name
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.save_as(folder / f"im{i}.dcm")
    for workers in ("0", "1"):
        out = tmp_path / f"r{workers}.csv"
        proc = run_cli("batch", folder, "--model", tiny_bundle, "--out", out, "-j", workers,
                       "--dicom-out", tmp_path / f"dicom{workers}")
        assert proc.returncode == 0, proc.stderr
        assert proc.stderr.count("unlikely to represent the intended person name") == 1, proc.stderr
        assert not any(name in proc.stderr for name in names), proc.stderr


def test_capture_references_its_source_image(run):
    """In a study with several images, a viewer ties the overlay to its radiograph through the SC's
    Source Image Sequence (and Referenced Image Sequence)."""
    for name, row in run["rows"].items():
        if row["status"] != "ok":
            continue
        source = pydicom.dcmread(run["inputs"] / name, stop_before_pixels=True)
        sc = pydicom.dcmread(run["dir"] / f"{row['sop_instance_uid']}.{row['model_id']}.sc.dcm")
        for sequence in ("SourceImageSequence", "ReferencedImageSequence"):
            refs = [(r.ReferencedSOPClassUID, r.ReferencedSOPInstanceUID) for r in sc.get(sequence, [])]
            assert refs == [(source.SOPClassUID, source.SOPInstanceUID)], (name, sequence)


def test_resume_rewrites_a_missing_result_of_a_leading_zero_instance(tiny_bundle, tmp_path):
    """A source whose SOP Instance UID has a leading-zero component gets its SR and SC, and --resume
    writes them again when one is missing (as for any other instance)."""
    from cxr_deploy.api import run_batch

    ds = pydicom.dcmread(SAMPLES / "dicom" / "normal_jpeg_baseline.dcm")
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = "1.2.826.0.1.3680043.0123.01.007"
    (tmp_path / "in").mkdir()
    ds.save_as(tmp_path / "in" / "zero.dcm")
    out, folder = tmp_path / "r.csv", tmp_path / "dcm"
    assert run_batch([tmp_path / "in"], model=tiny_bundle, out=out, workers=0, dicom_out=folder).exit_code == 0
    sr = next(folder.glob("*.sr.dcm"))
    assert sr.name.startswith(ds.SOPInstanceUID + ".")
    sr.unlink()
    run_batch([tmp_path / "in"], model=tiny_bundle, out=out, workers=0, dicom_out=folder, resume=True)
    assert sr.is_file()
