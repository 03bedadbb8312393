"""--shard i/n splits deterministically; bad files each get an error row and exit code 3."""

from __future__ import annotations

import os
import shutil
import time

import pytest
from click.testing import CliRunner

from cxr_deploy.api import run_batch
from cxr_deploy.batch.cli import batch_command
from cxr_deploy.batch.results_file import read_results
from cxr_deploy.batch.inputs import parse_shard


def test_shards_are_disjoint_and_cover_everything(tiny_bundle, tmp_path, make_pngs):
    make_pngs(tmp_path / "share" / "x", 9)
    make_pngs(tmp_path / "share" / "y", 8, start=9)
    everything = {r["path"] for r in read_results(_run(tiny_bundle, tmp_path / "share", tmp_path / "all.csv"))}
    assert len(everything) == 17

    parts = []
    for i in (1, 2, 3):
        out = _run(tiny_bundle, tmp_path / "share", tmp_path / f"shard{i}.csv", shard=parse_shard(f"{i}/3"))
        parts.append({r["path"] for r in read_results(out)})
    assert set().union(*parts) == everything
    assert sum(len(p) for p in parts) == len(everything), "a file landed in two shards"
    assert all(parts), "a shard got nothing: the split is not spreading files"

    # Another machine mounting the same share elsewhere assigns the same files to the same shard.
    mount = tmp_path / "elsewhere"
    os.symlink(tmp_path / "share", mount)
    other = {r["path"] for r in read_results(_run(tiny_bundle, mount, tmp_path / "m2.csv", shard=(1, 3)))}
    assert {p.replace(str(mount), str(tmp_path / "share")) for p in other} == parts[1]


def _run(bundle, folder, out, **options):
    summary = run_batch([folder], model=bundle, out=out, workers=0, batch_size=8, **options)
    assert summary.exit_code == 0
    return out


