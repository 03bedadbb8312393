"""Training data: finding labelled images, splitting them, and decoding them for the model.

Two sources:

- a dataset root in the Kaggle/Kermany layout ``root/{train,val,test}/{NORMAL,PNEUMONIA}/...``
  (folder names case-insensitive; ``root/{NORMAL,PNEUMONIA}`` without split folders is all train);
- a labels CSV with columns ``path`` (alias ``file``), ``label`` and optionally ``split``; paths are
  relative to the CSV's folder.

Every file is decoded by the runtime reader (PNG, JPEG, DICOM by content) and turned into model
input by the bundle's :class:`~cxr_deploy.preprocessing.PreprocessSpec`, so training sees exactly
what inference will see. When ``val`` is missing or tiny (the public Kermany ``val`` has 16 images)
a stratified validation split is carved from ``train`` with the run's seed and written to the run
directory as ``splits.csv``.
"""

from __future__ import annotations

import csv
import sys
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, RandomSampler, WeightedRandomSampler

from cxr_deploy import atomic
from cxr_deploy.bundle import CLASS_NAMES, POSITIVE_CLASS
from cxr_deploy.errors import UnreadableImage
from cxr_deploy.imaging import read_image, scan_paths
from cxr_deploy.labels import class_of_folder, parse_label, read_labels_csv
from cxr_deploy.preprocessing import PreprocessSpec

from .augment import build_augment, draw_params
from .cache import ResizedCache  # noqa: F401 (re-exported: tests and callers import it from here)
from .config import TrainConfig
from .device_batches import from_storage, to_storage

# Cache entries of training images: 16-bit since issue 20 (older 8-bit "stored" entries are not served).
STORED_KIND = "stored16"

SPLITS = ("train", "val", "test")
_SPLIT_ALIASES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
                  "test": "test", "testing": "test", "": "train"}


@dataclass(frozen=True)
class Sample:
    path: str
    label: int  # index into CLASS_NAMES
    split: str
    group: str = ""  # the patient (see training/groups.py); "" = unknown


def _label_index(raw: str, where: str) -> int:
    label = parse_label(raw, CLASS_NAMES, POSITIVE_CLASS)
    if label is not None:
        return CLASS_NAMES.index(label)
    raise ValueError(f"{where}: unknown label {raw!r} (expected one of {', '.join(CLASS_NAMES)}, any case)")


def load_samples(data: str | Path, group_regex: str | None = None) -> list[Sample]:
    """All labelled samples from a dataset root or labels CSV, in a deterministic order, each with
    its patient group where one is known (see :mod:`.groups`)."""
    from .groups import attach_groups, compile_group_regex

    regex = compile_group_regex(group_regex)
    data = Path(data)
    if data.is_file():
        return attach_groups(_samples_from_csv(data), regex)
    if data.is_dir():
        return attach_groups(_samples_from_folders(data), regex)
    raise ValueError(f"--data {data}: no such file or folder")


def _samples_from_csv(path: Path) -> list[Sample]:
    """Labels CSV through the runtime's one reader (cxr_deploy.labels); an optional ``split`` column."""
    samples = []
    for row in read_labels_csv(path, CLASS_NAMES, POSITIVE_CLASS):
        raw_split = row.extra.get("split", "")
        split = _SPLIT_ALIASES.get(raw_split.lower())
        if split is None:
            raise ValueError(f"{path}:{row.line}: unknown split {raw_split!r} (train, val or test)")
        group = row.extra.get("patient") or row.extra.get("group") or ""
        samples.append(Sample(row.path, CLASS_NAMES.index(row.label), split, group))
    missing = [s.path for s in samples if not Path(s.path).is_file()]
    if missing:
        raise ValueError(f"{path}: {len(missing)} listed file(s) do not exist, e.g. {missing[0]}")
    return samples


def _subdirs(folder: Path) -> dict[str, Path]:
    return {p.name.lower(): p for p in sorted(folder.iterdir()) if p.is_dir() and not p.name.startswith(".")}


