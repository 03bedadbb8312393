"""Fine-tuning ResNet50 for NORMAL vs PNEUMONIA: ``cxr-deploy train``, ``lr-find`` and ``sweep``.

Python API (the CLI is a thin layer over it)::

    from cxr_deploy.training import TrainConfig, train
    best_bundle_dir = train(TrainConfig(data="samples/labels.csv", weights="none", input_size=128,
                                        epochs_stage1=1, epochs_stage2=2, out="/tmp/run"))

Modules: config (TrainConfig, TOML), data (datasets, splits), cache (the resized-image cache),
groups (patient groups kept on one side of a split), augment, device_batches (augmentation on the
GPU), devices (device, precision, seeding), distributed (DDP), optim (stages, optimizers, schedules,
one step, early stopping), checkpoint (last.pt and RNG state), engine (the run: data, loop, best
bundle), weights (starting weights), threshold (validation metrics and threshold), curves (metrics
files and plot), population_fit (the out-of-population statistics), lr_range (lr-find), grid_sweep
(sweep), cli.
"""

_LAZY = {
    "TrainConfig": "config", "AugmentConfig": "config", "load_config": "config",
    "train": "engine", "resume": "engine", "EarlyStopping": "optim",
    "lr_find": "lr_range", "lr_range_test": "lr_range", "LRFindResult": "lr_range",
    "sweep": "grid_sweep",
    "choose_threshold": "threshold",
}


def __getattr__(name):
    # Lazy so that `cxr-deploy train --help` does not pay for importing torch.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = list(_LAZY)
