"""``pacs listen`` as a node an administrator runs: senders allowed by network, the batch
eligibility flags, a model that stays loaded for the listener's life (and is verified again when
its files change), a metrics endpoint and one log line per instance. Real listeners, storescu and
Orthanc."""

from __future__ import annotations

import pydicom
import pytest

from cxr_deploy.batch.results_file import read_results
from cxr_deploy.pacs.config import PacsConfigError, load_pacs_config
from tests.support import (SAMPLES, STORESCU, distinct_instances, free_port, run_cli, start_listener, stop_process, storescu,
                           wait_rows)

needs_storescu = pytest.mark.skipif(STORESCU is None, reason="dcmtk's storescu not installed (.ci/run installs dcmtk)")


def _listen_config(tmp_path, listen_lines: list[str]):
    path = tmp_path / "listen.toml"
    path.write_text("\n".join(["[local]", 'ae_title = "CXRDEPLOY"', f'spool = "{tmp_path / "spool"}"', "",
                               "[pacs]", 'push = "cstore"', "", "[listen]", 'allowed_ae_titles = ["STORESCU"]',
                               *listen_lines]) + "\n")
    return path


@needs_storescu
def test_allowed_addresses_take_networks(orthanc, tiny_bundle, tmp_path):
    port = free_port()
    proc, _ = start_listener(tmp_path, orthanc, tiny_bundle, port, allowed_addresses='["192.0.2.0/24", "127.0.0.0/8"]')
    try:
        answer = storescu(port, SAMPLES / "dicom" / "IM000004")
        assert "Received Store Response (Success)" in answer, answer
    finally:
        stop_process(proc)


@pytest.mark.parametrize("entry", ["127.0.0.300", "localhost", "10.1.2.3/8"])
def test_a_bad_allowed_address_is_a_one_line_config_error(tmp_path, tiny_bundle, entry):
    config = _listen_config(tmp_path, [f'allowed_addresses = ["{entry}"]'])
    with pytest.raises(PacsConfigError, match="allowed_addresses entry"):
        load_pacs_config(config)
    if entry != "localhost":
        return  # the command says the same, in one line: checked once
    proc = run_cli("pacs", "listen", "--config", config, "--model", tiny_bundle)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("cxr-deploy: error: ") and entry in proc.stderr


def test_a_plain_address_and_a_network_both_match(tmp_path):
    config = _listen_config(tmp_path, ['allowed_addresses = ["192.0.2.7", "10.1.0.0/16", "::1"]'])
    listen = load_pacs_config(config).listen
    allowed = ["192.0.2.7", "10.1.200.3", "::1", "::ffff:10.1.0.9"]
    refused = ["192.0.2.8", "10.2.0.1", "::2", "not an address"]
    assert [listen.address_allowed(a) for a in allowed + refused] == [True] * 4 + [False] * 4


def _as_modality(tmp_path, modality: str):
    ds = pydicom.dcmread(SAMPLES / "dicom" / "IM000004")
    ds.Modality = modality
    path = tmp_path / f"{modality}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


@needs_storescu
def test_listen_takes_the_batch_eligibility_flags(orthanc, tiny_bundle, tmp_path):
    """``--modality OT`` scores an OT image, as ``batch --modality OT`` does (without it: skipped)."""
    port = free_port()
    proc, _ = start_listener(tmp_path, orthanc, tiny_bundle, port, flags=("--modality", "OT", "--accept-any-view"))
    try:
        assert "Success" in storescu(port, _as_modality(tmp_path, "OT"))
        (row,) = wait_rows(tmp_path / "spool" / "results.csv", 1)
    finally:
        stop_process(proc)
    assert row["status"] == "ok", row


def test_listen_and_batch_share_the_eligibility_option_definitions():
    from cxr_deploy.batch.cli import batch_command
    from cxr_deploy.pacs.cli import listen_command

    def options(command):
        return {p.name: (tuple(p.opts), p.help, p.multiple, p.is_flag) for p in command.params
                if p.name in ("modalities", "body_parts", "accept_any_view", "no_dicom_filter")}

    assert len(options(batch_command)) == 4 and options(listen_command) == options(batch_command)


