"""The training loop: two stages, mixed precision, clipping, early stopping, checkpoint and resume.

Run directory (``config.out``)::

    config.resolved.toml   every setting of the run (defaults + file + flags)
    splits.csv             path,label,split of every image used (the carved validation split too)
    metrics.jsonl/.csv     one row per epoch; curves.png plots them
    last.pt                resume checkpoint, rewritten atomically after every epoch
    best/                  model bundle of the best validation epoch (what you deploy / export)
    summary.json           the best epoch's summary (also in best/manifest.json "training")

Stage 1 trains the head only: backbone parameters have ``requires_grad=False`` *and* every
BatchNorm layer stays in eval mode, so running statistics computed on ImageNet are not dragged
toward a small X-ray batch before the head has learned anything. Stage 2 trains everything at
``lr * stage2_lr_factor`` (early layers optionally lower still).
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, RandomSampler, WeightedRandomSampler

from cxr_deploy.bundle import CLASS_NAMES, POSITIVE_CLASS, save_bundle, ModelBundle
from cxr_deploy.decision import threshold_warning
from cxr_deploy.model import build_model
from cxr_deploy.preprocessing import PreprocessSpec

from .augment import build_augment
from .config import TrainConfig
from .curves import PNG_NAME, plot_curves, read_metrics, write_metrics
from .data import (CXRDataset, ResizedCache, Sample, assign_validation, collate_skip_unreadable,
                   load_samples, read_splits, split_counts, write_splits)
from .threshold import choose_threshold, classification_metrics
from .weights import resolve_weights

CHECKPOINT_NAME = "last.pt"
CHECKPOINT_FORMAT = "cxr-deploy-train-checkpoint"
CONFIG_NAME = "config.resolved.toml"
SPLITS_NAME = "splits.csv"
BEST_NAME = "best"
SUMMARY_NAME = "summary.json"
EARLY_LAYERS = ("conv1.", "bn1.", "layer1.", "layer2.")
POSITIVE_INDEX = CLASS_NAMES.index(POSITIVE_CLASS)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# -- reproducibility ---------------------------------------------------------------------------------
def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it to be deterministic
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    else:
        torch.use_deterministic_algorithms(False)  # a previous run in this process may have set it
        torch.backends.cudnn.deterministic = False
        torch.backends.cudnn.benchmark = True


def rng_state() -> dict:
    """Global RNG states as plain lists/tensors (loadable with ``torch.load(weights_only=True)``)."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]),
                  int(np_state[3]), float(np_state[4])],
        "python": [py_state[0], list(py_state[1]), py_state[2]],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# -- device and precision ----------------------------------------------------------------------------
def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda asked for, but PyTorch sees no CUDA GPU here")
    return device


def memory_format(device: torch.device) -> torch.memory_format:
    """Channels-last (NHWC) on CUDA, where tensor-core convolutions (fp16 under autocast, TF32
    otherwise) want it and NCHW costs a transpose around every convolution; the default elsewhere."""
    return torch.channels_last if device.type == "cuda" else torch.contiguous_format


def place_model(model: nn.Module, device: torch.device) -> nn.Module:
    """The model onto ``device`` in the layout batches there use (see :func:`memory_format`)."""
    return model.to(device, memory_format=memory_format(device))


def to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """An image batch onto ``device`` in the layout the model there uses."""
    return x.to(device, non_blocking=True, memory_format=memory_format(device))


def cpu_has_native_bf16() -> bool:
    cpu = getattr(torch, "cpu", None)
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(cpu, c, lambda: False)()) for c in checks)


@dataclass(frozen=True)
class Precision:
    """Autocast settings: CUDA → float16 with a GradScaler; CPU → bfloat16, no scaler needed (bf16
    has float32's exponent range, so gradients do not underflow)."""

    device_type: str
    dtype: torch.dtype | None  # None: full float32

    @property
    def name(self) -> str:
        return {None: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[self.dtype]

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.dtype)

    def grad_scaler(self) -> torch.amp.GradScaler:
        return torch.amp.GradScaler(self.device_type, enabled=self.dtype == torch.float16)


def resolve_precision(amp: str | bool, device: torch.device) -> Precision:
    """``amp``: "auto" (CUDA fp16; CPU bf16 only with native bf16 instructions, because emulated
    bf16 is slower than fp32), "on"/True, "off"/False."""
    mode = {True: "on", False: "off"}.get(amp, amp)
    if mode == "off":
        return Precision(device.type, None)
    if device.type == "cuda":
        return Precision("cuda", torch.float16)
    if device.type == "cpu" and (mode == "on" or cpu_has_native_bf16()):
        return Precision("cpu", torch.bfloat16)
    return Precision(device.type, None)


