"""The CUDA training path: fp16 autocast + GradScaler, clipping after unscaling, a full run.

Skipped where PyTorch sees no GPU (CI and the development machines have none); run on a GPU box
with ``python -m pytest tests -k cuda``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from cxr_deploy.bundle import ModelBundle
from cxr_deploy.model import build_model
from cxr_deploy.training import train
from cxr_deploy.training.checkpoint import load_checkpoint
from cxr_deploy.training.devices import resolve_precision
from cxr_deploy.training.optim import set_trainable, train_step

from synth_cxr import calibrated_random_weights, make_folder_dataset, tiny_config

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none visible to PyTorch)")


def test_auto_precision_on_cuda_is_fp16_with_an_active_grad_scaler():
    precision = resolve_precision("auto", torch.device("cuda"))
    assert precision.name == "fp16"
    scaler = precision.grad_scaler()
    assert scaler.is_enabled() and scaler.get_scale() > 1


def test_fp16_step_runs_in_half_and_clips_the_unscaled_gradients():
    device = torch.device("cuda")
    torch.manual_seed(0)
    model = build_model(None).to(device).train()
    set_trainable(model, 2)
    seen = []
    model.layer1.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    precision = resolve_precision("on", device)
    scaler = precision.grad_scaler()
    x, y = torch.randn(4, 3, 64, 64, device=device) * 5, torch.tensor([0, 1, 0, 1], device=device)
    max_norm = 1e-2
    initial_scale = scaler.get_scale()
    before = model.fc.weight.detach().clone()
    # At the initial scale (65536) fp16 gradients overflow: the scaler must skip that step (weights
    # untouched) and back off, until a step with finite gradients goes through.
    for _ in range(30):
        loss, pre_clip = train_step(model, x, y, optimizer, nn.CrossEntropyLoss(), precision, scaler,
                                    clip_grad_norm=max_norm)
        if np.isfinite(pre_clip):
            break
        assert torch.equal(model.fc.weight, before)  # overflowed step skipped
    assert seen[0] == torch.float16
    assert np.isfinite(loss) and np.isfinite(pre_clip) and pre_clip > 10 * max_norm
    assert scaler.get_scale() <= initial_scale
    assert not torch.equal(model.fc.weight, before)
    # The gradients the optimizer saw are the unscaled, clipped ones (scale is ~65536, so clipping
    # the scaled gradients instead would leave a norm 65536x too large after unscaling).
    after = torch.linalg.vector_norm(torch.stack([p.grad.float().norm() for p in model.parameters()
                                                  if p.grad is not None]))
    assert float(after) == pytest.approx(max_norm, rel=1e-2)
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_a_short_cuda_run_learns_and_saves_scaler_state(tmp_path):
    data = make_folder_dataset(tmp_path / "data", {"train": (10, 10), "val": (8, 8)})
    weights = calibrated_random_weights(data / "train", tmp_path / "start.pt")
    cfg = tiny_config(data, tmp_path / "run", weights=str(weights), epochs_stage1=4, epochs_stage2=1, lr=1e-3,
                      batch_size=4, augment={"enabled": False}, device="cuda", amp="auto")
    best = train(cfg)
    summary = ModelBundle.load(best).manifest.training
    assert summary["val_metrics"]["auc"] >= 0.85
    assert summary["config"]["device"] == "cuda"
    checkpoint = load_checkpoint(tmp_path / "run")
    assert checkpoint["scaler"] and checkpoint["scaler"]["scale"] > 0  # GradScaler state kept for --resume


@pytest.mark.parametrize("deep", [False, True])
def test_device_batches_on_cuda_equal_the_cpu_path(deep):
    """uint8 and uint16 stored pixels → augmented, normalized, channels-last batch on the GPU; the
    same as the same code on CPU tensors (which tests/training/test_device_batches.py ties to the
    worker path)."""
    from types import SimpleNamespace

    from cxr_deploy.preprocessing import PreprocessSpec
    from cxr_deploy.training.augment import Augment, draw_params
    from cxr_deploy.training.config import AugmentConfig
    from cxr_deploy.training.device_batches import batch_to_device, to_storage

    rng = np.random.default_rng(0)
    spec = PreprocessSpec(input_size=64)
    config = AugmentConfig(hflip=True)
    stored = torch.from_numpy(np.stack([to_storage(rng.random((64, 64), dtype=np.float32), deep) for _ in range(8)]))
    params = {i: draw_params(config, 64, np.random.default_rng(i)) for i in range(8)}
    batch = (stored, torch.zeros(8, dtype=torch.long), torch.arange(8))
    dataset = SimpleNamespace(augment=Augment(config, spec.pad_value), spec=spec, params=params.__getitem__)
    x_gpu, _ = batch_to_device(batch, torch.device("cuda"), dataset)
    x_cpu, _ = batch_to_device(batch, torch.device("cpu"), dataset)
    assert x_gpu.is_cuda and x_gpu.is_contiguous(memory_format=torch.channels_last)
    assert (x_gpu.cpu() - x_cpu).abs().max() < 1e-4
