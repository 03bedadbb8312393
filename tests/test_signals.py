"""Ctrl-C/SIGTERM at any moment of a command's life: exit 130 (or the run's own code once every
output is complete), never click's ``Aborted!`` / 1 or death by the signal (-15), outputs intact,
no process left behind. Signals go to the whole process group, as systemd and a terminal send them.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cxr_deploy.batch.results_file import COLUMNS, read_results
from tests.support import session_members, write_pngs

SAMPLES = Path(__file__).resolve().parents[1] / "samples"


def _start(*args, cwd=None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "cxr_deploy.cli", *map(str, args)], cwd=cwd,
                            env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def _catches_sigterm(pid: int) -> bool:
    """The process has a handler for SIGTERM (``SigCgt`` in /proc/PID/status)."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            mask = next(int(line.split()[1], 16) for line in fh if line.startswith("SigCgt:"))
    except (OSError, StopIteration):
        return False
    return bool(mask & (1 << (signal.SIGTERM - 1)))


def _finish(proc: subprocess.Popen, timeout: float = 60) -> tuple[int, str]:
    """Exit code and stderr; then wait (bounded) until no process of the session is left."""
    try:
        _, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    deadline = time.monotonic() + 15
    while session_members(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert session_members(proc.pid) == [], "processes left behind"
    return proc.returncode, err


def _sigterm_once_handled(proc: subprocess.Popen) -> None:
    """SIGTERM to the group as soon as the command's handlers are in place: start-up (imports,
    argument parsing, bundle and model loading are all still ahead)."""
    deadline = time.monotonic() + 60
    while not _catches_sigterm(proc.pid):
        assert proc.poll() is None and time.monotonic() < deadline, "the command never installed its handlers"
        time.sleep(0.002)
    os.killpg(proc.pid, signal.SIGTERM)


def test_sigterm_at_start_up_exits_130_and_leaves_no_partial_csv(tiny_bundle, tmp_path):
    out = tmp_path / "r.csv"
    proc = _start("batch", SAMPLES, "--model", tiny_bundle, "--out", out, "-j", "2", "--no-progress")
    _sigterm_once_handled(proc)
    code, err = _finish(proc)
    assert code == 130, err
    assert "Aborted" not in err
    assert not out.exists() or out.read_text().splitlines() == [",".join(COLUMNS)]


@pytest.mark.parametrize("command", ["evaluate", "export", "train", "pacs"])
def test_sigterm_at_start_up_of_any_command_exits_130(command, tiny_bundle, tmp_path):
    bundle = tmp_path / "bundle"
    if command == "export":  # export rewrites the bundle's artifacts: a copy of its own
        shutil.copytree(tiny_bundle, bundle)
    results = tmp_path / "r.csv"
    results.write_text(",".join(COLUMNS) + "\r\n")
    labels = tmp_path / "labels.csv"
    labels.write_text("path,label\n/x.png,NORMAL\n")
    args = {"evaluate": ("evaluate", results, "--labels", labels),
            "export": ("export", bundle),
            "train": ("train", "--data", SAMPLES, "--out", tmp_path / "run", "--epochs-stage1", "1"),
            "pacs": ("pacs", "pull", "--config", labels)}[command]  # the signal comes before it is read
    proc = _start(*args)
    _sigterm_once_handled(proc)
    code, err = _finish(proc, timeout=120)
    assert code == 130, err
    assert "Aborted" not in err and "Traceback" not in err, err


def test_sigterm_right_after_the_last_row_exits_130_or_0_with_a_whole_csv_and_report(tiny_bundle, tmp_path):
    """The signal lands while the run finishes (summary, report): 130 with the report complete, or,
    if it came after every output was complete, the run's own exit code."""
    folder = tmp_path / "in"
    images = write_pngs(folder / "NORMAL", 3) + write_pngs(folder / "PNEUMONIA", 3, start=3)
    out = tmp_path / "r.csv"
    proc = _start("batch", folder, "--model", tiny_bundle, "--out", out, "-j", "1", "-b", "2",
                  "--labels-from-folders", "--no-progress")
    lines = []
    for line in proc.stderr:  # hook on the summary: every row is written by then
        lines.append(line)
        if line.startswith("results: "):
            os.killpg(proc.pid, signal.SIGTERM)
            break
    code, err = _finish(proc)
    err = "".join(lines) + err
    assert code in (130, 0), err
    assert "Aborted" not in err and "Traceback" not in err, err
    rows = read_results(out)
    assert sorted(Path(r["path"]).name for r in rows) == sorted(p.name for p in images)
    report = tmp_path / "r_report"
    if report.exists():  # complete or absent, never half-written
        assert json.loads((report / "report.json").read_text())["metrics"]["n"] == len(images)
        assert (report / "report.html").stat().st_size > 0
    if code == 0:
        assert report.exists()
