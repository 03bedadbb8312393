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

import math
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from cxr_deploy import atomic, population
from cxr_deploy.artifacts import RUN_BEST_BUNDLE
from cxr_deploy.bundle import CLASS_NAMES, POSITIVE_CLASS, save_bundle, ModelBundle
from cxr_deploy.decision import threshold_warning
from cxr_deploy.model import build_model

from .population_fit import fit_run
from .checkpoint import (CHECKPOINT_FORMAT, CHECKPOINT_NAME, TrainingInterrupted, load_checkpoint, rng_state,
                         save_checkpoint, set_rng_state)
from .config import RESUME_OVERRIDES, TrainConfig
from .curves import PNG_NAME, open_tensorboard, plot_curves, read_metrics, write_metrics
from .data import (SPLITS_NAME, RunData, _split_samples, format_counts, make_loaders, make_loss, prepare_data,
                   split_counts)
from .device_batches import augment_on_device, batch_to_device
from .devices import place_model, resolve_precision, seed_everything, to_device
from .distributed import Dist, is_main_process, session
from .optim import EarlyStopping, build_optimizer, build_scheduler, set_train_mode, set_trainable, train_step
from .threshold import calibrate, choose_threshold, classification_metrics, operating_points
from .weights import resolve_weights

CONFIG_NAME = "config.resolved.toml"
BEST_NAME = RUN_BEST_BUNDLE
SUMMARY_NAME = "summary.json"
POSITIVE_INDEX = CLASS_NAMES.index(POSITIVE_CLASS)


def log(message: str) -> None:
    if is_main_process():  # under torchrun, one log: rank 0's
        print(message, file=sys.stderr, flush=True)


# -- one step, one epoch -----------------------------------------------------------------------------


@torch.no_grad()
def score_loader(model: nn.Module, loader: DataLoader, device: torch.device, temperature: float = 1.0,
                 dist: Dist | None = None) -> tuple[np.ndarray, np.ndarray, float, np.ndarray]:
    """(labels, P(positive) with ``temperature``, mean unweighted cross-entropy, logit margins
    positive − other) in full float32, in dataset order: the threshold is chosen on the same
    numerics the exported float32 model uses. With ``dist``, every rank's shard is gathered first,
    so all ranks return the whole set's arrays (see distributed.py)."""
    model.eval()
    rows = [torch.zeros((0, 5), dtype=torch.float64)]
    for batch in loader:
        if batch is None:
            continue
        x, y, index = batch
        x, y = to_device(x, device), y.to(device, non_blocking=True)
        logits = model(x).float()
        columns = (index.to(device), y, torch.softmax(logits / temperature, dim=1)[:, POSITIVE_INDEX],
                   2 * logits[:, POSITIVE_INDEX] - logits.sum(dim=1),  # margin, two classes
                   nn.functional.cross_entropy(logits, y, reduction="none"))
        rows.append(torch.stack([c.double() for c in columns], dim=1).cpu())
    table = torch.cat(rows)
    if dist is not None:
        table = dist.gather_rows(table)
    if len(table) == 0:
        raise RuntimeError("no readable validation images")
    table = table[torch.argsort(table[:, 0])].numpy()
    labels, scores, margins = table[:, 1].astype(np.int64), table[:, 2].astype(np.float32), table[:, 3]
    return labels, scores, float(table[:, 4].mean()), margins.astype(np.float32)


# -- the run -----------------------------------------------------------------------------------------
def default_run_dir() -> Path:
    return Path("runs") / time.strftime("%Y%m%d-%H%M%S")


