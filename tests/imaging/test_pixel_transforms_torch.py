"""The torch transforms against their numpy definitions (cxr_deploy/imaging/pixel_transforms.py):
hand-made values through every function, then every readable real DICOM and CXR through its plan."""

from __future__ import annotations


import numpy as np
import pytest
import torch

from cxr_deploy.imaging import pixel_transforms as px
from cxr_deploy.imaging import pixel_transforms_torch as pxt
from cxr_deploy.imaging.pixel_plan import PixelPlan, apply_plan
from cxr_deploy.imaging.reader import gray_from_stored, read_stored
from cxr_deploy.errors import CxrDeployError
from tests.support import dicom_sample

VALUES = np.array([[-3000, -160, 0, 39, 40, 41], [239, 240, 1000, 4095, 30000, 65535]], dtype=np.float32)


def t(a):
    return torch.from_numpy(np.ascontiguousarray(a))


@pytest.mark.parametrize("center, width, function", [(40, 400, "LINEAR"), (40, 1, "LINEAR"), (40, 0.5, "LINEAR_EXACT"),
                                                     (1000, 2600, "LINEAR_EXACT"), (40, 400, "SIGMOID")])
def test_window_matches_numpy(center, width, function):
    if function == "LINEAR_EXACT" or width >= 1:
        with np.errstate(over="ignore"):
            expected = px.window(VALUES, center, width, function)
        np.testing.assert_allclose(pxt.window(t(VALUES), center, width, function).numpy(), expected, atol=1e-6)


def test_window_rejects_what_numpy_rejects():
    for width, function in ((0.5, "LINEAR"), (0, "LINEAR_EXACT"), (0, "SIGMOID"), (10, "GAMMA")):
        with pytest.raises(ValueError):
            px.window(VALUES, 0, width, function)
        with pytest.raises(ValueError):
            pxt.window(t(VALUES), 0, width, function)


@pytest.mark.parametrize("dtype, bits", [(np.uint8, 8), (np.uint16, 12), (np.uint16, 16), (np.int16, 12), (np.int32, 16)])
def test_bit_depth_rescale_minmax_invert_match_numpy(dtype, bits):
    info = np.iinfo(dtype)
    a = np.linspace(max(info.min, -5000), min(info.max, 70000), 60).astype(dtype).reshape(6, 10)
    np.testing.assert_array_equal(pxt.scale_by_bit_depth(t(a), bits).numpy(), px.scale_by_bit_depth(a, bits))
    np.testing.assert_array_equal(pxt.rescale(t(a), 2.0, -1024.0).numpy(), px.rescale(a, 2.0, -1024.0))
    np.testing.assert_allclose(pxt.min_max(t(a)).numpy(), px.min_max(a), atol=1e-6)
    unit = px.scale_by_bit_depth(a, bits)
    np.testing.assert_array_equal(pxt.invert(t(unit)).numpy(), px.invert(unit))
    assert pxt.min_max(t(np.full((3, 4), 7, dtype))).numpy().tolist() == px.min_max(np.full((3, 4), 7, dtype)).tolist()


def test_min_max_is_per_image_in_a_stack():
    a = np.stack([np.arange(12, dtype=np.float32).reshape(3, 4), 100 + 3 * np.arange(12, dtype=np.float32).reshape(3, 4)])
    out = pxt.min_max(t(a)).numpy()
    np.testing.assert_allclose(out[0], px.min_max(a[0]), atol=1e-7)
    np.testing.assert_allclose(out[1], px.min_max(a[1]), atol=1e-7)


def test_rgb_to_gray_matches_numpy():
    rgb = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    np.testing.assert_allclose(pxt.rgb_to_gray(t(rgb)).numpy(), px.rgb_to_gray(rgb), atol=1e-4)
    with pytest.raises(ValueError):
        pxt.rgb_to_gray(t(rgb[..., :2]))


@pytest.mark.parametrize("plan", [PixelPlan("window", rescale=(1.0, -1024.0), center=1000, width=2600),
                                  PixelPlan("window", rescale=(1.0, 0.0), center=40, width=400, function="SIGMOID",
                                            invert=True),
                                  PixelPlan("bits", bits=12), PixelPlan("minmax", rescale=(0.5, 3.0)),
                                  PixelPlan("lut", factor=4095.0), PixelPlan("scale", factor=1 / 4095)])
def test_apply_plan_matches_numpy(plan):
    stored = np.random.default_rng(1).integers(0, 4096, (33, 17), dtype=np.uint16)
    with np.errstate(over="ignore"):
        expected = np.clip(np.nan_to_num(apply_plan(stored, plan)), 0, 1)
    np.testing.assert_allclose(pxt.apply_plan(t(stored), plan).numpy(), expected, atol=1e-6)


def _readable(paths):
    for path in paths:
        try:
            yield path, read_stored(path)
        except CxrDeployError:
            continue


def test_every_kind_of_real_dicom_and_cxr_gives_the_same_gray_on_torch(shared_data, dicom_manifest):
    """The torch plan vs read_image's numpy gray on one readable DICOM of every kind of stored pixels
    and 20 CXRs. Measured max |Δ| over all 152 readable DICOMs and 200 CXRs: 1.2e-7 (colour luma),
    0 elsewhere."""
    from cxr_deploy.batch.device_stage import _native

    worst, count, kinds = 0.0, 0, set()
    dicoms = dicom_sample(dicom_manifest, shared_data / "dicom", undecodable=False)
    files = [*_readable(dicoms), *_readable(sorted((shared_data / "cxr").glob("*/*.*"))[::10])]
    for path, image in files:
        reference = gray_from_stored(image, path)
        gray = pxt.apply_plan(torch.from_numpy(_native(image.stored).copy()), image.plan).numpy()
        assert gray.shape == reference.shape
        worst, count = max(worst, float(np.abs(gray - reference).max())), count + 1
        kinds.add((image.plan.voi, image.plan.rgb, image.plan.invert))
    print(f"\n{count} files, {len(kinds)} kinds of plan, max |gray torch - gray numpy| = {worst:.2e}")
    assert count >= 100 and len(kinds) >= 6
    assert worst <= 1e-6
