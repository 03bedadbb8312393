"""The transforms of :mod:`.pixel_transforms` on torch tensors, on whatever device they live.

Same formulas, same float32 arithmetic, same order; :mod:`.pixel_transforms` stays the definition
and ``tests/imaging/test_pixel_transforms_torch.py`` checks each function here against its numpy
twin. Tensors are one image ``(H, W)`` (``(H, W, 3)`` for colour) or a stack ``(N, H, W)``; the
min-max range is taken per image. Imported only by the main process (workers never import torch).
"""

from __future__ import annotations

import torch

from . import pixel_transforms as px
from .pixel_plan import PixelPlan

_LUMA = tuple(float(v) for v in px._LUMA)


def rescale(values: torch.Tensor, slope: float = 1.0, intercept: float = 0.0) -> torch.Tensor:
    out = values.to(torch.float32, copy=True)
    if slope != 1.0:
        out.mul_(slope)
    if intercept != 0.0:
        out.add_(intercept)
    return out


def window(values: torch.Tensor, center: float, width: float, function: str = "LINEAR") -> torch.Tensor:
    function = (function or "LINEAR").upper()
    if function not in px.VOI_FUNCTIONS:
        raise ValueError(f"unknown VOI LUT function {function!r}")
    x = values.to(torch.float32)
    if function == "SIGMOID":
        if width <= 0:
            raise ValueError(f"window width must be > 0 for SIGMOID, got {width}")
        return 1.0 / (1.0 + torch.exp(-4.0 * (x - center) / width))
    if function == "LINEAR_EXACT":
        if width <= 0:
            raise ValueError(f"window width must be > 0, got {width}")
        return (x * (1.0 / width) + (0.5 - center / width)).clamp_(0.0, 1.0)
    if width < 1:
        raise ValueError(f"window width must be >= 1 for LINEAR, got {width}")
    if width == 1:
        return (x > center - 0.5).to(torch.float32)
    return (x * (1.0 / (width - 1)) + (0.5 - (center - 0.5) / (width - 1))).clamp_(0.0, 1.0)


def min_max(values: torch.Tensor) -> torch.Tensor:
    """Per image (the last two dimensions): the data's own range to [0, 1]; constant → zeros."""
    x = values.to(torch.float32)
    lo = x.amin(dim=(-2, -1), keepdim=True)
    hi = x.amax(dim=(-2, -1), keepdim=True)
    span = hi - lo
    return torch.where(span > 0, (x - lo) * (1.0 / torch.where(span > 0, span, 1.0)), 0.0)


def scale_by_bit_depth(values: torch.Tensor, bits: int) -> torch.Tensor:
    out = values.to(torch.float32) * (1.0 / (2 ** int(bits) - 1))
    unsigned = values.dtype in (torch.uint8, torch.uint16, torch.uint32, torch.uint64)
    if not unsigned or values.element_size() * 8 > int(bits):
        out.clamp_(0.0, 1.0)
    return out


def invert(unit: torch.Tensor) -> torch.Tensor:
    return 1.0 - unit.to(torch.float32)


def rgb_to_gray(rgb: torch.Tensor) -> torch.Tensor:
    if rgb.shape[-1] != 3:
        raise ValueError(f"expected 3 samples per pixel, got shape {tuple(rgb.shape)}")
    return rgb.to(torch.float32) @ torch.tensor(_LUMA, dtype=torch.float32, device=rgb.device)


def apply_plan(stored: torch.Tensor, plan: PixelPlan) -> torch.Tensor:
    """:func:`cxr_deploy.imaging.pixel_plan.apply_plan` on a tensor, then the reader's final clip
    (NaN → 0, ±inf → 1/0, [0, 1]), so the result is what ``read_image`` returns."""
    x = rgb_to_gray(stored) if plan.rgb else stored
    if plan.rescale is not None:
        x = rescale(x, *plan.rescale)
    if plan.voi == "window":
        x = window(x, plan.center, plan.width, plan.function)
    elif plan.voi == "bits":
        x = scale_by_bit_depth(x, plan.bits)
    elif plan.voi == "scale":
        x = x.to(torch.float32) * plan.factor
    elif plan.voi == "lut":
        x = (x.to(torch.float32) / plan.factor).clamp_(0.0, 1.0)
    else:
        x = min_max(x)
    if plan.invert:
        x = invert(x)
    return torch.nan_to_num(x, nan=0.0, posinf=1.0, neginf=0.0).clamp_(0.0, 1.0)