# -- model stages ------------------------------------------------------------------------------------
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


# -- one step, one epoch -----------------------------------------------------------------------------
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


@torch.no_grad()
def predict(model: nn.Module, loader: DataLoader, device: torch.device) -> tuple[np.ndarray, np.ndarray, float]:
    """(labels, P(positive), mean unweighted cross-entropy) in full float32: the threshold is
    chosen on the same numerics the exported float32 model uses."""
    model.eval()
    labels, scores, loss_sum, n = [], [], 0.0, 0
    for batch in loader:
        if batch is None:
            continue
        x, y, _ = batch
        x, y = to_device(x, device), y.to(device, non_blocking=True)
        logits = model(x).float()
        loss_sum += float(nn.functional.cross_entropy(logits, y, reduction="sum"))
        n += len(y)
        labels.append(y.cpu().numpy())
        scores.append(torch.softmax(logits, dim=1)[:, POSITIVE_INDEX].cpu().numpy())
    if n == 0:
        raise RuntimeError("no readable validation images")
    return np.concatenate(labels), np.concatenate(scores), loss_sum / n


# -- early stopping ----------------------------------------------------------------------------------
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


# -- the run -----------------------------------------------------------------------------------------
@dataclass
class RunData:
    samples: list[Sample]
    split_note: str
    spec: PreprocessSpec
    train_set: CXRDataset
    val_set: CXRDataset
    test_set: CXRDataset | None
    class_counts: dict[str, int]
    class_weighting: dict = field(default_factory=dict)


def _split_samples(config: TrainConfig) -> tuple[list, str]:
    if not config.data:
        raise ValueError("no training data given (--data ROOT_OR_CSV)")
    return assign_validation(load_samples(config.data), val_fraction=config.val_fraction,
                             min_val_images=config.min_val_images, seed=config.seed)


def prepare_data(config: TrainConfig, run_dir: Path | None, *, reuse_splits: bool = False,
                 presplit: tuple[list, str] | None = None) -> RunData:
    splits_file = run_dir / SPLITS_NAME if run_dir else None
    if reuse_splits and splits_file and splits_file.is_file():
        samples, note = read_splits(splits_file), f"splits reused from {splits_file}"
    else:
        samples, note = presplit or _split_samples(config)
        if splits_file:
            write_splits(samples, splits_file)
    spec = PreprocessSpec(input_size=config.input_size, resize=config.resize)
    cache = ResizedCache(config.cache_dir, spec) if config.cache_dir else None
    by_split = {s: [x for x in samples if x.split == s] for s in ("train", "val", "test")}
    if not by_split["train"] or not by_split["val"]:
        raise ValueError("need both training and validation images")
    common = dict(cache=cache, max_pixels=config.max_pixels)
    train_set = CXRDataset(by_split["train"], spec, augment=build_augment(config.augment, spec.pad_value),
                           seed=config.seed, **common)
    val_set = CXRDataset(by_split["val"], spec, **common)
    test_set = CXRDataset(by_split["test"], spec, **common) if by_split["test"] else None
    counts = {name: sum(1 for s in by_split["train"] if s.label == i) for i, name in enumerate(CLASS_NAMES)}
    if min(counts.values()) == 0:
        raise ValueError(f"training split lacks a class: {counts}")
    n, k = sum(counts.values()), len(counts)
    # "balanced" weights (scikit-learn's convention): n / (k * count); they average to 1 per sample.
    weights = {name: n / (k * c) for name, c in counts.items()}
    weighting = {"mode": config.class_weighting, "train_counts": counts,
                 "weights": weights if config.class_weighting != "none" else None}
    return RunData(samples, note, spec, train_set, val_set, test_set, counts, weighting)


def make_loaders(config: TrainConfig, data: RunData, device: torch.device, generator: torch.Generator):
    common = dict(batch_size=config.batch_size, num_workers=config.num_workers,
                  collate_fn=collate_skip_unreadable, pin_memory=device.type == "cuda")
    if config.class_weighting == "sampler":
        w = data.class_weighting["weights"]
        per_sample = torch.tensor([w[CLASS_NAMES[s.label]] for s in data.train_set.samples], dtype=torch.double)
        sampler = WeightedRandomSampler(per_sample, num_samples=len(per_sample), replacement=True,
                                        generator=generator)
    else:
        sampler = RandomSampler(data.train_set, generator=generator)
    # A last batch of one image breaks BatchNorm in train mode; drop the remainder when there is more
    # than one batch (it is a different remainder every epoch, so no image is always left out).
    train = DataLoader(data.train_set, sampler=sampler, generator=generator,
                       drop_last=len(data.train_set) > config.batch_size, **common)
    val = DataLoader(data.val_set, shuffle=False, **common)
    test = DataLoader(data.test_set, shuffle=False, **common) if data.test_set else None
    return train, val, test


