"""cxr-deploy: chest X-ray (Normal vs Pneumonia) classification you can fine-tune, export and run.

Runtime package: reading images, the preprocessing spec, model bundles and inference. Training and
export live in the sub-packages ``cxr_deploy.training`` and ``cxr_deploy.export``, which this
package never imports.

PACS scripts use::

    import cxr_deploy
    model = cxr_deploy.load("bundle/")
    records = model.predict(["IM0001", "IM0002"])
    cxr_deploy.run_batch(["/exports/today"], model="bundle/", out="results.csv")
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