def _samples_from_folders(root: Path) -> list[Sample]:
    subdirs = _subdirs(root)
    class_keys = {name.lower() for name in CLASS_NAMES}
    if class_keys & set(subdirs) and not set(_SPLIT_ALIASES) & set(subdirs):
        split_roots = {"train": root}  # root/{NORMAL,PNEUMONIA}: everything is training data
    else:
        split_roots = {}
        for name, folder in subdirs.items():
            split = _SPLIT_ALIASES.get(name)
            if split is not None:
                if split in split_roots:
                    raise ValueError(f"{root}: two folders map to split {split!r}")
                split_roots[split] = folder
    if "train" not in split_roots:
        raise ValueError(f"{root}: expected root/train/{{NORMAL,PNEUMONIA}} (Kermany layout), "
                         f"root/{{NORMAL,PNEUMONIA}}, or a labels CSV; found folders {sorted(subdirs)}")
    samples, skipped = [], 0
    for split in SPLITS:
        if split not in split_roots:
            continue
        classes = {class_of_folder(name, CLASS_NAMES): folder for name, folder in _subdirs(split_roots[split]).items()}
        for index, name in enumerate(CLASS_NAMES):
            folder = classes.get(name)
            if folder is None:
                continue
            for entry in scan_paths([folder]):
                if entry.skipped:
                    skipped += 1
                    continue
                samples.append(Sample(entry.path, index, split))
    if skipped:
        print(f"note: {skipped} non-image file(s) under {root} ignored", file=sys.stderr)
    return samples


def split_counts(samples: list[Sample]) -> dict[str, dict[str, int]]:
    counts = Counter((s.split, s.label) for s in samples)
    return {split: {name: counts[(split, i)] for i, name in enumerate(CLASS_NAMES)}
            for split in SPLITS if any(s.split == split for s in samples)}


def assign_validation(samples: list[Sample], *, val_fraction: float, min_val_images: int,
                      seed: int) -> tuple[list[Sample], str]:
    """Return samples with a usable ``val`` split and a one-line note on what was done.

    A provided val split with at least ``min_val_images`` images and both classes is kept. Otherwise
    it is merged back into train and a stratified ``val_fraction`` of train is carved out with
    ``seed``, so the split is the same on every rerun: whole patients at a time when groups are
    known (:func:`.groups.carve_by_group`), else per image (``train_test_split``) with a warning.
    """
    from sklearn.model_selection import train_test_split

    from .groups import carve_by_group, warn_without_groups

    val = [s for s in samples if s.split == "val"]
    if len(val) >= min_val_images and len({s.label for s in val}) == len(CLASS_NAMES):
        return samples, f"using the provided validation split ({len(val)} images)"
    pool = [s for s in samples if s.split in ("train", "val")]
    rest = [s for s in samples if s.split == "test"]
    labels = [s.label for s in pool]
    per_class = Counter(labels)
    counts = {name: per_class.get(i, 0) for i, name in enumerate(CLASS_NAMES)}
    missing = [name for name, n in counts.items() if n == 0]
    if missing:
        raise ValueError(f"no {' or '.join(missing)} images in the training data (class counts {counts}): "
                         f"training needs images of every class ({', '.join(CLASS_NAMES)})")
    if min(per_class.values()) < 2:
        raise ValueError(f"cannot carve a stratified validation split: train has class counts {counts}; "
                         "each class needs at least 2 images")
    grouped = any(s.group for s in pool)
    if grouped:
        val_set = carve_by_group(pool, val_fraction, seed)
    else:
        warn_without_groups()
        n_val = max(len(CLASS_NAMES), round(val_fraction * len(pool)))
        _, val_idx = train_test_split(np.arange(len(pool)), test_size=n_val, stratify=labels, random_state=seed)
        val_set = set(val_idx.tolist())
    carved = [Sample(s.path, s.label, "val" if i in val_set else "train", s.group) for i, s in enumerate(pool)]
    why = "no validation split given" if not val else f"provided validation split too small ({len(val)} images)"
    how = (f"by patient ({len({s.group or s.path for s in pool})} groups)" if grouped else "per image (no patient "
           "information)")
    note = (f"{why}: carved a stratified {len(val_set)}-image validation split {how} from {len(pool)} "
            f"train{'+val' if val else ''} images (seed {seed})")
    return carved + rest, note