def make_loss(config: TrainConfig, data: RunData, device: torch.device) -> nn.Module:
    if config.class_weighting == "loss":
        w = data.class_weighting["weights"]
        return nn.CrossEntropyLoss(weight=torch.tensor([w[c] for c in CLASS_NAMES], dtype=torch.float32,
                                                       device=device))
    return nn.CrossEntropyLoss()


def _format_counts(counts: dict[str, dict[str, int]]) -> str:
    return "; ".join(f"{split}: " + ", ".join(f"{k} {v}" for k, v in c.items()) + f" (total {sum(c.values())})"
                     for split, c in counts.items())


def _save_checkpoint(path: Path, payload: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)  # a kill during the save leaves the previous checkpoint intact


def load_checkpoint(run_dir: str | Path) -> dict:
    path = Path(run_dir) / CHECKPOINT_NAME
    if not path.is_file():
        raise FileNotFoundError(f"nothing to resume: {path} does not exist")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a cxr-deploy training checkpoint")
    return ckpt


def default_run_dir() -> Path:
    return Path("runs") / time.strftime("%Y%m%d-%H%M%S")


def resume(run_dir: str | Path, *, on_epoch_end: Callable[[dict], bool] | None = None, **overrides) -> Path:
    """Continue the run in ``run_dir`` from ``last.pt`` with its saved config.

    Only settings that do not change the result may be overridden (device, num_workers, cache_dir,
    progress, tensorboard).
    """
    allowed = {"device", "num_workers", "cache_dir", "progress", "tensorboard"}
    bad = {k for k, v in overrides.items() if v is not None} - allowed
    if bad:
        raise ValueError(f"--resume continues the saved run exactly; cannot change {sorted(bad)} "
                         f"(only {sorted(allowed)})")
    ckpt = load_checkpoint(run_dir)
    config = TrainConfig.from_dict(ckpt["config"]).with_overrides(out=str(run_dir), **overrides)
    return train(config, _checkpoint=ckpt, on_epoch_end=on_epoch_end)