# -- the model stays resident ------------------------------------------------------------------------
def _replace(path, data: bytes) -> None:
    """Give ``path`` new contents in a new file (the bundle copy's files are hard links)."""
    path.unlink()
    path.write_bytes(data)


def test_the_bundle_is_verified_and_loaded_once_and_again_only_when_its_files_change(tiny_bundle, tmp_path):
    import os
    import shutil

    from cxr_deploy.batch.settings import BatchConfig
    from cxr_deploy.errors import BundleError
    from cxr_deploy.pacs.resident import ResidentModel

    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle, copy_function=os.link)
    resident = ResidentModel(BatchConfig(inputs=[str(tmp_path)], model=bundle, out=tmp_path / "r.csv", workers=0))
    try:
        first = resident.current()
        assert resident.current() == first and resident.loads == 1  # the same session, not loaded again
        _replace(bundle / "manifest.json", (bundle / "manifest.json").read_bytes())  # copied again, same content
        again = resident.current()
        assert resident.loads == 2 and again[1] is not first[1]
        onnx = (bundle / "model.onnx").read_bytes()
        _replace(bundle / "model.onnx", onnx[:-1] + bytes([onnx[-1] ^ 1]))  # one bit changed, same size
        with pytest.raises(BundleError, match="sha256"):
            resident.current()
    finally:
        resident.close()


def test_a_worker_stuck_in_its_warm_up_does_not_hold_the_listener_start(tiny_bundle, tmp_path, monkeypatch, caplog):
    """The warm-up waits for the decode workers' imports a bounded time, then starts anyway."""
    import logging
    import time
    from concurrent.futures import Future

    import numpy as np

    from cxr_deploy.bundle import ModelBundle
    from cxr_deploy.pacs import resident as module

    class StuckPool:  # a worker whose warm-up never returns
        workers = 2

        def submit(self, fn, *args):
            return Future()

    monkeypatch.setattr(module, "WARM_UP_TIMEOUT_S", 0.5)
    model = module.ResidentModel(None)
    model.pool, model.backend = StuckPool(), lambda x: np.zeros((len(x), 2), np.float32)
    start = time.monotonic()
    with caplog.at_level(logging.WARNING, logger=module.__name__):
        model._warm_up(ModelBundle.load(tiny_bundle, verify=False))
    assert time.monotonic() - start < 10
    assert "2 decode worker(s) still warming up after 0.5 s" in caplog.text


def _children(pid: int) -> set[int]:
    from pathlib import Path

    return {int(c) for task in Path(f"/proc/{pid}/task").iterdir()
            for c in (task / "children").read_text().split()}


@needs_storescu
def test_the_listener_keeps_its_model_and_decode_workers_across_passes(orthanc, tiny_bundle, tmp_path):
    first, second = distinct_instances(tmp_path, 2)
    port = free_port()
    proc, _ = start_listener(tmp_path, orthanc, tiny_bundle, port, flags=("-j", "1"))
    csv = tmp_path / "spool" / "results.csv"
    try:
        assert "Success" in storescu(port, first)
        wait_rows(csv, 1)
        workers = _children(proc.pid)
        assert "Success" in storescu(port, second)
        rows = wait_rows(csv, 2)
        assert workers and _children(proc.pid) == workers  # the same decode worker served both passes
        assert "Success" in storescu(port, first)  # sent again: stored, not scored twice, and said so
        _wait_log(tmp_path / "listen.log", "sent again, already scored")
    finally:
        stop_process(proc)
    assert [r["status"] for r in rows] == ["ok", "ok"] and len(read_results(csv)) == 2
    log = (tmp_path / "listen.log").read_text()
    assert log.count("model loaded") == 1
    sop = str(pydicom.dcmread(first, stop_before_pixels=True).SOPInstanceUID)
    assert len([line for line in log.splitlines() if f"instance {sop} from STORESCU" in line]) == 2


