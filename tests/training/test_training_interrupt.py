"""An interrupted `cxr-deploy train` (Ctrl-C) exits 130 and names the checkpoint and the command that
continues it, also when the run folder was chosen by the tool (no --out)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from cxr_deploy.training.checkpoint import load_checkpoint

from synth_cxr import make_csv_dataset


def test_interrupted_train_says_how_to_resume_its_own_run_dir(tmp_path):
    labels = make_csv_dataset(tmp_path / "d", 5)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "cxr_deploy.cli", "train", "--data", str(labels), "--weights", "none",
         "--input-size", "32", "--epochs-stage1", "1", "--epochs-stage2", "50", "--batch-size", "8",
         "--num-workers", "0", "--no-progress", "--no-amp", "--min-val-images", "4"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300  # a bound on a hung run, not a timing assertion
        while not list(tmp_path.glob("runs/*/last.pt")) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert proc.poll() is None, proc.communicate()
        proc.send_signal(signal.SIGINT)  # Ctrl-C once the first epoch's checkpoint is on disk
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    (run_dir,) = [p.parent.relative_to(tmp_path) for p in tmp_path.glob("runs/*/last.pt")]
    saved = load_checkpoint(tmp_path / run_dir)["epoch"]
    last = err.strip().splitlines()[-1]
    assert f"{run_dir}/last.pt" in last and f"epoch {saved}" in last, err
    assert last.endswith(f"continue with: cxr-deploy train --resume {run_dir}"), err
    assert "Traceback" not in err


def test_train_help_lists_its_exit_codes():
    from click.testing import CliRunner

    from cxr_deploy.cli import main
    from cxr_deploy.training.cli import EXIT_DONE, EXIT_FAILED, EXIT_INTERRUPTED, EXIT_USAGE

    codes, current = {}, None
    for words in (line.split() for line in CliRunner().invoke(main, ["train", "--help"]).output.splitlines()):
        if not words:
            current = None
        elif words[0].isdigit():
            current = int(words[0])
            codes[current] = " ".join(words[1:])
        elif current is not None:  # the description's continuation lines
            codes[current] += " " + " ".join(words)
    assert set(codes) == {EXIT_DONE, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED}
    assert "--resume" in codes[EXIT_INTERRUPTED] and "SIGTERM" in codes[EXIT_INTERRUPTED]