def train(config: TrainConfig, *, on_epoch_end: Callable[[dict], bool] | None = None,
          _checkpoint: dict | None = None) -> Path:
    """Run (or, via :func:`resume`, continue) training; return the best bundle's directory.

    ``on_epoch_end(row)`` is called after each epoch's checkpoint is on disk; returning True stops
    the run there, as a kill at that moment would (used by tests and by the sweep).
    """
    config.validate()
    run_dir = Path(config.out) if config.out else default_run_dir()
    config = config.with_overrides(out=str(run_dir))
    resuming = _checkpoint is not None
    if not resuming and (run_dir / CHECKPOINT_NAME).exists():
        raise FileExistsError(f"{run_dir} already holds a training run; continue it with --resume {run_dir} "
                              "or choose another --out")
    if not resuming and run_dir.is_dir() and any(run_dir.iterdir()) and not (run_dir / CONFIG_NAME).is_file():
        # Run files (metrics.csv, curves.png, best/ ...) are written here: never over someone else's files.
        raise FileExistsError(f"{run_dir} is not empty and is not a cxr-deploy training run; choose a new or empty --out")
    # Read and split the data before the run folder exists: a data problem must leave nothing behind.
    presplit = None if resuming else _split_samples(config)
    run_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(config.seed, config.deterministic)
    config.save(run_dir / CONFIG_NAME)

    device = resolve_device(config.device)
    precision = resolve_precision(config.amp, device)
    data = prepare_data(config, run_dir, reuse_splits=resuming, presplit=presplit)
    log(f"data: {_format_counts(split_counts(data.samples))}")
    log(f"validation: {data.split_note}")
    log(f"class weighting: {data.class_weighting['mode']} {data.class_weighting['weights'] or ''}".rstrip())
    log(f"device: {device}, precision: {precision.name}, input {config.input_size}px, run dir: {run_dir}")

    generator = torch.Generator().manual_seed(config.seed)
    train_loader, val_loader, test_loader = make_loaders(config, data, device, generator)
    model = place_model(build_model(resolve_weights(config.weights)), device)
    loss_fn = make_loss(config, data, device)
    scaler = precision.grad_scaler()
    stopper = EarlyStopping(config.monitor, config.patience, config.min_delta)
    rows: list[dict] = []
    best_summary: dict | None = None
    epoch = 0
    start_stage, start_stage_epoch = 1, 0
    if resuming:
        ckpt = _checkpoint
        model.load_state_dict(ckpt["model"])
        scaler.load_state_dict(ckpt["scaler"])
        stopper.load_state_dict(ckpt["stopper"])
        epoch, start_stage, start_stage_epoch = ckpt["epoch"], ckpt["stage"], ckpt["stage_epoch"]
        best_summary = ckpt.get("best_summary")
        rows = [r for r in read_metrics(run_dir) if r["epoch"] <= epoch]
        write_metrics(run_dir, rows)
        generator.set_state(ckpt["loader_generator"])
        set_rng_state(ckpt["rng"])
        log(f"resuming after epoch {epoch} (stage {start_stage}, epoch {start_stage_epoch} of that stage)")

    writer = _tensorboard(run_dir) if config.tensorboard else None
    stage_epochs = {1: config.epochs_stage1, 2: config.epochs_stage2}
    total_epochs = config.epochs_stage1 + config.epochs_stage2
    stopped_by_hook = False
    for stage in (1, 2):
        if stage < start_stage or stage_epochs[stage] == 0:
            continue
        set_trainable(model, stage)
        optimizer = build_optimizer(model, stage, config)
        scheduler, per_step = build_scheduler(optimizer, config, stage_epochs[stage], len(train_loader))
        stage_epoch = 0
        if resuming and stage == start_stage:
            optimizer.load_state_dict(ckpt["optimizer"])
            if scheduler is not None and ckpt.get("scheduler") is not None:
                scheduler.load_state_dict(ckpt["scheduler"])
            stage_epoch = start_stage_epoch
        else:
            stopper.new_stage()
            if stage == 2:
                log(f"stage 2: backbone unfrozen, lr {config.lr_stage2:g}"
                    + (f" (early layers x{config.early_lr_factor:g})" if config.early_lr_factor != 1 else ""))
        while stage_epoch < stage_epochs[stage] and not stopper.should_stop:
            epoch += 1
            stage_epoch += 1
            data.train_set.set_epoch(epoch)
            t0 = time.perf_counter()
            train_loss, seen, mean_lr = _run_epoch(model, train_loader, optimizer, scheduler if per_step else None,
                                          loss_fn, precision, scaler, config, device, stage,
                                          desc=f"stage {stage} epoch {epoch}/{total_epochs}")
            train_seconds = time.perf_counter() - t0
            labels, scores, val_loss = predict(model, val_loader, device)
            val = classification_metrics(labels, scores, 0.5)
            if scheduler is not None and not per_step:
                scheduler.step(val_loss)
            improved = stopper.update(epoch, val["auc"], val_loss)
            row = {"epoch": epoch, "stage": stage, "lr": mean_lr,
                   "train_loss": train_loss, "val_loss": val_loss, "val_auc": _none_if_nan(val["auc"]),
                   "val_accuracy": val["accuracy"], "images_per_s": seen / max(train_seconds, 1e-9),
                   "epoch_seconds": time.perf_counter() - t0, "improved": improved}
            if improved:
                best_summary = _save_best(run_dir, model, data, config, precision, device, epoch, stage,
                                          labels, scores, val_loss)
            rows.append(row)
            write_metrics(run_dir, rows)
            plot_curves(rows, run_dir / PNG_NAME)
            if writer is not None:
                for key in ("train_loss", "val_loss", "val_auc", "lr", "images_per_s"):
                    if row[key] is not None:
                        writer.add_scalar(key, row[key], epoch)
                writer.flush()
            _save_checkpoint(run_dir / CHECKPOINT_NAME, {
                "format": CHECKPOINT_FORMAT, "version": 1, "config": config.to_dict(),
                "epoch": epoch, "stage": stage, "stage_epoch": stage_epoch,
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict() if scheduler is not None else None,
                "scaler": scaler.state_dict(), "stopper": stopper.state_dict(),
                "loader_generator": generator.get_state(), "rng": rng_state(), "best_summary": best_summary,
            })
            auc_text = "n/a" if row["val_auc"] is None else f"{row['val_auc']:.4f}"
            log(f"epoch {epoch}/{total_epochs} stage {stage}: train loss {train_loss:.4f}, val loss "
                f"{val_loss:.4f}, val AUC {auc_text}, {row['images_per_s']:.1f} img/s"
                + ("  * best" if improved else ""))
            if on_epoch_end is not None and on_epoch_end(row):
                stopped_by_hook = True
                break
        if stopped_by_hook:
            break
        if stopper.should_stop:
            log(f"stage {stage}: no improvement in {config.patience} epoch(s), stopping early "
                f"(best epoch {stopper.best_epoch})")
            if stage == 2:
                break
    if writer is not None:
        writer.close()
    best_dir = run_dir / BEST_NAME
    if not stopped_by_hook:
        _finish(run_dir, best_dir, best_summary, test_loader, device)
    return best_dir


