"""What a step changes and when training stops: the two stages' trainable parameters, optimizers,
LR schedules, one optimization step (AMP, clipping), and early stopping."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from .config import TrainConfig
from .devices import Precision

EARLY_LAYERS = ("conv1.", "bn1.", "layer1.", "layer2.")  # --early-lr-factor applies to these in stage 2


def is_head(name: str) -> bool:
    return name.startswith("fc.")


def set_trainable(model: nn.Module, stage: int) -> None:
    for name, param in model.named_parameters():
        param.requires_grad_(stage == 2 or is_head(name))


def set_train_mode(model: nn.Module, stage: int) -> None:
    """``model.train()``, except that in stage 1 every BatchNorm stays in eval mode: in train mode
    BN would update its running statistics even with frozen affine parameters."""
    model.train()
    if stage == 1:
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()


def param_groups(model: nn.Module, stage: int, config: TrainConfig) -> list[dict]:
    """Weight decay on conv/linear weights only (decaying BN scales and biases only hurts);
    stage 2 early layers at ``early_lr_factor`` × the stage LR."""
    base_lr = config.lr if stage == 1 else config.lr_stage2
    groups: dict[tuple[bool, bool], list] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        early = stage == 2 and name.startswith(EARLY_LAYERS)
        decay = param.ndim > 1
        groups.setdefault((early, decay), []).append(param)
    out = []
    for (early, decay), params in sorted(groups.items()):
        lr = base_lr * (config.early_lr_factor if early else 1.0)
        out.append({"params": params, "lr": lr, "weight_decay": config.weight_decay if decay else 0.0,
                    "name": f"{'early' if early else 'main'}_{'decay' if decay else 'no_decay'}"})
    return out


def build_optimizer(model: nn.Module, stage: int, config: TrainConfig) -> torch.optim.Optimizer:
    groups = param_groups(model, stage, config)
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=groups[0]["lr"], momentum=config.momentum,
                               nesterov=config.nesterov and config.momentum > 0)
    betas = (config.momentum, 0.999)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=groups[0]["lr"], betas=betas)
    return torch.optim.Adam(groups, lr=groups[0]["lr"], betas=betas)


def cosine_with_warmup(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return factor


def build_scheduler(optimizer, config: TrainConfig, epochs: int, steps_per_epoch: int):
    """Returns (scheduler, per_step). Cosine steps per batch; plateau steps per epoch on val loss."""
    if config.schedule == "cosine":
        total = max(1, epochs * steps_per_epoch)
        warmup = min(total - 1, int(round(config.warmup_epochs * steps_per_epoch)))
        return torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_with_warmup(total, warmup)), True
    if config.schedule == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="min", factor=0.1, patience=max(1, config.patience // 2)), False
    return None, False


def train_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, optimizer: torch.optim.Optimizer,
               loss_fn: nn.Module, precision: Precision, scaler: torch.amp.GradScaler,
               clip_grad_norm: float = 0.0) -> tuple[float, float]:
    """Forward, backward, clip, step. Returns (loss, global grad norm before clipping).

    Clipping happens on *unscaled* gradients (``scaler.unscale_`` first); clipping the scaled ones
    would make the bound depend on the current loss scale.
    """
    optimizer.zero_grad(set_to_none=True)
    with precision.autocast():
        logits = model(x)
    loss = loss_fn(logits.float(), y)
    if not torch.isfinite(loss):
        raise FloatingPointError(f"training loss became {loss.item()}: lower the learning rate "
                                 "(try cxr-deploy lr-find) or keep gradient clipping on")
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    if clip_grad_norm > 0:
        norm = torch.nn.utils.clip_grad_norm_(params, clip_grad_norm)
    else:
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))
    scaler.step(optimizer)  # skipped by the scaler when fp16 gradients overflowed
    scaler.update()
    return float(loss.detach()), float(norm)


@dataclass
class EarlyStopping:
    """Tracks the best epoch. ``val_auc``: higher is better, equal AUC broken by lower loss (AUC
    on a small validation set moves in coarse steps and often ties); ``val_loss``: lower is better.
    A NaN AUC (validation with one class) falls back to loss."""

    monitor: str = "val_auc"
    patience: int = 4
    min_delta: float = 0.0
    best_auc: float | None = None
    best_loss: float | None = None
    best_epoch: int = 0
    bad_epochs: int = 0

    def update(self, epoch: int, auc: float, loss: float) -> bool:
        """Record an epoch's metrics; True when it is the new best."""
        if self.best_epoch == 0:
            better = True
        elif self.monitor == "val_auc" and not math.isnan(auc) and not math.isnan(self.best_auc):
            better = auc > self.best_auc + self.min_delta or (
                abs(auc - self.best_auc) <= 1e-12 and loss < self.best_loss)
        else:
            better = loss < self.best_loss - self.min_delta
        if better:
            self.best_auc, self.best_loss, self.best_epoch, self.bad_epochs = auc, loss, epoch, 0
        else:
            self.bad_epochs += 1
        return better

    @property
    def should_stop(self) -> bool:
        return self.bad_epochs >= self.patience

    def new_stage(self) -> None:
        self.bad_epochs = 0

    def state_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("monitor", "patience", "min_delta", "best_auc", "best_loss",
                                               "best_epoch", "bad_epochs")}

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)

