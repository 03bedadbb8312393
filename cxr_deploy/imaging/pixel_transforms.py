"""Pure array transforms from stored pixel values to display-ready gray in [0, 1].

No file access and no pydicom objects here: every function takes arrays and numbers, so each step
is testable on hand-made values. The DICOM reader applies them in the order the standard's
grayscale pipeline prescribes (PS3.3 C.11 / PS3.4 N.2):

    stored value --Modality LUT--> modality value --VOI LUT/window--> [0, 1] --MONOCHROME1--> 1 - y

Inverting before VOI (as some tools do) gives the wrong picture whenever the window is not centred
on the data, so :func:`invert` must only ever see VOI output.
"""

from __future__ import annotations

import numpy as np

# ITU-R BT.601 luma weights: what Pillow's convert("L") uses, so a colour PNG and a colour DICOM of
# the same pixels become the same gray image.
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)

VOI_FUNCTIONS = ("LINEAR", "LINEAR_EXACT", "SIGMOID")


def rescale(values: np.ndarray, slope: float = 1.0, intercept: float = 0.0) -> np.ndarray:
    """Modality LUT given as RescaleSlope/RescaleIntercept: ``slope * x + intercept`` in float32."""
    out = values.astype(np.float32, copy=True)
    if slope != 1.0:
        out *= np.float32(slope)
    if intercept != 0.0:
        out += np.float32(intercept)
    return out


def window(values: np.ndarray, center: float, width: float, function: str = "LINEAR",
           out: np.ndarray | None = None) -> np.ndarray:
    """VOI window (PS3.3 C.11.2.1.2) mapped straight to [0, 1] (float32).

    LINEAR uses the standard's ``c - 0.5`` / ``w - 1`` form, LINEAR_EXACT the plain one, SIGMOID the
    logistic curve. The output range is [0, 1] instead of the standard's [ymin, ymax]. ``out`` may
    be ``values`` itself (a float32 buffer the caller owns) to avoid another full-size copy.
    """
    function = (function or "LINEAR").upper()
    if function not in VOI_FUNCTIONS:
        raise ValueError(f"unknown VOI LUT function {function!r}")
    x = np.asarray(values, dtype=np.float32)
    if function == "SIGMOID":
        if width <= 0:
            raise ValueError(f"window width must be > 0 for SIGMOID, got {width}")
        return (1.0 / (1.0 + np.exp(-4.0 * (x - center) / width))).astype(np.float32)
    if function == "LINEAR_EXACT":
        if width <= 0:
            raise ValueError(f"window width must be > 0, got {width}")
        return _affine_clip(x, 1.0 / width, 0.5 - center / width, out)
    if width < 1:
        raise ValueError(f"window width must be >= 1 for LINEAR, got {width}")
    if width == 1:  # degenerate window: a threshold at c - 0.5
        return (x > center - 0.5).astype(np.float32)
    # ((x - (c - 0.5)) / (w - 1) + 0.5) as one multiply-add: two passes over the image, not five.
    return _affine_clip(x, 1.0 / (width - 1), 0.5 - (center - 0.5) / (width - 1), out)


def _affine_clip(x: np.ndarray, scale: float, offset: float, out: np.ndarray | None) -> np.ndarray:
    y = np.multiply(x, np.float32(scale), out=out, dtype=np.float32)
    y += np.float32(offset)
    return np.clip(y, 0.0, 1.0, out=y)


def lut_full_scale(output_bits: int, data_max: float) -> float:
    """What a LUT's output (Modality or VOI LUT Sequence item, looked up by pydicom) is divided by to
    land in [0, 1]: the LUT's full scale ``2**bits - 1`` (PS3.3 C.11.2.1.1); when the data exceed the
    declared bit depth (a common encoder bug) the data's own maximum; never below 1."""
    return max(float(2 ** int(output_bits) - 1), float(data_max), 1.0)


def min_max(values: np.ndarray) -> np.ndarray:
    """Stretch the data's own range to [0, 1]; a constant image becomes all zeros."""
    x = np.asarray(values, dtype=np.float32)
    lo, hi = float(x.min()), float(x.max())
    if hi <= lo:
        return np.zeros_like(x, dtype=np.float32)
    out = x - np.float32(lo)
    out *= np.float32(1.0 / (hi - lo))
    return out


def scale_by_bit_depth(values: np.ndarray, bits: int) -> np.ndarray:
    """Unsigned integer samples of ``bits`` depth to [0, 1] (full scale = ``2**bits - 1``)."""
    values = np.asarray(values)
    out = np.multiply(values, np.float32(1.0 / (2 ** int(bits) - 1)), dtype=np.float32)
    if values.dtype.kind != "u" or values.dtype.itemsize * 8 > int(bits):
        np.clip(out, 0.0, 1.0, out=out)  # stray high bits / signed values; uint8 at 8 bits cannot overflow
    return out


def invert(unit: np.ndarray) -> np.ndarray:
    """MONOCHROME1 presentation: ``1 - y`` on VOI output in [0, 1] (never on raw values)."""
    return np.float32(1.0) - np.asarray(unit, dtype=np.float32)


def rgb_to_gray(rgb: np.ndarray) -> np.ndarray:
    """(..., H, W, 3) colour samples to (..., H, W) float32 luma, same scale as the input."""
    rgb = np.asarray(rgb)
    if rgb.shape[-1] != 3:
        raise ValueError(f"expected 3 samples per pixel, got shape {rgb.shape}")
    return (rgb.astype(np.float32) @ _LUMA).astype(np.float32, copy=False)
