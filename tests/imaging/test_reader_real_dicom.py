"""The real DICOM corpus in ../shared/data/dicom: every file reads or fails with the typed error."""

import numpy as np
import pytest

from cxr_deploy.errors import UnreadableImage
from cxr_deploy.imaging import read_image


def test_every_manifest_file_reads_or_raises_typed_error(shared_data, dicom_manifest):
    read, refused, must_read_failed = 0, 0, []
    for row in dicom_manifest:
        path = shared_data / "dicom" / row["file"]
        try:
            img = read_image(path)
        except UnreadableImage as exc:  # anything else propagates and fails the test
            refused += 1
            assert exc.reason and "\n" not in exc.reason
            if row["decode_status"] == "ok":
                must_read_failed.append((row["file"], exc.reason))
            continue
        read += 1
        assert img.pixels.ndim == 2 and img.pixels.dtype == np.float32
        assert 0.0 <= float(img.pixels.min()) and float(img.pixels.max()) <= 1.0
        assert np.isfinite(img.pixels).all()
    assert not must_read_failed, must_read_failed
    assert read >= 180 and refused >= 60


LOSSLESS_VARIANTS = ["MR_small_RLE.dcm", "MR_small_jp2klossless.dcm", "MR_small_jpeg_ls_lossless.dcm",
                     "MR_small_bigendian.dcm", "MR_small_implicit.dcm", "MR_small_expb.dcm"]


@pytest.mark.parametrize("variant", LOSSLESS_VARIANTS)
def test_lossless_and_byte_order_variants_decode_identically(shared_data, variant):
    base = read_image(shared_data / "dicom" / "pydicom_test_files" / "MR_small.dcm").pixels
    other = read_image(shared_data / "dicom" / "pydicom_test_files" / variant).pixels
    np.testing.assert_allclose(other, base, atol=1e-6)


def test_lossy_jpeg_variant_agrees_within_codec_tolerance(shared_data):
    folder = shared_data / "dicom" / "pydicom_test_files"
    rle = read_image(folder / "SC_rgb_rle.dcm").pixels
    jpeg = read_image(folder / "SC_rgb_jpeg_dcmtk.dcm").pixels  # YBR_FULL baseline JPEG of the same image
    assert np.abs(rle - jpeg).mean() < 0.02


def test_real_monochrome1_equals_inverted_monochrome2(shared_data):
    folder = shared_data / "dicom" / "torchxrayvision"
    mono2 = read_image(folder / "1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm")
    mono1 = read_image(folder / "Fake_MONOHR1.dcm")  # same pixels, relabelled MONOCHROME1
    assert (mono1.meta.photometric, mono2.meta.photometric) == ("MONOCHROME1", "MONOCHROME2")
    np.testing.assert_allclose(mono1.pixels, 1.0 - mono2.pixels, atol=1e-6)


def test_real_cr_chest_monochrome1_jpeg2000(shared_data):
    img = read_image(shared_data / "dicom" / "pydicom_data" / "RG1_J2KI.dcm")
    assert img.meta.photometric == "MONOCHROME1" and img.meta.body_part_examined == "CHEST"
    # MONOCHROME1 inverted for display: the lungs (dense air = dark) are darker than the mediastinum.
    h, w = img.pixels.shape
    centre = img.pixels[h // 3: 2 * h // 3, w // 2 - w // 20: w // 2 + w // 20].mean()
    lungs = np.mean([img.pixels[h // 3: 2 * h // 3, w // 5: w // 3].mean(),
                     img.pixels[h // 3: 2 * h // 3, 2 * w // 3: 4 * w // 5].mean()])
    assert centre > lungs


def test_broken_j2k_is_refused_and_fixed_copy_reads(shared_data):
    folder = shared_data / "dicom" / "pylibjpeg_data" / "JPEG2000Lossless"
    with pytest.raises(UnreadableImage, match="JPEG 2000"):
        read_image(folder / "966.dcm")
    assert read_image(folder / "966_fixed.dcm").pixels.size > 0


def test_truncated_and_no_pixel_files_have_clear_reasons(shared_data):
    folder = shared_data / "dicom" / "pydicom_test_files"
    with pytest.raises(UnreadableImage, match="truncated"):
        read_image(folder / "MR_truncated.dcm")
    with pytest.raises(UnreadableImage, match="no pixel data"):
        read_image(folder / "rtstruct.dcm")


def test_valid_12_bit_lossy_jpeg_is_not_called_corrupt(shared_data):
    """NEMA/GDCM's 12-bit JPEG Extended bone scan is valid (imagecodecs and DCMTK decode it), but
    no decoder pydicom can use here reads it: the reason must say that, not "corrupt"."""
    from cxr_deploy.errors import UnreadableImage
    from cxr_deploy.imaging import read_image

    with pytest.raises(UnreadableImage) as info:
        read_image(shared_data / "dicom" / "pydicom_test_files" / "JPEG-lossy.dcm")
    reason = info.value.reason
    assert "corrupt" not in reason
    assert "no installed decoder reads this 12-bit lossy JPEG" in reason and "dcmdjpeg" in reason
    assert "1.2.840.10008.1.2.4.51" in reason and "\n" not in reason


def test_a_missing_decoder_names_what_to_install_in_pydicoms_words(shared_data, monkeypatch):
    """The advice comes from pydicom's decoder (``missing_dependencies``), not from a table of ours
    that drifts from the plugins pydicom really has."""
    from pydicom.pixels import get_decoder
    from pydicom.uid import JPEGLSLossless

    decoder = get_decoder(JPEGLSLossless)
    assert isinstance(decoder.missing_dependencies, list)  # the public API this relies on
    monkeypatch.setattr(decoder, "_available", {})  # as if neither plugin were installed here
    monkeypatch.setattr(decoder, "_unavailable", {"pylibjpeg": ("pylibjpeg>=2.0", "pylibjpeg-libjpeg>=2.1"),
                                                  "pyjpegls": ("pyjpegls>=1.0",)})
    with pytest.raises(UnreadableImage) as exc:
        read_image(shared_data / "dicom" / "pydicom_test_files" / "MR_small_jpeg_ls_lossless.dcm")
    assert exc.value.reason.endswith("install one of: pylibjpeg - requires pylibjpeg>=2.0 and "
                                     "pylibjpeg-libjpeg>=2.1; pyjpegls - requires pyjpegls>=1.0"), exc.value.reason
