"""PNG and JPEG through Pillow, always reduced to one gray channel.

Colour is converted to gray unconditionally: in the public pediatric CXR set every NORMAL image is
grayscale while some PNEUMONIA images are stored as RGB, so a model that sees the colour mode can
learn the label from it.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import UnreadableImage
from .meta import ImageMeta, check_pixel_limit
from .pixel_plan import PixelPlan, StoredImage

_SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I"}


def read_raster_stored(path: Path, fmt: str, *, max_pixels: int) -> StoredImage:
    """The integer half of reading a PNG/JPEG (:func:`.reader.gray_from_stored` is the float half):
    decoded, EXIF-rotated, one channel (Pillow's ``L``), as stored; the plan scales it by its bit
    depth (min-max for float images)."""
    label = fmt.upper()
    try:
        with warnings.catch_warnings():
            # Our own pixel limit below is the guard; Pillow's warning would only add noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(path)
            check_pixel_limit(path, image.height, image.width, 1, max_pixels)
            image.load()
    except UnreadableImage:
        raise
    except Image.DecompressionBombError as exc:
        # Pillow's own guard fires at open() for absurd sizes (> ~179 MP), before ours can.
        raise UnreadableImage(path, f"{label} claims a size over the pixel limit (decompression-bomb "
                                    f"guard): {exc}") from None
    except UnidentifiedImageError:
        raise UnreadableImage(path, f"corrupt {label}: header not recognised") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        reason = str(exc) or type(exc).__name__
        if "truncated" in reason.lower() or isinstance(exc, EOFError):
            raise UnreadableImage(path, f"truncated {label}: {reason}") from None
        raise UnreadableImage(path, f"corrupt {label}: {reason}") from None

    mode = image.mode
    shape = (image.height, image.width) + ((len(image.getbands()),) if len(image.getbands()) > 1 else ())
    if fmt == "jpeg":
        image = ImageOps.exif_transpose(image)  # camera/phone captures carry an orientation tag
    if mode in _SIXTEEN_BIT_MODES:
        stored, plan, bits = np.asarray(image), PixelPlan("bits", bits=16), 16
    elif mode == "F":
        stored, plan, bits = np.asarray(image), PixelPlan("minmax"), 32
    else:
        if mode != "L":
            image = image.convert("L")  # BT.601 luma; alpha is dropped
        stored, plan, bits = np.asarray(image), PixelPlan("bits", bits=8), 8
    meta = ImageMeta(
        path=str(path), format=fmt, original_shape=shape, photometric=mode, bits_stored=bits,
        voi="bit_depth" if mode != "F" else "minmax",
    )
    return StoredImage(stored, plan, meta)
