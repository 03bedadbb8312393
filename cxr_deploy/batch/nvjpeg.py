"""JPEG entropy decoding on the GPU (nvJPEG through ``torchvision.io.decode_jpeg(device="cuda")``),
for ``--preprocess-on device`` when the model runs on CUDA; the CPU decoder (Pillow) is the fallback.

Kept apart and small: it cannot run without a GPU (``tests/batch/test_batch_cuda.py`` covers it on a
GPU box and skips elsewhere). Not exact: nvJPEG's IDCT and its gray conversion (the Y channel) may
differ from libjpeg-turbo + Pillow's ``convert("L")`` by one gray level (1/255 ≈ 0.017 per
normalized pixel), above the 1e-3 parity of the other device paths; decisions on the shared CXRs
are still to be compared on a GPU. Not wired into the workers yet (they would send JPEG bytes
instead of decoded samples for files without EXIF rotation; JPEG-baseline DICOM frames likewise).
nvImageCodec (JPEG 2000, HTJ2K, lossless JPEG on the GPU) would be the optional extra for DICOM
codecs beyond baseline JPEG; not added.
"""

from __future__ import annotations

import numpy as np
import torch


def gpu_jpeg_available() -> bool:
    try:
        from torchvision.io import decode_jpeg  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


def decode_jpeg_gray(data: bytes, device: str | torch.device = "cuda") -> torch.Tensor:
    """JPEG bytes → (H, W) uint8 gray on ``device``: nvJPEG when it can, else Pillow on the CPU
    (then copied to ``device``). Raises only what Pillow raises for a corrupt file."""
    device = torch.device(device)
    if device.type == "cuda" and gpu_jpeg_available():
        from torchvision.io import ImageReadMode, decode_jpeg

        try:
            encoded = torch.frombuffer(bytearray(data), dtype=torch.uint8)
            return decode_jpeg(encoded, mode=ImageReadMode.GRAY, device=device)[0]
        except RuntimeError:  # progressive/CMYK/12-bit and other streams nvJPEG refuses
            pass
    import io

    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        gray = np.asarray(image.convert("L"))
    return torch.from_numpy(gray.copy()).to(device)
