"""``pacs listen`` with real peers: dcmtk's storescu and Orthanc send to it; it scores what arrives
and sends the SR + SC to Orthanc; it refuses who and what does not belong; after ``kill -9`` a
restart scores every received instance exactly once."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pydicom
import pytest

from cxr_deploy.batch.results_file import read_results

from tests.support import (STORESCU, SAMPLES, distinct_instances, free_port, self_signed_cert, start_listener, start_tls_listener,
                           stop_process, storescu, wait_rows)

pytestmark = pytest.mark.skipif(STORESCU is None, reason="dcmtk's storescu not installed (.ci/run installs dcmtk)")
_listener, _storescu, _wait_rows = start_listener, storescu, wait_rows


_stop = stop_process


def test_listener_receives_scores_and_sends_results(orthanc, tiny_bundle, tmp_path, shared_data):
    import requests

    orthanc.delete_all()
    port = free_port()
    proc, config = _listener(tmp_path, orthanc, tiny_bundle, port, max_instance_mb=1.7)
    try:
        spool = tmp_path / "spool"
        sent = _storescu(port, SAMPLES / "dicom" / "normal_jpeg_baseline.dcm")
        assert "Received Store Response (Success)" in sent, sent
        # Orthanc forwards an instance to the listener (C-STORE SCU side of a real PACS)
        source = orthanc.upload(SAMPLES / "dicom" / "pneumonia_cr_monochrome1.dcm")["ID"]
        requests.put(f"{orthanc.url}/modalities/CXRDEPLOY", json={"AET": "CXRDEPLOY", "Host": "127.0.0.1",
                                                                  "Port": port}, timeout=10).raise_for_status()
        requests.post(f"{orthanc.url}/modalities/CXRDEPLOY/store", json={"Resources": [source]},
                      timeout=60).raise_for_status()
        # a non-chest modality, a non-image object: stored, then skipped with the reason
        for name in ("CT_small.dcm", "rtplan.dcm"):
            assert "Success" in _storescu(port, shared_data / "dicom" / "pydicom_test_files" / name)
        rows = {Path(r["path"]).name: r for r in _wait_rows(spool / "results.csv", 4)}
        statuses = sorted(r["status"] for r in rows.values())
        assert statuses == ["ok", "ok", "skipped", "skipped"], rows
        assert all("Modality" in r["error"] for r in rows.values() if r["status"] == "skipped")
        # the results arrive in Orthanc, in the source studies
        deadline, modalities = time.monotonic() + 60, []
        while time.monotonic() < deadline:
            modalities = sorted(orthanc.get(f"/instances/{i}/simplified-tags").get("Modality", "")
                                for i in orthanc.get("/instances"))
            if modalities.count("SR") == 2 and modalities.count("OT") == 2:
                break
            time.sleep(0.3)
        assert modalities.count("SR") == 2 and modalities.count("OT") == 2, modalities

        # who and what does not belong
        refused = _storescu(port, SAMPLES / "dicom" / "IM000004", aet="INTRUDER")
        assert "Association Rejected" in refused, refused
        big = _storescu(port, SAMPLES / "dicom" / "normal_dx_16bit_rescale_window.dcm")  # 1.9 MB > 1.7 MB
        assert "Refused: OutOfResources" in big, big
        evil = tmp_path / "evil.dcm"
        ds = pydicom.dcmread(SAMPLES / "dicom" / "IM000004")
        ds.StudyInstanceUID = "1.2.3/../../../escape"
        ds.save_as(evil, enforce_file_format=True)
        refused = _storescu(port, evil)
        assert "Success" not in refused.split("Received Store Response")[-1], refused
        truncated = tmp_path / "truncated.dcm"
        truncated.write_bytes((SAMPLES / "dicom" / "IM000004").read_bytes()[:600])
        _storescu(port, truncated)  # storescu itself may refuse to send it; the listener must survive
        assert not list(tmp_path.rglob("escape*")) and proc.poll() is None
        assert "Success" in _storescu(port, SAMPLES / "dicom" / "IM000004")  # still listening
        _wait_rows(spool / "results.csv", 5)
    finally:
        code = _stop(proc)
    assert code == 0, (tmp_path / "listen.log").read_text()[-2000:]  # SIGTERM: a clean stop
    log = (tmp_path / "listen.log").read_text()
    assert "not a valid DICOM UID" in log and "over the" in log


def test_kill_9_then_restart_scores_every_instance_exactly_once(orthanc, tiny_bundle, tmp_path):
    orthanc.delete_all()
    port = free_port()
    proc, _ = _listener(tmp_path, orthanc, tiny_bundle, port)
    files = distinct_instances(tmp_path, 8)  # eight distinct instances of one study
    try:
        for path in files[:4]:
            assert "Success" in _storescu(port, path)
        _wait_rows(tmp_path / "spool" / "results.csv", 1)
        os.killpg(proc.pid, signal.SIGKILL)  # mid-stream
        proc.wait()
        proc, _ = _listener(tmp_path, orthanc, tiny_bundle, port)
        for path in files[4:]:
            assert "Success" in _storescu(port, path)
        rows = _wait_rows(tmp_path / "spool" / "results.csv", 8)
        time.sleep(1.5)  # anything scored twice would show up by now
        rows = read_results(tmp_path / "spool" / "results.csv")
    finally:
        _stop(proc)
    uids = [r["sop_instance_uid"] for r in rows]
    assert sorted(uids) == sorted(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in files)
    assert len(uids) == len(set(uids)) == 8 and all(r["status"] == "ok" for r in rows)


def test_dicom_tls_between_push_and_listen(tiny_bundle, tmp_path):
    """DICOM TLS as an option: the listener serves TLS with its certificate; push verifies it
    against ca_file; a plain association to the TLS port stores nothing."""
    from cxr_deploy.pacs.config import load_pacs_config
    from cxr_deploy.pacs.listen import wait_for_port
    from cxr_deploy.pacs.transfer import push

    made = self_signed_cert(tmp_path)
    assert not isinstance(made, str), made
    cert, key = made
    port = free_port()
    proc, config = start_tls_listener(tmp_path, tiny_bundle, port, cert, key, ["CXRDEPLOY", "STORESCU"])
    try:
        wait_for_port("127.0.0.1", port, timeout=60)
        plain = _storescu(port, SAMPLES / "dicom" / "IM000004")
        assert "Received Store Response (Success)" not in plain
        summary = push(load_pacs_config(config), [SAMPLES / "dicom" / "IM000004"], log_dir=tmp_path,
                       retry_delays=())
        assert summary.counts["done"] == 1, summary.failures
        assert len(list((tmp_path / "spool" / "incoming").rglob("*.dcm"))) == 1
    finally:
        _stop(proc)


@pytest.mark.parametrize("limits, expected", [
    ({"max_spool_gb": 0.000001}, "Refused: OutOfResources"),  # ~1 KB of spool: full at once
    # our 127.0.0.1 is not on the list: rejected at once (an abort left storescu waiting its ACSE timeout)
    ({"allowed_addresses": '["192.0.2.1"]'}, "Association Rejected"),
])
def test_spool_limit_and_address_list(orthanc, tiny_bundle, tmp_path, limits, expected):
    port = free_port()
    proc, _ = _listener(tmp_path, orthanc, tiny_bundle, port, **limits)
    try:
        answer = _storescu(port, SAMPLES / "dicom" / "IM000004")
        assert expected in answer and "Received Store Response (Success)" not in answer, answer
        assert not list((tmp_path / "spool" / "incoming").rglob("*.dcm"))
        assert proc.poll() is None  # still listening
    finally:
        _stop(proc)


def test_a_truncated_data_set_sent_over_the_network_ends_with_a_reason(orthanc, tiny_bundle, tmp_path):
    """pynetdicom sends a file's bytes as they are (no decoding): a data set cut short in its pixel
    data arrives truncated. The listener answers, and the instance ends as an error row with the reason."""
    from pynetdicom import AE

    port = free_port()
    proc, _ = _listener(tmp_path, orthanc, tiny_bundle, port)
    data = (SAMPLES / "dicom" / "IM000004").read_bytes()
    truncated = tmp_path / "truncated.dcm"
    truncated.write_bytes(data[: len(data) // 2])
    try:
        ae = AE(ae_title="STORESCU")
        ae.add_requested_context(pydicom.dcmread(truncated, stop_before_pixels=True, force=True).SOPClassUID,
                                 "1.2.840.10008.1.2.1")
        assoc = ae.associate("127.0.0.1", port, ae_title="CXRDEPLOY")
        assert assoc.is_established
        status = assoc.send_c_store(truncated)
        assoc.release()
        assert status and status.Status in (0x0000, 0xC000)
        if status.Status == 0x0000:  # stored as received: scoring gives it an error row with the reason
            (row,) = _wait_rows(tmp_path / "spool" / "results.csv", 1)
            assert row["status"] == "error" and "truncated" in row["error"]
        assert proc.poll() is None
    finally:
        _stop(proc)
