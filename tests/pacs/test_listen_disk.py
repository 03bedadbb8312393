"""``pacs listen`` and its disk: a full file system is answered A700 (Out of Resources) and leaves no
temp file; an instance over ``max_instance_mb`` is stopped once it crosses the cap, not received
whole first; results a full disk kept from being written are written once space returns. Real
small file systems (tmpfs, mounted by the test; skipped where that is not permitted), real storescu."""

from __future__ import annotations

from pathlib import Path

import pytest

from cxr_deploy.batch.results_file import read_results

from tests.support import (STORESCU, fill_filesystem, free_port, sized_instance, small_filesystem, start_listener,
                           stop_process, storescu, wait_for)

pytestmark = pytest.mark.skipif(STORESCU is None, reason="dcmtk's storescu not installed (.ci/run installs dcmtk)")


def _leftovers(*folders: Path) -> list[Path]:
    """Every file under ``folders`` but the spool's own bookkeeping and the test's fillers."""
    # .ses: ONNX Runtime (1.31) writes a session stamp of 51 bytes to $TMPDIR/.ses when it is
    # imported, which the listener now does at start-up (its model is loaded once): not ours
    keep = {"filler", "results.csv", "population.json", ".ses"}
    return [p for folder in folders if folder.exists() for p in folder.rglob("*")
            if p.is_file() and p.name not in keep and not p.name.endswith(".lock")
            and not {"incoming", "results"} & set(p.relative_to(folder).parts[:1])]


def test_an_instance_over_the_cap_is_stopped_once_it_crosses_the_cap(orthanc, tiny_bundle, tmp_path, monkeypatch):
    """A 60 MB instance against max_instance_mb = 1, with the spool and the process's temp folder
    on a 1.5 MB file system: only a transfer stopped at the cap (plus at most a PDU) fits; one
    received whole first would hit ENOSPC instead of the cap."""
    big = sized_instance(tmp_path / "big.dcm", 5480)
    assert big.stat().st_size > 60 * 10**6
    port = free_port()
    with small_filesystem(tmp_path / "spool", "1536k") as spool:
        (spool / "tmp").mkdir()
        monkeypatch.setenv("TMPDIR", str(spool / "tmp"))  # wherever the listener keeps temp files
        proc, _ = start_listener(tmp_path, orthanc, tiny_bundle, port, max_instance_mb=1)
        try:
            answer = storescu(port, big)
            assert "Refused: OutOfResources" in answer, answer[-2000:]
            small = sized_instance(tmp_path / "small.dcm", 256)
            assert "Received Store Response (Success)" in storescu(port, small)  # the association after it
            assert proc.poll() is None
            assert not _leftovers(spool), _leftovers(spool)
        finally:
            stop_process(proc)
    log = (tmp_path / "listen.log").read_text()
    assert "over the 1,048,576-byte limit" in log, log[-3000:]
    assert "No space left" not in log and "Traceback" not in log, log[-3000:]


def test_a_full_spool_disk_answers_out_of_resources_and_leaves_no_temp_file(orthanc, tiny_bundle, tmp_path,
                                                                            monkeypatch):
    tmpdir = tmp_path / "tmpdir"
    tmpdir.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmpdir))  # pynetdicom's default place for what it receives
    port = free_port()
    with small_filesystem(tmp_path / "spool", "4m") as spool:
        proc, _ = start_listener(tmp_path, orthanc, tiny_bundle, port)
        try:
            fill_filesystem(spool / "filler")
            answer = storescu(port, sized_instance(tmp_path / "a.dcm", 512))
            assert "Refused: OutOfResources" in answer, answer[-2000:]
            assert not _leftovers(spool, tmpdir), _leftovers(spool, tmpdir)  # no partial file anywhere
            assert not list((spool / "incoming").rglob("*.dcm"))
            (spool / "filler").unlink()  # space returns: the next instance is stored (no state kept)
            assert "Received Store Response (Success)" in storescu(port, tmp_path / "a.dcm")
            assert proc.poll() is None
        finally:
            stop_process(proc)
    log = (tmp_path / "listen.log").read_text()
    assert "Traceback" not in log and "0xC211" not in log, log[-3000:]
    assert "spool disk is full" in log, log[-3000:]


