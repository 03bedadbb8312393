"""``torchrun -m cxr_deploy train`` with 2 processes on the CPU (gloo), as real subprocesses.

Speed (2-core CI): ResNet50 at 32 px, random init, 20 training / 13 validation images, batch 8, one
epoch per stage; one 2-process training run costs ~17 s here, mostly process start and imports.
The validation split has an odd count on purpose: the 2 shards hold 7 and 6 images, so padding
(what DistributedSampler would add) would show as 14.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest
import torch

from cxr_deploy.model import build_model
from cxr_deploy.training import TrainConfig, train
from cxr_deploy.training.checkpoint import load_checkpoint
from cxr_deploy.training.curves import read_metrics
from cxr_deploy.training.data import make_loaders, prepare_data
from cxr_deploy.training.distributed import session
from cxr_deploy.training.engine import score_loader

from synth_cxr import make_folder_dataset, tiny_config

N_VAL = 13
# Augmentation off so both runs see the same pixels; stage 1 then differs from one process only by
# float summation order (gradients summed per rank, then all-reduced).
COMMON = dict(weights="none", input_size=32, batch_size=8, num_workers=0, epochs_stage1=1, epochs_stage2=1,
              amp="off", min_val_images=4, augment={"enabled": False}, progress=False)
FLAGS = ["--weights", "none", "--input-size", "32", "--batch-size", "8", "--num-workers", "0",
         "--epochs-stage1", "1", "--epochs-stage2", "1", "--no-amp", "--min-val-images", "4", "--no-augment",
         "--no-progress"]
# Stage 1 (backbone and BatchNorm frozen): measured differences 3e-8 (train loss), 5e-9 (val loss),
# 0 (val AUC). The bound leaves room for other BLAS builds, not for a wrong batch or a missed image.
TIGHT = 1e-5
# Stage 2: BatchNorm normalizes each process's 4 images instead of all 8 (--sync-bn would fix
# that, but SyncBatchNorm has no CPU kernel), so a single process is only roughly comparable:
# measured |delta train loss| 0.05 on this run. The bound catches a broken step (a rank training
# alone, a lost learning rate), not BatchNorm noise.
LOOSE = 0.25


def _kill_marked(marker: str) -> None:
    """SIGKILL every process carrying ``marker`` in its environment: torchrun starts each worker in
    a session of its own, so killing torchrun's process group would not reach them."""
    needle = marker.encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as fh:
                if needle in fh.read().split(b"\0"):
                    os.kill(int(entry), signal.SIGKILL)
        except OSError:
            continue


