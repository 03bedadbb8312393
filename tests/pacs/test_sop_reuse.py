"""One SOP Instance UID, one image: an instance sent (or pulled) again under a SOP Instance UID the
spool holds for another patient or study is kept apart with an error row and no result, never over
the first one (whose SR the PACS already has under UIDs made from it); the same instance sent again
changes nothing. Real storescu, real Orthanc."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest

from cxr_deploy.batch.results_file import read_results
from cxr_deploy.pacs.spool import REUSED_ERROR

from tests.support import STORESCU, free_port, sized_instance, start_listener, stop_process, storescu, wait_for
from tests.support import pacs_config as _config

pytestmark = pytest.mark.skipif(STORESCU is None, reason="dcmtk's storescu not installed (.ci/run installs dcmtk)")


def _variants(tmp_path: Path) -> tuple[Path, Path, Path, str]:
    """x (patient DEMO-0004), x2 (same SOP Instance UID and study, another patient and image),
    x3 (same SOP Instance UID, another patient and study); the UID."""
    x = sized_instance(tmp_path / "x.dcm", 256)
    ds = pydicom.dcmread(x)
    ds.PatientID, ds.PatientName = "OTHER-1", "Other^Patient"
    ds.PixelData = np.roll(ds.pixel_array, 60, axis=1).astype(np.uint16).tobytes()
    ds.save_as(tmp_path / "x2.dcm", enforce_file_format=True)
    ds.StudyInstanceUID, ds.SeriesInstanceUID = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    ds.save_as(tmp_path / "x3.dcm", enforce_file_format=True)
    return x, tmp_path / "x2.dcm", tmp_path / "x3.dcm", str(ds.SOPInstanceUID)


def test_listen_keeps_a_reused_sop_instance_uid_apart(orthanc, tiny_bundle, tmp_path):
    orthanc.delete_all()
    x, x2, x3, uid = _variants(tmp_path)
    port = free_port()
    proc, _ = start_listener(tmp_path, orthanc, tiny_bundle, port)
    spool, csv = tmp_path / "spool", tmp_path / "spool" / "results.csv"

    def rows(n):
        return wait_for(lambda: csv.exists() and len(found := read_results(csv)) >= n and found, f"{n} rows")

    try:
        assert "Received Store Response (Success)" in storescu(port, x)
        wait_for(lambda: len(orthanc.get("/instances")) == 2, "x's SR and SC in the PACS")
        assert "Received Store Response (Success)" in storescu(port, x2)  # same study, another patient
        assert rows(2)[1]["status"] == "error" and rows(2)[1]["error"] == REUSED_ERROR, rows(2)
        (spooled,) = (spool / "incoming").rglob("*.dcm")
        assert pydicom.dcmread(spooled).PatientID == "DEMO-0004"  # not overwritten
        assert "Received Store Response (Success)" in storescu(port, x3)  # another study, another patient
        assert rows(3)[2]["status"] == "error" and rows(3)[2]["error"] == REUSED_ERROR, rows(3)
        assert "Received Store Response (Success)" in storescu(port, x)  # the same instance again: a no-op
        y = sized_instance(tmp_path / "y.dcm", 256)
        assert "Received Store Response (Success)" in storescu(port, y)
        wait_for(lambda: len(orthanc.get("/instances")) == 4, "y's SR and SC in the PACS")
        final = read_results(csv)
    finally:
        stop_process(proc)
    assert len(final) == 4 and [r["status"] for r in final] == ["ok", "error", "error", "ok"], final
    assert [r["sop_instance_uid"] for r in final[:3]] == [uid] * 3
    y_uid = pydicom.dcmread(y).SOPInstanceUID
    assert {p.name for p in (spool / "incoming").rglob("*.dcm")} == {f"{uid}.dcm", f"{y_uid}.dcm"}
    results = sorted((spool / "results").glob(f"{uid}.*.dcm"))
    assert len(results) == 2 and {pydicom.dcmread(p).PatientID for p in results} == {"DEMO-0004"}
    patients = {orthanc.get(f"/instances/{i}/simplified-tags")["PatientID"] for i in orthanc.get("/instances")}
    assert patients == {"DEMO-0004"}  # nothing of the other patient was sent under x's result UIDs


def test_pull_keeps_a_reused_sop_instance_uid_apart(orthanc, tmp_path, cli):
    orthanc.delete_all()
    x, x2, x3, uid = _variants(tmp_path)
    config = _config(tmp_path, orthanc)
    study = str(pydicom.dcmread(x).StudyInstanceUID)
    orthanc.upload(x)
    assert cli("pacs", "pull", "--config", config, "--study-uid", study).returncode == 0
    orthanc.delete_all()
    orthanc.upload(x3)  # the PACS now has that SOP Instance UID in another study, for another patient
    pulled = cli("pacs", "pull", "--config", config, "--study-uid", str(pydicom.dcmread(x3).StudyInstanceUID))
    assert pulled.returncode == 3 and REUSED_ERROR in pulled.stderr, pulled.stderr
    (spooled,) = (tmp_path / "spool" / "incoming").rglob("*.dcm")
    assert spooled.parent.name == study and pydicom.dcmread(spooled).PatientID == "DEMO-0004"
    (apart,) = (tmp_path / "spool" / "reused").rglob("*.dcm")
    assert pydicom.dcmread(apart).PatientID == "OTHER-1" and apart.name.startswith(uid)
    # the same study, another patient: the search names the patient, so it is fetched and kept apart too
    orthanc.delete_all()
    orthanc.upload(x2)
    pulled = cli("pacs", "pull", "--config", config, "--study-uid", study)
    assert pulled.returncode == 3 and REUSED_ERROR in pulled.stderr, pulled.stderr
    assert len(list((tmp_path / "spool" / "reused").rglob("*.dcm"))) == 2
    assert pydicom.dcmread(spooled).PatientID == "DEMO-0004"
    orthanc.delete_all()
    orthanc.upload(x)  # the same instance: already there, not fetched
    assert "0 done, 1 already there, 0 failed" in cli("pacs", "pull", "--config", config, "--study-uid", study).stderr
