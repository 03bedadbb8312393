"""Data sources, splits, augmentation, cache, config and threshold rules (no training here)."""

from __future__ import annotations


import numpy as np
import pytest

from cxr_deploy.imaging import read_image
from cxr_deploy.preprocessing import PreprocessSpec
from cxr_deploy.training.augment import Augment
from cxr_deploy.training.config import AugmentConfig, TrainConfig, load_config
from cxr_deploy.training.data import (CXRDataset, ResizedCache, assign_validation, load_samples,
                                      split_counts)
from cxr_deploy.training.threshold import choose_threshold

from synth_cxr import make_csv_dataset, make_folder_dataset


def test_folder_layout_case_insensitive_and_carved_validation(tmp_path):
    root = make_folder_dataset(tmp_path / "ds", {"train": (6, 10), "val": (1, 1), "test": (2, 2)})
    (root / "train" / "NORMAL").rename(root / "train" / "normal")  # class folder case must not matter
    (root / "train" / "normal" / "notes.txt").write_text("not an image")
    samples = load_samples(root)
    assert split_counts(samples) == {"train": {"NORMAL": 6, "PNEUMONIA": 10}, "val": {"NORMAL": 1, "PNEUMONIA": 1},
                                     "test": {"NORMAL": 2, "PNEUMONIA": 2}}
    carved, note = assign_validation(samples, val_fraction=0.25, min_val_images=4, seed=3)
    counts = split_counts(carved)
    # the 2-image val is merged back, then 25 % of 18 is carved, stratified
    assert sum(counts["val"].values()) == round(0.25 * 18)
    assert counts["val"]["NORMAL"] >= 1 and counts["val"]["PNEUMONIA"] >= 2
    assert counts["test"] == {"NORMAL": 2, "PNEUMONIA": 2}
    assert "carved" in note
    again, _ = assign_validation(samples, val_fraction=0.25, min_val_images=4, seed=3)
    assert again == carved  # same seed, same split


def test_provided_validation_split_is_kept_when_large_enough(tmp_path):
    root = make_folder_dataset(tmp_path / "ds", {"train": (4, 4), "val": (3, 3)})
    samples = load_samples(root)
    kept, note = assign_validation(samples, val_fraction=0.2, min_val_images=6, seed=0)
    assert kept == samples and "provided" in note


def test_labels_csv_with_file_column_and_lowercase_labels(tmp_path):
    csv_path = make_csv_dataset(tmp_path, 3, path_column="file")
    samples = load_samples(csv_path)
    assert len(samples) == 6 and {s.label for s in samples} == {0, 1}
    assert all(s.split == "train" for s in samples)
    assert all(str(tmp_path) in s.path for s in samples)  # relative to the CSV's folder


