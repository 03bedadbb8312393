"""lr-find, sweep and the CLI (config file + flags) on tiny synthetic data."""

from __future__ import annotations

import copy
import csv
import json
import math

import numpy as np
import torch
from click.testing import CliRunner

from cxr_deploy.model import build_model
from cxr_deploy.training import lr_range_test, sweep
from cxr_deploy.training.cli import lr_find_command, train_command
from cxr_deploy.training.config import load_config
from cxr_deploy.training.devices import resolve_precision
from cxr_deploy.training.data import make_loaders, make_loss, prepare_data
from cxr_deploy.training.optim import build_optimizer, set_trainable
from cxr_deploy.training.lr_range import suggest_lr

from synth_cxr import make_csv_dataset, make_folder_dataset, tiny_config


def test_suggest_lr_picks_the_steepest_descent_before_the_minimum():
    lrs = list(np.logspace(-6, 0, 61))
    log_lr = np.log10(lrs)
    loss = 1.0 - 0.8 / (1 + np.exp(-(log_lr + 3) * 4))  # steepest at lr = 1e-3
    loss[50:] += np.linspace(0, 5, 11)  # divergence after the minimum
    assert math.isclose(math.log10(suggest_lr(lrs, list(loss))), -3, abs_tol=0.15)
    assert suggest_lr(lrs[:3], list(loss[:3])) is None


