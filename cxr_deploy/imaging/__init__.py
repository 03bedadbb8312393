"""Reading PNG/JPEG/DICOM files into display-ready grayscale arrays.

- :mod:`.detect`: what a file is, from its first bytes (never from its extension).
- :mod:`.pixel_transforms`: pure array transforms (rescale, window, LUT scale, inversion, colour→gray).
- :mod:`.pixel_plan`: the float steps from stored samples to gray, as data (:class:`PixelPlan`).
- :mod:`.pixel_transforms_torch`: the same plan on batches of tensors on the model's device.
- :mod:`.raster`: PNG/JPEG through Pillow.
- :mod:`.dicom`: DICOM through pydicom (+ pylibjpeg decoders).
- :mod:`.meta`: :class:`ImageMeta` (what the reader saw) and the pixel-count guard.
- :mod:`.reader`: the one entry point, :func:`read_image`.
- :mod:`.scan`: walking folders into a deterministic list of candidate files.
"""

from .meta import DEFAULT_MAX_PIXELS, DecodedImage, ImageMeta
from .reader import read_image
from .scan import ScanEntry, scan_paths

__all__ = ["DecodedImage", "ImageMeta", "read_image", "DEFAULT_MAX_PIXELS", "ScanEntry", "scan_paths"]
