"""The VOI step against pydicom's own (``apply_windowing`` / ``apply_voi_lut``) as the oracle, on
the real DICOM corpus: what the reader makes of a windowed file is pydicom's window, rescaled from
its output range to [0, 1] (and inverted for MONOCHROME1).

pydicom's functions give float64 in the stored range, one image at a time; the project's
(:mod:`cxr_deploy.imaging.pixel_transforms`) give float32 in [0, 1] with one multiply-add, and run
the same plan on the GPU. The figures must not drift apart."""

from __future__ import annotations

import warnings

import numpy as np
import pydicom
import pytest
from pydicom.pixels import apply_modality_lut, apply_voi_lut, apply_windowing, pixel_array

from cxr_deploy.imaging import pixel_transforms as px
from cxr_deploy.imaging.reader import gray_from_stored, read_stored

ATOL = 1e-5  # float32 against float64: the real files agree to 1e-7


def _pydicom_modality(path, stored=None):
    """The header and pydicom's modality values: of ``stored`` (the reader's decoded samples, so a
    large JPEG 2000 is not decoded twice; a Modality LUT Sequence is already looked up in them), or
    of pydicom's own decode."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(path, force=True, stop_before_pixels=stored is not None)
        if stored is not None:
            return ds, stored if "ModalityLUTSequence" in ds else apply_modality_lut(stored, ds)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        return ds, apply_modality_lut(pixel_array(ds, index=0 if frames > 1 else None), ds)


def _pydicom_window_unit(values, ds) -> np.ndarray:
    """pydicom's window, from its output range [y_min, y_max] to [0, 1] (the range is whatever
    pydicom derives from the header: its window of -inf and +inf)."""
    lo, hi = apply_windowing(np.array([-1e12, 1e12]), ds)
    return (apply_windowing(values, ds) - lo) / (hi - lo)


def _windowed_files(dicom_manifest):
    """Grayscale files with a window, one per distinct (size, window, bits, rescale)."""
    seen, found = set(), []
    for row in dicom_manifest:
        if not row["window_center"] or row["decode_status"] != "ok" or \
                row["photometric"] not in ("MONOCHROME1", "MONOCHROME2"):
            continue
        key = tuple(row[k] for k in ("rows", "cols", "window_center", "window_width", "bits_stored",
                                     "pixel_representation", "rescale_slope", "rescale_intercept", "photometric"))
        if key not in seen:
            seen.add(key)
            found.append(row["file"])
    return found


def test_the_readers_window_is_pydicoms_on_real_files(shared_data, dicom_manifest):
    files = _windowed_files(dicom_manifest)
    assert len(files) >= 30, len(files)
    compared = []
    for name in files:
        path = shared_data / "dicom" / name
        image = read_stored(path)
        if image.plan.voi != "window":  # e.g. a VOI LUT Sequence wins over the window
            continue
        ds, modality = _pydicom_modality(path, image.stored)
        expected = _pydicom_window_unit(modality, ds)
        if ds.PhotometricInterpretation == "MONOCHROME1":
            expected = 1.0 - expected
        np.testing.assert_allclose(gray_from_stored(image, path), expected, atol=ATOL, err_msg=name)
        compared.append(name)
    assert len(compared) >= 30, compared


@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")  # SIGMOID saturating: both
@pytest.mark.parametrize("function", px.VOI_FUNCTIONS)
@pytest.mark.parametrize("center,width", [(600.0, 1600.0), (40.0, 1.0), (1000.5, 2.0), (-200.0, 300.0)])
def test_window_functions_are_pydicoms(shared_data, function, center, width):
    """Every VOI function and degenerate widths, on real stored values (MR_small: signed 16-bit)."""
    if function == "LINEAR" and width < 1:
        pytest.skip("LINEAR needs a width >= 1")
    ds, modality = _pydicom_modality(shared_data / "dicom" / "pydicom_test_files" / "MR_small.dcm")
    ds.WindowCenter, ds.WindowWidth, ds.VOILUTFunction = center, width, function
    values = np.concatenate([modality.ravel(), np.arange(center - width, center + width + 1, 0.25)])
    ours = px.window(values.astype(np.float32), center, width, function)
    np.testing.assert_allclose(ours, _pydicom_window_unit(values.astype(np.float64), ds), atol=ATOL)


def test_the_readers_voi_lut_is_pydicoms(shared_data):
    path = shared_data / "dicom" / "pydicom_data" / "vlut_04.dcm"
    image = read_stored(path)
    assert image.plan.voi == "lut"
    ds, modality = _pydicom_modality(path)
    looked_up = apply_voi_lut(modality, ds)
    bits = int(ds.VOILUTSequence[0].LUTDescriptor[2])
    expected = np.clip(looked_up / px.lut_full_scale(bits, looked_up.max()), 0.0, 1.0)
    if ds.PhotometricInterpretation == "MONOCHROME1":
        expected = 1.0 - expected
    np.testing.assert_allclose(gray_from_stored(image, path), expected, atol=ATOL)