def _none_if_nan(value: float) -> float | None:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else value


def _run_epoch(model, loader, optimizer, step_scheduler, loss_fn, precision, scaler, config, device, stage,
               desc: str) -> tuple[float, int, float]:
    """One pass over the training loader: (mean loss, images seen, mean LR over the steps)."""
    from tqdm import tqdm

    set_train_mode(model, stage)
    total_loss, seen, lr_sum, steps, t0 = 0.0, 0, 0.0, 0, time.perf_counter()
    bar = tqdm(loader, desc=desc, unit="batch", leave=False, disable=not config.progress, file=sys.stderr)
    for batch in bar:
        if batch is None:
            continue
        x, y, _ = batch
        x, y = to_device(x, device), y.to(device, non_blocking=True)
        lr_sum += max(g["lr"] for g in optimizer.param_groups)  # main group's LR for this step
        steps += 1
        loss, grad_norm = train_step(model, x, y, optimizer, loss_fn, precision, scaler, config.clip_grad_norm)
        # Under fp16 the GradScaler skips a step whose gradients overflowed (the first steps, while it
        # finds its scale); the schedule follows the steps actually taken.
        if step_scheduler is not None and math.isfinite(grad_norm):
            step_scheduler.step()
        total_loss += loss * len(y)
        seen += len(y)
        bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{seen / max(time.perf_counter() - t0, 1e-9):.1f}")
    bar.close()
    if seen == 0:
        raise RuntimeError("no readable training images in this epoch")
    return total_loss / seen, seen, lr_sum / max(1, steps)


def _save_best(run_dir, model, data: RunData, config, precision, device, epoch, stage, labels, scores,
               val_loss) -> dict:
    threshold = choose_threshold(labels, scores, config.target_sensitivity)
    metrics = classification_metrics(labels, scores, threshold["threshold"])
    warning = threshold_warning(threshold["threshold"])
    if warning:
        log(f"WARNING: {warning} (validation AUC {metrics['auc']:.3f})")
    summary = {
        "best_epoch": epoch,
        "stage": stage,
        "val_metrics": {**{k: _none_if_nan(v) for k, v in metrics.items()}, "loss": val_loss},
        "threshold_rule": {**threshold, "asked_for": config.threshold_rule},
        "class_weighting": data.class_weighting,
        "split": {"counts": split_counts(data.samples), "note": data.split_note, "file": SPLITS_NAME},
        "precision": precision.name,
        "device": str(device),
        "torch_version": str(torch.__version__),
        "config": config.to_dict(),
        "warnings": [warning] if warning else [],
    }
    save_bundle(run_dir / BEST_NAME, model, spec=data.spec, threshold=threshold["threshold"], training=summary)
    return summary


def _finish(run_dir: Path, best_dir: Path, summary: dict | None, test_loader, device) -> None:
    """After the last epoch: evaluate the best bundle on the test split (if any), write summary.json."""
    import json

    if summary is None:
        raise RuntimeError("training produced no best model")
    bundle = ModelBundle.load(best_dir)
    if test_loader is not None:
        labels, scores, test_loss = predict(place_model(bundle.build_model(), device), test_loader, device)
        test = classification_metrics(labels, scores, bundle.threshold)
        summary = {**summary, "test_metrics": {**{k: _none_if_nan(v) for k, v in test.items()}, "loss": test_loss}}
        bundle.update(training=summary)
        log(f"test split ({test['n']} images) at threshold {bundle.threshold:.3f}: AUC "
            f"{test['auc']:.4f}, sensitivity {test['sensitivity']:.3f}, specificity {test['specificity']:.3f}")
    tmp = run_dir / (SUMMARY_NAME + ".tmp")
    tmp.write_text(json.dumps(summary, indent=2) + "\n")
    os.replace(tmp, run_dir / SUMMARY_NAME)
    val = summary["val_metrics"]
    auc = "n/a" if val.get("auc") is None else f"{val['auc']:.4f}"
    log(f"best epoch {summary['best_epoch']}: val AUC {auc}, threshold {summary['threshold_rule']['threshold']:.4f} "
        f"({summary['threshold_rule']['rule']}); bundle: {best_dir}")


def _tensorboard(run_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        log("note: --tensorboard asked for but the tensorboard package is not installed; skipping it")
        return None
    return SummaryWriter(str(run_dir / "tensorboard"))
