"""Only frontal chest radiographs are scored (issue 9, item 2), checked on the real DICOM corpus.

The expectation is computed here from the corpus manifest (written when the corpus was collected,
independently of this package): Modality, SOP class name, BodyPartExamined, ViewPosition.
"""

from __future__ import annotations

import pytest

from cxr_deploy.batch.results_file import read_results
from cxr_deploy.eligibility import ChestFilter, DicomHeader

BLANK = {"pylibjpeg_data/JPEG2000Lossless/JPEG2KLossless_1s_1f_u_16_16.dcm"}
RADIOGRAPH_CLASSES = {"Computed Radiography Image Storage", "Digital X-Ray Image Storage - For Presentation"}


def _is_frontal_chest_radiograph(entry: dict) -> bool:
    return (entry["modality"] in ("CR", "DX") and entry["sop_class"] in RADIOGRAPH_CLASSES
            and entry["body_part"].upper() in ("", "CHEST", "THORAX")
            and entry["view_position"].upper() not in ("LL", "RL", "LATERAL"))


@pytest.fixture(scope="module")
def corpus_rows(shared_data, tiny_bundle, tmp_path_factory):
    from cxr_deploy.api import run_batch

    out = tmp_path_factory.mktemp("filter") / "r.csv"
    run_batch([shared_data / "dicom"], model=tiny_bundle, out=out, workers=2, batch_size=8, decode_timeout=60)
    root = str(shared_data / "dicom") + "/"
    return {r["path"].replace(root, ""): r for r in read_results(out)}


def test_non_chest_dicoms_are_skipped_with_a_reason_and_chest_radiographs_scored(corpus_rows, dicom_manifest):
    scored, skipped = [], []
    for entry in dicom_manifest:
        row = corpus_rows.get(entry["file"])
        if row is None or not entry["read_status"].startswith(("ok", "ERROR(strict)")):
            continue  # header unreadable: an error row, covered by the reader tests
        if entry["modality"] and not _is_frontal_chest_radiograph(entry):
            assert row["status"] == "skipped", (entry["file"], row["status"], row["error"])
            assert row["probability"] == "" and row["predicted_label"] == ""
            assert "\n" not in row["error"] and ("chest radiograph" in row["error"] or "radiograph object" in
                                                 row["error"] or "view" in row["error"]), row["error"]
            assert row["modality"] == entry["modality"]
            skipped.append(entry["file"])
        elif entry["file"] in BLANK:  # a frontal chest DX, but uniformly white after its own window
            assert row["status"] == "error" and row["error"].startswith("blank or saturated image"), row
            assert row["probability"] == "" and row["predicted_label"] == ""
        elif _is_frontal_chest_radiograph(entry) and entry["decode_status"] == "ok":
            assert row["status"] == "ok", (entry["file"], row["error"])
            assert 0.0 <= float(row["probability"]) <= 1.0
            scored.append(entry["file"])
    # the corpus holds CT, MR, US, NM, RT, SEG, SR, SC objects and four frontal chest CR/DX files, one blank
    assert len(skipped) > 150 and len(scored) == 3, (len(skipped), scored)
    reasons = {corpus_rows[f]["error"].split("(")[1].split(";")[0] for f in skipped if "Modality" in corpus_rows[f]["error"]}
    assert {"Modality CT", "Modality MR", "Modality US", "Modality RTDOSE"} <= reasons
    # a skipped row says what the object was, never who the patient is
    import pydicom

    for name in skipped:
        ds = pydicom.dcmread(corpus_rows[name]["path"], stop_before_pixels=True, force=True)
        cells = set(corpus_rows[name].values())
        for keyword in ("PatientName", "PatientID"):
            value = str(ds.get(keyword, "") or "").strip()
            assert not value or len(value) < 3 or value not in cells, (name, keyword)


def test_lateral_and_non_chest_radiographs_are_skipped(corpus_rows, dicom_manifest):
    by_view = [e for e in dicom_manifest if e["modality"] == "CR" and e["view_position"] == "LL"]
    assert by_view, "the corpus has a lateral CR"
    for entry in by_view:
        assert corpus_rows[entry["file"]]["status"] == "skipped"
    spines = [e for e in dicom_manifest if e["modality"] == "CR" and e["body_part"] == "CSPINE"
              and e["view_position"] == "AP"]
    for entry in spines:
        assert "BodyPartExamined CSPINE" in corpus_rows[entry["file"]]["error"]


def test_flags_widen_the_filter(tiny_bundle, shared_data, dicom_manifest, tmp_path, cli):
    lateral = next(e["file"] for e in dicom_manifest if e["modality"] == "CR" and e["view_position"] == "LL")
    ct_head = next(e["file"] for e in dicom_manifest if e["modality"] == "CT" and e["body_part"] == "HEAD"
                   and e["decode_status"] == "ok")
    files = [shared_data / "dicom" / lateral, shared_data / "dicom" / ct_head]

    def statuses(*flags):
        out = tmp_path / f"r{len(list(tmp_path.iterdir()))}.csv"
        proc = cli("batch", *files, "--model", tiny_bundle, "--out", out, "-j", "0", *flags)
        assert proc.returncode == 0, proc.stderr
        return [r["status"] for r in read_results(out)]

    assert statuses() == ["skipped", "skipped"]
    assert statuses("--accept-any-view", "--body-part", "CSPINE") == ["ok", "skipped"]
    assert statuses("--modality", "CT", "--body-part", "HEAD") == ["skipped", "ok"]
    assert statuses("--no-dicom-filter") == ["ok", "ok"]


@pytest.mark.parametrize("header, reason", [
    (DicomHeader("DX", "1.2.840.10008.5.1.4.1.1.1.1", "CHEST", "PA"), None),
    (DicomHeader("CR", "1.2.840.10008.5.1.4.1.1.1", None, None), None),  # body part and view often empty
    (DicomHeader("dx", "1.2.840.10008.5.1.4.1.1.1.1", " thorax ", "ap"), None),
    (DicomHeader("CT", "1.2.840.10008.5.1.4.1.1.2", "CHEST", None), "not a chest radiograph (Modality CT"),
    (DicomHeader(None, "1.2.840.10008.5.1.4.1.1.7", None, None), "not a chest radiograph (no Modality"),
    (DicomHeader("DX", "1.2.840.10008.5.1.4.1.1.7", "CHEST", "PA"), "not a radiograph object (Secondary Capture"),
    (DicomHeader("DX", "1.2.840.10008.5.1.4.1.1.1.1.1", "CHEST", "PA"), "For Processing"),
    (DicomHeader("CR", "1.2.840.10008.5.1.4.1.1.1", "SKULL", "PA"), "BodyPartExamined SKULL"),
    (DicomHeader("CR", "1.2.840.10008.5.1.4.1.1.1", "CHEST", "LL"), "lateral view (ViewPosition LL)"),
    (DicomHeader("CR", "1.2.840.10008.5.1.4.1.1.1", "CHEST", "RAO"), "oblique view"),
])
def test_the_rule(header, reason):
    got = ChestFilter().reason_to_skip(header)
    assert (got is None) if reason is None else (reason in got), got
    assert ChestFilter(enabled=False).reason_to_skip(header) is None