def test_results_a_full_disk_kept_from_being_written_are_written_when_space_returns(orthanc, tiny_bundle, tmp_path):
    """The results folder fills up while an image is scored: its row says why its SR + SC are
    missing. A pass that runs while the whole spool disk is full is retried, not fatal; once space
    returns the SR + SC are written and pushed without any new instance arriving."""
    orthanc.delete_all()
    port = free_port()
    with small_filesystem(tmp_path / "spool", "8m") as spool, small_filesystem(spool / "results", "8m") as results:
        filler = fill_filesystem(results / "filler")
        proc, _ = start_listener(tmp_path, orthanc, tiny_bundle, port)
        try:
            assert "Received Store Response (Success)" in storescu(port, sized_instance(tmp_path / "a.dcm", 256))
            csv = spool / "results.csv"
            (row,) = wait_for(lambda: csv.exists() and read_results(csv), "a row for the instance")
            assert row["status"] == "ok" and "No space left" in row["error"], row
            spool_filler = fill_filesystem(spool / "filler")  # now the CSV cannot be rewritten either
            log = tmp_path / "listen.log"
            wait_for(lambda: proc.poll() is not None or "next try in 10 s" in log.read_text(),
                      "a retry on a full disk")
            assert proc.poll() is None, log.read_text()[-2000:]  # still listening
            spool_filler.unlink()
            filler.unlink()
            wait_for(lambda: len(list(results.glob("*.dcm"))) == 2, "the SR and SC, written on a later pass")
            wait_for(lambda: len(orthanc.get("/instances")) == 2, "the SR and SC in the PACS")
            (row,) = read_results(csv)
            assert row["status"] == "ok" and not row["error"], row
        finally:
            stop_process(proc)


def test_parallel_associations_never_overshoot_the_spool_cap(orthanc, tiny_bundle, tmp_path):
    """Six 18 MB instances at once against a cap that holds two and a half: exactly two are
    stored, the others are answered A700 (checked and counted in one step)."""
    from concurrent.futures import ThreadPoolExecutor

    files = [sized_instance(tmp_path / f"p{i}.dcm", 3000) for i in range(6)]
    cap_gb = 2.5 * files[0].stat().st_size / 2**30
    port = free_port()
    proc, _ = start_listener(tmp_path, orthanc, tiny_bundle, port, max_spool_gb=cap_gb, spool_target_gb=cap_gb)
    try:
        with ThreadPoolExecutor(len(files)) as pool:
            answers = list(pool.map(lambda path: storescu(port, path), files))
        stored = list((tmp_path / "spool" / "incoming").rglob("*.dcm"))
        ok = [a for a in answers if "Received Store Response (Success)" in a]
        assert len(ok) == len(stored) == 2, [a.splitlines()[-2:] for a in answers]
        assert all("Refused: OutOfResources" in a for a in answers if a not in ok)
    finally:
        stop_process(proc)


def test_a_full_spool_makes_room_by_itself_once_results_are_sent(orthanc, tiny_bundle, tmp_path):
    """max_spool_gb holds two and a half instances, spool_target_gb one and a half: once the second
    instance's results are sent, the first (sent before) leaves the spool, its row stays, and a
    third instance is stored instead of answered A700."""
    orthanc.delete_all()
    a, b, c = (sized_instance(tmp_path / f"{name}.dcm", 256) for name in "abc")
    size = a.stat().st_size
    port = free_port()
    proc, _ = start_listener(tmp_path, orthanc, tiny_bundle, port, max_spool_gb=2.5 * size / 2**30,
                             spool_target_gb=1.5 * size / 2**30)
    spool = tmp_path / "spool"
    try:
        assert "Received Store Response (Success)" in storescu(port, a)
        wait_for(lambda: len(orthanc.get("/instances")) == 2, "a's SR and SC in the PACS")
        assert "Received Store Response (Success)" in storescu(port, b)
        wait_for(lambda: len(orthanc.get("/instances")) == 4, "b's SR and SC in the PACS")
        spooled = wait_for(lambda: (lambda s: s if len(s) == 1 else None)(list((spool / "incoming").rglob("*.dcm"))),
                            "retention down to one instance")
        import pydicom

        uid = {p.name: str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in (a, b)}
        assert spooled[0].name == f"{uid['b.dcm']}.dcm"  # the older one went
        assert {r["sop_instance_uid"] for r in read_results(spool / "results.csv")} == set(uid.values())
        assert "Received Store Response (Success)" in storescu(port, c)  # no A700: room came back
    finally:
        stop_process(proc)
