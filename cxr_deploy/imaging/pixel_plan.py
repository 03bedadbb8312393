"""The float work between a file's stored samples and [0, 1] gray, as data: :class:`PixelPlan`.

A reader splits its job in two: the integer part (container parse, entropy decode, EXIF rotation,
Pillow's colour→``L`` conversion, LUT *lookups*, colour-palette expansion) gives the stored samples,
as small as they are (uint8/uint16); the float part — rescale, VOI window or LUT scaling, bit-depth
or min-max scaling, MONOCHROME1 inversion, colour→luma — is described by a frozen
:class:`PixelPlan`. :func:`apply_plan` runs a plan with the numpy functions of
:mod:`.pixel_transforms` (the definition of every transform, and what :func:`~.reader.read_image`
returns); :mod:`.pixel_transforms_torch` runs the same plan on batches of tensors on the model's
device. A plan is a few numbers, so it crosses a process boundary for free.

The steps, in the order the standard's grayscale pipeline prescribes (see :mod:`.pixel_transforms`):

    rgb→luma (colour only) → rescale (Modality) → voi: window | lut | bits | scale | minmax → invert
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import pixel_transforms as px

VOI_STEPS = ("window", "lut", "bits", "scale", "minmax")


@dataclass(frozen=True)
class PixelPlan:
    """What turns stored samples into [0, 1] gray (before the reader's final clip).

    - ``rgb``: samples are (H, W, 3); BT.601 luma first (in stored units).
    - ``rescale``: (slope, intercept) of the Modality step, or ``None`` (no float copy made); a
      Modality LUT Sequence is *looked up* by the reader (integer in, integer out) and leaves
      ``(1.0, 0.0)`` here, so the values become float32 as they always did.
    - ``voi``: ``window`` (``center``, ``width``, ``function``), ``lut`` (VOI LUT output, already
      looked up by the reader: ÷ ``factor`` = the LUT's full scale, then clip), ``bits``
      (:func:`~.pixel_transforms.scale_by_bit_depth` with ``bits``), ``scale`` (× ``factor``:
      colour luma by its bit depth) or ``minmax``.
    - ``invert``: MONOCHROME1, ``1 - y`` after VOI.
    """

    voi: str = "bits"
    bits: int = 8
    rgb: bool = False
    rescale: tuple[float, float] | None = None
    center: float = 0.0
    width: float = 0.0
    function: str = "LINEAR"
    factor: float = 1.0
    invert: bool = False

    def __post_init__(self):
        if self.voi not in VOI_STEPS:
            raise ValueError(f"voi must be one of {VOI_STEPS}, got {self.voi!r}")
        if self.voi == "window" and self.function not in px.VOI_FUNCTIONS:
            raise ValueError(f"unknown VOI LUT function {self.function!r}")


def apply_plan(stored: np.ndarray, plan: PixelPlan) -> np.ndarray:
    """Stored samples → float32 gray by ``plan``, with the numpy transforms (the reference)."""
    x = px.rgb_to_gray(stored) if plan.rgb else stored
    owned = plan.rgb  # a float32 buffer this function made, safe to overwrite
    if plan.rescale is not None:
        x, owned = px.rescale(x, *plan.rescale), True
    if plan.voi == "window":
        x = px.window(x, plan.center, plan.width, plan.function, out=x if owned else None)
    elif plan.voi == "bits":
        x = px.scale_by_bit_depth(x, plan.bits)
    elif plan.voi == "scale":
        x = np.asarray(x, dtype=np.float32) * np.float32(plan.factor)
    elif plan.voi == "lut":
        x = np.clip(np.asarray(x, dtype=np.float32) / np.float32(plan.factor), 0.0, 1.0)
    else:
        x = px.min_max(x)
    return px.invert(x) if plan.invert else x


@dataclass(frozen=True)
class StoredImage:
    """A file's stored samples (uint8/uint16/…, (H, W) or (H, W, 3)), its plan and what the reader saw."""

    stored: np.ndarray
    plan: PixelPlan
    meta: object  # an ImageMeta