def _wait_log(log, text: str, timeout: float = 60) -> None:
    import time

    deadline = time.monotonic() + timeout
    while text not in log.read_text():
        assert time.monotonic() < deadline, f"{text!r} not logged within {timeout} s"
        time.sleep(0.2)


# -- metrics, health, one log line per instance, a clean stop ----------------------------------------
def _metrics(port: int) -> dict:
    """``{(name, labels as a sorted tuple): value}`` of the listener's Prometheus endpoint."""
    import requests
    from prometheus_client.parser import text_string_to_metric_families

    text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


@needs_storescu
def test_metrics_health_and_one_log_line_per_instance_without_phi(orthanc, tiny_bundle, tmp_path, shared_data):
    import time

    import requests

    orthanc.delete_all()
    port, metrics_port = free_port(), free_port()
    proc, _ = start_listener(tmp_path, orthanc, tiny_bundle, port, metrics_port=metrics_port, max_instance_mb=1.7)
    good = SAMPLES / "dicom" / "IM000004"
    try:
        assert requests.get(f"http://127.0.0.1:{metrics_port}/health", timeout=10).status_code == 200
        assert "Success" in storescu(port, good)
        assert "Success" in storescu(port, shared_data / "dicom" / "pydicom_test_files" / "CT_small.dcm")
        assert "OutOfResources" in storescu(port, SAMPLES / "dicom" / "normal_dx_16bit_rescale_window.dcm")
        wait_rows(tmp_path / "spool" / "results.csv", 2)
        spool_bytes = sum(p.stat().st_size for p in (tmp_path / "spool" / "incoming").rglob("*.dcm"))
        expected = {("cxr_listen_instances_received_total", ()): 2,
                ("cxr_listen_instances_refused_total", (("status", "0xA700"),)): 1,
                ("cxr_listen_instances_scored_total", ()): 1, ("cxr_listen_instances_skipped_total", ()): 1,
                ("cxr_listen_results_pushed_total", ()): 2, ("cxr_listen_results_push_failed_total", ()): 0,
                    ("cxr_listen_spool_bytes", ()): spool_bytes, ("cxr_listen_latency_seconds_count", ()): 1}
        deadline = time.monotonic() + 60
        while True:  # results are pushed, and counted, in the listener's pusher thread
            values = _metrics(metrics_port)
            if {key: values.get(key) for key in expected} == expected or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    finally:
        code = stop_process(proc)
    assert code == 0
    assert {key: values.get(key) for key in expected} == expected
    log = (tmp_path / "listen.log").read_text()
    lines = [line for line in log.splitlines() if " instance " in line and " from STORESCU" in line]
    sop = str(pydicom.dcmread(good, stop_before_pixels=True).SOPInstanceUID)
    assert len(lines) == 3, lines  # one per instance: scored, skipped, refused
    (scored,) = [line for line in lines if sop in line]
    assert " ok" in scored and "pushed" in scored and " s" in scored.split(sop)[1], scored
    for phi in ("Demo^Sample", "DEMO-0004", "CompressedSamples^CT1", "1CT1"):
        assert phi not in log


def _everything_whole(spool, *, partial_copies_ok: bool = False) -> None:
    """Every file with a final name is whole: received instances and result objects read to the
    end, every CSV row and push-log line is complete. Temporary files: none, except (when
    ``partial_copies_ok``) hidden partial copies of instances still arriving at the stop, never
    acknowledged, which the next start removes."""
    import json

    from cxr_deploy.atomic import TEMP_MARK

    temps = [p for p in spool.rglob("*") if TEMP_MARK in p.name]
    assert all(p.name.startswith(".") and "incoming" in p.parts for p in temps) if partial_copies_ok else not temps
    data = (spool / "results.csv").read_bytes()
    assert data.endswith(b"\n") and all(r["status"] in ("ok", "error", "skipped") for r in
                                        read_results(spool / "results.csv"))
    push_log = spool / "results" / "push-log.jsonl"  # none yet when the stop came before the first push
    for line in push_log.read_text().splitlines() if push_log.exists() else ():
        json.loads(line)
    for path in [*(spool / "incoming").rglob("*.dcm"), *(spool / "results").glob("*.dcm")]:
        dataset = pydicom.dcmread(path)
        if "PixelData" in dataset:  # images: their pixels decode (an SR has none)
            assert dataset.pixel_array.size