def torchrun(*args, timeout: float = 120) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run --standalone --nproc-per-node 2 -m cxr_deploy ...``; every
    process it started is gone when this returns, also on a timeout or a failed assertion, and so is
    what it wrote to the temporary folder (torch's elastic agent leaves a ``torchelastic_*`` folder
    of logs there on every launch)."""
    marker = f"CXR_DDP_TEST_LAUNCH={uuid.uuid4().hex}"
    own_tmp = tempfile.mkdtemp(prefix="cxr-ddp-test-")
    env = dict(os.environ, OMP_NUM_THREADS="1", CXR_DDP_TIMEOUT_S="60", TMPDIR=own_tmp)
    env[marker.split("=")[0]] = marker.split("=")[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "cxr_deploy", *map(str, args)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
        return subprocess.CompletedProcess(cmd, proc.returncode, out, err)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        _kill_marked(marker)
        shutil.rmtree(own_tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_folder_dataset(tmp_path_factory.mktemp("ddp_data"), {"train": (10, 10), "val": (7, 6), "test": (2, 2)})


@pytest.fixture(scope="module")
def runs(data, tmp_path_factory):
    """The same run twice: in this process, and with torchrun on 2 processes; and a copy of the
    one-process run folder as it stood after epoch 1."""
    root = tmp_path_factory.mktemp("ddp_runs")
    epoch1 = tmp_path_factory.mktemp("ddp_epoch1") / "single"
    train(tiny_config(data, root / "single", **COMMON),
          on_epoch_end=lambda row: _keep_epoch_1(root / "single", epoch1, row))
    t0 = time.perf_counter()
    launched = torchrun("train", "--data", data, "--out", root / "ddp", *FLAGS)
    assert launched.returncode == 0, launched.stderr[-3000:]
    return root / "single", root / "ddp", launched, time.perf_counter() - t0, epoch1


def _keep_epoch_1(run: Path, copy: Path, row: dict) -> bool:
    """The single-process run folder as it stands after epoch 1's checkpoint: what a run stopped
    (or killed) there leaves, for the resume test, without training that epoch a second time."""
    if row["epoch"] == 1:
        shutil.copytree(run, copy)
    return False


def _val_loss_of_saved_weights(run_dir: Path) -> float:
    """Validation loss of the weights in last.pt, scored here in one process."""
    ckpt = load_checkpoint(run_dir)
    config = TrainConfig.from_dict(ckpt["config"])
    model = build_model(None)
    model.load_state_dict(ckpt["model"])
    val = make_loaders(config, prepare_data(config, run_dir, reuse_splits=True, write=False),
                       torch.device("cpu"), torch.Generator())[1]
    return score_loader(model, val, torch.device("cpu"))[2]


def test_first_epoch_matches_one_process_on_the_same_global_batch(runs):
    single, ddp, _, _, _ = runs
    one, two = read_metrics(single), read_metrics(ddp)
    assert [r["epoch"] for r in two] == [1, 2]
    for key in ("train_loss", "val_loss", "val_auc", "val_accuracy", "lr"):
        assert two[0][key] == pytest.approx(one[0][key], abs=TIGHT), key
    # 20 images, global batch 8: two whole global batches, as one process with drop_last.
    assert two[0]["train_images"] == one[0]["train_images"] == 16
    assert abs(two[1]["train_loss"] - one[1]["train_loss"]) < LOOSE
    summary_one = json.loads((single / "summary.json").read_text())
    summary_two = json.loads((ddp / "summary.json").read_text())
    assert summary_two["processes"] == {"world_size": 2, "backend": "gloo", "global_batch": 8,
                                        "per_process_batch": 4, "sync_bn": False}
    assert summary_two["best_epoch"] == summary_one["best_epoch"]
    assert summary_two["threshold_rule"]["threshold"] == pytest.approx(summary_one["threshold_rule"]["threshold"],
                                                                       abs=TIGHT)


def test_validation_counts_every_image_once_with_the_weights_rank0_saves(runs):
    _, ddp, _, _, _ = runs
    rows = read_metrics(ddp)
    assert [r["val_images"] for r in rows] == [N_VAL, N_VAL]  # shards of 7 and 6, no padded repeats
    summary = json.loads((ddp / "summary.json").read_text())
    assert summary["val_metrics"]["n"] == N_VAL and summary["calibration"]["validation_images"] == N_VAL
    # After stage 2 each rank has updated BatchNorm statistics with its own images; the recorded
    # validation loss must still be that of the weights rank 0 saved (all ranks validate rank 0's
    # model), which also shows every rank held rank 0's trained weights.
    assert rows[-1]["val_loss"] == pytest.approx(_val_loss_of_saved_weights(ddp), abs=TIGHT)


def test_only_rank0_writes_and_the_run_folder_is_a_single_process_one(runs):
    single, ddp, launched, seconds, _ = runs

    def files(run):
        return sorted(str(p.relative_to(run)) for p in run.rglob("*") if p.is_file())

    assert files(ddp) == files(single)
    assert sorted(p.name for p in ddp.parent.iterdir()) == ["ddp", "single"]  # nothing beside the folder
    assert launched.stdout.splitlines() == [str(ddp / "best")]  # one line, not one per process
    assert launched.stderr.count("epoch 1/2 stage 1:") == 1  # rank 0 logs, the other rank does not
    assert "distributed: {'world_size': 2, 'backend': 'gloo'" in launched.stderr
    assert seconds < 90


def test_resume_under_torchrun_continues_the_distributed_run(data, runs, tmp_path):
    _, ddp, _, _, epoch1_run = runs
    cut = tmp_path / "cut"
    # The one-process run as it stood right after epoch 1's checkpoint, as a kill then would leave
    # it; continued by 2 processes.
    shutil.copytree(epoch1_run, cut)
    epoch1 = read_metrics(cut)
    assert [r["epoch"] for r in epoch1] == [1] and load_checkpoint(cut)["epoch"] == 1
    launched = torchrun("train", "--resume", cut)
    assert launched.returncode == 0, launched.stderr[-3000:]
    assert launched.stderr.count("resuming after epoch 1") == 1
    rows = read_metrics(cut)
    assert [r["epoch"] for r in rows] == [1, 2] and rows[0] == epoch1[0]
    # Both ranks loaded last.pt (weights, optimizer, loader generator): epoch 2 is the one the
    # uninterrupted 2-process run trained, from epoch-1 weights that differ by float rounding only
    # (one process sums the gradients in another order); AdamW's per-parameter normalization grows
    # that into ~1e-4 of loss within an epoch (measured 1.4e-4 here once training images became
    # 8-bit integers; 1e-4 passed before).
    full = read_metrics(ddp)[1]
    for key in ("train_loss", "val_loss", "lr"):
        assert rows[1][key] == pytest.approx(full[key], abs=1e-3), key
    assert rows[1]["val_images"] == N_VAL
    assert load_checkpoint(cut)["epoch"] == 2 and (cut / "summary.json").is_file()


def test_a_foreign_out_folder_stops_every_process_with_the_same_error(data, tmp_path):
    out = tmp_path / "theirs"
    out.mkdir()
    (out / "notes.txt").write_text("not a training run\n")
    left_before = set(Path(tempfile.gettempdir()).glob("torchelastic_*"))
    launched = torchrun("train", "--data", data, "--out", out, *FLAGS, timeout=60)
    assert set(Path(tempfile.gettempdir()).glob("torchelastic_*")) <= left_before  # no log folder left behind
    assert launched.returncode != 0
    errors = [line for line in launched.stderr.splitlines() if line.startswith("cxr-deploy: error:")]
    assert len(errors) == 2 and len(set(errors)) == 1 and "is not empty" in errors[0]  # rank 0's check, on both
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


@pytest.mark.parametrize("changes, message", [
    (dict(batch_size=7), "multiple of the 2 processes"),
    (dict(sync_bn=True, device="cpu"), "--sync-bn needs CUDA"),
])
def test_settings_a_distributed_run_cannot_honour_fail_before_joining(monkeypatch, tmp_path, changes, message):
    # The environment torchrun gives rank 0 of 2; the checks come before any process waits on another.
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    config = TrainConfig(data=str(tmp_path), out=str(tmp_path / "run"), device="cpu").with_overrides(**changes)
    with pytest.raises(ValueError, match=message):
        with session(config):
            pass
    assert not torch.distributed.is_initialized()


def test_python_m_cxr_deploy_is_the_cli_and_train_help_says_the_batch_is_global():
    result = subprocess.run([sys.executable, "-m", "cxr_deploy", "train", "--help"], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0 and "Usage: cxr-deploy train" in result.stdout
    text = " ".join(result.stdout.split())
    assert "all processes together" in text and "--sync-bn" in text
