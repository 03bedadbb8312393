"""PNG/JPEG modes to one gray channel; malformed inputs raise UnreadableImage with a clear reason."""

import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from cxr_deploy.errors import NotAnImage, UnreadableImage
from cxr_deploy.imaging import read_image

GRAY = (np.arange(64 * 48).reshape(48, 64) % 256).astype(np.uint8)


def _save(tmp_path, image, name):
    path = tmp_path / name
    image.save(path)
    return path


@pytest.mark.parametrize("mode", ["L", "LA", "RGB", "RGBA", "P"])
def test_png_modes_become_the_same_gray(tmp_path, mode):
    base = Image.fromarray(GRAY)
    if mode == "P":
        image = base.convert("P")  # palette of grays: exact
    else:
        image = base.convert(mode)
    img = read_image(_save(tmp_path, image, f"x_{mode}.png"))
    assert img.pixels.shape == GRAY.shape and img.pixels.dtype == np.float32
    np.testing.assert_allclose(img.pixels, GRAY / 255.0, atol=1 / 255 + 1e-6)
    assert img.meta.photometric == mode


def test_16bit_png_keeps_precision(tmp_path):
    values = (np.arange(32 * 32).reshape(32, 32) * 64).astype(np.uint16)
    path = _save(tmp_path, Image.fromarray(values), "x16.png")
    img = read_image(path)
    assert img.meta.bits_stored == 16
    np.testing.assert_allclose(img.pixels, values / 65535.0, atol=1e-6)


def test_colour_jpeg_is_converted_to_gray(tmp_path):
    rgb = np.stack([GRAY] * 3, axis=-1)
    path = tmp_path / "colour.jpg"
    Image.fromarray(rgb).save(path, quality=95)
    gray_path = tmp_path / "gray.jpg"
    Image.fromarray(GRAY).save(gray_path, quality=95)
    a, b = read_image(path), read_image(gray_path)
    assert a.pixels.ndim == 2 and a.meta.photometric == "RGB"
    assert np.abs(a.pixels - b.pixels).mean() < 0.02


def test_format_comes_from_content_not_extension(tmp_path):
    path = tmp_path / "actually_png.dcm"
    Image.fromarray(GRAY).save(path, format="PNG")
    assert read_image(path).meta.format == "png"
    no_ext = tmp_path / "IMG0001"
    Image.fromarray(GRAY).save(no_ext, format="JPEG")
    assert read_image(no_ext).meta.format == "jpeg"


def test_empty_file(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(UnreadableImage, match="empty"):
        read_image(tmp_path / "empty.png")


def test_truncated_png(tmp_path):
    full = _save(tmp_path, Image.fromarray(np.random.RandomState(0).randint(0, 255, (200, 200), np.uint8)), "a.png")
    cut = tmp_path / "cut.png"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    with pytest.raises(UnreadableImage, match="truncated|corrupt"):
        read_image(cut)


def test_random_bytes_are_not_an_image(tmp_path):
    path = tmp_path / "noise.dcm"
    path.write_bytes(np.random.RandomState(1).bytes(4096))
    with pytest.raises(NotAnImage, match="not an image"):
        read_image(path)


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(UnreadableImage, match="not found"):
        read_image(tmp_path / "nope.png")
    with pytest.raises(UnreadableImage, match="folder"):
        read_image(tmp_path)


def _png_with_claimed_size(width, height):
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_huge_claimed_png_refused_before_decoding(tmp_path):
    path = tmp_path / "bomb.png"
    path.write_bytes(_png_with_claimed_size(100_000, 100_000))
    with pytest.raises(UnreadableImage, match="pixel limit"):
        read_image(path)


def test_pixel_limit_is_configurable(tmp_path):
    path = _save(tmp_path, Image.fromarray(GRAY), "small.png")
    with pytest.raises(UnreadableImage, match="pixel limit"):
        read_image(path, max_pixels=100)
