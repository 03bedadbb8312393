"""Training batches made on the device (issue 13): stored 8/16-bit pixels + augmentation parameters
from the workers, augmentation and normalization a batch at a time. Same input as the worker path."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from cxr_deploy.preprocessing import PreprocessSpec
from cxr_deploy.training.augment import Augment, augment_batch, draw_params
from cxr_deploy.training.config import AugmentConfig
from cxr_deploy.training.data import STORED_KIND, CXRDataset, ResizedCache, collate_skip_unreadable, load_samples
from cxr_deploy.training.device_batches import augment_on_device, batch_to_device, from_storage, to_storage

from synth_cxr import make_csv_dataset, tiny_config

STRONG = AugmentConfig(rotation=20, translate=0.1, scale_min=0.8, scale_max=1.2, brightness=0.1, contrast=0.2,
                       hflip=True)


def test_batched_augmentation_equals_the_per_image_path():
    rng = np.random.default_rng(0)
    gray = rng.random((12, 40, 40), dtype=np.float32)
    params = np.stack([draw_params(STRONG, 40, np.random.default_rng([0, 0, i])) for i in range(12)])
    assert params[:, 6].any() and not params[:, 6].all()  # some flipped, some not
    per_image = np.stack([Augment(STRONG, 0.25).apply(g, p) for g, p in zip(gray, params)])
    batched = augment_batch(torch.from_numpy(gray), torch.from_numpy(params), 0.25).numpy()
    assert np.abs(batched - per_image).max() < 1e-4
    identity = np.tile(np.array([0, 0, 0, 1, 0, 1, 0], np.float32), (12, 1))
    assert np.abs(augment_batch(torch.from_numpy(gray), torch.from_numpy(identity), 0.25).numpy() - gray).max() < 1e-5


@pytest.mark.parametrize("augment", [None, STRONG])
def test_device_path_gives_the_workers_input(tmp_path, augment):
    samples = load_samples(make_csv_dataset(tmp_path / "d", 4))
    spec = PreprocessSpec(input_size=32)
    aug = Augment(augment, spec.pad_value) if augment else None
    workers, device = (CXRDataset(samples, spec, augment=aug, seed=3, stored_pixels=True) for _ in range(2))
    device.device_side = True
    for ds in (workers, device):
        ds.set_epoch(2)
    batches = [collate_skip_unreadable([ds[i] for i in range(len(samples))]) for ds in (workers, device)]
    assert batches[1][0].dtype == torch.uint16 and len(batches[1]) == 3  # pixels, labels, indices
    (xw, yw), (xd, yd) = (batch_to_device(b, torch.device("cpu"), ds) for b, ds in zip(batches, (workers, device)))
    assert torch.equal(yw, yd) and xw.shape == xd.shape == (len(samples), 3, 32, 32)
    assert (xw - xd).abs().max() < 1e-4  # per normalized pixel


def test_storage_keeps_the_source_resolution(tmp_path):
    gray = np.linspace(0, 1, 32 * 32, dtype=np.float32).reshape(32, 32)
    assert to_storage(gray, deep=False).dtype == np.uint8 and to_storage(gray, deep=True).dtype == np.uint16
    assert np.abs(from_storage(to_storage(gray, False)) - gray).max() <= 0.5 / 255 + 1e-7
    assert np.abs(from_storage(to_storage(gray, True)) - gray).max() <= 0.5 / 65535 + 1e-7
    # Every training image is stored (and cached) in 16 bits, an 8-bit source too (issue 20).
    Image.fromarray((gray * 65535).astype(np.uint16)).save(tmp_path / "deep.png")
    Image.fromarray((gray * 255).astype(np.uint8)).save(tmp_path / "flat.png")
    (tmp_path / "l.csv").write_text("path,label\ndeep.png,NORMAL\nflat.png,PNEUMONIA\n")
    spec = PreprocessSpec(input_size=32)
    cache = ResizedCache(tmp_path / "cache", spec)
    ds = CXRDataset(load_samples(tmp_path / "l.csv"), spec, cache=cache)
    assert [ds.stored(i).dtype for i in range(2)] == [np.uint16, np.uint16]
    assert [cache.get(s.path, STORED_KIND).dtype for s in ds.samples] == [np.uint16, np.uint16]


def test_auto_means_device_on_cuda_only():
    assert augment_on_device("auto", torch.device("cuda")) and not augment_on_device("auto", torch.device("cpu"))
    assert augment_on_device("device", torch.device("cpu")) and not augment_on_device("workers", torch.device("cuda"))
    with pytest.raises(ValueError, match="augment_on"):
        augment_on_device("gpu", torch.device("cpu"))


def test_a_run_s_batches_are_the_same_augmented_on_the_device_or_in_the_workers(tmp_path):
    """The choice changes where the work runs, not the run: through the run's own data preparation,
    loaders (sampler, generator, epoch) and ``batch_to_device``, each path gives the same training
    batches, with augmentation on. (Two whole ``train()`` runs said the same at 15x the cost: equal
    first-epoch loss and AUC to 1e-4 with SGD.)"""
    from cxr_deploy.training.data import make_loaders, prepare_data

    data_csv, cpu = make_csv_dataset(tmp_path / "d", 8), torch.device("cpu")
    batches = {}
    for where in ("workers", "device"):
        config = tiny_config(data_csv, tmp_path / where, augment_on=where, batch_size=4, epochs_stage1=0)
        (tmp_path / where).mkdir()
        data = prepare_data(config, tmp_path / where)
        data.train_set.device_side = augment_on_device(config.augment_on, cpu)  # as the run does
        loader = make_loaders(config, data, cpu, torch.Generator().manual_seed(config.seed))[0]
        batches[where] = []
        for epoch in (1, 2):
            data.train_set.set_epoch(epoch)
            batches[where] += [batch_to_device(b, cpu, loader.dataset) for b in loader]
    n = len(batches["workers"]) // 2  # batches per epoch
    assert n >= 2 and len(batches["device"]) == 2 * n
    for (xw, yw), (xd, yd) in zip(batches["workers"], batches["device"]):
        assert torch.equal(yw, yd) and xw.shape == xd.shape == (4, 3, 32, 32)
        assert (xw - xd).abs().max() < 1e-4  # per normalized pixel
    assert (batches["device"][0][0] - batches["device"][n][0]).abs().max() > 0.01  # epochs differ


def test_device_items_do_not_depend_on_the_epoch_so_workers_can_persist(tmp_path):
    """The parameters are drawn in the main process from the dataset's current epoch, so loader
    workers that live across epochs (persistent_workers) still augment each epoch afresh."""
    from torch.utils.data import DataLoader

    samples = load_samples(make_csv_dataset(tmp_path / "d", 3))
    spec = PreprocessSpec(input_size=32)
    ds = CXRDataset(samples, spec, augment=Augment(STRONG, spec.pad_value), seed=1, stored_pixels=True)
    ds.device_side = True
    loader = DataLoader(ds, batch_size=len(ds), num_workers=1, persistent_workers=True,
                        collate_fn=collate_skip_unreadable)
    inputs = []
    for epoch in (0, 1):
        ds.set_epoch(epoch)
        (batch,) = list(loader)
        inputs.append(batch_to_device(batch, torch.device("cpu"), ds)[0])
    assert not torch.equal(inputs[0], inputs[1])  # epoch 1 drew new parameters
    ds.set_epoch(1)
    reference = torch.stack([torch.from_numpy(spec.normalize(ds.augment.apply(ds.resized(i), ds.params(i))))
                             for i in range(len(ds))])
    assert (inputs[1] - reference).abs().max() < 1e-4  # the worker path's image for that epoch