def write_splits(samples: list[Sample], path: Path) -> None:
    with atomic.open_atomic(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "label", "split", "group"])
        for s in samples:
            writer.writerow([s.path, CLASS_NAMES[s.label], s.split, s.group])


def read_splits(path: Path) -> list[Sample]:
    with open(path, newline="") as fh:
        return [Sample(r["path"], _label_index(r["label"], str(path)), r["split"], r.get("group") or "")
                for r in csv.DictReader(fh)]


# -- decoding ----------------------------------------------------------------------------------------
class CXRDataset(Dataset):
    """(input tensor, label, index) per sample; unreadable files yield ``None`` (dropped by
    :func:`collate_skip_unreadable` with a warning naming the file) so one corrupt file in
    thousands does not end a long run.

    ``augment`` (train only) works on the spec's resized gray image and is seeded per
    (seed, epoch, index): identical with any number of workers and after a resume.
    """

    def __init__(self, samples: list[Sample], spec: PreprocessSpec, *, augment=None, seed: int = 0,
                 cache: ResizedCache | None = None, max_pixels: int = 64_000_000, stored_pixels: bool = False):
        self.samples = samples
        self.spec = spec
        self.augment = augment
        self.seed = seed
        self.epoch = 0
        self.cache = cache
        self.max_pixels = max_pixels
        self.stored_pixels = stored_pixels or augment is not None  # training: 16-bit (device_batches)
        self.device_side = False  # True: __getitem__ sends the stored pixels only (device_batches)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.samples)

    def resized(self, index: int) -> np.ndarray:
        """The spec's (S, S) [0, 1] gray image; for a training set, as its stored 16-bit integers
        decode it, so the worker and the device path start from the same pixels."""
        if self.stored_pixels:
            return from_storage(self.stored(index))
        path = self.samples[index].path
        cached = self.cache.get(path) if self.cache is not None else None
        if cached is not None:
            return cached.astype(np.float32)
        resized = self.spec.resize_gray(read_image(path, max_pixels=self.max_pixels).pixels)
        if self.cache is not None:
            self.cache.put(path, resized)
        return resized

    def stored(self, index: int) -> np.ndarray:
        """Training images as the device path receives them (:func:`.device_batches.to_storage`)."""
        path = self.samples[index].path
        cached = self.cache.get(path, STORED_KIND) if self.cache is not None else None
        if cached is not None:
            return cached
        stored = to_storage(self.spec.resize_gray(read_image(path, max_pixels=self.max_pixels).pixels))
        if self.cache is not None:
            self.cache.put(path, stored, STORED_KIND)
        return stored

    def __getitem__(self, index: int):
        sample = self.samples[index]
        try:
            gray = self.stored(index) if self.device_side else self.resized(index)
        except UnreadableImage as exc:
            warnings.warn(f"skipping unreadable training image {exc.path}: {exc.reason}", stacklevel=1)
            return None
        if self.device_side:  # the stored pixels only: augmented and normalized on the device
            return torch.from_numpy(gray), sample.label, index
        if self.augment is not None:
            gray = self.augment.apply(gray, self.params(index))
        x = self.spec.normalize(gray)
        return torch.from_numpy(np.ascontiguousarray(x)), sample.label, index

    def params(self, index: int) -> np.ndarray:
        """Image ``index``'s augmentation parameters this epoch, seeded by (seed, epoch, index): the
        same wherever they are drawn (a loader worker, or the main process for the device path)."""
        rng = np.random.default_rng([self.seed, self.epoch, index])
        return draw_params(self.augment.config, self.spec.input_size, rng)


