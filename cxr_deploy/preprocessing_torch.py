""":meth:`PreprocessSpec.resize_gray` and :meth:`PreprocessSpec.normalize` as batched torch ops on
the model's device (CUDA when the model runs there, CPU tensors otherwise: the same code).

The spec stays the one definition of the geometry (:meth:`PreprocessSpec.placement`); this module
reproduces *how* Pillow resamples, so both paths give the model the same input:

1. Pillow's ``reducing_gap=2.0``: when the image is at least 2× the target size per axis, Pillow first
   box-averages ``factor = int(in / out / 2)`` pixel blocks (``Image.reduce``; the last, partial
   block of a row or column averages only the pixels it has). Here: ``avg_pool2d`` with
   ``ceil_mode=True``, which divides an edge window by the pixels inside the image, as Pillow does.
2. Pillow then resamples the reduced image with its antialiased filter over the box
   ``(0, 0, W / factor, H / factor)`` — a fractional box when ``W`` is not a multiple of the factor.
   ``torch.nn.functional.interpolate(..., antialias=True)`` implements Pillow's separable
   algorithm; with ``scale_factor = out / (in / factor)`` and ``recompute_scale_factor=False`` it
   places its sampling centres exactly where Pillow does for that box, and the output is cut to
   the target size.

Skipping step 1 (plain ``interpolate`` with antialias from the full image) differs from Pillow by
0.15 per normalized pixel on a real 1974×2102 film (2.0e-5 with it), 150× the parity target of
1e-3; ``tests/test_preprocessing_torch.py`` prints both.
Supported: the ``letterbox`` policy with ``bilinear`` or ``bicubic`` interpolation (the bundles'
default and the only policies whose box starts at the origin); :func:`device_support` says why not
otherwise, and the batch runner keeps such bundles on the worker path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .preprocessing import PreprocessSpec

REDUCING_GAP = 2.0  # what PreprocessSpec.resize_gray passes to Pillow
_MODES = {"bilinear": "bilinear", "bicubic": "bicubic"}


def device_support(spec: PreprocessSpec) -> str | None:
    """``None`` when :func:`resize_gray` reproduces ``spec.resize_gray``; else why not."""
    if spec.resize != "letterbox":
        return f"resize policy {spec.resize!r} (only letterbox runs on the device)"
    if spec.interpolation not in _MODES:
        return f"interpolation {spec.interpolation!r} (only bilinear or bicubic run on the device)"
    return None


def reduce_factors(height: int, width: int, new_h: int, new_w: int, gap: float = REDUCING_GAP) -> tuple[int, int]:
    """Pillow's ``Image.resize`` reduce factors (y, x) for a full-image box."""
    return int(height / new_h / gap) or 1, int(width / new_w / gap) or 1


def resize_gray(gray: torch.Tensor, spec: PreprocessSpec, reduce: bool = True) -> torch.Tensor:
    """(N, H, W) float32 [0, 1], all of one size → (N, S, S), as ``spec.resize_gray`` per image.

    ``reduce=False`` skips Pillow's box reduction (only for measuring what it is worth)."""
    reason = device_support(spec)
    if reason:
        raise ValueError(f"cannot resize on the device: {reason}")
    n, height, width = gray.shape
    where = spec.placement(height, width)
    new_h, new_w = where.resized_hw
    size = spec.input_size
    x = gray[:, None]
    if (new_h, new_w) != (height, width):
        fy, fx = reduce_factors(height, width, new_h, new_w) if reduce else (1, 1)
        if fy > 1 or fx > 1:
            x = F.avg_pool2d(x, (fy, fx), stride=(fy, fx), ceil_mode=True, count_include_pad=False)
        # Output size = floor(in * scale); 600 * (207 / 600) is 206.999…, so nudge the scale up by
        # 1e-9 (it moves sampling centres by < 1e-6 pixel) and cut to the target size.
        scale = (new_h / (height / fy) * (1 + 1e-9), new_w / (width / fx) * (1 + 1e-9))
        x = F.interpolate(x, scale_factor=scale, mode=_MODES[spec.interpolation], align_corners=False,
                          antialias=True, recompute_scale_factor=False)[..., :new_h, :new_w]
    if (new_h, new_w) == (size, size):
        return x[:, 0]
    out = torch.full((n, size, size), float(spec.pad_value), dtype=torch.float32, device=gray.device)
    y0, y1, x0, x1 = where.content
    out[:, y0:y1, x0:x1] = x[:, 0]
    return out


def normalize(resized: torch.Tensor, spec: PreprocessSpec) -> torch.Tensor:
    """(N, S, S) [0, 1] gray → (N, C, S, S), channel c = (x - mean[c]) / std[c] (as the numpy spec)."""
    scale = torch.tensor([1.0 / s for s in spec.std], dtype=torch.float32, device=resized.device)
    shift = torch.tensor([m / s for m, s in zip(spec.mean, spec.std)], dtype=torch.float32, device=resized.device)
    return resized[:, None] * scale[:, None, None] - shift[:, None, None]
