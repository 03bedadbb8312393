"""The classifier: ResNet50 (torchvision's network, built by :mod:`cxr_deploy.resnet`) with a 2-class
linear head.

The head stays a single ``nn.Linear`` on globally average-pooled ``layer4`` features: that is what
makes the exported models' forward-pass class-activation map equal Grad-CAM (see
``cxr_deploy.cam``).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from .errors import WeightsUnavailable

ARCHITECTURE = "resnet50"
FEATURE_DIM = 2048

if TYPE_CHECKING:
    from torch import nn

# torch is imported inside the functions that build or load a model, so the bundle manifest (which
# names ARCHITECTURE) can be read and served through ONNX Runtime without torch.


def imagenet_weights_enum():
    from torchvision.models import ResNet50_Weights

    return ResNet50_Weights.IMAGENET1K_V2


def imagenet_weights_location() -> Path:
    """Where torchvision's standard weights mechanism looks for (and caches) the ImageNet file."""
    import torch

    url = imagenet_weights_enum().url
    return Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]


def build_model(weights: str | Path | None = "imagenet", num_classes: int = 2) -> nn.Module:
    """ResNet50 with its ``fc`` replaced by ``Linear(2048, num_classes)``.

    ``weights``: ``"imagenet"`` (torchvision's IMAGENET1K_V2 through its standard download/cache
    mechanism), ``None``/``"none"`` (random init), a path to a ResNet50 state_dict file, or a
    state_dict itself (ImageNet-style; its 1000-class ``fc`` is dropped when the class count
    differs). Starting from a bundle is resolved by training (``cxr_deploy.training.weights``).
    """
    from torch import nn

    from .resnet import ResNet50

    if isinstance(weights, str) and weights.lower() in ("none", "random", ""):
        weights = None
    model = ResNet50()
    if isinstance(weights, dict):
        _load_backbone(model, {k.removeprefix("module."): v for k, v in weights.items()})
    elif weights is not None and str(weights).lower() == "imagenet":
        _load_backbone(model, _imagenet_state_dict())
    elif weights is not None:
        _load_backbone(model, _state_dict_from_file(Path(weights)))
    model.fc = nn.Linear(FEATURE_DIM, num_classes)
    return model


def _imagenet_state_dict() -> dict:
    enum = imagenet_weights_enum()
    target = imagenet_weights_location()
    try:
        return enum.get_state_dict(progress=False, check_hash=True)
    except Exception as exc:  # URLError, socket errors, hash mismatch of a partial download
        raise WeightsUnavailable(
            "cannot obtain the ImageNet ResNet50 weights "
            f"({type(exc).__name__}: {exc}). This machine is probably offline. On a connected machine "
            f"download {enum.url} and copy it to {target} (torchvision's cache; set TORCH_HOME to move "
            "it), or pass --weights /path/to/resnet50.pth, or --weights none to train from scratch."
        ) from None


def _state_dict_from_file(path: Path) -> dict:
    if path.is_dir():
        raise WeightsUnavailable(f"{path} is a folder, not a state_dict file (cxr-deploy train --weights "
                                 "takes a bundle folder)")
    if not path.is_file():
        raise WeightsUnavailable(f"weights file not found: {path}")
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise WeightsUnavailable(f"cannot load weights from {path}: {type(exc).__name__}: {exc}") from None
    for key in ("state_dict", "model"):  # common checkpoint wrappers
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise WeightsUnavailable(f"{path} does not hold a state_dict")
    return {k.removeprefix("module."): v for k, v in state.items()}


def _load_backbone(model: nn.Module, state: dict) -> None:
    """Load everything but a mismatching head; anything else missing is an error, not a warning."""
    own = model.state_dict()
    state = {k: v for k, v in state.items() if not (k.startswith("fc.") and own.get(k) is not None
                                                    and own[k].shape != v.shape)}
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches: one line, not a traceback
        first = " ".join(str(exc).split())[:200]
        raise WeightsUnavailable(f"weights do not fit a ResNet50: {first}") from None
    missing = [k for k in missing if not k.startswith("fc.")]
    if missing or unexpected:
        raise WeightsUnavailable(
            f"weights do not fit a ResNet50: missing {missing[:5]}, unexpected {list(unexpected)[:5]}")


def head_is_linear(model: nn.Module) -> bool:
    """True when logits are an affine function of pooled layer4 features (CAM == Grad-CAM)."""
    from torch import nn

    return isinstance(getattr(model, "fc", None), nn.Linear) and isinstance(
        getattr(model, "avgpool", None), nn.AdaptiveAvgPool2d)
