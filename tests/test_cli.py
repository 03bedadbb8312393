"""The command group: one error prefix for every command, and help that does not import torch."""

from __future__ import annotations

import subprocess
import sys

import pytest


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "cxr_deploy.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=120, cwd=cwd)


@pytest.mark.parametrize("args", [
    ("train", "--data", "/nonexistent/data"),          # click's own usage error
    ("train", "--data", "{samples}/labels.csv", "--lr", "-1", "--out", "{tmp}/run"),  # the command's error
    ("export", "/nonexistent/bundle"),                  # export could not start
    ("batch", "/nonexistent/in", "--model", "/nonexistent/bundle", "--out", "{tmp}/r.csv"),
    ("evaluate", "{tmp}/missing.csv", "--labels-from-folders"),
    ("inspect", "--no-such-option"),
    ("demo", "--out", "{samples}"),                     # not a folder the demo made
])
def test_every_command_uses_one_error_prefix(args, tmp_path):
    from tests.support import SAMPLES

    proc = _cli(*(a.format(tmp=tmp_path, samples=SAMPLES) for a in args))
    assert proc.returncode in (1, 2), proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("cxr-deploy: error: "), proc.stderr
    assert "Error:" not in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("command", ["export", "train", "batch", "evaluate", "inspect", "demo", "sweep", "lr-find"])
def test_help_does_not_import_torch_onnx_or_ray(command):
    code = ("import sys\nfrom cxr_deploy.cli import main\n"
            f"try:\n    main.main(['{command}', '--help'], prog_name='cxr-deploy')\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in ('torch', 'onnx', 'onnxruntime', 'sklearn', 'ray') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.stdout.strip().splitlines()[-1] == "[]", proc.stdout[-500:] + proc.stderr[-500:]


def test_batch_help_explains_every_option():
    """Every option of `batch` has a help text (`-b/--batch-size` had none)."""
    import click

    from cxr_deploy.batch.cli import batch_command

    missing = [p.opts[0] for p in batch_command.params if isinstance(p, click.Option) and not p.help]
    assert missing == []
