"""Without a GPU the JPEG decode of --preprocess-on device falls back to Pillow, exactly."""

from __future__ import annotations

import numpy as np
from PIL import Image

from cxr_deploy.batch.nvjpeg import decode_jpeg_gray


def test_cpu_fallback_is_pillows_decode(shared_data):
    path = sorted((shared_data / "cxr" / "NORMAL").glob("*.jpeg"))[0]
    gray = decode_jpeg_gray(path.read_bytes(), "cpu")
    assert gray.device.type == "cpu"
    np.testing.assert_array_equal(gray.numpy(), np.asarray(Image.open(path).convert("L")))