def resume(run_dir: str | Path, *, on_epoch_end: Callable[[dict], bool] | None = None, **overrides) -> Path:
    """Continue the run in ``run_dir`` from ``last.pt`` with its saved config.

    Only settings that do not change the result may be overridden (:data:`.config.RESUME_OVERRIDES`).
    """
    allowed = RESUME_OVERRIDES
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
    the run there, as a kill at that moment would (used by tests and by the sweep). Ctrl-C raises
    :class:`.checkpoint.TrainingInterrupted`, naming the run folder and the last saved epoch."""
    runs: list[_TrainingRun] = []  # the run once it exists, for an interrupt to say where it stands
    try:
        with session(config) as dist:  # under torchrun: the process group, left again on any error
            runs.append(_TrainingRun(config, _checkpoint, dist))
            stopped_by_hook = runs[0].run_stages(on_epoch_end)
        run = runs[0]
        if run.writer is not None:
            run.writer.close()
        best_dir = run.run_dir / BEST_NAME
        if not stopped_by_hook and dist.is_main:  # rank 0 holds the summary; the test split needs no help
            _finish(run.run_dir, best_dir, run.best_summary, run.test_loader, run.device)
            fit_run(run.config, run.data.samples, best_dir, run.device, log)
    except KeyboardInterrupt:
        raise (TrainingInterrupted(runs[0].run_dir, runs[0].saved_epoch) if runs else TrainingInterrupted(
            Path(config.out) if config.out else None, (_checkpoint or {}).get("epoch"))) from None
    return best_dir


def _open_run_dir(config: TrainConfig, resuming: bool) -> tuple[TrainConfig, Path, tuple | None]:
    """Validate, check the folder is ours, read and split the data, then create the folder."""
    config.validate()
    run_dir = Path(config.out) if config.out else default_run_dir()
    config = config.with_overrides(out=str(run_dir))
    if not resuming and (run_dir / CHECKPOINT_NAME).exists():
        raise FileExistsError(f"{run_dir} already holds a training run; continue it with --resume {run_dir} "
                              "or choose another --out")
    if not resuming and run_dir.is_dir() and any(run_dir.iterdir()) and not (run_dir / CONFIG_NAME).is_file():
        # Run files (metrics.csv, curves.png, best/ ...) are written here: never over someone else's files.
        raise FileExistsError(f"{run_dir} is not empty and is not a cxr-deploy training run; choose a new or empty --out")
    # Read and split the data before the run folder exists: a data problem must leave nothing behind.
    presplit = None if resuming else _split_samples(config)
    run_dir.mkdir(parents=True, exist_ok=True)
    return config, run_dir, presplit


class _TrainingRun:
    """Everything one run holds between epochs: data, model, loss, scaler, early stopping, rows."""

    def __init__(self, config: TrainConfig, checkpoint: dict | None, dist: Dist):
        self.ckpt, self.dist, self.net = checkpoint, dist, None
        # Rank 0 checks and creates the folder; every rank gets its answer or its error.
        config, self.run_dir, presplit = dist.run_on_main(lambda: _open_run_dir(config, checkpoint is not None))
        self.config = config
        seed_everything(config.seed, config.deterministic)
        if dist.is_main:
            config.save(self.run_dir / CONFIG_NAME)
        self.device = dist.device
        self.precision = resolve_precision(config.amp, self.device)
        self.data = prepare_data(config, self.run_dir, reuse_splits=checkpoint is not None, presplit=presplit,
                                 write=dist.is_main)
        self.data.train_set.device_side = augment_on_device(config.augment_on, self.device)
        log(f"data: {format_counts(split_counts(self.data.samples))}")
        log(f"validation: {self.data.split_note}")
        log(f"class weighting: {self.data.class_weighting['mode']} {self.data.class_weighting['weights'] or ''}".rstrip())
        log(f"device: {self.device}, precision: {self.precision.name}, input {config.input_size}px, "
            f"augmentation on the {'device' if self.data.train_set.device_side else 'loader workers'}, "
            f"run dir: {self.run_dir}")
        self.generator = torch.Generator().manual_seed(config.seed)
        self.train_loader, self.val_loader, self.test_loader = make_loaders(config, self.data, self.device,
                                                                            self.generator, dist.rank, dist.world_size)
        self.model = build_model(resolve_weights(config.weights))
        if config.sync_bn and dist.enabled:  # same state_dict keys: the bundle stays plain BatchNorm
            self.model = nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
        if dist.enabled:
            log(f"distributed: {dist.describe(config.batch_size, config.sync_bn)}")
        self.model = place_model(self.model, self.device)
        self.loss_fn = make_loss(config, self.data, self.device)
        self.scaler = self.precision.grad_scaler()
        self.stopper = EarlyStopping(config.monitor, config.patience, config.min_delta)
        self.rows: list[dict] = []
        self.best_summary: dict | None = None
        self.epoch, self.start_stage, self.start_stage_epoch = 0, 1, 0
        self.saved_epoch: int | None = None  # the epoch last.pt holds
        if checkpoint is not None:
            self._restore(checkpoint)
        self.writer = open_tensorboard(self.run_dir) if config.tensorboard and dist.is_main else None

    def _restore(self, ckpt: dict) -> None:
        self.model.load_state_dict(ckpt["model"])
        self.scaler.load_state_dict(ckpt["scaler"])
        self.stopper.load_state_dict(ckpt["stopper"])
        self.epoch, self.start_stage, self.start_stage_epoch = ckpt["epoch"], ckpt["stage"], ckpt["stage_epoch"]
        self.saved_epoch = ckpt["epoch"]
        self.best_summary = ckpt.get("best_summary")
        self.rows = [r for r in read_metrics(self.run_dir) if r["epoch"] <= self.epoch]
        if self.dist.is_main:
            write_metrics(self.run_dir, self.rows)
        self.generator.set_state(ckpt["loader_generator"])
        set_rng_state(ckpt["rng"])
        log(f"resuming after epoch {self.epoch} (stage {self.start_stage}, epoch {self.start_stage_epoch} "
            "of that stage)")

    def run_stages(self, on_epoch_end) -> bool:
        """Both stages, early stopping included; True when ``on_epoch_end`` stopped the run."""
        config = self.config
        stage_epochs = {1: config.epochs_stage1, 2: config.epochs_stage2}
        for stage in (1, 2):
            if stage < self.start_stage or stage_epochs[stage] == 0:
                continue
            optimizer, scheduler, per_step, stage_epoch = self._start_stage(stage)
            while stage_epoch < stage_epochs[stage] and not self.stopper.should_stop:
                stage_epoch += 1
                row = self._epoch(stage, stage_epoch, optimizer, scheduler, per_step)
                if on_epoch_end is not None and self.dist.broadcast(on_epoch_end(row)):  # rank 0's answer
                    return True
            if self.stopper.should_stop:
                log(f"stage {stage}: no improvement in {config.patience} epoch(s), stopping early "
                    f"(best epoch {self.stopper.best_epoch})")
                if stage == 2:
                    break
        return False

    def _start_stage(self, stage: int):
        config = self.config
        set_trainable(self.model, stage)
        self.net = None  # the previous stage's DDP wrapper goes before the new one is made
        self.net = self.dist.wrap(self.model)
        optimizer = build_optimizer(self.model, stage, config)
        epochs = config.epochs_stage1 if stage == 1 else config.epochs_stage2
        scheduler, per_step = build_scheduler(optimizer, config, epochs, len(self.train_loader))
        if self.ckpt is not None and stage == self.start_stage:
            optimizer.load_state_dict(self.ckpt["optimizer"])
            if scheduler is not None and self.ckpt.get("scheduler") is not None:
                scheduler.load_state_dict(self.ckpt["scheduler"])
            return optimizer, scheduler, per_step, self.start_stage_epoch
        self.stopper.new_stage()
        if stage == 2:
            log(f"stage 2: backbone unfrozen, lr {config.lr_stage2:g}"
                + (f" (early layers x{config.early_lr_factor:g})" if config.early_lr_factor != 1 else ""))
        return optimizer, scheduler, per_step, 0

    def _epoch(self, stage: int, stage_epoch: int, optimizer, scheduler, per_step: bool) -> dict:
        """Train one epoch, validate, keep the best bundle, write metrics and the checkpoint."""
        config, total = self.config, self.config.epochs_stage1 + self.config.epochs_stage2
        self.epoch += 1
        epoch = self.epoch
        self.data.train_set.set_epoch(epoch)
        t0 = time.perf_counter()
        train_loss, seen, mean_lr = _run_epoch(self.net, self.train_loader, optimizer,
                                               scheduler if per_step else None, self.loss_fn, self.precision,
                                               self.scaler, config, self.device, stage, self.dist,
                                               desc=f"stage {stage} epoch {epoch}/{total}")
        train_seconds = time.perf_counter() - t0
        self.dist.sync_buffers(self.model)  # every rank validates the model rank 0 saves
        labels, scores, val_loss, margins = score_loader(self.model, self.val_loader, self.device, dist=self.dist)
        val = classification_metrics(labels, scores, 0.5, ranking=margins)  # the epoch's one val AUC
        # Every rank holds the same gathered arrays, so the same numbers; decisions still follow rank
        # 0's, broadcast, so that ranks on different machines (BLAS builds) can never part ways.
        val["auc"], val_loss = self.dist.broadcast((val["auc"], val_loss))
        if scheduler is not None and not per_step:
            scheduler.step(val_loss)
        improved = self.stopper.update(epoch, val["auc"], val_loss)
        row = {"epoch": epoch, "stage": stage, "lr": mean_lr,
               "train_loss": train_loss, "val_loss": val_loss, "val_auc": _none_if_nan(val["auc"]),
               "val_accuracy": val["accuracy"], "images_per_s": seen / max(train_seconds, 1e-9),
               "epoch_seconds": time.perf_counter() - t0, "improved": improved,
               "train_images": seen, "val_images": len(labels)}  # all processes together, each image once
        if self.dist.is_main:  # rank 0 alone writes
            if improved:
                self.best_summary = _save_best(self.run_dir, self.model, self.data, config, self.precision,
                                               self.dist, epoch, stage, labels, margins, val_loss)
            self._record(row)
            self._checkpoint(stage, stage_epoch, optimizer, scheduler)
        auc_text = "n/a" if row["val_auc"] is None else f"{row['val_auc']:.4f}"
        log(f"epoch {epoch}/{total} stage {stage}: train loss {train_loss:.4f}, val loss "
            f"{val_loss:.4f}, val AUC {auc_text}, {row['images_per_s']:.1f} img/s" + ("  * best" if improved else ""))
        return row

    def _record(self, row: dict) -> None:
        self.rows.append(row)
        write_metrics(self.run_dir, self.rows)
        plot_curves(self.rows, self.run_dir / PNG_NAME)
        if self.writer is not None:
            for key in ("train_loss", "val_loss", "val_auc", "lr", "images_per_s"):
                if row[key] is not None:
                    self.writer.add_scalar(key, row[key], row["epoch"])
            self.writer.flush()

    def _checkpoint(self, stage: int, stage_epoch: int, optimizer, scheduler) -> None:
        save_checkpoint(self.run_dir / CHECKPOINT_NAME, {
            "format": CHECKPOINT_FORMAT, "version": 1, "config": self.config.to_dict(),
            "epoch": self.epoch, "stage": stage, "stage_epoch": stage_epoch,
            "model": self.model.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "scaler": self.scaler.state_dict(), "stopper": self.stopper.state_dict(),
            "loader_generator": self.generator.get_state(), "rng": rng_state(), "best_summary": self.best_summary,
        })
        self.saved_epoch = self.epoch


def _none_if_nan(value: float) -> float | None:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else value


def _run_epoch(model, loader, optimizer, step_scheduler, loss_fn, precision, scaler, config, device, stage,
               dist: Dist, desc: str) -> tuple[float, int, float]:
    """One pass over the training loader: (mean loss, images seen, mean LR over the steps); loss and
    images over all processes under torchrun."""
    from tqdm import tqdm

    set_train_mode(model, stage)
    total_loss, seen, lr_sum, steps, t0 = 0.0, 0, 0.0, 0, time.perf_counter()
    bar = tqdm(loader, desc=desc, unit="batch", leave=False, disable=not (config.progress and dist.is_main),
               file=sys.stderr)
    for batch in bar:
        if batch is None:
            if dist.enabled:  # skipping the step would leave the other processes waiting in theirs
                raise RuntimeError("every image of one process's batch was unreadable; under torchrun all "
                                   "processes must take each step: remove the unreadable files")
            continue
        x, y = batch_to_device(batch, device, loader.dataset)
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
    total_loss, seen = dist.sum(total_loss, seen)
    seen = int(seen)
    if seen == 0:
        raise RuntimeError("no readable training images in this epoch")
    return total_loss / seen, seen, lr_sum / max(1, steps)


def _save_best(run_dir, model, data: RunData, config, precision, dist: Dist, epoch, stage, labels, margins,
               val_loss) -> dict:
    temperature, scores, calibration = calibrate(labels, margins, config.calibrate)
    threshold = choose_threshold(labels, scores, config.target_sensitivity)
    metrics = classification_metrics(labels, scores, threshold["threshold"], ranking=margins)  # AUC as logged
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
        "device": str(dist.device),
        "processes": dist.describe(config.batch_size, config.sync_bn),
        "torch_version": str(torch.__version__),
        "config": config.to_dict(),
        "operating_points": operating_points(labels, scores),
        "calibration": calibration,
        "warnings": [warning] if warning else [],
    }
    bundle = save_bundle(run_dir / BEST_NAME, model, spec=data.spec, threshold=threshold["threshold"],
                         training=summary, temperature=temperature)
    if len(scores) >= population.MIN_REFERENCE:  # the population-shift alarm's reference (issue 20)
        population.write_reference(bundle, scores, source=f"validation split ({len(scores)} images, epoch {epoch})")
    return summary


def _finish(run_dir: Path, best_dir: Path, summary: dict | None, test_loader, device) -> None:
    """After the last epoch: evaluate the best bundle on the test split (if any), write summary.json."""
    import json

    if summary is None:
        raise RuntimeError("training produced no best model")
    bundle = ModelBundle.load(best_dir)
    if test_loader is not None:
        labels, scores, test_loss, margins = score_loader(place_model(bundle.build_model(), device), test_loader,
                                                          device, temperature=bundle.manifest.temperature)
        test = classification_metrics(labels, scores, bundle.threshold, ranking=margins)
        summary = {**summary, "test_metrics": {**{k: _none_if_nan(v) for k, v in test.items()}, "loss": test_loss}}
        bundle.update(training=summary)
        log(f"test split ({test['n']} images) at threshold {bundle.threshold:.3f}: AUC "
            f"{test['auc']:.4f}, sensitivity {test['sensitivity']:.3f}, specificity {test['specificity']:.3f}")
    atomic.write_text(run_dir / SUMMARY_NAME, json.dumps(summary, indent=2) + "\n")
    val = summary["val_metrics"]
    auc = "n/a" if val.get("auc") is None else f"{val['auc']:.4f}"
    log(f"best epoch {summary['best_epoch']}: val AUC {auc}, threshold {summary['threshold_rule']['threshold']:.4f} "
        f"({summary['threshold_rule']['rule']}); bundle: {best_dir}")
