"""Round trip against a real Orthanc: upload the chest DICOMs, ``pacs pull`` (QIDO + WADO), ``batch
--dicom-out``, ``pacs push`` (STOW-RS, then C-STORE): the SR and SC are found in the source study
(QIDO), parse back and carry the CSV's probability; reruns move nothing twice."""

from __future__ import annotations

import json

import pydicom
import pytest

from cxr_deploy.batch.results_file import read_results

from tests.support import SAMPLES, sr_items
from tests.support import pacs_config as _config



def test_pull_score_push_round_trip(orthanc, tiny_bundle, tmp_path, cli):
    orthanc.delete_all()
    sources = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID: p for p in (SAMPLES / "dicom").iterdir()}
    for path in sources.values():
        orthanc.upload(path)
    config = _config(tmp_path, orthanc)

    pulled = cli("pacs", "pull", "--config", config, "--modality", "DX")
    assert pulled.returncode == 0, pulled.stderr
    assert "3 done, 0 already there, 0 failed" in pulled.stderr
    spooled = sorted((tmp_path / "spool").rglob("*.dcm"))
    assert len(spooled) == 3 and {p.stem for p in spooled} <= set(sources)
    again = cli("pacs", "pull", "--config", config, "--modality", "DX")
    assert "0 done, 3 already there" in again.stderr  # a rerun fetches nothing it already has

    out, results = tmp_path / "r.csv", tmp_path / "results"
    scored = cli("batch", tmp_path / "spool", "--model", tiny_bundle, "--out", out, "--dicom-out", results, "-j", "1")
    assert scored.returncode == 0, scored.stderr
    rows = {r["sop_instance_uid"]: r for r in read_results(out)}

    pushed = cli("pacs", "push", results, "--config", config)
    assert pushed.returncode == 0, pushed.stderr
    assert "6 done, 0 already there, 0 failed" in pushed.stderr
    assert "0 done, 6 already there" in cli("pacs", "push", results, "--config", config).stderr  # idempotent

    from dicomweb_client.api import DICOMwebClient

    client = DICOMwebClient(url=f"{orthanc.url}/dicom-web")
    for uid, row in rows.items():
        found = client.search_for_instances(study_instance_uid=row["study_instance_uid"],
                                            search_filters={"Modality": "SR"})
        assert len(found) == 1, uid
        sr_uid = found[0]["00080018"]["Value"][0]
        sr = client.retrieve_instance(row["study_instance_uid"], found[0]["0020000E"]["Value"][0], sr_uid)
        values = [float(i.MeasuredValueSequence[0].NumericValue) for i in sr_items(sr) if i.ValueType == "NUM"
                  and i.ConceptNameCodeSequence[0].get("CodeValue") == "PNEUMONIA_PROB"]
        assert values == [pytest.approx(float(row["probability"]), abs=1e-6)]
        assert len(client.search_for_instances(study_instance_uid=row["study_instance_uid"],
                                               search_filters={"Modality": "OT"})) == 1  # the overlay SC
    log = [json.loads(line) for line in (results / "push-log.jsonl").read_text().splitlines()]
    assert len(log) == 6 and {e["status"] for e in log} == {"stored"}


def test_cstore_push_and_its_failures_are_logged(orthanc, tiny_bundle, tmp_path, cli):
    from cxr_deploy.pacs.config import load_pacs_config
    from cxr_deploy.pacs.transfer import push

    orthanc.delete_all()
    results = tmp_path / "results"
    assert cli("batch", SAMPLES / "dicom", "--model", tiny_bundle, "--out", tmp_path / "r.csv", "--dicom-out",
               results, "-j", "0").returncode == 0
    files = sorted(results.glob("*.dcm"))
    summary = push(load_pacs_config(_config(tmp_path, orthanc, push="cstore")), files, log_dir=results)
    assert summary.counts == {"done": 8, "already": 0, "failed": 0}, summary.failures
    assert len(orthanc.get("/instances")) == 8
    # a PACS that is not there: every instance fails after the retries, each with its reason
    (tmp_path / "down").mkdir()
    bad = _config(tmp_path / "down", orthanc, push="cstore")
    bad.write_text(bad.read_text().replace(f"port = {orthanc.dicom_port}", "port = 9"))
    summary = push(load_pacs_config(bad), files[:1], log_dir=tmp_path / "down", retry_delays=(0.01,))
    assert summary.counts["failed"] == 1 and "after 2 tries" in summary.failures[0]


def test_secrets_come_from_the_environment_never_the_config(orthanc, tmp_path, monkeypatch):
    from cxr_deploy.pacs.config import PacsConfigError, load_pacs_config

    path = _config(tmp_path, orthanc, auth="basic", username="cxr", password="hunter2")
    with pytest.raises(PacsConfigError, match="never in the config itself"):
        load_pacs_config(path)
    path = _config(tmp_path, orthanc, auth="basic", username="cxr", password_env="CXR_TEST_SECRET")
    with pytest.raises(PacsConfigError, match="CXR_TEST_SECRET"):
        load_pacs_config(path)
    monkeypatch.setenv("CXR_TEST_SECRET", "hunter2")
    config = load_pacs_config(path)
    assert config.pacs.secret == "hunter2" and "hunter2" not in repr(config)


def test_leading_zero_uids_are_pulled_scored_and_get_their_results(orthanc, tiny_bundle, tmp_path, cli):
    """Real devices send UID components with a leading zero ("….0123"): such an instance is pulled,
    scored, and its SR and SC are written and pushed back into its study."""
    orthanc.delete_all()
    ds = pydicom.dcmread(SAMPLES / "dicom" / "normal_dx_16bit_rescale_window.dcm")
    study, series, sop = "1.2.826.0.1.3680043.0123", "1.2.826.0.1.3680043.0123.01", "1.2.826.0.1.3680043.0123.01.007"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = sop
    source = tmp_path / "zero.dcm"
    ds.save_as(source)
    orthanc.upload(source)
    config = _config(tmp_path, orthanc)
    pulled = cli("pacs", "pull", "--config", config, "--study-uid", study)
    assert pulled.returncode == 0 and "1 done, 0 already there, 0 failed" in pulled.stderr, pulled.stderr

    results = tmp_path / "results"
    scored = cli("batch", tmp_path / "spool", "--model", tiny_bundle, "--out", tmp_path / "r.csv",
                 "--dicom-out", results, "-j", "0")
    assert scored.returncode == 0, scored.stderr
    assert [row["error"] for row in read_results(tmp_path / "r.csv")] == [""]
    written = sorted(p.name for p in results.glob("*.dcm"))
    assert len(written) == 2 and all(name.startswith(sop + ".") for name in written)
    pushed = cli("pacs", "push", results, "--config", config)
    assert pushed.returncode == 0 and "2 done" in pushed.stderr, pushed.stderr
    modalities = sorted(orthanc.get(f"/series/{s}")["MainDicomTags"]["Modality"]
                        for s in orthanc.get(f"/studies/{orthanc.get('/studies')[0]}")["Series"])
    assert len(orthanc.get("/studies")) == 1 and modalities == ["DX", "OT", "SR"]
