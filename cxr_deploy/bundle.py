"""Model bundles: one directory, one manifest, verified on every load.

Layout::

    bundle/
      manifest.json   format + version, architecture, classes, positive class, threshold,
                      preprocessing spec, training summary, sha256 of every artifact, versions
      weights.pt      state_dict, loaded only with torch.load(..., weights_only=True)
      ...             exported artifacts added later (model.ts, model.onnx, parity.json, ...)

The manifest is the commit point: artifacts are written first, the manifest last (atomically), and
loading refuses any artifact whose sha256 does not match, so a tampered, truncated or half-copied
bundle fails loudly instead of predicting quietly wrong.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import __version__, atomic
from .decision import check_threshold
from .errors import BundleError
from .model import ARCHITECTURE, build_model
from .preprocessing import PreprocessSpec

BUNDLE_FORMAT = "cxr-deploy-bundle"
BUNDLE_FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
WEIGHTS_NAME = "weights.pt"
CLASS_NAMES = ("NORMAL", "PNEUMONIA")
POSITIVE_CLASS = "PNEUMONIA"

if TYPE_CHECKING:
    from torch import nn

# torch is imported only where weights are read or written (state_dict, save_bundle): reading,
# verifying and serving a bundle through ONNX Runtime never loads it (`import cxr_deploy.bundle`
# took 2.6-4.2 s with torch at the top, 0.11-0.15 s without, on the 2-core machine).


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


# Flush a file a library wrote (torch.jit/torch.export/onnx save) to disk before it is hashed and
# registered, so a power cut cannot leave a manifest pointing at a half-written artifact.
fsync_file = atomic.fsync_path


def write_json_atomic(path: Path, data: Any, *, default=None) -> None:
    """Write JSON so that readers see the old file or the new one, never a half-written one."""
    atomic.write_json(path, data, default=default)


@dataclass
class BundleManifest:
    """The manifest, validated on construction so an invalid one never exists in memory."""

    preprocessing: PreprocessSpec
    artifacts: dict[str, dict]
    class_names: tuple[str, ...] = CLASS_NAMES
    positive_class: str = POSITIVE_CLASS
    threshold: float = 0.5
    temperature: float = 1.0  # probability calibration (temperature scaling), applied by every artifact
    architecture: str = ARCHITECTURE
    training: dict | None = None
    site: dict | None = None  # a site calibration (cxr-deploy calibrate): parent, data hash, date, points
    package_version: str = __version__
    created: str = field(default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    format: str = BUNDLE_FORMAT
    format_version: int = BUNDLE_FORMAT_VERSION

    def __post_init__(self):
        if self.format != BUNDLE_FORMAT:
            raise BundleError(f"not a cxr-deploy bundle manifest (format={self.format!r})")
        if not isinstance(self.format_version, int) or self.format_version > BUNDLE_FORMAT_VERSION:
            raise BundleError(
                f"bundle format version {self.format_version!r} is newer than this cxr-deploy "
                f"({__version__}) supports ({BUNDLE_FORMAT_VERSION}); upgrade cxr-deploy")
        if self.format_version < 1:
            raise BundleError(f"invalid bundle format version {self.format_version!r}")
        if self.architecture != ARCHITECTURE:
            raise BundleError(f"unsupported architecture {self.architecture!r} (expected {ARCHITECTURE})")
        self.class_names = tuple(self.class_names)
        if len(self.class_names) < 2 or len(set(self.class_names)) != len(self.class_names):
            raise BundleError(f"class_names must be >= 2 distinct names, got {self.class_names}")
        if self.positive_class not in self.class_names:
            raise BundleError(f"positive_class {self.positive_class!r} not among {self.class_names}")
        try:
            self.threshold = check_threshold(self.threshold) if not isinstance(self.threshold, bool) else None
        except ValueError as exc:
            raise BundleError(str(exc)) from None
        if self.threshold is None:
            raise BundleError("threshold must be a number within [0, 1], got a boolean")
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)) \
                or not 0.0 < float(self.temperature) < 1e3:
            raise BundleError(f"temperature must be a number > 0, got {self.temperature!r}")
        self.temperature = float(self.temperature)
        if isinstance(self.preprocessing, dict):
            try:
                self.preprocessing = PreprocessSpec.from_dict(self.preprocessing)
            except (TypeError, ValueError) as exc:
                raise BundleError(f"invalid preprocessing spec in manifest: {exc}") from None
        if WEIGHTS_NAME not in self.artifacts:
            raise BundleError(f"manifest lists no {WEIGHTS_NAME}")
        for name, info in self.artifacts.items():
            if "/" in name or "\\" in name or name.startswith(".") or name == MANIFEST_NAME:
                raise BundleError(f"invalid artifact name {name!r}")
            if not isinstance(info, dict) or len(str(info.get("sha256", ""))) != 64:
                raise BundleError(f"artifact {name!r} has no valid sha256 in the manifest")

    @property
    def positive_index(self) -> int:
        return self.class_names.index(self.positive_class)

    def to_dict(self) -> dict:
        return {
            "format": self.format,
            "format_version": self.format_version,
            "architecture": self.architecture,
            "class_names": list(self.class_names),
            "positive_class": self.positive_class,
            "threshold": self.threshold,
            "temperature": self.temperature,
            "preprocessing": self.preprocessing.to_dict(),
            "training": self.training,
            **({"site": self.site} if self.site is not None else {}),
            "artifacts": self.artifacts,
            "package_version": self.package_version,
            "created": self.created,
        }

    @classmethod
    def from_dict(cls, data: dict) -> "BundleManifest":
        if not isinstance(data, dict):
            raise BundleError("manifest.json does not hold a JSON object")
        known = set(cls.__dataclass_fields__)
        missing = {"preprocessing", "artifacts", "format", "format_version"} - set(data)
        if missing:
            raise BundleError(f"manifest.json lacks {sorted(missing)}")
        try:
            return cls(**{k: v for k, v in data.items() if k in known})
        except TypeError as exc:
            raise BundleError(f"manifest.json is malformed: {exc}") from None


class ModelBundle:
    """A verified bundle directory. Use :meth:`load` to open and :func:`save_bundle` to create."""

    def __init__(self, directory: Path, manifest: BundleManifest):
        self.directory = Path(directory)
        self.manifest = manifest

    # -- opening ---------------------------------------------------------------------------------
    @classmethod
    def load(cls, directory: str | Path, *, verify: bool = True) -> "ModelBundle":
        """Open a bundle; with ``verify`` (default) every artifact's sha256 is checked now."""
        directory = Path(directory)
        manifest_path = directory / MANIFEST_NAME
        if not manifest_path.is_file():
            raise BundleError(_why_not_a_bundle(directory))
        try:
            data = json.loads(manifest_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise BundleError(f"{manifest_path} is not valid JSON (truncated or edited?): {exc}") from None
        bundle = cls(directory, BundleManifest.from_dict(data))
        if verify:
            for name in bundle.manifest.artifacts:
                bundle.verified_path(name)
        return bundle

    def verified_path(self, name: str) -> Path:
        """Path of an artifact after checking it exists and matches its recorded sha256."""
        info = self.manifest.artifacts.get(name)
        if info is None:
            raise BundleError(f"bundle {self.directory} has no artifact {name!r} "
                              f"(has: {', '.join(sorted(self.manifest.artifacts))})")
        path = self.directory / name
        if not path.is_file():
            raise BundleError(f"artifact {name} listed in {self.directory / MANIFEST_NAME} is missing")
        if info.get("bytes") is not None and path.stat().st_size != info["bytes"]:
            raise BundleError(f"artifact {name} is {path.stat().st_size} bytes, manifest says "
                              f"{info['bytes']}: truncated or replaced; copy the bundle again")
        if sha256_file(path) != info["sha256"]:
            raise BundleError(f"artifact {name} fails its sha256 check (modified or corrupted since the "
                              "bundle was written); copy the bundle again or re-export it")
        return path

    def has(self, name: str) -> bool:
        return name in self.manifest.artifacts

    # -- contents --------------------------------------------------------------------------------
    @property
    def spec(self) -> PreprocessSpec:
        return self.manifest.preprocessing

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.manifest.class_names

    @property
    def threshold(self) -> float:
        return self.manifest.threshold

    @property
    def model_id(self) -> str:
        """Short, stable id of what decides predictions: weights, classes, threshold, preprocessing."""
        key = json.dumps({
            "weights": self.manifest.artifacts[WEIGHTS_NAME]["sha256"],
            "classes": list(self.manifest.class_names),
            "positive": self.manifest.positive_class,
            "threshold": self.manifest.threshold,
            "preprocessing": self.manifest.preprocessing.to_dict(),
            # calibrated bundles only: an uncalibrated bundle keeps the id it always had
            **({"temperature": self.manifest.temperature} if self.manifest.temperature != 1.0 else {}),
        }, sort_keys=True)
        return hashlib.sha256(key.encode()).hexdigest()[:16]

    def state_dict(self) -> dict:
        import torch

        path = self.verified_path(WEIGHTS_NAME)
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise BundleError(f"cannot load {path}: {type(exc).__name__}: {exc}") from None

    def classifier(self) -> nn.Module:
        """The model as every artifact runs it: probabilities (with the bundle's temperature) + CAM
        (+ the population score when the bundle has its statistics, :mod:`cxr_deploy.in_population`)."""
        from . import in_population
        from .cam import ClassifierWithCAM

        return ClassifierWithCAM(self.build_model(), self.manifest.positive_index, self.manifest.temperature,
                                 population=in_population.load(self)).eval()

    def build_model(self) -> nn.Module:
        """The eager PyTorch model in eval mode, its tensors the bundle's own weights.

        The module is built on the meta device and the weights are assigned to it: a random
        initialisation that the weights would overwrite costs 0.2-0.3 s of CPU for a ResNet50 and
        would move the caller's torch random stream."""
        import torch

        state = {k: v.float() if v.is_floating_point() else v for k, v in self.state_dict().items()}
        with torch.device("meta"):
            model = build_model(weights=None, num_classes=len(self.class_names))
        try:
            model.load_state_dict(state, strict=True, assign=True)
        except RuntimeError as exc:
            raise BundleError(f"weights in {self.directory} do not fit {ARCHITECTURE}: {exc}") from None
        return model.eval()

    # -- changing --------------------------------------------------------------------------------
    def add_artifact(self, name: str, **info) -> None:
        """Record a file already written into the bundle directory (hash computed now)."""
        path = self.directory / name
        if not path.is_file():
            raise BundleError(f"cannot add artifact {name}: {path} does not exist")
        self.manifest.artifacts[name] = {"sha256": sha256_file(path), "bytes": path.stat().st_size, **info}
        self.save_manifest()

    def remove_artifact(self, name: str) -> None:
        if name == WEIGHTS_NAME:
            raise BundleError("the weights cannot be removed from a bundle")
        self.manifest.artifacts.pop(name, None)
        self.save_manifest()
        (self.directory / name).unlink(missing_ok=True)

    def update(self, **fields) -> None:
        """Change manifest fields (e.g. threshold, training) and re-validate before writing."""
        data = self.manifest.to_dict() | fields
        self.manifest = BundleManifest.from_dict(data)
        self.save_manifest()

    def save_manifest(self) -> None:
        BundleManifest.from_dict(self.manifest.to_dict())  # re-validate before it hits disk
        write_json_atomic(self.directory / MANIFEST_NAME, self.manifest.to_dict())


def save_bundle(
    directory: str | Path,
    model: nn.Module | dict,
    *,
    spec: PreprocessSpec,
    class_names: tuple[str, ...] = CLASS_NAMES,
    positive_class: str = POSITIVE_CLASS,
    threshold: float = 0.5,
    training: dict | None = None,
    temperature: float = 1.0,
) -> ModelBundle:
    """Write a new bundle, replacing any bundle at ``directory`` in one step.

    Everything is written (and fsync'ed) into a hidden sibling folder first, then swapped with the
    old bundle by one atomic ``renameat2(RENAME_EXCHANGE)`` (:func:`cxr_deploy.atomic.exchange`), so
    a crash at any moment (e.g. best-model saving during training) leaves a whole bundle at
    ``directory``: the old one or the new one. Only a folder that loads and verifies as a bundle
    (:meth:`ModelBundle.load`) or an empty one is ever replaced: a folder of the user's that merely
    holds a ``manifest.json`` is not ours to delete (:class:`BundleError`).
    """
    import torch
    from torch import nn

    directory = Path(directory)
    _check_replaceable(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = directory.with_name(f".{directory.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        state = model.state_dict() if isinstance(model, nn.Module) else model
        state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
        torch.save(state, tmp / WEIGHTS_NAME)
        atomic.fsync_path(tmp / WEIGHTS_NAME)
        manifest = BundleManifest(
            preprocessing=spec,
            artifacts={WEIGHTS_NAME: {"sha256": sha256_file(tmp / WEIGHTS_NAME),
                                      "bytes": (tmp / WEIGHTS_NAME).stat().st_size,
                                      "kind": "state_dict", "torch_version": torch.__version__}},
            class_names=tuple(class_names),
            positive_class=positive_class,
            threshold=threshold,
            training=training,
            temperature=temperature,
        )
        write_json_atomic(tmp / MANIFEST_NAME, manifest.to_dict())
        _swap_in(tmp, directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # after a swap: the old bundle
    return ModelBundle(directory, manifest)


def _check_replaceable(directory: Path) -> None:
    if not os.path.lexists(directory) or (directory.is_dir() and not directory.is_symlink()
                                          and not any(directory.iterdir())):
        return
    try:
        if directory.is_symlink() or not directory.is_dir():
            raise BundleError("not a folder")
        ModelBundle.load(directory)
    except BundleError as exc:
        raise BundleError(f"{directory} exists and is not a cxr-deploy bundle that verifies ({exc}); not replacing it "
                          "(choose another folder)") from None


def _swap_in(tmp: Path, directory: Path) -> None:
    """Put the finished bundle ``tmp`` at ``directory``; the old one (if any) ends up at ``tmp``."""
    if not directory.exists():
        os.replace(tmp, directory)
    elif not atomic.exchange(tmp, directory):
        # No RENAME_EXCHANGE here (not Linux, or a file system without it): two renames, and the
        # old bundle put back if the second fails. A crash between them leaves it at ``old``.
        old = directory.with_name(f".{directory.name}.old-{os.getpid()}")
        os.replace(directory, old)
        try:
            os.replace(tmp, directory)
        except BaseException:
            os.replace(old, directory)
            raise
        os.replace(old, tmp)
    atomic.fsync_dir(directory.parent)


def is_bundle(path: str | Path) -> bool:
    return (Path(path) / MANIFEST_NAME).is_file()


def _why_not_a_bundle(directory: Path) -> str:
    """The one-line reason a path given as a bundle is none: missing, a file, a training run."""
    from .artifacts import RUN_BEST_BUNDLE

    if not directory.exists():
        return f"no model bundle at {directory}: that folder does not exist"
    if not directory.is_dir():
        return f"no model bundle at {directory}: that is a file; give the bundle's folder"
    best = directory / RUN_BEST_BUNDLE
    if (best / MANIFEST_NAME).is_file():
        return (f"{directory} is a training run, not a model bundle; its best model is the bundle "
                f"{best} (use that path)")
    return f"no model bundle at {directory} ({MANIFEST_NAME} missing)"