def test_labels_csv_errors_are_clear(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("path,label\nx.png,COVID\n")
    with pytest.raises(ValueError, match="label 'COVID' is not one of"):
        load_samples(bad)
    bad.write_text("image,diagnosis\nx.png,NORMAL\n")
    with pytest.raises(ValueError, match="needs a header with"):
        load_samples(bad)


def test_real_manifest_works_as_labels_csv(shared_data):
    samples = load_samples(shared_data / "cxr" / "manifest.csv")
    assert split_counts(samples) == {"train": {"NORMAL": 100, "PNEUMONIA": 100}}


def test_validation_items_are_exactly_the_spec(tmp_path):
    csv_path = make_csv_dataset(tmp_path, 2)
    samples = load_samples(csv_path)
    spec = PreprocessSpec(input_size=32)
    x, label, index = CXRDataset(samples, spec)[1]
    expected = spec.apply(read_image(samples[1].path).pixels)
    assert np.array_equal(x.numpy(), expected) and label == samples[1].label and index == 1


def test_augmentation_keeps_range_and_shape_and_is_seeded():
    gray = np.random.default_rng(0).random((32, 32), dtype=np.float32)
    aug = Augment(AugmentConfig(rotation=10, brightness=0.2, contrast=0.2))
    a = aug(gray, np.random.default_rng([0, 1, 2]))
    b = aug(gray, np.random.default_rng([0, 1, 2]))
    c = aug(gray, np.random.default_rng([0, 1, 3]))
    assert a.shape == gray.shape and a.dtype == np.float32
    assert 0.0 <= a.min() and a.max() <= 1.0
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert not np.array_equal(a, gray)


def test_training_items_go_through_spec_normalize(tmp_path):
    samples = load_samples(make_csv_dataset(tmp_path, 2))
    spec = PreprocessSpec(input_size=32)
    ds = CXRDataset(samples, spec, augment=Augment(AugmentConfig()), seed=5)
    ds.set_epoch(2)
    x, _, _ = ds[0]
    gray = spec.denormalize(x.numpy())
    # channels are the spec's normalisation of one gray image
    np.testing.assert_allclose(spec.normalize(gray), x.numpy(), atol=1e-5)
    ds.set_epoch(3)
    assert not np.array_equal(ds[0][0].numpy(), x.numpy())  # a new epoch draws new parameters


def test_resized_cache_roundtrip_and_invalidation(tmp_path):
    samples = load_samples(make_csv_dataset(tmp_path / "d", 1))
    spec = PreprocessSpec(input_size=32)
    cache = ResizedCache(tmp_path / "cache", spec)
    plain = CXRDataset(samples, spec)[0][0].numpy()
    cached_ds = CXRDataset(samples, spec, cache=cache)
    first = cached_ds[0][0].numpy()
    assert len(list((tmp_path / "cache").rglob("*.npy"))) == 1
    np.testing.assert_allclose(first, plain, atol=2e-3)  # float16 storage
    assert cache.get(samples[0].path) is not None
    other = ResizedCache(tmp_path / "cache", PreprocessSpec(input_size=40))
    assert other.get(samples[0].path) is None  # another spec never sees this entry


def test_config_toml_then_overrides_and_roundtrip(tmp_path):
    cfg_file = tmp_path / "c.toml"
    cfg_file.write_text('data = "x"\nbatch_size = 4\nlr = 0.01\n[augment]\nrotation = 5.0\n')
    cfg = load_config(cfg_file, lr=0.5, augment={"hflip": True})
    assert (cfg.batch_size, cfg.lr, cfg.augment.rotation, cfg.augment.hflip) == (4, 0.5, 5.0, True)
    saved = tmp_path / "resolved.toml"
    cfg.save(saved)
    assert load_config(saved) == cfg
    cfg_file.write_text("batch_sise = 4\n")
    with pytest.raises(ValueError, match="unknown config key"):
        load_config(cfg_file)
    with pytest.raises(ValueError, match="optimizer"):
        TrainConfig.from_dict({"optimizer": "lion"})


def test_threshold_rules():
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    scores = np.array([0.1, 0.2, 0.3, 0.7, 0.4, 0.8, 0.85, 0.9])
    youden = choose_threshold(labels, scores)
    assert youden["rule"] == "youden_j" and youden["threshold"] == pytest.approx(0.8)
    assert (youden["sensitivity"], youden["specificity"]) == (0.75, 1.0)
    screen = choose_threshold(labels, scores, target_sensitivity=1.0)
    assert screen["threshold"] == pytest.approx(0.4) and screen["sensitivity"] == 1.0
    assert screen["specificity"] == 0.75
    assert choose_threshold(np.ones(4), scores[:4])["threshold"] == 0.5


def test_one_class_only_names_the_missing_class_and_leaves_no_run_folder(tmp_path):
    from cxr_deploy.training import train

    from synth_cxr import tiny_config

    root = make_folder_dataset(tmp_path / "ds", {"train": (12, 0)})
    out = tmp_path / "run"
    with pytest.raises(ValueError) as info:
        train(tiny_config(root, out))
    message = str(info.value)
    assert message.startswith("no PNEUMONIA images in the training data"), message
    assert "'NORMAL': 12" in message
    assert not out.exists()  # not even config.resolved.toml


def test_a_threshold_of_one_is_flagged_in_the_log_manifest_and_inspect(tmp_path, capsys):
    """A model that ranks validation backwards (AUC < 0.5) gets threshold 1.0 from Youden's J."""
    from click.testing import CliRunner

    from cxr_deploy.bundle import ModelBundle
    from cxr_deploy.inspect import inspect_command
    from cxr_deploy.training import train

    from synth_cxr import calibrated_random_weights, tiny_config

    root = make_folder_dataset(tmp_path / "ds", {"train": (8, 8), "val": (6, 6)})
    val = root / "val"  # swap the validation labels: a model that learned the task now ranks them backwards
    (val / "NORMAL").rename(val / "tmp")
    (val / "PNEUMONIA").rename(val / "NORMAL")
    (val / "tmp").rename(val / "PNEUMONIA")
    weights = calibrated_random_weights(root / "train", tmp_path / "start.pt")
    best = train(tiny_config(root, tmp_path / "run", weights=str(weights), epochs_stage1=3, epochs_stage2=0,
                             lr=1e-3, batch_size=4, augment={"enabled": False}))
    bundle = ModelBundle.load(best)
    assert bundle.manifest.training["val_metrics"]["auc"] < 0.5
    assert bundle.threshold == 1.0
    assert any("threshold is 1.0" in w for w in bundle.manifest.training["warnings"])
    assert "WARNING: decision threshold is 1.0" in capsys.readouterr().err
    shown = CliRunner().invoke(inspect_command, [str(best)]).output
    assert "# WARNING: decision threshold is 1.0" in shown
