"""Hand-built DICOMs with known pixels: rescale -> window -> MONOCHROME1 inversion, in that order."""

import numpy as np
import pytest

from cxr_deploy.errors import UnreadableImage
from cxr_deploy.imaging import read_image

STORED = np.array([[0, 100, 200, 300], [400, 500, 600, 4095]], dtype=np.uint16)


def _expected_linear(values, c, w):
    out = np.empty(values.shape, dtype=np.float64)
    for i, v in np.ndenumerate(values.astype(np.float64)):
        if v <= c - 0.5 - (w - 1) / 2:
            out[i] = 0.0
        elif v > c - 0.5 + (w - 1) / 2:
            out[i] = 1.0
        else:
            out[i] = (v - (c - 0.5)) / (w - 1) + 0.5
    return out


def test_rescale_then_window(make_dicom):
    slope, intercept, c, w = 2.0, -100.0, 500.0, 600.0
    path = make_dicom(STORED, bits_stored=12, RescaleSlope=slope, RescaleIntercept=intercept,
                      WindowCenter=c, WindowWidth=w)
    img = read_image(path)
    expected = _expected_linear(STORED * slope + intercept, c, w)
    np.testing.assert_allclose(img.pixels, expected, atol=1e-6)
    assert img.meta.voi.startswith("window(")


def test_monochrome1_inverts_after_window(make_dicom):
    slope, intercept, c, w = 2.0, -100.0, 500.0, 600.0
    common = dict(bits_stored=12, RescaleSlope=slope, RescaleIntercept=intercept, WindowCenter=c, WindowWidth=w)
    mono1 = read_image(make_dicom(STORED, photometric="MONOCHROME1", **common)).pixels
    mono2 = read_image(make_dicom(STORED, photometric="MONOCHROME2", **common)).pixels
    np.testing.assert_allclose(mono1, 1.0 - mono2, atol=1e-6)
    # The known bug: inverting stored values before windowing gives a different picture.
    wrong = _expected_linear((4095 - STORED) * slope + intercept, c, w)
    assert np.abs(mono1 - wrong).max() > 0.1


def test_multiple_windows_uses_first(make_dicom):
    path = make_dicom(STORED, bits_stored=12, WindowCenter=[300, 2000], WindowWidth=[200, 4000])
    np.testing.assert_allclose(read_image(path).pixels, _expected_linear(STORED, 300, 200), atol=1e-6)


def test_no_window_16bit_is_min_max(make_dicom):
    img = read_image(make_dicom(STORED, bits_stored=12))
    np.testing.assert_allclose(img.pixels, STORED / 4095.0, atol=1e-6)  # data span 0..4095
    assert img.meta.voi.startswith("minmax")


def test_no_window_8bit_scales_by_bit_depth(make_dicom):
    pixels = np.array([[10, 20], [30, 40]], dtype=np.uint8)
    img = read_image(make_dicom(pixels))
    np.testing.assert_allclose(img.pixels, pixels / 255.0, atol=1e-6)


def test_signed_pixels_with_rescale(make_dicom):
    stored = np.array([[-1000, 0], [500, 1000]], dtype=np.int16)
    path = make_dicom(stored, RescaleSlope=1.0, RescaleIntercept=-24.0, WindowCenter=0.0, WindowWidth=2000.0)
    np.testing.assert_allclose(read_image(path).pixels, _expected_linear(stored - 24.0, 0.0, 2000.0), atol=1e-6)


def test_rgb_dicom_becomes_luma(make_dicom):
    rgb = np.zeros((2, 2, 3), dtype=np.uint8)
    rgb[..., 0] = 255
    img = read_image(make_dicom(rgb, photometric="RGB"))
    np.testing.assert_allclose(img.pixels, 0.299, atol=1e-5)
    assert img.pixels.ndim == 2


def test_voi_lut_sequence_takes_precedence_over_window(make_dicom):
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    item = Dataset()
    item.LUTDescriptor = [4, 0, 8]
    item.add_new(0x00283006, "US", [0, 50, 100, 255])  # LUTData as US (it is US or OW)
    stored = np.array([[0, 1], [2, 3]], dtype=np.uint16)
    path = make_dicom(stored, VOILUTSequence=Sequence([item]), WindowCenter=1000, WindowWidth=10)
    np.testing.assert_allclose(read_image(path).pixels, np.array([[0, 50], [100, 255]]) / 255.0, atol=1e-6)


def test_metadata_without_identifiers_unless_asked(make_dicom):
    path = make_dicom(STORED, bits_stored=12, ViewPosition="PA", BodyPartExamined="CHEST")
    meta = read_image(path).meta
    assert meta.sop_instance_uid and meta.study_instance_uid and meta.series_instance_uid
    assert (meta.modality, meta.view_position, meta.body_part_examined) == ("DX", "PA", "CHEST")
    assert meta.identifiers is None and "Doe" not in repr(meta.to_dict())
    with_ids = read_image(path, include_identifiers=True).meta
    assert with_ids.identifiers["PatientID"] == "PID-123"


def test_multiframe_reads_first_frame_and_says_so(make_dicom):
    frames = np.stack([np.full((3, 4), 10, np.uint8), np.full((3, 4), 200, np.uint8)])
    path = make_dicom(frames.reshape(6, 4), NumberOfFrames=2)  # written as 2 frames of 3x4
    import pydicom

    ds = pydicom.dcmread(path)
    ds.Rows = 3
    ds.save_as(path)
    img = read_image(path)
    assert img.meta.frames == 2 and img.meta.multi_frame and img.meta.frame_index == 0
    np.testing.assert_allclose(img.pixels, 10 / 255.0, atol=1e-6)


def test_dicom_without_preamble_or_extension_is_detected(make_dicom):
    path = make_dicom(STORED, name="IM0001", bits_stored=12, preamble=False)
    assert path.read_bytes()[128:132] != b"DICM"
    img = read_image(path)
    assert img.meta.format == "dicom" and img.pixels.shape == STORED.shape


def test_huge_claimed_dicom_size_is_refused_before_decoding(make_dicom):
    path = make_dicom(STORED, bits_stored=12)
    import pydicom

    ds = pydicom.dcmread(path)
    ds.Rows, ds.Columns = 60000, 60000
    ds.save_as(path)
    with pytest.raises(UnreadableImage, match="pixel limit"):
        read_image(path)


def test_no_pixel_data_is_a_clear_error(make_dicom):
    path = make_dicom(STORED)
    import pydicom

    ds = pydicom.dcmread(path)
    del ds.PixelData
    ds.save_as(path)
    with pytest.raises(UnreadableImage, match="no pixel data"):
        read_image(path)
