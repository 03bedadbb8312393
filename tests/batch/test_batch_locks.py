"""One run per output: a second ``batch`` on the same ``--out`` (``--resume`` included), a second
writer of a report folder or of the Ray parts folder, and a second ``pacs listen`` on a spool stop at
once with exit 2, ``... is in use by process N``. Real concurrent processes, bounded waits."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from cxr_deploy import locks
from cxr_deploy.batch.results_file import read_results

HOLDER = ("import sys; from cxr_deploy.locks import hold; "
          "cm = hold(sys.argv[1], inside=sys.argv[2] == 'inside'); cm.__enter__(); "
          "print('held', flush=True); sys.stdin.read()")


@contextmanager
def held_by_another_process(path: Path, inside: bool = False):
    """``path`` locked by a separate Python process for the block; yields its pid."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(path), "inside" if inside else "beside"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"  # returns at EOF if the holder died
        yield proc
    finally:
        proc.stdin.close()  # the holder exits at EOF
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _in_use(proc, pid: int, *words: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    (line,) = proc.stderr.strip().splitlines()
    assert f"is in use by process {pid}" in line, line
    for word in words:
        assert word in line, line


def _wait_for_holder(path: Path, proc: subprocess.Popen, deadline_s: float = 120) -> None:
    """Until ``proc`` holds the lock of ``path`` (it records its pid), or it exits, or the deadline."""
    deadline = time.monotonic() + deadline_s
    while locks.holder(path) != proc.pid:
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline, "the first run never took its lock"
        time.sleep(0.05)


def test_second_batch_on_the_same_out_stops_at_once_and_the_first_finishes(tiny_bundle, png_folder, tmp_path, cli):
    """Run A waits on an @list FIFO (it holds --out meanwhile); runs B (--resume, --overwrite, plain)
    on the same --out exit 2 naming A; A then finishes with every row, none torn."""
    fifo, out = tmp_path / "list.fifo", tmp_path / "r.csv"
    os.mkfifo(fifo)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    first = subprocess.Popen([sys.executable, "-m", "cxr_deploy.cli", "batch", f"@{fifo}", "-m", str(tiny_bundle),
                              "-o", str(out), "-j", "0", "--no-progress"], env=env, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_holder(out, first)
        for extra in (["--resume"], ["--overwrite"], []):
            _in_use(cli("batch", png_folder, "-m", tiny_bundle, "-o", out, "-j", "0", *extra), first.pid, str(out))
        images = sorted(png_folder.rglob("*.png"))
        with open(fifo, "w") as feed:  # A reads its inputs now
            feed.write("".join(f"{p}\n" for p in images))
        _, err = first.communicate(timeout=120)
        assert first.returncode == 0, err
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert sorted(r["path"] for r in read_results(out)) == [str(p) for p in images]
    resumed = cli("batch", png_folder, "-m", tiny_bundle, "-o", out, "-j", "0", "--resume")
    assert resumed.returncode == 0, resumed.stderr  # the lock went with the process
    assert len(read_results(out)) == len(images)


def test_lock_is_released_by_kill_9(tmp_path):
    target = tmp_path / "r.csv"
    with held_by_another_process(target) as holder:
        with pytest.raises(locks.InUse, match=f"in use by process {holder.pid}"):
            with locks.hold(target):
                pass
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
        with locks.hold(target):  # no stale lock: the kernel dropped it with the process
            assert locks.holder(target) == os.getpid()


def test_report_folder_parts_folder_and_spool_are_held_too(tiny_bundle, png_folder, tmp_path, cli):
    from cxr_deploy.batch.parts import parts_dir

    results = tmp_path / "r.csv"
    assert cli("batch", png_folder, "-m", tiny_bundle, "-o", results, "-j", "0").returncode == 0
    report = tmp_path / "rep"
    with held_by_another_process(report) as holder:
        _in_use(cli("evaluate", results, "--labels-from-folders", "--out-dir", report), holder.pid, "report folder")
        _in_use(cli("batch", png_folder, "-m", tiny_bundle, "-o", tmp_path / "r2.csv", "--labels-from-folders",
                    "--report-dir", report, "-j", "0"), holder.pid, "report folder")
    assert not report.exists() and not (tmp_path / "r2.csv").exists()
    with held_by_another_process(parts_dir(tmp_path / "r3.csv")) as holder:
        _in_use(cli("batch", png_folder, "-m", tiny_bundle, "-o", tmp_path / "r3.csv", "--engine", "ray"),
                holder.pid, "parts folder")
    spool = tmp_path / "spool"
    config = tmp_path / "pacs.toml"
    config.write_text(f'[local]\nae_title = "CXRDEPLOY"\nspool = "{spool}"\n\n[pacs]\nae_title = "PACS"\n'
                      'host = "127.0.0.1"\nport = 11112\npush = "cstore"\n\n[listen]\nport = 0\nallowed_ae_titles = ["PACS"]\n')
    spool.mkdir()
    with held_by_another_process(spool, inside=True) as holder:
        _in_use(cli("pacs", "listen", "--config", config, "--model", tiny_bundle, "--no-push"), holder.pid, "spool")
