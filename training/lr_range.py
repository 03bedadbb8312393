"""``cxr-deploy lr-find``: the exponential learning-rate range test (Smith, 2015).

The LR grows exponentially from ``start_lr`` to ``end_lr`` over ``num_iters`` training steps; the
bias-corrected exponential moving average of the loss is recorded, and the test stops once it
exceeds ``diverge_factor`` × its minimum (or goes non-finite). The suggested LR is the point of
steepest descent of the smoothed loss against log10(LR), searched before the minimum. The model
and optimizer are restored afterwards: the test changes nothing.
"""

from __future__ import annotations

import copy
import csv
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from cxr_deploy import atomic
from cxr_deploy.model import build_model

from .config import TrainConfig
from .devices import Precision, place_model, resolve_device, resolve_precision, seed_everything, to_device
from .data import make_loaders, make_loss, prepare_data
from .engine import log
from .optim import build_optimizer, set_train_mode, set_trainable, train_step
from .weights import resolve_weights

SUGGESTION_RULE = "steepest descent of the smoothed loss vs log10(LR), before its minimum"


@dataclass
class LRFindResult:
    lrs: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)  # raw per-step losses
    smoothed: list[float] = field(default_factory=list)
    suggested_lr: float | None = None
    rule: str = SUGGESTION_RULE
    diverged: bool = False
    note: str = ""

    def to_csv(self, path: Path) -> None:
        with atomic.open_atomic(path, "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["lr", "loss", "smoothed_loss"])
            writer.writerows(zip(self.lrs, self.losses, self.smoothed))

    def plot(self, path: Path) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6.5, 4))
        ax.plot(self.lrs, self.losses, alpha=0.3, label="loss")
        ax.plot(self.lrs, self.smoothed, label="smoothed loss")
        if self.suggested_lr is not None:
            ax.axvline(self.suggested_lr, color="tab:red", linestyle="--",
                       label=f"suggested {self.suggested_lr:.2e}")
        ax.set_xscale("log")
        ax.set_xlabel("learning rate")
        ax.set_ylabel("training loss")
        ax.set_title("LR range test")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        with atomic.temp_for(path) as tmp:
            fig.savefig(tmp, dpi=90, format=Path(path).suffix.lstrip(".") or "png")
        plt.close(fig)


def suggest_lr(lrs: list[float], smoothed: list[float], skip_start: int | None = None) -> float | None:
    """Steepest descent of the smoothed loss over log10(LR), before the loss minimum.

    The first few points are skipped: the moving average has not settled there yet.
    """
    if len(lrs) < 5:
        return None
    loss = np.asarray(smoothed, dtype=np.float64)
    log_lr = np.log10(np.asarray(lrs, dtype=np.float64))
    end = int(np.argmin(loss)) + 1
    start = skip_start if skip_start is not None else max(1, len(lrs) // 10)
    if end - start < 3:
        start = 0
    if end - start < 3:
        return None
    slope = np.gradient(loss[start:end], log_lr[start:end])
    return float(lrs[start + int(np.argmin(slope))])


def lr_range_test(model: nn.Module, optimizer: torch.optim.Optimizer, loader, loss_fn: nn.Module, *,
                  precision: Precision, device: torch.device, stage: int = 1, start_lr: float = 1e-7,
                  end_lr: float = 10.0, num_iters: int = 100, smoothing: float = 0.98,
                  diverge_factor: float = 4.0, clip_grad_norm: float = 0.0, progress: bool = False) -> LRFindResult:
    """Run the range test with this model/optimizer/loader and restore both afterwards.

    Parameter groups keep their LR ratios (e.g. early layers at a fraction of the rest); the
    largest group's LR is the one swept and reported.
    """
    if not 0 < start_lr < end_lr:
        raise ValueError(f"need 0 < start_lr < end_lr, got {start_lr}, {end_lr}")
    if num_iters < 2:
        raise ValueError("num_iters must be >= 2")
    model_state = copy.deepcopy(model.state_dict())
    optim_state = copy.deepcopy(optimizer.state_dict())
    top = max(g["lr"] for g in optimizer.param_groups) or 1.0
    ratios = [g["lr"] / top if top else 1.0 for g in optimizer.param_groups]
    scaler = precision.grad_scaler()
    result = LRFindResult()
    gamma = (end_lr / start_lr) ** (1.0 / (num_iters - 1))
    avg, best = 0.0, math.inf
    try:
        set_train_mode(model, stage)
        step = 0
        from tqdm import tqdm

        bar = tqdm(total=num_iters, desc="lr-find", unit="step", leave=False, disable=not progress)
        while step < num_iters:
            yielded = False
            for batch in loader:
                if batch is None:
                    continue
                yielded = True
                lr = start_lr * gamma ** step
                for group, ratio in zip(optimizer.param_groups, ratios):
                    group["lr"] = lr * ratio
                x, y = to_device(batch[0], device), batch[1].to(device)
                try:
                    loss, _ = train_step(model, x, y, optimizer, loss_fn, precision, scaler, clip_grad_norm)
                except FloatingPointError:
                    result.diverged, result.note = True, f"loss became non-finite at lr {lr:.3g}"
                    break
                avg = smoothing * avg + (1 - smoothing) * loss
                smooth = avg / (1 - smoothing ** (step + 1))
                result.lrs.append(lr)
                result.losses.append(loss)
                result.smoothed.append(smooth)
                best = min(best, smooth)
                step += 1
                bar.update(1)
                if smooth > diverge_factor * best:
                    result.diverged = True
                    result.note = f"smoothed loss exceeded {diverge_factor:g}x its minimum at lr {lr:.3g}"
                    break
                if step >= num_iters:
                    break
            if result.diverged or not yielded:
                break
        bar.close()
    finally:
        model.load_state_dict(model_state)
        optimizer.load_state_dict(optim_state)
    if not result.diverged:
        result.note = f"reached end_lr {end_lr:g} without diverging"
    result.suggested_lr = suggest_lr(result.lrs, result.smoothed)
    return result


def lr_find(config: TrainConfig, *, out: str | Path | None = None, stage: int = 1, start_lr: float = 1e-7,
            end_lr: float = 10.0, num_iters: int = 100) -> LRFindResult:
    """Range test on the training split of ``config.data`` for ``stage`` (1: head only with the
    backbone frozen, the stage ``--lr`` applies to; 2: whole network). Writes lr_find.png and
    lr_find.csv into ``out`` (default: ``config.out`` or ./lr_find)."""
    config.validate()
    seed_everything(config.seed, config.deterministic)
    device = resolve_device(config.device)
    precision = resolve_precision(config.amp, device)
    data = prepare_data(config, None)
    generator = torch.Generator().manual_seed(config.seed)
    train_loader, _, _ = make_loaders(config, data, device, generator)
    model = place_model(build_model(resolve_weights(config.weights)), device)
    set_trainable(model, stage)
    optimizer = build_optimizer(model, stage, config)
    log(f"lr-find: stage {stage}, {len(data.train_set)} training images, {num_iters} steps from "
        f"{start_lr:g} to {end_lr:g}, precision {precision.name}")
    result = lr_range_test(model, optimizer, train_loader, make_loss(config, data, device), precision=precision,
                           device=device, stage=stage, start_lr=start_lr, end_lr=end_lr, num_iters=num_iters,
                           clip_grad_norm=config.clip_grad_norm, progress=config.progress)
    out_dir = Path(out or config.out or "lr_find")
    out_dir.mkdir(parents=True, exist_ok=True)
    result.to_csv(out_dir / "lr_find.csv")
    result.plot(out_dir / "lr_find.png")
    return result
