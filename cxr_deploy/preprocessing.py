"""The one preprocessing spec: from a reader's 2-D [0, 1] array to the model's input tensor.

:class:`PreprocessSpec` is stored in every model bundle's manifest and in every exported artifact;
training, export and inference all call :meth:`PreprocessSpec.apply` (or its two halves). Nothing
else in the code base resizes or normalizes model inputs: training augmentation works on the 2-D
array *before* the spec and then calls it.

Resize policy, default ``letterbox``: scale the longer side to ``input_size`` keeping the aspect
ratio, then pad to a square with black (0 in display space, what collimated X-ray borders already
look like). Chest films are not square (the public pediatric set ranges from 0.6 to 1.8 aspect
ratio); the ImageNet habit of resize-shorter-side + centre-crop cuts off costophrenic angles or
apices on exactly the wide or tall films, and consolidation in a lung base is a pneumonia sign. A
stretch would distort the cardiothoracic proportions. ``center_crop`` is available for weights
trained that way.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from enum import Enum

import numpy as np
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

class ResizePolicy(str, Enum):
    """How a (non-square) film becomes the square model input."""

    LETTERBOX = "letterbox"
    """Longer side to ``input_size``, aspect kept, padded with ``pad_value`` (the default: nothing of
    the chest is cut off)."""
    CENTER_CROP = "center_crop"
    """Shorter side to ``input_size``, then the central square (the ImageNet habit; cuts the
    costophrenic angles or apices off wide or tall films)."""


RESIZE_POLICIES = tuple(p.value for p in ResizePolicy)
_INTERPOLATIONS = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC,
                   "area": Image.Resampling.BOX, "nearest": Image.Resampling.NEAREST}
SPEC_VERSION = 1


@dataclass(frozen=True)
class PreprocessSpec:
    """Validated, JSON-serializable description of the whole array→tensor transform."""

    input_size: int = 224
    resize: str = "letterbox"
    interpolation: str = "bilinear"  # Pillow, antialiased when downscaling
    pad_value: float = 0.0  # display-space value of letterbox padding (0 = black)
    channels: int = 3  # gray replicated to this many channels (3 for ImageNet backbones)
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    version: int = field(default=SPEC_VERSION)

    def __post_init__(self):
        # Frozen dataclass: coerce lists (from JSON) to tuples, then validate.
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))
        if not isinstance(self.input_size, int) or not 8 <= self.input_size <= 4096:
            raise ValueError(f"input_size must be an integer in [8, 4096], got {self.input_size!r}")
        if self.resize not in RESIZE_POLICIES:
            raise ValueError(f"resize must be one of {RESIZE_POLICIES}, got {self.resize!r}")
        if self.interpolation not in _INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {tuple(_INTERPOLATIONS)}, got {self.interpolation!r}")
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {self.channels!r}")
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ValueError(f"mean and std need {self.channels} values each")
        if any(not math.isfinite(s) or s <= 0 for s in self.std) or any(not math.isfinite(m) for m in self.mean):
            raise ValueError("std values must be finite and > 0; mean values finite")
        if not 0.0 <= float(self.pad_value) <= 1.0:
            raise ValueError(f"pad_value must be in [0, 1], got {self.pad_value!r}")
        if self.version != SPEC_VERSION:
            raise ValueError(f"preprocessing spec version {self.version} is not supported (expected {SPEC_VERSION})")

    # -- serialization -------------------------------------------------------------------------
    def to_dict(self) -> dict:
        out = asdict(self)
        out["mean"], out["std"] = list(self.mean), list(self.std)
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "PreprocessSpec":
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown preprocessing fields: {sorted(unknown)}")
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "PreprocessSpec":
        return cls.from_dict(json.loads(text))

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (self.channels, self.input_size, self.input_size)

    # -- the transform -------------------------------------------------------------------------
    def placement(self, height: int, width: int) -> "Placement":
        """Where an ``height x width`` image lands in the model's input square: the one definition
        of the letterbox / centre-crop geometry, used by :meth:`resize_gray` and (inverted) by the
        overlays that carry a CAM back onto the original image."""
        size = self.input_size
        if self.resize == "letterbox":
            scale = size / max(height, width)
            new_w, new_h = max(1, round(width * scale)), max(1, round(height * scale))
            top, left = (size - new_h) // 2, (size - new_w) // 2
            return Placement(size, (new_h / height, new_w / width), (top, left), (top, top + new_h, left, left + new_w),
                             (new_h, new_w), None)
        # center_crop: shorter side to size, then the central square
        scale = size / min(height, width)
        new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
        left, top = (new_w - size) / 2 / scale, (new_h - size) / 2 / scale
        box = (left, top, left + size / scale, top + size / scale)  # crop in source coordinates
        return Placement(size, (scale, scale), (-top * scale, -left * scale), (0, size, 0, size), (size, size), box)

    def resize_gray(self, pixels: np.ndarray) -> np.ndarray:
        """2-D [0, 1] array → (input_size, input_size) float32 [0, 1], by the resize policy.

        Works on one channel in Pillow's float ("F") mode: no RGB round trip, no extra copies.
        """
        if pixels.ndim != 2:
            raise ValueError(f"expected a 2-D gray array, got shape {pixels.shape}")
        src = np.ascontiguousarray(pixels, dtype=np.float32)
        size = self.input_size
        resample = _INTERPOLATIONS[self.interpolation]
        image = Image.fromarray(src)  # float32 2-D → Pillow mode "F"
        where = self.placement(*src.shape)
        new_h, new_w = where.resized_hw
        # reducing_gap: box-reduce by an integer factor first (fast), then the antialiased filter.
        resized = np.asarray(image.resize((new_w, new_h), resample, box=where.source_box, reducing_gap=2.0),
                             dtype=np.float32)
        if (new_h, new_w) == (size, size):
            return resized
        out = np.full((size, size), self.pad_value, dtype=np.float32)
        y0, y1, x0, x1 = where.content
        out[y0:y1, x0:x1] = resized
        return out

    def normalize(self, resized: np.ndarray) -> np.ndarray:
        """(..., S, S) [0, 1] gray → (..., C, S, S) float32, channel c = (x - mean[c]) / std[c]."""
        x = np.asarray(resized, dtype=np.float32)
        scale = np.asarray([1.0 / s for s in self.std], dtype=np.float32)
        shift = np.asarray([m / s for m, s in zip(self.mean, self.std)], dtype=np.float32)
        expand = (slice(None),) + (None,) * 2
        return x[..., None, :, :] * scale[expand] - shift[expand]

    def apply(self, pixels: np.ndarray) -> np.ndarray:
        """2-D [0, 1] array → (C, S, S) float32 model input."""
        return self.normalize(self.resize_gray(pixels))

    def denormalize(self, tensor: np.ndarray) -> np.ndarray:
        """Model input (C, S, S) → (S, S) [0, 1] gray (channel 0), e.g. for overlays and inspection."""
        t = np.asarray(tensor, dtype=np.float32)
        return np.clip(t[..., 0, :, :] * self.std[0] + self.mean[0], 0.0, 1.0)


@dataclass(frozen=True)
class Placement:
    """How one image maps into the input square, per axis (y, x): input coordinate
    ``u = offset + t * scale`` for original coordinate ``t``; ``content`` = (y0, y1, x0, x1), the part
    of the square showing the image (the rest is padding); ``resized_hw`` the image's size in the
    square; ``source_box`` the crop window in original coordinates (centre crop only)."""

    size: int
    scale: tuple[float, float]
    offset: tuple[float, float]
    content: tuple[int, int, int, int]
    resized_hw: tuple[int, int]
    source_box: tuple[float, float, float, float] | None

    def to_input(self, y, x):
        """Original coordinates → input-square coordinates (arrays welcome)."""
        return self.offset[0] + np.asarray(y) * self.scale[0], self.offset[1] + np.asarray(x) * self.scale[1]

    def to_original(self, u, v):
        """Input-square coordinates → original coordinates (the inverse of :meth:`to_input`)."""
        return (np.asarray(u) - self.offset[0]) / self.scale[0], (np.asarray(v) - self.offset[1]) / self.scale[1]


def imagenet_spec(input_size: int = 224, **overrides) -> PreprocessSpec:
    """Spec matching torchvision's ImageNet weights (mean/std) at the given input size."""
    return PreprocessSpec(input_size=input_size, mean=IMAGENET_MEAN, std=IMAGENET_STD, **overrides)
