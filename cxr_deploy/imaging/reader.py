"""The one entry point for turning a file into pixels: :func:`read_image`.

Output contract, whatever the input: a 2-D ``float32`` array in [0, 1], display-ready grayscale
(brighter = denser tissue, as a radiologist sees it), plus :class:`ImageMeta`. Any failure is an
:class:`~cxr_deploy.errors.UnreadableImage` with a one-line reason; any other exception is a bug.
"""

from __future__ import annotations

import errno
import stat
from pathlib import Path

import numpy as np

from ..errors import NotAnImage, UnreadableImage
from . import detect
from .meta import DEFAULT_MAX_PIXELS, DecodedImage
from .pixel_plan import StoredImage, apply_plan


def read_image(
    path: str | Path,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    include_identifiers: bool = False,
    eligibility=None,
) -> DecodedImage:
    """Read a PNG, JPEG or DICOM file (format detected from content) into [0, 1] gray.

    ``eligibility``: a :class:`cxr_deploy.eligibility.ChestFilter`, given by every path that reads
    an image to score it; a DICOM whose header fails it raises :class:`~cxr_deploy.errors.NotEligible`
    before any pixel is decoded (PNG/JPEG carry no such metadata and pass), and any image that is
    blank or saturated as displayed raises :class:`~cxr_deploy.errors.UnreadableImage`
    (:func:`cxr_deploy.eligibility.blank_reason`).
    """
    image = read_stored(path, max_pixels=max_pixels, include_identifiers=include_identifiers,
                        eligibility=eligibility)
    return DecodedImage(gray_from_stored(image, Path(path)), image.meta)


def read_stored(
    path: str | Path,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    include_identifiers: bool = False,
    eligibility=None,
) -> StoredImage:
    """:func:`read_image` without the float work: the stored samples (uint8/uint16, as small as the
    file holds them) and the :class:`~.pixel_plan.PixelPlan` that :func:`gray_from_stored` (numpy)
    or :mod:`.pixel_transforms_torch` (batches on the model's device) runs. Same checks and errors."""
    path = Path(path)
    fmt = _sniff(path)
    if fmt == detect.DICOM:
        from .dicom import read_dicom_stored  # pydicom import costs ~0.1 s; only pay it when needed

        image = read_dicom_stored(path, max_pixels=max_pixels, include_identifiers=include_identifiers,
                                  eligibility=eligibility)
    else:
        from .raster import read_raster_stored

        image = read_raster_stored(path, fmt, max_pixels=max_pixels)
    if eligibility is not None:  # to be scored: never a blank or saturated image
        from ..eligibility import blank_reason

        reason = blank_reason(display_sample(image, path))
        if reason:
            raise UnreadableImage(path, reason)
    return image


def display_sample(image: StoredImage, path: Path) -> np.ndarray:
    """The display image (what :func:`gray_from_stored` gives) at every k-th pixel, at most
    ``CONTENT_SAMPLE_SIDE`` per side: the plan's steps are per pixel (``minmax`` aside: it stretches
    the sample's own range), so this is a sample of the full image, for 2-3 ms a file (1024² and
    1416² 16-bit DICOMs, on 2 busy cores) instead of the whole float conversion (which
    ``--preprocess-on device`` leaves to the GPU)."""
    import math

    from ..eligibility import CONTENT_SAMPLE_SIDE

    stored = image.stored
    step = max(1, math.ceil(max(stored.shape[:2]) / CONTENT_SAMPLE_SIDE))
    return gray_from_stored(StoredImage(stored[::step, ::step], image.plan, image.meta), path)


def gray_from_stored(image: StoredImage, path: Path) -> np.ndarray:
    """The float half of :func:`read_image`: the plan by the numpy transforms, then the final clip."""
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. exp overflow in a SIGMOID window: saturates, as it should
            pixels = apply_plan(image.stored, image.plan)
    except Exception as exc:  # malformed windows in real files: report, never crash a batch
        raise UnreadableImage(path, f"cannot convert pixels to gray ({type(exc).__name__}: {exc})") from None
    return _finalize(pixels, path)


def _sniff(path: Path) -> str:
    try:
        if path.is_dir():
            raise UnreadableImage(path, "is a folder, not a file")
        st = path.stat()
    except FileNotFoundError:
        raise UnreadableImage(path, "file not found") from None
    except PermissionError:
        raise UnreadableImage(path, "permission denied") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UnreadableImage(path, "symbolic link loop (the link never reaches a file)") from None
        raise UnreadableImage(path, f"cannot open file: {exc.strerror or exc}") from None
    if not stat.S_ISREG(st.st_mode):
        # A named pipe or device would block or never end: refuse before opening it.
        raise UnreadableImage(path, "not a regular file (named pipe, socket or device)")
    if st.st_size == 0:
        raise UnreadableImage(path, "empty file (0 bytes)")
    try:
        fmt = detect.sniff_file(path)
    except OSError as exc:
        raise UnreadableImage(path, f"cannot open file: {exc.strerror or exc}") from None
    if fmt is None:
        raise NotAnImage(path, "not an image: content is not PNG, JPEG or DICOM")
    return fmt


def _finalize(pixels: np.ndarray, path: Path) -> np.ndarray:
    if pixels.ndim != 2 or pixels.size == 0:
        raise UnreadableImage(path, f"decoded to an unusable array of shape {pixels.shape}")
    if pixels.dtype != np.float32:
        pixels = pixels.astype(np.float32)
    # Every transform already clips to [0, 1]; this is the cheap safety net (two reductions instead of
    # a full isfinite + clip pass). NaN fails both comparisons, so float DICOM NaN/inf lands below.
    lo, hi = pixels.min(), pixels.max()
    if lo >= 0.0 and hi <= 1.0:
        return pixels
    pixels = np.nan_to_num(pixels, nan=0.0, posinf=1.0, neginf=0.0)
    return np.clip(pixels, 0.0, 1.0, out=pixels)
