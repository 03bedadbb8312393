"""Training configuration: one dataclass, loaded from TOML, overridden by CLI flags, saved resolved.

Precedence (lowest to highest): dataclass defaults → ``--config file.toml`` → command-line flags.
The resolved config is written to ``RUN_DIR/config.resolved.toml`` (and embedded in the best
bundle's manifest) so a run can be repeated from its own directory.

TOML layout: top-level keys are :class:`TrainConfig` fields; ``[augment]`` holds
:class:`AugmentConfig` fields; ``[sweep]`` (used by ``cxr-deploy sweep`` only) holds lists::

    data = "/data/chest_xray"
    weights = "imagenet"
    epochs_stage1 = 2
    epochs_stage2 = 10
    lr = 1e-3

    [augment]
    rotation = 10.0
    hflip = false

    [sweep]
    optimizer = ["adamw", "sgd"]
    lr = [1e-3, 3e-4]
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from cxr_deploy import atomic

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 needs the backport (dependency: tomli; python_version<'3.11')
    import tomli as tomllib

class Optimizer(str, Enum):
    """``--optimizer``."""

    ADAMW = "adamw"
    """AdamW (decoupled weight decay), the default."""
    ADAM = "adam"
    """Adam (weight decay added to the gradient)."""
    SGD = "sgd"
    """SGD with ``--momentum`` (Nesterov with ``--nesterov``)."""


class Schedule(str, Enum):
    """``--schedule``, per stage."""

    COSINE = "cosine"
    """Linear warm-up, then cosine decay to zero over the stage's steps (the default)."""
    PLATEAU = "plateau"
    """Reduce the LR when the validation loss stops improving."""
    NONE = "none"
    """Constant LR."""


class ClassWeighting(str, Enum):
    """``--class-weighting``: how class imbalance is handled."""

    LOSS = "loss"
    """Balanced class weights in the cross-entropy (the default)."""
    SAMPLER = "sampler"
    """A weighted sampler draws classes equally often."""
    NONE = "none"
    """Neither."""


class Monitor(str, Enum):
    """``--monitor``: what early stopping and the best epoch follow."""

    VAL_AUC = "val_auc"
    """Validation ROC AUC, ties broken by validation loss (the default)."""
    VAL_LOSS = "val_loss"
    """Validation cross-entropy."""


OPTIMIZERS = tuple(o.value for o in Optimizer)
SCHEDULES = tuple(s.value for s in Schedule)
CLASS_WEIGHTING = tuple(c.value for c in ClassWeighting)
MONITORS = tuple(m.value for m in Monitor)
AMP_MODES = ("auto", "on", "off")


def default_num_workers() -> int:
    return min(4, os.cpu_count() or 1)


# Where training augmentation runs (training/device_batches.py): auto = the device on CUDA, else workers.
AUGMENT_ON = ("auto", "workers", "device")

# What `--resume` may change: settings that do not change the result (where and how fast it runs).
RESUME_OVERRIDES = frozenset({"device", "num_workers", "cache_dir", "augment_on", "progress", "tensorboard"})


@dataclass
class AugmentConfig:
    """Train-time augmentation, applied to the spec's resized gray image (see augment.py)."""

    enabled: bool = True
    rotation: float = 10.0  # degrees, uniform in ±rotation
    translate: float = 0.05  # fraction of the side, uniform in ±translate on each axis
    scale_min: float = 0.9  # zoom; < 1 shrinks (shows more border), > 1 crops in
    scale_max: float = 1.1
    brightness: float = 0.1  # additive offset, uniform in ±brightness (image in [0, 1])
    contrast: float = 0.1  # multiplicative factor around the mean, uniform in 1 ± contrast
    # Off by default: a flipped film puts the heart on the right. The classifier should not learn
    # that dextrocardia-looking images are normal, and laterality markers become mirror-written.
    hflip: bool = False

    def validate(self) -> None:
        if not 0 <= self.rotation <= 45:
            raise ValueError(f"augment.rotation must be within [0, 45] degrees, got {self.rotation}")
        if not 0 <= self.translate <= 0.3:
            raise ValueError(f"augment.translate must be within [0, 0.3], got {self.translate}")
        if not 0.5 <= self.scale_min <= self.scale_max <= 2.0:
            raise ValueError(f"augment scale range must satisfy 0.5 <= scale_min <= scale_max <= 2, "
                             f"got [{self.scale_min}, {self.scale_max}]")
        if not 0 <= self.brightness <= 0.5 or not 0 <= self.contrast <= 0.9:
            raise ValueError("augment.brightness must be within [0, 0.5] and augment.contrast within [0, 0.9]")


