"""``pacs pull`` and ``pacs push`` against a PACS that caps its searches, is down, never answers, or
refuses: every search page is fetched and what the PACS did not list is reported; a down PACS is
reported after a few retries (not one full round of retries per file); a refusal is not retried;
an unreachable server is one line, never a traceback."""

from __future__ import annotations

import json
import socket

import pydicom
import pytest

from tests.support import SAMPLES, free_port
from tests.support import pacs_config as _config


def _instances(folder, series_sizes) -> tuple[str, list]:
    """One study with a series of each size, made of a real (small, JPEG) radiograph."""
    from pydicom.uid import generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    ds = pydicom.dcmread(SAMPLES / "dicom" / "normal_jpeg_baseline.dcm")
    ds.StudyInstanceUID, paths = generate_uid(), []
    for s, size in enumerate(series_sizes):
        ds.SeriesInstanceUID = generate_uid()
        for i in range(size):
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            paths.append(folder / f"s{s}-{i}.dcm")
            ds.save_as(paths[-1])
    return ds.StudyInstanceUID, paths


def test_pull_gets_every_instance_the_pacs_lists_and_reports_the_rest(capped_orthanc, tmp_path, cli):
    """The capped Orthanc lists at most 5 instances per search and ignores the offset past that:
    before, the pull took those 5 of 16, said "0 failed" and exited 0."""
    capped_orthanc.delete_all()
    study, paths = _instances(tmp_path / "src", [3, 3, 3, 7])
    for path in paths:
        capped_orthanc.upload(path)
    config = _config(tmp_path, capped_orthanc)
    pulled = cli("pacs", "pull", "--config", config, "--study-uid", study)
    assert pulled.returncode == 3, pulled.stderr
    assert "14 done, 0 already there, 2 failed" in pulled.stderr
    assert "the PACS listed 5 of the 7 instances of series" in pulled.stderr
    assert len(list((tmp_path / "spool").rglob("*.dcm"))) == 14
    again = cli("pacs", "pull", "--config", config, "--study-uid", study, "--parallel", "1")
    assert "0 done, 14 already there, 2 failed" in again.stderr
    (tmp_path / "limited").mkdir()
    config = _config(tmp_path / "limited", capped_orthanc)
    limited = cli("pacs", "pull", "--config", config, "--study-uid", study, "--limit", "7")
    assert limited.returncode == 0 and "7 done, 0 already there, 0 failed" in limited.stderr, limited.stderr


def test_pull_from_a_server_that_is_not_there_is_one_line(orthanc, tmp_path, cli):
    config = _config(tmp_path, orthanc)
    port = free_port()
    config.write_text(config.read_text().replace(orthanc.url, f"http://127.0.0.1:{port}"))
    down = cli("pacs", "pull", "--config", config, "--modality", "DX")
    assert down.returncode == 2
    assert down.stderr.splitlines() == [f"cxr-deploy: error: cannot reach http://127.0.0.1:{port}/dicom-web: "
                                        "[Errno 111] Connection refused"]
    config.write_text(config.read_text().replace(f"http://127.0.0.1:{port}/dicom-web", f"{orthanc.url}/no-such-root"))
    wrong = cli("pacs", "pull", "--config", config, "--modality", "DX")
    assert wrong.returncode == 2
    assert wrong.stderr.splitlines() == [f"cxr-deploy: error: QIDO-RS search at {orthanc.url}/no-such-root failed: "
                                         "HTTP 404 Not Found"]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """Three real DICOM files to push (small: the push outcome is what is tested)."""
    return _instances(tmp_path_factory.mktemp("topush"), [3])[1]


def _log(folder):
    path = folder / "push-log.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def test_push_to_a_pacs_that_is_down_stops_after_one_instance_and_says_so(orthanc, results, tmp_path, cli):
    """Before: silent while each of the files went through its four tries, then one line per file."""
    config = _config(tmp_path, orthanc)
    config.write_text(config.read_text().replace(orthanc.url, f"http://127.0.0.1:{free_port()}"))
    pushed = cli("pacs", "push", *results, "--config", config, "--log-dir", tmp_path)
    assert pushed.returncode == 3
    lines = pushed.stderr.splitlines()
    retries = [line for line in lines if "Connection refused; retry in" in line]
    assert [line.rsplit("retry in ", 1)[1] for line in retries] == ["0.5 s", "1 s", "2 s"], pushed.stderr
    assert "0 done, 0 already there, 3 failed" in pushed.stderr
    assert "(after 4 tries in" in pushed.stderr and "2 more not sent: the PACS is down" in pushed.stderr
    assert [e["status"] for e in _log(tmp_path)] == ["failed"]  # the two not tried are not logged as tried


