"""What the reader returns besides pixels (:class:`ImageMeta`, :class:`DecodedImage`) and the
decompression-bomb guard shared by every format's reader.

Its own module so the format readers (:mod:`.dicom`, :mod:`.raster`) and the entry point
(:mod:`.reader`) all import it, and never each other in a circle.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import UnreadableImage

# Decompression-bomb guard: 64 megapixels is twice the largest detector in clinical use (~43x43 cm
# at 0.1 mm ≈ 4300² ≈ 18.5 MP) with room to spare; anything larger is refused before decoding.
DEFAULT_MAX_PIXELS = 64_000_000


@dataclass(frozen=True)
class ImageMeta:
    """What the reader saw. Never holds patient identifiers unless explicitly asked for."""

    path: str
    format: str  # "png" | "jpeg" | "dicom"
    original_shape: tuple[int, ...]  # rows, cols[, samples] of the stored image (first frame)
    photometric: str | None = None  # DICOM PhotometricInterpretation, or Pillow mode for PNG/JPEG
    bits_stored: int | None = None
    transfer_syntax: str | None = None
    voi: str | None = None  # how stored values became [0, 1]: window/voi_lut/bit_depth/minmax/...
    frames: int = 1
    frame_index: int = 0  # multi-frame files: only this frame is read (see dicom.py)
    study_instance_uid: str | None = None
    series_instance_uid: str | None = None
    sop_instance_uid: str | None = None
    modality: str | None = None
    view_position: str | None = None
    body_part_examined: str | None = None
    patient_age_years: float | None = None  # PatientAge or StudyDate - PatientBirthDate (cxr_deploy.in_population)
    identifiers: dict[str, str] | None = field(default=None, repr=False)  # opt-in only

    @property
    def multi_frame(self) -> bool:
        return self.frames > 1

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["original_shape"] = list(self.original_shape)
        if self.identifiers is None:
            out.pop("identifiers")
        return out


@dataclass(frozen=True)
class DecodedImage:
    pixels: np.ndarray  # (H, W) float32 in [0, 1]
    meta: ImageMeta


def check_pixel_limit(path: Path, rows: int, cols: int, frames: int, max_pixels: int) -> None:
    """Refuse absurd claimed sizes before any decoding allocates memory for them."""
    if rows <= 0 or cols <= 0:
        raise UnreadableImage(path, f"invalid image size {rows}x{cols}")
    if rows * cols > max_pixels:
        raise UnreadableImage(
            path,
            f"image is {cols}x{rows} = {rows * cols:,} pixels, over the {max_pixels:,}-pixel limit "
            "(decompression-bomb guard; raise --max-pixels if the image is genuine)",
        )