def test_lr_range_test_gives_a_finite_curve_and_restores_model_and_optimizer(tmp_path):
    data_dir = make_folder_dataset(tmp_path / "d", {"train": (4, 4), "val": (2, 2)})
    cfg = tiny_config(data_dir, tmp_path / "unused", batch_size=4)
    data = prepare_data(cfg, None)
    device = torch.device("cpu")
    loader, _, _ = make_loaders(cfg, data, device, torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    model = build_model(None)
    set_trainable(model, 1)
    optimizer = build_optimizer(model, 1, cfg)
    # give the optimizer some state worth restoring
    model.fc.weight.grad = torch.ones_like(model.fc.weight)
    model.fc.bias.grad = torch.ones_like(model.fc.bias)
    optimizer.step()
    model_before = copy.deepcopy(model.state_dict())
    optim_before = copy.deepcopy(optimizer.state_dict())
    result = lr_range_test(model, optimizer, loader, make_loss(cfg, data, device),
                           precision=resolve_precision("off", device), device=device, stage=1,
                           start_lr=1e-5, end_lr=10.0, num_iters=6)
    assert 2 <= len(result.lrs) <= 6
    assert all(math.isfinite(v) for v in result.losses + result.smoothed)
    assert result.lrs == sorted(result.lrs) and result.lrs[0] == 1e-5
    for key, value in model.state_dict().items():
        assert torch.equal(value, model_before[key]), key
    after = optimizer.state_dict()
    assert after["param_groups"] == optim_before["param_groups"]
    for pid, state in optim_before["state"].items():
        for name, value in state.items():
            assert torch.equal(after["state"][pid][name], value)


def test_lr_find_command_writes_plot_and_prints_a_suggestion_or_why_not(tmp_path):
    data_dir = make_folder_dataset(tmp_path / "d", {"train": (4, 4), "val": (2, 2)})
    result = CliRunner().invoke(lr_find_command, [
        "--data", str(data_dir), "--weights", "none", "--input-size", "32", "--batch-size", "4",
        "--num-workers", "0", "--no-progress", "--num-iters", "5", "--out", str(tmp_path / "lf"),
        "--min-val-images", "2"])
    assert result.exit_code == 0, result.output
    assert "suggested lr" in result.output or "no suggestion" in result.output
    assert (tmp_path / "lf" / "lr_find.png").stat().st_size > 0
    with open(tmp_path / "lf" / "lr_find.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert 2 <= len(rows) <= 5 and all(math.isfinite(float(r["smoothed_loss"])) for r in rows)


def test_train_command_config_file_flags_override_and_resolved_config(tmp_path):
    data = make_csv_dataset(tmp_path / "d", 4)
    cfg_file = tmp_path / "train.toml"
    cfg_file.write_text(f'data = "{data}"\nweights = "none"\ninput_size = 32\nbatch_size = 8\n'
                        'epochs_stage1 = 1\nepochs_stage2 = 0\nnum_workers = 0\nprogress = false\n'
                        'min_val_images = 2\nlr = 0.5\n[augment]\nrotation = 3.0\n')
    out = tmp_path / "run"
    result = CliRunner().invoke(train_command, ["--config", str(cfg_file), "--lr", "0.001", "--batch-size", "4",
                                                "--no-augment", "--out", str(out)])
    assert result.exit_code == 0, result.output
    resolved = load_config(out / "config.resolved.toml")
    assert (resolved.lr, resolved.batch_size, resolved.input_size) == (0.001, 4, 32)  # flags win, file fills in
    assert resolved.augment.enabled is False and resolved.augment.rotation == 3.0
    manifest = json.loads((out / "best" / "manifest.json").read_text())
    assert manifest["training"]["config"]["lr"] == 0.001
    assert manifest["preprocessing"]["input_size"] == 32
    with open(out / "splits.csv") as fh:
        assert {r["split"] for r in csv.DictReader(fh)} == {"train", "val"}
    # offline ImageNet weights: a clear error, not a traceback
    again = CliRunner().invoke(train_command, ["--config", str(cfg_file), "--weights", "imagenet",
                                               "--out", str(tmp_path / "run2")])
    assert again.exit_code != 0 and "--weights none" in again.output and "Traceback" not in again.output


def test_sweep_ranks_trials_and_skips_finished_ones_on_rerun(tmp_path):
    data_dir = make_folder_dataset(tmp_path / "d", {"train": (4, 4), "val": (2, 2)})
    base = tiny_config(data_dir, "", epochs_stage1=1, epochs_stage2=0, batch_size=4)
    out = tmp_path / "sweep"
    grid = {"lr": [1e-3, 0.0], "optimizer": ["adamw"]}
    results = sweep(base, grid, out)
    assert len(results) == 2 and [r["rank"] for r in results] == [1, 2]
    aucs = [r["val_auc"] for r in results]
    assert all(a is not None for a in aucs) and aucs == sorted(aucs, reverse=True)
    with open(out / "results.csv") as fh:
        assert [r["trial"] for r in csv.DictReader(fh)] == [r["trial"] for r in results]
    best = load_config(out / "best_config.toml")
    assert best.lr == results[0]["lr"] and best.optimizer == "adamw"
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and "trials" in p.parts}
    again = sweep(base, grid, out)
    assert [r["trial"] for r in again] == [r["trial"] for r in results]
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # nothing re-trained or rewritten
    bigger = sweep(base, {**grid, "lr": [1e-3, 0.0, 1e-2]}, out)  # only the new trial runs
    assert len(bigger) == 3
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps


def test_train_and_sweep_never_write_into_a_folder_of_someone_elses(tmp_path):
    import pytest

    from cxr_deploy.training import sweep, train

    from synth_cxr import make_csv_dataset, tiny_config

    data = make_csv_dataset(tmp_path / "ds", 4)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "metrics.csv").write_text("my own numbers")
    (mine / "results.csv").write_text("my own results")
    with pytest.raises(FileExistsError, match="not a cxr-deploy training run"):
        train(tiny_config(data, mine))
    with pytest.raises(ValueError, match="not a sweep folder"):
        sweep(tiny_config(data, tmp_path / "unused"), {"lr": [1e-3]}, mine)
    assert sorted(p.name for p in mine.iterdir()) == ["metrics.csv", "results.csv"]
    assert (mine / "metrics.csv").read_text() == "my own numbers"