def test_a_refusal_is_not_retried(capped_orthanc, results, tmp_path, cli):
    """HTTP 404 (a wrong DICOMweb root) and a rejected association (a called AE title the PACS does
    not answer to) are answers that a retry cannot change: one try each, not four with back-off."""
    config = _config(tmp_path, capped_orthanc)
    config.write_text(config.read_text().replace("/dicom-web", "/no-such-root"))
    wrong = cli("pacs", "push", *results, "--config", config, "--log-dir", tmp_path)
    assert wrong.returncode == 3 and "retry in" not in wrong.stderr
    assert wrong.stderr.count("HTTP 404 Not Found (refused; not retried)") == 6  # 3 progress notes + 3 failures
    assert "0 done, 0 already there, 3 failed" in wrong.stderr

    (tmp_path / "cstore").mkdir()
    config = _config(tmp_path / "cstore", capped_orthanc, push="cstore")
    config.write_text(config.read_text().replace(f'ae_title = "{capped_orthanc.aet}"', 'ae_title = "NOTORTHANC"'))
    rejected = cli("pacs", "push", *results, "--config", config, "--log-dir", tmp_path / "cstore")
    assert rejected.returncode == 3 and "retry in" not in rejected.stderr
    assert "association rejected by NOTORTHANC@127.0.0.1" in rejected.stderr
    assert "(refused; not retried)" in rejected.stderr and "2 more not sent" in rejected.stderr


def test_a_pacs_that_never_answers_is_given_up_within_the_budget(orthanc, results, tmp_path):
    """A host that takes the connection and never answers (a hung PACS): each try waits the connect
    timeout (3 s) and the tries stop when the next could not finish within the 10 s budget. Before,
    each try waited pynetdicom's 30 s ACSE timeout: 124 s of silence for one file."""
    from cxr_deploy.pacs.config import load_pacs_config
    from cxr_deploy.pacs.transfer import push

    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(0)  # never accepts: the kernel completes one handshake, nobody answers
        config = _config(tmp_path, orthanc, push="cstore")
        config.write_text(config.read_text().replace(f"port = {orthanc.dicom_port}",
                                                     f"port = {silent.getsockname()[1]}"))
        notes = []
        summary = push(load_pacs_config(config), results, log_dir=tmp_path, note=notes.append)
    assert summary.counts == {"done": 0, "already": 0, "failed": 3}
    assert "(after 2 tries in" in summary.failures[0] and "no association" in summary.failures[0]
    assert len([n for n in notes if "retry in" in n]) == 1


def test_urls_are_printed_without_their_user_info():
    """One helper redacts every URL this package prints (push and pull lines, their errors)."""
    import requests

    from cxr_deploy.pacs.network import reason, redact_url

    assert redact_url("https://cxr:hunter2@pacs.example.org/dicom-web") == "https://***@pacs.example.org/dicom-web"
    assert redact_url("at http://cxr:hunter2@h:8042/x, then https://h/y") == "at http://***@h:8042/x, then https://h/y"
    with pytest.raises(requests.RequestException) as caught:
        requests.get(f"http://cxr:hunter2@127.0.0.1:{free_port()}/dicom-web", timeout=3)
    assert "hunter2" not in reason(caught.value) and "Connection refused" in reason(caught.value)
    assert reason(ValueError("cannot use http://cxr:hunter2@h/x")) == "ValueError: cannot use http://***@h/x"


def test_pull_from_a_pacs_that_goes_down_stops_at_once(own_orthanc, tmp_path):
    """The PACS dies once the first instance is in the spool: one retry budget is spent per thread,
    the rest are not tried and say so (before: each of the rest spent its own 3.5 s of retries)."""
    import threading
    import time

    from cxr_deploy.pacs.config import load_pacs_config
    from cxr_deploy.pacs.transfer import pull

    study, paths = _instances(tmp_path / "src", [40])
    for path in paths:
        own_orthanc.upload(path)
    spool = tmp_path / "spool"

    def kill_at_first_arrival():
        while not list(spool.rglob("*.dcm")):
            time.sleep(0.005)
        own_orthanc.process.kill()

    threading.Thread(target=kill_at_first_arrival, daemon=True).start()
    summary = pull(load_pacs_config(_config(tmp_path, own_orthanc)), study_uid=study, parallel=2)
    assert summary.counts["done"] >= 1 and summary.counts["done"] + summary.counts["failed"] == 40
    assert len([f for f in summary.failures if " tries in " in f]) <= 2, summary.failures  # one budget per thread
    assert summary.failures[-1].endswith("more not retrieved: the PACS stopped answering; rerun the same pull "
                                         "when it is back")
