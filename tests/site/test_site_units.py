"""Issue 20: site calibration and population-shift arithmetic (no model)."""

from __future__ import annotations

import numpy as np
import pytest

from cxr_deploy import population
from cxr_deploy import site_calibration as sc
from cxr_deploy.bundle import BundleManifest
from cxr_deploy.calibration import sigmoid
from cxr_deploy.decision import operating_point
from cxr_deploy.preprocessing import PreprocessSpec


def _site(n=400, seed=0, temperature=2.5, prevalence=0.6):
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < prevalence).astype(int)
    margins = rng.normal(np.where(y == 1, 3.0, -3.0), 2.0)  # true p = sigmoid(margin / temperature)
    y = (rng.random(n) < sigmoid(margins / temperature)).astype(int)
    return y, margins


def test_fit_site_recovers_the_temperature_and_meets_each_target_locally():
    y, margins = _site()
    parent_t = 1.0
    fit = sc.fit_site(y, sigmoid(margins / parent_t), parent_t)
    assert 1.8 < fit["temperature"]["used"] < 3.5 and fit["temperature"]["nll_used"] < fit["temperature"]["nll_parent"]
    points = fit["operating_points"]
    assert set(points) == {"youden", "sens90", "sens95", "sens98", "spec90", "spec95", "spec98"}
    for name in ("sens90", "sens95", "sens98"):
        assert points[name]["sensitivity"] >= int(name[4:]) / 100
    for name in ("spec90", "spec95", "spec98"):
        assert points[name]["specificity"] >= int(name[4:]) / 100
    p = points["sens95"]
    lo, hi = p["sensitivity_ci95"]
    assert lo <= p["sensitivity"] <= hi and p["positives"] + p["negatives"] == 400 == fit["images"]


def test_small_site_sets_say_so():
    y, margins = _site(n=80)
    fit = sc.fit_site(y, sigmoid(margins), 1.0)
    assert fit["warnings"][0].startswith("only 80 labelled site images")
    warned = [name for name, p in fit["operating_points"].items() if "wider than ±0.05" in p.get("warning", "")]
    assert warned and all(f"site:{name}" in " ".join(fit["warnings"]) for name in warned)


def test_rescaled_thresholds_make_the_same_decisions():
    margins = np.linspace(-8, 8, 801)
    for t in (0.1, 0.37, 0.5, 0.93):
        old = sigmoid(margins / 1.3) >= t
        new = sigmoid(margins / 2.9) >= sc.rescale_threshold(t, 1.3, 2.9)
        assert (old != new).sum() <= 1  # at most the margin sitting on the threshold itself
    assert np.allclose(sc.margins_from_probabilities(sigmoid(margins / 1.3), 1.3), margins, atol=1e-9)


def test_images_needed_for_a_five_point_interval():
    assert 60 < sc.images_needed(0.95) < 90 and sc.images_needed(0.5) > 350


def test_data_hash_follows_content_and_labels_not_order():
    a = [("aa", "NORMAL"), ("bb", "PNEUMONIA")]
    assert sc.data_hash(a) == sc.data_hash(a[::-1]) != sc.data_hash([("aa", "PNEUMONIA"), ("bb", "PNEUMONIA")])


def test_site_points_are_named_with_the_site_prefix():
    manifest = BundleManifest(preprocessing=PreprocessSpec(input_size=64), artifacts={"weights.pt": {"sha256": "0" * 64}},
                              training={"operating_points": {"sens95": {"threshold": 0.2}}},
                              site={"operating_points": {"sens95": {"threshold": 0.7}}})
    assert operating_point(manifest, "sens95") == 0.2 and operating_point(manifest, "site:sens95") == 0.7
    with pytest.raises(ValueError, match="site:sens95"):
        operating_point(manifest, "site:spec99")
    assert BundleManifest.from_dict(manifest.to_dict()).site == manifest.site
    plain = BundleManifest(preprocessing=PreprocessSpec(input_size=64), artifacts={"weights.pt": {"sha256": "0" * 64}})
    assert "site" not in plain.to_dict()  # old bundles keep their manifest as it was
    with pytest.raises(ValueError, match="not site-calibrated"):
        operating_point(plain, "site:sens95")


def test_the_alarm_false_alarm_rate_on_the_same_population_is_at_most_alpha():
    rng = np.random.default_rng(1)

    def draw(n):
        y = rng.random(n) < 0.74
        return sigmoid(rng.normal(np.where(y, 4.0, -4.0), 2.5))

    reference = population.build_reference(draw(900), source="validation split", temperature=1.0)
    alarms = [population.compare(reference, draw(n), 0.5)["status"] == "differs" for n in (50, 200) for _ in range(200)]
    assert np.mean(alarms) <= 0.06
    shifted = sigmoid(rng.normal(np.where(rng.random(200) < 0.74, 4.0, -1.0), 2.5))  # normals scored higher
    assert population.compare(reference, shifted, 0.5)["status"] == "differs"
    few = population.compare(reference, draw(population.MIN_IMAGES - 1), 0.5)
    assert few["status"] == "too_few" and "fewer than" in population.describe(few)[0]