@dataclass
class TrainConfig:
    """Everything that decides a training run. Field names are the TOML keys; CLI flags use dashes."""

    data: str = ""  # dataset root (root/{train,val,test}/{NORMAL,PNEUMONIA}) or labels CSV
    out: str = ""  # run directory; empty → runs/<timestamp>
    weights: str = "imagenet"  # "imagenet" | "none" | path to a ResNet50 state_dict or a bundle dir
    input_size: int = 224
    resize: str = "letterbox"  # PreprocessSpec resize policy
    # data split
    val_fraction: float = 0.2  # carved from train (stratified) when val is missing or tiny
    group_regex: str | None = None  # patient from the file name ("kermany" preset), see training/groups.py
    min_val_images: int = 32  # a provided val split smaller than this is merged into train and re-carved
    # optimisation
    epochs_stage1: int = 2  # backbone frozen (params + BN statistics), head only
    epochs_stage2: int = 10  # everything trainable
    batch_size: int = 32
    optimizer: str = "adamw"
    lr: float = 1e-3  # stage 1 (head) learning rate
    stage2_lr_factor: float = 0.1  # stage 2 LR = lr * stage2_lr_factor
    early_lr_factor: float = 1.0  # stage 2: conv1/bn1/layer1/layer2 get a further factor (e.g. 0.1)
    momentum: float = 0.9  # SGD momentum / Adam beta1
    nesterov: bool = False
    weight_decay: float = 1e-4  # on conv/linear weights only (not on BN or biases)
    schedule: str = "cosine"  # per stage: cosine with linear warm-up | reduce-on-plateau | none
    warmup_epochs: float = 0.5  # cosine only: warm-up length in epochs (fractions allowed)
    clip_grad_norm: float = 1.0  # global-norm clipping after unscaling; 0 disables
    class_weighting: str = "loss"  # loss (class-weighted cross-entropy) | sampler | none
    amp: str = "auto"  # auto: CUDA fp16, CPU bf16 only with native bf16 support; on; off
    # early stopping
    monitor: str = "val_auc"  # val_auc (ties broken by val_loss) | val_loss
    patience: int = 4  # epochs without improvement before a stage ends early
    min_delta: float = 0.0
    # decision threshold chosen on validation at the best epoch
    target_sensitivity: float | None = None  # None → Youden's J; e.g. 0.95 for screening
    # out-of-population flag (cxr_deploy.in_population), fitted after the last epoch on the best model
    age_range: str = ""  # the training data's patient ages in years, "LOW-HIGH" (Kermany: "1-5"); "" unknown
    population_quantile: float = 95.0  # validation percentile the population threshold is set at
    # reproducibility and machinery
    seed: int = 0
    deterministic: bool = False
    calibrate: bool = True  # temperature scaling on validation (cxr_deploy.calibration)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    sync_bn: bool = False  # under torchrun: SyncBatchNorm (statistics over the global batch); CUDA only
    num_workers: int = field(default_factory=default_num_workers)
    cache_dir: str = ""  # on-disk cache of resized images; empty disables
    augment_on: str = "auto"  # auto (device on CUDA, workers on CPU) | workers | device (device_batches)
    max_pixels: int = 64_000_000
    tensorboard: bool = False
    progress: bool = True
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    # -- construction ----------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        data = dict(data)
        data.pop("sweep", None)
        aug = data.pop("augment", None) or {}
        if isinstance(aug, AugmentConfig):
            aug = dataclasses.asdict(aug)
        _check_keys(data, cls, "")
        _check_keys(aug, AugmentConfig, "augment.")
        cfg = cls(**data, augment=AugmentConfig(**aug))
        cfg.validate()
        return cfg

    def with_overrides(self, **overrides) -> "TrainConfig":
        """A copy with the given fields replaced; ``None`` values are ignored (flag not given).

        ``augment`` may be a dict of AugmentConfig fields to override individually.
        """
        data = self.to_dict()
        for key, value in overrides.items():
            if value is None:
                continue
            if key == "augment":
                data["augment"].update({k: v for k, v in value.items() if v is not None})
            else:
                data[key] = value
        return TrainConfig.from_dict(data)

    def __post_init__(self):
        # Friendly Python-API inputs, normalized so the resolved TOML round-trips.
        if isinstance(self.amp, bool):
            self.amp = "on" if self.amp else "off"
        if self.weights is None:
            self.weights = "none"
        for name in ("data", "out", "weights", "cache_dir"):
            if isinstance(getattr(self, name), os.PathLike):
                setattr(self, name, os.fspath(getattr(self, name)))
        if isinstance(self.augment, dict):
            self.augment = AugmentConfig(**self.augment)

    def validate(self) -> None:
        def one_of(name, allowed):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")

        one_of("optimizer", OPTIMIZERS)
        one_of("schedule", SCHEDULES)
        one_of("class_weighting", CLASS_WEIGHTING)
        one_of("monitor", MONITORS)
        one_of("amp", AMP_MODES)
        if self.epochs_stage1 < 0 or self.epochs_stage2 < 0 or self.epochs_stage1 + self.epochs_stage2 < 1:
            raise ValueError("epochs_stage1 and epochs_stage2 must be >= 0 with at least one epoch in total")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        for name in ("lr", "stage2_lr_factor", "early_lr_factor", "weight_decay", "clip_grad_norm",
                     "warmup_epochs", "momentum", "min_delta"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        if self.patience < 1:
            raise ValueError(f"patience must be >= 1, got {self.patience}")
        if self.target_sensitivity is not None and not 0 < self.target_sensitivity <= 1:
            raise ValueError(f"target_sensitivity must be in (0, 1], got {self.target_sensitivity}")
        if self.num_workers < 0:
            raise ValueError("num_workers must be >= 0")
        from cxr_deploy.in_population import parse_age_range

        parse_age_range(self.age_range)
        if not 50 <= self.population_quantile < 100:
            raise ValueError(f"population_quantile must be in [50, 100), got {self.population_quantile}")
        if self.augment_on not in AUGMENT_ON:
            raise ValueError(f"augment_on must be one of {', '.join(AUGMENT_ON)}, got {self.augment_on!r}")
        self.augment.validate()
        from cxr_deploy.preprocessing import PreprocessSpec

        PreprocessSpec(input_size=self.input_size, resize=self.resize)  # validates both

    # -- serialization ---------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_toml(self) -> str:
        return dumps_toml(self.to_dict())

    def save(self, path: str | Path) -> None:
        atomic.write_text(path, self.to_toml())

    @property
    def lr_stage2(self) -> float:
        return self.lr * self.stage2_lr_factor

    @property
    def threshold_rule(self) -> dict:
        if self.target_sensitivity is None:
            return {"rule": "youden_j"}
        return {"rule": "target_sensitivity", "target": self.target_sensitivity}


def _check_keys(data: dict, cls, prefix: str) -> None:
    unknown = set(data) - {f.name for f in dataclasses.fields(cls)} - {"augment"}
    if unknown:
        known = ", ".join(prefix + f.name for f in dataclasses.fields(cls))
        raise ValueError(f"unknown config key(s) {sorted(prefix + k for k in unknown)}; known: {known}")


def read_toml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ValueError(f"config file not found: {path}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{path} is not valid TOML: {exc}") from None


def load_config(path: str | Path | None = None, **overrides) -> TrainConfig:
    """Defaults → TOML file (if given) → overrides (``None`` values ignored)."""
    base = TrainConfig.from_dict(read_toml(path)) if path else TrainConfig()
    return base.with_overrides(**overrides)


# -- a tiny TOML writer (stdlib has a reader only) -------------------------------------------------
def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        if isinstance(value, float) and not math.isfinite(value):
            return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # JSON string escapes are valid TOML basic-string escapes
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def dumps_toml(data: dict[str, Any]) -> str:
    """Flat keys first, then one level of tables. ``None`` values are written as comments (TOML has
    no null), so reading the file back gives the field's default, which is ``None``."""
    lines, tables = [], []
    for key, value in data.items():
        if isinstance(value, dict):
            tables.append((key, value))
        elif value is None:
            lines.append(f"# {key} = (unset)")
        else:
            lines.append(f"{key} = {_toml_value(value)}")
    for name, table in tables:
        lines.append("")
        lines.append(f"[{name}]")
        for key, value in table.items():
            lines.append(f"# {key} = (unset)" if value is None else f"{key} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"
