"""``--preprocess-on device`` sends the stored samples through a ring of shared-memory slots
(:mod:`cxr_deploy.batch.shm`): the same pixels and rows as pickling them, slots freed on every
path, and no ``/dev/shm`` block left behind after the run, SIGTERM or ``kill -9``."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import cxr_deploy
from cxr_deploy.batch.decode import DecodeConfig, decode_file
from cxr_deploy.batch.pool import DecodePool
from cxr_deploy.batch.results_file import read_results
from cxr_deploy.batch.shm import DISABLE_ENV, ShmRing, decode_to_slot, shm_supported
from cxr_deploy.eligibility import ChestFilter
from cxr_deploy.preprocessing import PreprocessSpec

from tests.support import dicom_sample, session_members

pytestmark = pytest.mark.skipif(not shm_supported() or not os.path.isdir("/dev/shm"),
                                reason="needs POSIX shared memory in /dev/shm")
NO_FILTER = ChestFilter.build("", "", False, False)


def _blocks(prefix: str) -> list[str]:
    return sorted(name for name in os.listdir("/dev/shm") if name.startswith(prefix))


def _shared_files(shared_data: Path, n_dicom: int, n_cxr: int) -> list[Path]:
    dicoms = sorted(p for p in (shared_data / "dicom").rglob("*") if p.is_file() and p.suffix == ".dcm")
    cxrs = sorted(p for p in (shared_data / "cxr").rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    return dicoms[:n_dicom] + cxrs[:n_cxr]


def test_a_slot_carries_exactly_the_stored_samples_of_every_kind_of_shared_dicom(shared_data, dicom_manifest):
    """A shared DICOM of every kind of stored pixels (8/16/32-bit, signed, big-endian, RGB,
    multi-frame), every one that does not decode, and some CXRs, decoded by a real worker into a
    slot, equal the samples decoded in this process; a slot too small for an image falls back to
    pickling and says so."""
    config = DecodeConfig(spec=PreprocessSpec(input_size=64), send="stored", eligibility=NO_FILTER)
    files = dicom_sample(dicom_manifest, shared_data / "dicom") + _shared_files(shared_data, 0, 12)
    pool, ring, tiny = DecodePool(1, config), ShmRing(2, 64 << 20), ShmRing(1, 4096)
    checked = pickled = 0
    try:
        for path in files:
            expected = decode_file(str(path), config)
            target = ring.acquire()
            got = pool.submit(decode_to_slot, str(path), target).result(timeout=120)
            assert (got.status, got.error) == (expected.status, expected.error), path
            if expected.stored is None:
                assert got.shm is None and ring.settle(target, got) is None
                continue
            assert got.transfer == "shm" and got.stored is None, (path, got.transfer)
            view = ring.view(got.shm)
            assert view.dtype == expected.stored.dtype.newbyteorder("=") and np.array_equal(view, expected.stored), path
            assert got.plan == expected.plan
            ring.release(target.index)
            checked += 1
            if expected.stored.nbytes > 4096 and pickled < 3:  # too big for the tiny ring's slot
                small = tiny.acquire()
                fallback = pool.submit(decode_to_slot, str(path), small).result(timeout=120)
                assert fallback.transfer.startswith("pickled: ") and "do not fit a 4,096-byte slot" in fallback.transfer
                assert fallback.shm is None and np.array_equal(fallback.stored, expected.stored)
                assert tiny.settle(small, fallback) is None and tiny.held == 0
                pickled += 1
    finally:
        pool.close(cancel=True)
        prefixes = ring.prefix, tiny.prefix
        ring.close()
        tiny.close()
    # ~150 shared DICOMs carry samples; blank or saturated ones (a dozen test patterns) are error rows
    assert checked >= 86 and pickled == 3 and ring.held == 0
    assert _blocks(prefixes[0]) == [] and _blocks(prefixes[1]) == []


def _run(files, bundle, out, **options):
    summary = cxr_deploy.run_batch(files, bundle, out, workers=2, batch_size=8, preprocess_on="device",
                                   eligibility=NO_FILTER, progress=False, **options)
    rows = [{k: v for k, v in row.items() if k != "processed_at"} for row in read_results(out)]
    return summary, rows


def test_rows_through_shared_memory_equal_the_pickled_rows(shared_data, tiny_bundle, tmp_path, monkeypatch):
    files = _shared_files(shared_data, 60, 30)
    shm_summary, shm_rows = _run(files, tiny_bundle, tmp_path / "shm.csv")
    monkeypatch.setenv(DISABLE_ENV, "0")
    pickled_summary, pickled_rows = _run(files, tiny_bundle, tmp_path / "pickled.csv")
    assert shm_summary.counts["ok"] >= 50 and shm_summary.counts == pickled_summary.counts
    assert shm_rows == pickled_rows
    assert shm_summary.transfers["shm"] == shm_summary.counts["ok"]  # every scored image came through a slot
    assert not any(k.startswith("pickled") for k in shm_summary.transfers), shm_summary.transfers
    assert pickled_summary.transfers == {}  # CXR_DEPLOY_SHM=0: no ring at all
    assert _blocks(f"cxr-deploy-{os.getpid()}-") == []


def test_timed_out_files_give_their_slots_back(tiny_bundle, tmp_path, make_pngs):
    """Every file waited on times out and its pool is killed; without the slots coming back, the
    ring (window 4 + batch 1 = 5 slots) would run dry after 5 files and the rest would be pickled."""
    images = make_pngs(tmp_path / "in", 8)
    summary = cxr_deploy.run_batch([tmp_path / "in"], tiny_bundle, tmp_path / "r.csv", workers=1, batch_size=1,
                                   preprocess_on="device", decode_timeout=1e-6, progress=False)
    rows = read_results(tmp_path / "r.csv")
    assert sorted(r["path"] for r in rows) == sorted(str(p) for p in images)
    timed_out = [r for r in rows if "took over 1e-06 s" in r["error"]]
    assert len(timed_out) > 5 and all(r["status"] in ("ok", "error") for r in rows)
    assert "pickled: no free slot" not in summary.transfers, summary.transfers
    assert _blocks(f"cxr-deploy-{os.getpid()}-") == []


def _start_on_fifo(tmp_path: Path, bundle: Path, files: list[Path]):
    """A real ``cxr-deploy batch --preprocess-on device`` reading its inputs from a FIFO that stays
    open: once rows are written it waits for more input, mid-run, its window of decoded files (8
    here) holding their slots in /dev/shm."""
    fifo = tmp_path / "inputs.fifo"
    os.mkfifo(fifo)
    out = tmp_path / "r.csv"
    proc = subprocess.Popen([sys.executable, "-m", "cxr_deploy.cli", "batch", f"@{fifo}", "--model", str(bundle),
                             "--out", str(out), "-b", "2", "-j", "2", "--preprocess-on", "device", "--no-progress"],
                            env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True)
    feed = open(fifo, "w")
    feed.writelines(f"{p}\n" for p in files)
    feed.flush()
    prefix = f"cxr-deploy-{proc.pid}-"
    deadline = time.monotonic() + 120
    while not (out.exists() and out.read_text().count("\n") >= 3) and time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read().decode()
        time.sleep(0.05)
    assert out.read_text().count("\n") >= 3, "the run wrote no rows"
    assert len(_blocks(prefix)) >= 2, "the run holds no shared-memory slots"
    return proc, feed, prefix


def test_kill_9_of_the_main_process_leaves_no_shared_memory_and_no_process(tiny_bundle, tmp_path, shared_data):
    """The blocks are registered with multiprocessing's resource tracker, which outlives the main
    process: once the workers have died with it, the tracker unlinks them and exits."""
    proc, feed, prefix = _start_on_fifo(tmp_path, tiny_bundle, _shared_files(shared_data, 0, 16))
    try:
        assert len(session_members(proc.pid)) >= 4  # main, 2 workers, resource tracker
        proc.kill()
        proc.wait()
        deadline = time.monotonic() + 15
        while (_blocks(prefix) or session_members(proc.pid)) and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        feed.close()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert _blocks(prefix) == []
    assert session_members(proc.pid) == []


def test_sigterm_unlinks_the_slots_before_exit_130(tiny_bundle, tmp_path, shared_data):
    proc, feed, prefix = _start_on_fifo(tmp_path, tiny_bundle, _shared_files(shared_data, 0, 16))
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        code = proc.wait(timeout=60)
    finally:
        feed.close()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert code == 130, proc.stderr.read().decode()
    assert _blocks(prefix) == []  # unlinked by the run itself, not by the resource tracker later
    assert b"leaked shared_memory" not in proc.stderr.read()


def test_a_killed_worker_costs_no_row_and_no_slot(tiny_bundle, tmp_path, shared_data):
    """kill -9 of an idle worker (the OOM killer's choice) broke the pool, and the next submit ended
    the run with a traceback; now new work goes to a fresh pool and the run ends normally."""
    files = _shared_files(shared_data, 0, 24)
    proc, feed, prefix = _start_on_fifo(tmp_path, tiny_bundle, files[:16])
    try:
        workers = [pid for pid in session_members(proc.pid) if pid != proc.pid and
                   b"resource_tracker" not in Path(f"/proc/{pid}/cmdline").read_bytes()]
        assert len(workers) == 2, workers
        os.kill(workers[0], signal.SIGKILL)
        feed.writelines(f"{p}\n" for p in files[16:])
        feed.close()
        code = proc.wait(timeout=120)
    finally:
        feed.close()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert code == 0, proc.stderr.read().decode()[-2000:]
    rows = read_results(tmp_path / "r.csv")
    assert sorted(r["path"] for r in rows) == sorted(map(str, files)) and {r["status"] for r in rows} == {"ok"}
    assert _blocks(prefix) == []


def test_the_session_check_counts_only_its_own_blocks_never_a_real_run_beside_it(session_shm_blocks):
    """A real run beside the test session (a live process without the session's marker) keeps its
    shared memory: the end-of-session check neither reports nor unlinks it. A block made by the
    session itself is counted."""
    import subprocess
    import sys
    from multiprocessing import shared_memory

    env = {k: v for k, v in os.environ.items() if k != "CXR_DEPLOY_TEST_SESSION"}
    code = ("import os, sys\nfrom multiprocessing import shared_memory\n"
            "b = shared_memory.SharedMemory(f'cxr-deploy-{os.getpid()}-beside-0', create=True, size=64)\n"
            "print(b.name.lstrip('/'), flush=True)\nsys.stdin.read()\nb.close()\nb.unlink()\n")
    beside = subprocess.Popen([sys.executable, "-c", code], env=env, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    own = shared_memory.SharedMemory(f"cxr-deploy-{os.getpid()}-own-0", create=True, size=64)
    try:
        theirs = beside.stdout.readline().strip()
        assert theirs.startswith("cxr-deploy-") and os.path.exists(f"/dev/shm/{theirs}")
        counted = session_shm_blocks()
        assert own.name.lstrip("/") in counted and theirs not in counted
    finally:
        own.close()
        own.unlink()
        beside.communicate("", timeout=30)
    assert beside.returncode == 0 and not os.path.exists(f"/dev/shm/{theirs}")