def test_bad_files_get_error_rows_and_exit_3(tiny_bundle, tmp_path, make_pngs, shared_data):
    folder = tmp_path / "export"
    good = make_pngs(folder, 3)
    (folder / "empty.png").write_bytes(b"")
    data = good[0].read_bytes()
    (folder / "truncated.png").write_bytes(data[: len(data) // 2])
    (folder / "noise.png").write_bytes(os.urandom(5000))
    shutil.copy(shared_data / "dicom" / "pydicom_test_files" / "rtplan.dcm", folder / "rtplan.dcm")
    (folder / "notes.txt").write_text("export manifest, not an image\n")
    out = tmp_path / "results.csv"

    result = CliRunner().invoke(batch_command, [str(folder), "--model", str(tiny_bundle), "--out", str(out),
                                                "-b", "2", "-j", "2"])
    assert result.exit_code == 3, result.output
    rows = {os.path.basename(r["path"]): r for r in read_results(out)}
    assert len(rows) == 8
    for name in ("empty.png", "truncated.png", "noise.png"):
        assert rows[name]["status"] == "error", name
        reason = rows[name]["error"]
        assert reason and "\n" not in reason and "Traceback" not in reason
        assert rows[name]["probability"] == ""
    assert "empty" in rows["empty.png"]["error"]
    # an RT plan is not a chest radiograph: skipped with the reason, never scored, not an error
    assert rows["rtplan.dcm"]["status"] == "skipped" and rows["rtplan.dcm"]["probability"] == ""
    assert "Modality RTPLAN" in rows["rtplan.dcm"]["error"] and rows["rtplan.dcm"]["modality"] == "RTPLAN"
    assert rows["notes.txt"]["status"] == "skipped"
    for path in good:
        assert rows[path.name]["status"] == "ok"
    assert "3 ok, 3 error, 2 skipped" in result.output

    # Skipped non-image files alone do not fail a run.
    clean = tmp_path / "clean"
    make_pngs(clean, 2)
    (clean / "README.txt").write_text("hello")
    result = CliRunner().invoke(batch_command, [str(clean), "--model", str(tiny_bundle), "--out",
                                                str(tmp_path / "clean.csv"), "-j", "0"])
    assert result.exit_code == 0, result.output

    # A bundle that is not there: exit 2, no CSV.
    result = CliRunner().invoke(batch_command, [str(clean), "--model", str(tmp_path / "nope"), "--out",
                                                str(tmp_path / "x.csv")])
    assert result.exit_code == 2 and not (tmp_path / "x.csv").exists()


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs POSIX named pipes")
def test_a_named_pipe_gets_an_error_row_instead_of_blocking_the_run(tiny_bundle, tmp_path, make_pngs):
    """Opening a pipe with no writer blocks for ever; the scan and the reader must not open it."""
    folder = tmp_path / "share"
    good = make_pngs(folder, 3)
    os.mkfifo(folder / "img001_pipe.png")
    out = tmp_path / "results.csv"
    result = CliRunner().invoke(batch_command, [str(folder), "--model", str(tiny_bundle), "--out", str(out),
                                                "-b", "2", "-j", "1", "--decode-timeout", "0"])
    assert result.exit_code == 3, result.output
    rows = {os.path.basename(r["path"]): r for r in read_results(out)}
    assert rows["img001_pipe.png"]["status"] == "error"
    assert "not a regular file" in rows["img001_pipe.png"]["error"]
    assert all(rows[p.name]["status"] == "ok" for p in good)


def test_decode_timeout_gives_error_rows_and_loses_no_input(tiny_bundle, tmp_path, make_pngs):
    """With a timeout no decode can meet, each file waited on times out: the worker pool is killed
    and rebuilt, files other workers finished are kept, and every input still gets exactly one row."""
    folder = tmp_path / "share"
    good = make_pngs(folder, 5)
    out = tmp_path / "results.csv"
    result = CliRunner().invoke(batch_command, [str(folder), "--model", str(tiny_bundle), "--out", str(out),
                                                "-b", "2", "-j", "2", "--decode-timeout", "0.000001"])
    assert result.exit_code == 3, result.output
    rows = read_results(out)
    assert sorted(os.path.basename(r["path"]) for r in rows) == sorted(p.name for p in good)
    timed_out = [r for r in rows if r["status"] == "error"]
    assert timed_out and all("took over 1e-06 s" in r["error"] for r in timed_out)
    assert all(r["status"] in ("ok", "error") for r in rows)


def test_a_stuck_worker_is_killed_and_its_queue_moves_to_a_fresh_pool(tiny_bundle, make_pngs, tmp_path):
    from cxr_deploy.batch.decode import DecodeConfig, decode_file
    from cxr_deploy.batch.pool import DecodePool as _DecodePool
    from cxr_deploy.batch.pool import Slot as _Slot
    from cxr_deploy.batch.pool import replace_hung_pool as _replace_hung_pool
    from cxr_deploy.bundle import ModelBundle

    paths = [str(p) for p in make_pngs(tmp_path / "imgs", 4)]
    pool = _DecodePool(2, DecodeConfig(spec=ModelBundle.load(tiny_bundle).spec))
    stuck = pool.submit(time.sleep, 3600)  # a worker that will never come back
    first = _Slot(paths[0], "a", future=pool.submit(decode_file, paths[0]))
    first.future.result(timeout=60)  # finished by the other worker before the kill: must be kept
    queued = [_Slot(p, p, future=pool.submit(decode_file, p)) for p in paths[1:]]
    old_processes = list(pool._pool._processes.values())
    started = time.monotonic()
    _replace_hung_pool([first, *queued], pool)
    assert time.monotonic() - started < 30
    assert not any(p.is_alive() for p in old_processes)
    assert stuck.done()
    assert first.result is not None and first.result.status == "ok"
    for slot in queued:  # kept if finished, else resubmitted to the new pool
        result = slot.result or slot.future.result(timeout=60)
        assert result.status == "ok"
    pool.close()


def test_a_hung_file_in_flight_when_a_worker_crashes_gets_its_timeout_row(tiny_bundle, make_pngs, tmp_path):
    """After a worker crash every in-flight file is retried alone; a retry that never comes back (a
    read on a stalled share) must end at the decode timeout, not hang the run."""
    from cxr_deploy.batch.decode import DecodeConfig
    from cxr_deploy.batch.pool import DecodePool as _DecodePool
    from cxr_deploy.batch.pool import Slot as _Slot
    from cxr_deploy.batch.pool import isolate_crash, submit_decode
    from cxr_deploy.bundle import ModelBundle

    good = str(make_pngs(tmp_path / "imgs", 1)[0])
    pool = _DecodePool(1, DecodeConfig(spec=ModelBundle.load(tiny_bundle).spec))

    def retry(slot, pool):  # real worker processes: one file kills its worker, one never returns
        if slot.path == "crashes":
            return pool.submit(os._exit, 1)
        if slot.path == "hangs":
            return pool.submit(time.sleep, 3600)
        return submit_decode(slot, pool)

    slots = [_Slot("hangs", "h"), _Slot("crashes", "c"), _Slot(good, "g")]
    started = time.monotonic()
    isolate_crash(slots, pool, timeout=2.0, submit=retry)
    assert time.monotonic() - started < 60
    hung, crashed, ok = (s.result for s in slots)
    assert hung.status == "error" and "took over 2 s" in hung.error
    assert crashed.status == "error" and "crashed" in crashed.error
    assert ok.status == "ok"
    pool.kill()


def test_operating_point_selects_a_validation_threshold_by_name(tmp_path, make_pngs):
    import torch

    from cxr_deploy.bundle import save_bundle
    from cxr_deploy.model import build_model
    from cxr_deploy.preprocessing import PreprocessSpec

    torch.manual_seed(0)
    bundle = tmp_path / "bundle"
    points = {"youden": {"threshold": 0.61, "sensitivity": 0.9, "specificity": 0.8},
              "sens95": {"threshold": 0.3125, "sensitivity": 0.96, "specificity": 0.7}}
    save_bundle(bundle, build_model(None), spec=PreprocessSpec(input_size=64), threshold=0.61,
                training={"operating_points": points})
    images = make_pngs(tmp_path / "in", 2)
    out = tmp_path / "r.csv"
    args = [str(tmp_path / "in"), "--model", str(bundle), "--out", str(out), "--backend", "torch", "-j", "0"]
    result = CliRunner().invoke(batch_command, [*args, "--operating-point", "sens95"])
    assert result.exit_code == 0, result.output
    assert {r["threshold"] for r in read_results(out)} == {"0.3125"} and len(images) == 2
    result = CliRunner().invoke(batch_command, [*args, "--overwrite", "--operating-point", "sens99"])
    assert result.exit_code == 2 and "sens99" in result.output and "sens95, youden" in result.output
