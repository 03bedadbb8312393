"""Training runs on tiny synthetic data: learning, freezing, early stopping, resume, AMP, clipping."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from cxr_deploy import in_population
from cxr_deploy.bundle import ModelBundle
from cxr_deploy.imaging import read_image
from cxr_deploy.model import build_model
from cxr_deploy.training import EarlyStopping, resume, train
from cxr_deploy.training.curves import read_metrics
from cxr_deploy.training.checkpoint import load_checkpoint
from cxr_deploy.training.devices import Precision, resolve_precision
from cxr_deploy.training.optim import train_step
from cxr_deploy.training.threshold import classification_metrics

from synth_cxr import calibrated_random_weights, make_csv_dataset, make_folder_dataset, tiny_config


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    return make_folder_dataset(root, {"train": (10, 10), "val": (8, 8), "test": (2, 2)})


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("small")
    return make_folder_dataset(root, {"train": (4, 4), "val": (2, 2)})


def test_learns_a_learnable_task_and_writes_a_complete_bundle(dataset, tmp_path):
    weights = calibrated_random_weights(dataset / "train", tmp_path / "start.pt")
    # Augmentation off: on a random (not pretrained) backbone, brightness jitter drowns the blob cue.
    cfg = tiny_config(dataset, tmp_path / "run", weights=str(weights), epochs_stage1=4, epochs_stage2=0,
                      lr=1e-3, batch_size=4, augment={"enabled": False}, target_sensitivity=0.9, age_range="1-5")
    best = train(cfg)
    bundle = ModelBundle.load(best)
    summary = bundle.manifest.training
    rows = read_metrics(tmp_path / "run")
    assert summary["val_metrics"]["auc"] >= 0.85, rows
    assert rows[-1]["val_auc"] >= 0.8, rows  # ends well above chance, not just one lucky epoch
    assert bundle.spec.input_size == 32 and bundle.spec.resize == "letterbox"
    assert summary["config"]["input_size"] == 32 and summary["config"]["target_sensitivity"] == 0.9
    assert summary["class_weighting"]["mode"] == "loss"
    assert summary["class_weighting"]["train_counts"] == {"NORMAL": 10, "PNEUMONIA": 10}
    assert summary["threshold_rule"]["rule"].startswith("target_sensitivity")
    assert summary["threshold_rule"]["sensitivity"] >= 0.9
    calibration = summary["calibration"]  # temperature scaling on validation, applied by the bundle
    assert bundle.manifest.temperature == calibration["temperature"] > 0
    assert calibration["nll_after"] <= calibration["nll_before"] + 1e-12
    population = in_population.load(bundle)  # the out-of-population statistics, fitted after training
    assert population is not None and population.age_range == (1.0, 5.0)
    assert population.info["train_images"] == 20 and population.info["validation_images"] == 16
    assert population.centres.shape == (2, 3072) and population.threshold > 0
    val_scores = bundle.classifier()(torch.from_numpy(np.stack(
        [bundle.spec.apply(read_image(p).pixels) for p in sorted((dataset / "val").rglob("*.png"))])))[2]
    assert np.mean(val_scores.detach().numpy() > population.threshold) <= 0.125  # the 95th percentile of these
    points = summary["operating_points"]  # named thresholds chosen on validation
    assert set(points) == {"youden", "sens90", "sens95", "sens98", "spec90", "spec95", "spec98"}
    for name, target in (("sens90", 0.90), ("sens95", 0.95), ("sens98", 0.98)):
        assert points[name]["sensitivity"] >= target and 0 <= points[name]["threshold"] <= 1
    assert points["sens90"]["threshold"] >= points["sens98"]["threshold"]  # more sensitivity, lower threshold
    assert bundle.threshold == summary["threshold_rule"]["threshold"]
    assert summary["test_metrics"]["n"] == 4
    assert (tmp_path / "run" / "curves.png").stat().st_size > 0
    assert len(rows) == 4
    # The bundle, run through the bare spec like inference will, reproduces the recorded validation AUC.
    model = bundle.build_model()
    val = sorted((dataset / "val").rglob("*.png"))
    x = torch.stack([torch.from_numpy(bundle.spec.apply(read_image(p).pixels)) for p in val])
    with torch.no_grad():
        scores = torch.softmax(model(x), 1)[:, 1].numpy()
    labels = np.array([p.parent.name == "PNEUMONIA" for p in val], dtype=int)
    assert classification_metrics(labels, scores)["auc"] == pytest.approx(summary["val_metrics"]["auc"], abs=1e-6)


def test_stage1_leaves_backbone_parameters_and_bn_statistics_bit_identical(small_dataset, tmp_path):
    torch.manual_seed(1)
    start = build_model(None).state_dict()
    torch.save(start, tmp_path / "start.pt")
    cfg = tiny_config(small_dataset, tmp_path / "run", weights=str(tmp_path / "start.pt"), epochs_stage1=2,
                      epochs_stage2=0, lr=0.05, augment={"enabled": True})
    train(cfg)
    after = load_checkpoint(tmp_path / "run")["model"]
    backbone = [k for k in start if not k.startswith("fc.")]
    assert any("running_mean" in k for k in backbone) and any("num_batches_tracked" in k for k in backbone)
    changed = [k for k in backbone if not torch.equal(start[k], after[k])]
    assert changed == []
    assert not torch.equal(after["fc.weight"], torch.zeros_like(after["fc.weight"]))


def test_early_stopping_rule():
    stop = EarlyStopping("val_auc", patience=2)
    assert stop.update(1, 0.70, 0.60)
    assert stop.update(2, 0.80, 0.50)
    assert stop.update(3, 0.80, 0.40)  # AUC tie, lower loss: better
    assert not stop.update(4, 0.80, 0.45) and not stop.should_stop
    assert not stop.update(5, 0.79, 0.30) and stop.should_stop
    assert stop.best_epoch == 3
    loss_mode = EarlyStopping("val_loss", patience=1, min_delta=0.1)
    loss_mode.update(1, float("nan"), 1.0)
    assert not loss_mode.update(2, 0.9, 0.95) and loss_mode.should_stop  # below min_delta


def test_early_stopping_stops_at_the_expected_epoch_on_a_plateau(small_dataset, tmp_path):
    # lr = 0 with a frozen backbone: validation metrics are exactly constant from epoch 1 on, so with
    # patience 2 the run must stop after epoch 3 of the 10 allowed.
    cfg = tiny_config(small_dataset, tmp_path / "run", epochs_stage1=10, epochs_stage2=0, lr=0.0, patience=2)
    train(cfg)
    rows = read_metrics(tmp_path / "run")
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert [r["improved"] for r in rows] == [True, False, False]
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["best_epoch"] == 1
    with pytest.raises(FileExistsError, match="--resume"):  # a finished run is never overwritten
        train(cfg)


def test_resume_after_interruption_matches_an_uninterrupted_run(tmp_path):
    data = make_csv_dataset(tmp_path / "d", 5)  # carved validation split
    common = dict(epochs_stage1=1, epochs_stage2=2, deterministic=True, lr=1e-3, seed=7)
    full = train(tiny_config(data, tmp_path / "full", **common))
    # Stop after epoch 2 (mid stage 2) as a kill right after that checkpoint would, then resume.
    train(tiny_config(data, tmp_path / "cut", **common), on_epoch_end=lambda row: row["epoch"] == 2)
    assert load_checkpoint(tmp_path / "cut")["epoch"] == 2
    assert not (tmp_path / "cut" / "summary.json").exists()
    resumed = resume(tmp_path / "cut")

    a, b = load_checkpoint(tmp_path / "full"), load_checkpoint(tmp_path / "cut")
    assert a["epoch"] == b["epoch"] == 3
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    best_a, best_b = ModelBundle.load(full).state_dict(), ModelBundle.load(resumed).state_dict()
    assert all(torch.equal(best_a[k], best_b[k]) for k in best_a)
    timing = {"images_per_s", "epoch_seconds"}
    rows_a = [{k: v for k, v in r.items() if k not in timing} for r in read_metrics(tmp_path / "full")]
    rows_b = [{k: v for k, v in r.items() if k not in timing} for r in read_metrics(tmp_path / "cut")]
    assert rows_a == rows_b and len(rows_a) == 3
    sa = json.loads((tmp_path / "full" / "summary.json").read_text())
    sb = json.loads((tmp_path / "cut" / "summary.json").read_text())
    assert sa["val_metrics"] == sb["val_metrics"] and sa["threshold_rule"] == sb["threshold_rule"]


def test_bf16_autocast_path_runs_on_cpu():
    precision = resolve_precision("on", torch.device("cpu"))
    assert precision.dtype == torch.bfloat16 and precision.name == "bf16"
    assert resolve_precision("off", torch.device("cpu")).dtype is None
    torch.manual_seed(0)
    model = build_model(None).train()
    seen = []
    model.layer1.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([0, 1])
    before = model.fc.weight.detach().clone()
    loss, norm = train_step(model, x, y, optimizer, nn.CrossEntropyLoss(), precision, precision.grad_scaler(), 0.0)
    assert seen == [torch.bfloat16]
    assert np.isfinite(loss) and np.isfinite(norm) and norm > 0
    assert model.fc.weight.dtype == torch.float32 and not torch.equal(before, model.fc.weight)


def _small_net():
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(8, 2))


@pytest.mark.parametrize("scale", [None, 2.0 ** 12])
def test_clipping_bounds_the_unscaled_gradient_norm(scale):
    torch.manual_seed(0)
    model = _small_net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(8, 3, 16, 16) * 10, torch.randint(0, 2, (8,))
    # With a loss scaler active, the bound must hold for the *unscaled* gradients the optimizer uses.
    scaler = torch.amp.GradScaler("cpu", init_scale=scale, enabled=scale is not None) if scale else \
        torch.amp.GradScaler("cpu", enabled=False)
    max_norm = 1e-3
    _, pre_clip = train_step(model, x, y, optimizer, nn.CrossEntropyLoss(), Precision("cpu", None), scaler,
                             clip_grad_norm=max_norm)
    after = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()]))
    assert pre_clip > 10 * max_norm
    assert float(after) == pytest.approx(max_norm, rel=1e-3)
