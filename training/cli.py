"""Click commands ``train``, ``lr-find`` and ``sweep`` (registered lazily by cxr_deploy.cli).

Every TrainConfig field has a flag; a flag left out keeps the value from ``--config`` (or the
default), so ``--config`` files and flags compose: defaults → file → flags.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from cxr_deploy.errors import CxrDeployError

from cxr_deploy.preprocessing import RESIZE_POLICIES

from .config import AUGMENT_ON, CLASS_WEIGHTING, MONITORS, OPTIMIZERS, SCHEDULES, load_config, read_toml

# (flag declarations, click kwargs, config field). Defaults are None = "not given on the command line".
_OPTIONS = [
    (("--data",), dict(type=click.Path(exists=True), help="Dataset root (root/{train,val,test}/{NORMAL,PNEUMONIA}) or labels CSV (path|file,label[,split])."), "data"),
    (("--weights",), dict(help="imagenet (default), none (random init), or a ResNet50 state_dict file / bundle dir."), "weights"),
    (("--input-size",), dict(type=int, help="Model input side in pixels (default 224); stored in the bundle's preprocessing spec."), "input_size"),
    (("--resize",), dict(type=click.Choice(RESIZE_POLICIES), help="Resize policy of the preprocessing spec (default letterbox)."), "resize"),
    (("--epochs-stage1",), dict(type=int, help="Epochs with the backbone frozen (head only). Default 2."), "epochs_stage1"),
    (("--epochs-stage2",), dict(type=int, help="Epochs with everything trainable. Default 10."), "epochs_stage2"),
    (("--batch-size",), dict(type=int, help="Images per optimizer step, all processes together (default 32): under torchrun with N processes each loads batch-size/N (must divide), so a run matches one process at the same batch size."), "batch_size"),
    (("--optimizer",), dict(type=click.Choice(OPTIMIZERS), help="Default adamw."), "optimizer"),
    (("--lr",), dict(type=float, help="Stage 1 (head) learning rate; stage 2 uses lr x --stage2-lr-factor. Default 1e-3."), "lr"),
    (("--stage2-lr-factor",), dict(type=float, help="Default 0.1."), "stage2_lr_factor"),
    (("--early-lr-factor",), dict(type=float, help="Stage 2: extra LR factor for conv1/layer1/layer2 (default 1)."), "early_lr_factor"),
    (("--momentum",), dict(type=float, help="SGD momentum / Adam beta1 (default 0.9)."), "momentum"),
    (("--nesterov/--no-nesterov",), dict(default=None, help="Nesterov momentum (SGD)."), "nesterov"),
    (("--weight-decay",), dict(type=float, help="On conv/linear weights, not BN or biases. Default 1e-4."), "weight_decay"),
    (("--schedule",), dict(type=click.Choice(SCHEDULES), help="Per stage: cosine with warm-up (default), plateau (on val loss), none."), "schedule"),
    (("--warmup-epochs",), dict(type=float, help="Cosine warm-up length in epochs (default 0.5)."), "warmup_epochs"),
    (("--clip-grad-norm",), dict(type=float, help="Global gradient-norm bound, applied after AMP unscaling; 0 disables. Default 1."), "clip_grad_norm"),
    (("--class-weighting",), dict(type=click.Choice(CLASS_WEIGHTING), help="Imbalance handling: loss (default), sampler, none."), "class_weighting"),
    (("--amp/--no-amp",), dict(default=None, help="Mixed precision: CUDA fp16 + GradScaler, CPU bf16. Default: on for CUDA, on for CPUs with native bf16."), "amp"),
    (("--monitor",), dict(type=click.Choice(MONITORS), help="Early-stopping metric (default val_auc, ties broken by val loss)."), "monitor"),
    (("--patience",), dict(type=int, help="Epochs without improvement before a stage stops (default 4)."), "patience"),
    (("--min-delta",), dict(type=float, help="Minimum improvement that counts (default 0)."), "min_delta"),
    (("--target-sensitivity",), dict(type=float, help="Choose the threshold reaching this validation sensitivity (e.g. 0.95) instead of Youden's J."), "target_sensitivity"),
    (("--age-range",), dict(type=str, metavar="LOW-HIGH", help="The training images' patient ages in years (Kermany: 1-5); DICOM inputs of other ages are flagged as outside the training population. Default: unknown (no age check)."), "age_range"),
    (("--population-quantile",), dict(type=float, help="Validation percentile of the population score above which an image is flagged as outside the training population (default 95)."), "population_quantile"),
    (("--val-fraction",), dict(type=float, help="Fraction of train carved as validation when val is missing/tiny (default 0.2)."), "val_fraction"),
    (("--group-regex",), dict(type=str, metavar="REGEX|kermany", help="Patient from the file name (first capture group) so validation is carved by patient; 'kermany' = the Kermany naming. Where both are given, a 'patient'/'group' column of the labels CSV wins over --group-regex (a warning says for how many images); --group-regex wins over DICOM PatientID."), "group_regex"),
    (("--min-val-images",), dict(type=int, help="A provided val split smaller than this is re-carved (default 32)."), "min_val_images"),
    (("--seed",), dict(type=int, help="Default 0."), "seed"),
    (("--deterministic/--no-deterministic",), dict(default=None, help="Deterministic algorithms (slower): needed for the same seed to give the same bundle on CUDA; on a CPU it does without."), "deterministic"),
    (("--calibrate/--no-calibrate",), dict(default=None, help="Temperature scaling of the probabilities on validation (default on; needs >= 20 validation images)."), "calibrate"),
    (("--device",), dict(help="auto (default), cpu, cuda, cuda:N. Under torchrun: auto/cuda = GPU LOCAL_RANK, cpu = gloo on the CPU."), "device"),
    (("--sync-bn/--no-sync-bn",), dict(default=None, help="Under torchrun: SyncBatchNorm, statistics over the global batch instead of each process's share (CUDA only; default off)."), "sync_bn"),
    (("--num-workers",), dict(type=int, help="DataLoader decoding workers (default min(4, CPUs))."), "num_workers"),
    (("--cache-dir",), dict(type=click.Path(file_okay=False), help="Cache resized images here (training images as 8/16-bit integers, validation float16 .npy) for faster repeated epochs."), "cache_dir"),
    (("--augment-on",), dict(type=click.Choice(AUGMENT_ON), help="Augment and normalize training batches on the device (a batch at a time) or in the loader workers; auto: device on CUDA, workers on CPU."), "augment_on"),
    (("--max-pixels",), dict(type=int, help="Refuse larger images (decompression-bomb guard)."), "max_pixels"),
    (("--tensorboard/--no-tensorboard",), dict(default=None, help="Also log to RUN_DIR/tensorboard (needs the tensorboard package)."), "tensorboard"),
    (("--progress/--no-progress",), dict(default=None, help="Progress bars (default on)."), "progress"),
    (("--augment/--no-augment",), dict(default=None, help="Train-time augmentation (default on)."), "augment.enabled"),
    (("--rotation",), dict(type=float, help="Augmentation: max rotation in degrees (default 10)."), "augment.rotation"),
    (("--translate",), dict(type=float, help="Augmentation: max translation, fraction of side (default 0.05)."), "augment.translate"),
    (("--scale-min",), dict(type=float, help="Augmentation: min zoom (default 0.9)."), "augment.scale_min"),
    (("--scale-max",), dict(type=float, help="Augmentation: max zoom (default 1.1)."), "augment.scale_max"),
    (("--brightness",), dict(type=float, help="Augmentation: brightness jitter (default 0.1)."), "augment.brightness"),
    (("--contrast",), dict(type=float, help="Augmentation: contrast jitter (default 0.1)."), "augment.contrast"),
    (("--hflip/--no-hflip",), dict(default=None, help="Augmentation: random horizontal flips. Off by default: a flipped film shows the heart on the right."), "augment.hflip"),
]
GRID_FIELDS = ("optimizer", "lr", "weight_decay", "batch_size")


def _param_name(decls: tuple[str, ...]) -> str:
    return decls[0].split("/")[0].lstrip("-").replace("-", "_")


def _config_options(exclude=()):
    def decorate(func):
        for decls, kwargs, field_name in reversed(_OPTIONS):
            if field_name in exclude:
                continue
            func = click.option(*decls, _param_name(decls), **kwargs)(func)
        return func
    return decorate


def _overrides(kwargs: dict, *, amp_flag=None) -> dict:
    """CLI kwargs → config overrides (None = not given)."""
    out, augment = {}, {}
    for decls, _, field_name in _OPTIONS:
        name = _param_name(decls)
        if name not in kwargs:
            continue
        value = kwargs.pop(name)
        if value is None:
            continue
        if field_name == "amp":
            value = "on" if value else "off"
        if field_name.startswith("augment."):
            augment[field_name.split(".", 1)[1]] = value
        else:
            out[field_name] = value
    if augment:
        out["augment"] = augment
    return out


def _fail(exc: BaseException):
    error = click.ClickException(f"{type(exc).__name__}: {exc}" if not isinstance(exc, (ValueError, CxrDeployError))
                                 else str(exc))
    error.exit_code = EXIT_FAILED
    raise error


def _single_process(command: str) -> None:
    from .distributed import launched_world_size

    if launched_world_size() > 1:
        raise click.UsageError(f"{command} runs in one process; start it without torchrun "
                               "(only train runs distributed)")


_EXPECTED = (ValueError, FileExistsError, FileNotFoundError, FloatingPointError, RuntimeError, CxrDeployError)
# train's exit status (README, "Exit codes" of the training section; `train --help`).
EXIT_DONE, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


@click.command("train")
@click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False), help="TOML config; flags override it.")
@click.option("--out", type=click.Path(file_okay=False), help="Run directory (default runs/<timestamp>).")
@click.option("--resume", "resume_dir", type=click.Path(exists=True, file_okay=False), help="Continue the run in this directory from its last.pt, with its saved config.")
@_config_options()
def train_command(config_file, out, resume_dir, **kwargs):
    """Fine-tune ResNet50 in two stages and write the best epoch as a model bundle (RUN_DIR/best).

    Stage 1 trains the head with the backbone frozen (weights and BatchNorm statistics); stage 2
    trains everything at a lower LR. The best validation epoch (ROC AUC) is saved as a bundle with
    its preprocessing spec, validation metrics and a decision threshold chosen on validation.

    Several processes (DDP): torchrun --nproc-per-node N -m cxr_deploy train ... --batch-size stays
    the global batch; rank 0 alone writes RUN_DIR, the same files a single process writes.

    \b
    Exit status:
      0    done; the best bundle's folder is printed on stdout
      1    training could not run or failed (data, config values, a folder that is not a run, a
           non-finite loss): one line says why
      2    usage: unknown or conflicting options (--resume with options that change the run)
      130  interrupted (Ctrl-C or SIGTERM): the last finished epoch is saved in RUN_DIR/last.pt;
           continue with: cxr-deploy train --resume RUN_DIR (the line printed names RUN_DIR)
    """
    from .config import RESUME_OVERRIDES
    from .engine import resume, train

    overrides = _overrides(kwargs)
    try:
        if resume_dir:
            allowed = RESUME_OVERRIDES
            ignored = sorted(set(overrides) - allowed) + (["--config"] if config_file else []) + (["--out"] if out else [])
            if ignored:
                raise click.UsageError(f"--resume continues the saved run exactly; remove {', '.join(ignored)} "
                                       f"(only {', '.join(sorted(RESUME_OVERRIDES))} may change)")
            best = resume(resume_dir, **overrides)
        else:
            config = load_config(config_file, out=out, **overrides)
            best = train(config)
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM raised as KeyboardInterrupt
        from .checkpoint import TrainingInterrupted

        message = exc.message() if isinstance(exc, TrainingInterrupted) else "interrupted before training started"
        click.echo(f"\n{message}", err=True)
        sys.exit(EXIT_INTERRUPTED)
    except click.UsageError:
        raise
    except _EXPECTED as exc:
        _fail(exc)
    from .distributed import is_main_process

    if is_main_process():  # under torchrun, one line on stdout, not one per process
        click.echo(str(best))


@click.command("lr-find")
@click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False), help="TOML config; flags override it.")
@click.option("--out", type=click.Path(file_okay=False), default="lr_find", show_default=True, help="Where lr_find.png and lr_find.csv go.")
@click.option("--stage", type=click.IntRange(1, 2), default=1, show_default=True, help="1: head with frozen backbone (suggests --lr); 2: whole network.")
@click.option("--start-lr", type=float, default=1e-7, show_default=True)
@click.option("--end-lr", type=float, default=10.0, show_default=True)
@click.option("--num-iters", type=int, default=100, show_default=True, help="Steps (the loader is cycled if needed).")
@_config_options()
def lr_find_command(config_file, out, stage, start_lr, end_lr, num_iters, **kwargs):
    """Learning-rate range test: exponential LR sweep, loss-vs-LR plot, suggested LR.

    Stops when the smoothed loss diverges (4x its minimum); model and optimizer are restored
    afterwards. Suggestion rule: steepest descent of the smoothed loss against log10(LR).
    """
    from .lr_range import lr_find

    _single_process("lr-find")
    try:
        config = load_config(config_file, **_overrides(kwargs))
        result = lr_find(config, out=out, stage=stage, start_lr=start_lr, end_lr=end_lr, num_iters=num_iters)
    except _EXPECTED as exc:
        _fail(exc)
    click.echo(f"{len(result.lrs)} steps, {result.note}; plot: {Path(out) / 'lr_find.png'}", err=True)
    if result.suggested_lr is None:
        click.echo("no suggestion: too few points before the loss minimum (raise --num-iters or lower --start-lr)")
        return
    hint = "" if stage == 1 else f" (for stage 2; as --lr with --stage2-lr-factor {config.stage2_lr_factor:g}: " \
                                  f"{result.suggested_lr / config.stage2_lr_factor:.2e})"
    click.echo(f"suggested lr: {result.suggested_lr:.2e}{hint}  [rule: {result.rule}]")


def _float_list(text):
    return [float(v) for v in text.split(",") if v.strip()] if text else None


def _int_list(text):
    return [int(v) for v in text.split(",") if v.strip()] if text else None


@click.command("sweep")
@click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False), help="TOML config; its [sweep] table gives grid lists; flags override.")
@click.option("--out", type=click.Path(file_okay=False), required=True, help="Sweep directory (trials/, results.csv, best_config.toml).")
@click.option("--optimizer", "grid_optimizer", help="Comma-separated, e.g. adamw,sgd.")
@click.option("--lr", "grid_lr", help="Comma-separated, e.g. 1e-3,3e-4.")
@click.option("--weight-decay", "grid_weight_decay", help="Comma-separated, e.g. 0,1e-4.")
@click.option("--batch-size", "grid_batch_size", help="Comma-separated, e.g. 16,32.")
@_config_options(exclude=GRID_FIELDS)
def sweep_command(config_file, out, grid_optimizer, grid_lr, grid_weight_decay, grid_batch_size, **kwargs):
    """Grid over optimizer x LR x weight decay x batch size; one short training run per trial.

    Results are ranked by validation AUC in OUT/results.csv; the best config is printed and saved as
    OUT/best_config.toml. Re-running skips finished trials and resumes interrupted ones.
    """
    from .grid_sweep import grid_from_config, sweep

    _single_process("sweep")
    try:
        grid = grid_from_config(read_toml(config_file)) if config_file else {}
        cli_grid = {"optimizer": grid_optimizer.split(",") if grid_optimizer else None,
                    "lr": _float_list(grid_lr), "weight_decay": _float_list(grid_weight_decay),
                    "batch_size": _int_list(grid_batch_size)}
        for key, values in cli_grid.items():
            if values:
                grid[key] = [v.strip() if isinstance(v, str) else v for v in values]
        for name in grid.get("optimizer", []):
            if name not in OPTIMIZERS:
                raise ValueError(f"unknown optimizer {name!r} in the sweep grid (choose from {OPTIMIZERS})")
        base = load_config(config_file, **_overrides(kwargs))
        results = sweep(base, grid, out)
    except KeyboardInterrupt:
        click.echo("\ninterrupted; re-run the same command to resume (finished trials are skipped)", err=True)
        sys.exit(130)
    except _EXPECTED as exc:
        _fail(exc)
    for row in results:
        auc = "n/a" if row.get("val_auc") is None else f"{row['val_auc']:.4f}"
        click.echo(f"{row['rank']:>3}  {auc}  {row['trial']}  {row['status']}")