def collate_skip_unreadable(batch):
    items = [b for b in batch if b is not None]
    if not items:
        return None
    *tensors, ys, idx = zip(*items)
    return (*(torch.stack(t) for t in tensors), torch.tensor(ys, dtype=torch.long),
            torch.tensor(idx, dtype=torch.long))


# -- one run's data: splits, datasets, loaders, loss ------------------------------------------------
SPLITS_NAME = "splits.csv"


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
    return assign_validation(load_samples(config.data, config.group_regex), val_fraction=config.val_fraction,
                             min_val_images=config.min_val_images, seed=config.seed)


def prepare_data(config: TrainConfig, run_dir: Path | None, *, reuse_splits: bool = False,
                 presplit: tuple[list, str] | None = None, write: bool = True) -> RunData:
    """``write=False``: do not write ``splits.csv`` (ranks other than 0 under torchrun)."""
    splits_file = run_dir / SPLITS_NAME if run_dir else None
    if reuse_splits and splits_file and splits_file.is_file():
        samples, note = read_splits(splits_file), f"splits reused from {splits_file}"
    else:
        samples, note = presplit or _split_samples(config)
        if splits_file and write:
            write_splits(samples, splits_file)
    spec = PreprocessSpec(input_size=config.input_size, resize=config.resize)
    cache = ResizedCache(config.cache_dir, spec) if config.cache_dir else None
    by_split = {s: [x for x in samples if x.split == s] for s in ("train", "val", "test")}
    if not by_split["train"] or not by_split["val"]:
        raise ValueError("need both training and validation images")
    common = dict(cache=cache, max_pixels=config.max_pixels)
    train_set = CXRDataset(by_split["train"], spec, augment=build_augment(config.augment, spec.pad_value),
                           seed=config.seed, stored_pixels=True, **common)
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


def make_loaders(config: TrainConfig, data: RunData, device: torch.device, generator: torch.Generator,
                 rank: int = 0, world_size: int = 1):
    """Train, validation and test loaders. Under torchrun (``world_size`` N > 1) ``batch_size`` is the
    global batch: this rank loads its ``batch_size / N`` share of the batches a single process draws
    and an unpadded ``1/N`` of the validation set; only rank 0 gets a test loader (see distributed.py)."""
    from .distributed import GlobalBatchShard, Shard

    if len(data.train_set) < 2 * world_size:  # a process without images would leave the others waiting
        raise ValueError(f"{len(data.train_set)} training images are too few for {world_size} processes")
    common = dict(batch_size=config.batch_size // world_size, num_workers=config.num_workers,
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
    drop_last = len(data.train_set) > config.batch_size
    if world_size > 1:  # the shard drops the remainder itself, in whole global batches
        sampler, drop_last = GlobalBatchShard(sampler, rank, world_size, config.batch_size), False
    # Device path: a training item no longer depends on the epoch (the parameters are drawn in the main
    # process), so the workers can live across epochs instead of being started again for each one.
    persistent = data.train_set.device_side and config.num_workers > 0
    train = DataLoader(data.train_set, sampler=sampler, generator=generator, drop_last=drop_last,
                       persistent_workers=persistent, **common)
    val = DataLoader(data.val_set, sampler=Shard(len(data.val_set), rank, world_size), **common)
    test = DataLoader(data.test_set, shuffle=False, **common) if data.test_set and rank == 0 else None
    return train, val, test


def make_loss(config: TrainConfig, data: RunData, device: torch.device) -> nn.Module:
    if config.class_weighting == "loss":
        w = data.class_weighting["weights"]
        return nn.CrossEntropyLoss(weight=torch.tensor([w[c] for c in CLASS_NAMES], dtype=torch.float32,
                                                       device=device))
    return nn.CrossEntropyLoss()


def format_counts(counts: dict[str, dict[str, int]]) -> str:
    return "; ".join(f"{split}: " + ", ".join(f"{k} {v}" for k, v in c.items()) + f" (total {sum(c.values())})"
                     for split, c in counts.items())
