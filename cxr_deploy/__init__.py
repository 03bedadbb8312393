"""cxr-deploy: chest X-ray (Normal vs Pneumonia) classification you can fine-tune, export and run.

Runtime package: reading images, the preprocessing spec, model bundles and inference. Training and
export live in the sub-packages ``cxr_deploy.training`` and ``cxr_deploy.export``, which this
package never imports.

PACS scripts use::

    import cxr_deploy
    model = cxr_deploy.load("bundle/")
    records = model.predict(["IM0001", "IM0002"])
    cxr_deploy.run_batch(["/exports/today"], model="bundle/", out="results.csv")

Packages: :mod:`.imaging` (files to pixels), :mod:`.serving` (a bundle ready to run: the backends),
:mod:`.batch` (the batch runner and its engines), :mod:`.reporting` (the metric report and
``evaluate``), :mod:`.pacs` (DICOM results and the PACS commands), :mod:`.review` (the local review
page and its verdicts); training and export, above.

Modules: :mod:`.api` (``load``, ``run_batch``), :mod:`.bundle` (model bundles, verified on load),
:mod:`.artifacts` (every file a bundle can hold), :mod:`.preprocessing` (the one preprocessing spec)
and :mod:`.preprocessing_torch` (the same on the model's device), :mod:`.model` (the classifier),
:mod:`.resnet` (its ResNet50, torch only) and :mod:`.cam` (classifier + CAM in one pass), :mod:`.decision` (the decision rule),
:mod:`.run_settings` (flag > config > bundle > default), :mod:`.operating_points` (youden,
sensN, specN: the rules), :mod:`.eligibility` (frontal chest radiographs only), :mod:`.calibration`,
:mod:`.site_calibration` (what ``calibrate`` fits on a site's images), :mod:`.population` (the
population-shift alarm and its reference), :mod:`.in_population` (the per-image out-of-population
flag), :mod:`.labels` (the labels CSV reader), :mod:`.errors`
(typed one-line errors, ``fail``), :mod:`.atomic` (crash-safe writes), :mod:`.locks` (one writer per
output), :mod:`.signals` (Ctrl-C/SIGTERM: exit 130, outputs intact), :mod:`.quiet` (library notices
off the terminal), :mod:`.cli` (the ``cxr-deploy`` command), :mod:`.inspect` and :mod:`.demo`
(their commands).
"""

__version__ = "0.1.0"

# Heavy imports (torch, onnxruntime) only happen when these are used.
_LAZY = {
    "load": ("cxr_deploy.api", "load"),
    "run_batch": ("cxr_deploy.api", "run_batch"),
    "read_image": ("cxr_deploy.imaging", "read_image"),
    "PreprocessSpec": ("cxr_deploy.preprocessing", "PreprocessSpec"),
    "ModelBundle": ("cxr_deploy.bundle", "ModelBundle"),
    "UnreadableImage": ("cxr_deploy.errors", "UnreadableImage"),
    "BundleError": ("cxr_deploy.errors", "BundleError"),
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'cxr_deploy' has no attribute {name!r}")


__all__ = ["__version__", *_LAZY]