@needs_storescu
def test_sigterm_during_a_pass_leaves_nothing_half_written(orthanc, tiny_bundle, tmp_path):
    """What ``systemctl stop`` does (SIGTERM to the unit's processes) in the middle of a scoring pass:
    exit 0, nothing torn; the next start scores the rest, each instance once."""
    import os
    import signal
    import subprocess
    import time

    files = distinct_instances(tmp_path, 12)
    port = free_port()
    proc, _ = start_listener(tmp_path, orthanc, tiny_bundle, port, flags=("-j", "1"))  # a decode worker too
    spool = tmp_path / "spool"
    sender = subprocess.Popen(["setpriv", "--pdeathsig", "KILL", STORESCU, "-aet", "STORESCU", "-aec", "CXRDEPLOY",
                               "127.0.0.1", str(port), *map(str, files)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        wait_rows(spool / "results.csv", 1)  # a pass is running: the burst is still arriving and scoring
        os.killpg(proc.pid, signal.SIGTERM)
        assert proc.wait(30) == 0, (tmp_path / "listen.log").read_text()[-2000:]
    finally:
        sender.wait(60)
        stop_process(proc)
    _everything_whole(spool, partial_copies_ok=True)
    received = len(list((spool / "incoming").rglob("*.dcm")))
    proc, _ = start_listener(tmp_path, orthanc, tiny_bundle, port)
    try:
        rows = wait_rows(spool / "results.csv", received)
        time.sleep(1.0)  # anything scored twice would show up by now
    finally:
        stop_process(proc)
    rows = read_results(spool / "results.csv")
    assert len(rows) == len({r["sop_instance_uid"] for r in rows}) == received
    _everything_whole(spool)


def test_each_instance_s_report_is_pushed_before_its_overlay():
    from pathlib import Path

    from cxr_deploy.pacs.pusher import sr_first

    names = ["1.2.9.m.sc.dcm", "1.2.9.m.sr.dcm", "1.2.10.m.sc.dcm", "1.2.10.m.sr.dcm"]
    ordered = [p.name for p in sorted(map(Path, names), key=sr_first)]
    assert ordered == ["1.2.10.m.sr.dcm", "1.2.10.m.sc.dcm", "1.2.9.m.sr.dcm", "1.2.9.m.sc.dcm"]


@needs_storescu
def test_results_a_pacs_that_was_down_did_not_take_are_sent_when_it_is_back(own_orthanc, tiny_bundle, tmp_path):
    # The push of a pass fails (the PACS is stopped); nothing else arrives; once the PACS is back
    # the pusher's own retries (5 s, then 10 s ...) send the SR and SC, with no new instance needed.
    port = free_port()
    proc, _ = start_listener(tmp_path, own_orthanc, tiny_bundle, port)
    try:
        own_orthanc.stop()
        assert "Received Store Response (Success)" in storescu(port, SAMPLES / "dicom" / "IM000004")
        rows = wait_rows(tmp_path / "spool" / "results.csv", 1)
        assert rows[0]["status"] == "ok", rows
        _wait_log(tmp_path / "listen.log", "not sent: next push in")
        own_orthanc.start()
        _wait_log(tmp_path / "listen.log", "sent 2 result objects an earlier push could not send", timeout=60)
        sop = rows[0]["sop_instance_uid"]
        found = own_orthanc.get("/instances?expand")
        modalities = sorted(i["MainDicomTags"].get("SOPInstanceUID") != sop for i in found)
        assert len(found) == 2 and all(modalities), found  # the SR and the SC, not the source
    finally:
        stop_process(proc)
