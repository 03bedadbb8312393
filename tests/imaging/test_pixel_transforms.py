"""Pure transforms against values computed by hand from the standard's formulas."""

import numpy as np
import pytest

from cxr_deploy.imaging import pixel_transforms as px


def test_rescale_is_slope_times_x_plus_intercept():
    out = px.rescale(np.array([0, 10, 4095], dtype=np.uint16), 2.0, -1024.0)
    np.testing.assert_allclose(out, [-1024.0, -1004.0, 7166.0])
    assert out.dtype == np.float32


def test_linear_window_matches_standard_formula():
    c, w = 40.0, 400.0
    x = np.array([-500, -160.5, -159, 0, 40, 239, 239.5, 1000], dtype=np.float32)
    expected = []
    for v in x:  # PS3.3 C.11.2.1.2.1, with ymin=0, ymax=1
        if v <= c - 0.5 - (w - 1) / 2:
            expected.append(0.0)
        elif v > c - 0.5 + (w - 1) / 2:
            expected.append(1.0)
        else:
            expected.append((v - (c - 0.5)) / (w - 1) + 0.5)
    np.testing.assert_allclose(px.window(x, c, w), expected, atol=1e-6)


def test_linear_exact_and_sigmoid_windows():
    x = np.array([0.0, 50.0, 100.0], dtype=np.float32)
    np.testing.assert_allclose(px.window(x, 50, 100, "LINEAR_EXACT"), [0.0, 0.5, 1.0], atol=1e-6)
    sig = px.window(x, 50, 100, "SIGMOID")
    np.testing.assert_allclose(sig, 1 / (1 + np.exp(-4 * (x - 50) / 100)), rtol=1e-6)


def test_invalid_window_rejected():
    with pytest.raises(ValueError):
        px.window(np.zeros(3), 0, 0.5)
    with pytest.raises(ValueError):
        px.window(np.zeros(3), 0, 10, "GAMMA")


def test_lut_full_scale_is_the_declared_depth_unless_the_data_exceed_it():
    assert px.lut_full_scale(8, 200) == 255.0
    assert px.lut_full_scale(12, 4095) == 4095.0
    assert px.lut_full_scale(8, 1000) == 1000.0  # LUT data past its declared bits: the data's maximum
    assert px.lut_full_scale(0, 0) == 1.0  # a corrupt descriptor never divides by zero


def test_min_max_and_constant_image():
    np.testing.assert_allclose(px.min_max(np.array([5, 10, 15])), [0, 0.5, 1])
    assert not px.min_max(np.full((2, 2), 7)).any()


def test_invert_and_luma():
    np.testing.assert_allclose(px.invert(np.array([0.0, 0.25, 1.0])), [1.0, 0.75, 0.0])
    rgb = np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255]]], dtype=np.uint8)
    np.testing.assert_allclose(px.rgb_to_gray(rgb)[0], [0.299 * 255, 0.587 * 255, 0.114 * 255], rtol=1e-5)
