"""``cxr_deploy.export``: TorchScript + ONNX (fp32/fp16/INT8) artifacts with Grad-CAM in the graph,
and optionally a torch.export program.

Modules: :mod:`.exporter` (``export_bundle``), :mod:`.check` (``check_bundle``), :mod:`.torchscript`, :mod:`.torch_export`,
:mod:`.onnx_export`, :mod:`.quantize` (INT8 + statistical gate), :mod:`.parity` (the gate),
:mod:`.metadata` (what each file says about itself), :mod:`.inputs` (real images through the
runtime's reader), :mod:`.cli` (``cxr-deploy export``), :mod:`.calibrate_cli` (``cxr-deploy
calibrate``: a site's temperature and operating points into a new bundle, exported again).
"""

_LAZY = {
    "read_onnx_metadata": "metadata", "read_archive_metadata": "metadata", "Tolerances": "parity",
    **{name: "exporter" for name in ("EXPORT_ARTIFACTS", "INT8_REPORT", "MODEL_ARTIFACTS", "ONNX_FP16", "ONNX_FP32",
                                     "ONNX_INT8", "PARITY_REPORT", "TORCH_EXPORT", "TORCHSCRIPT", "ExportError",
                                     "export_bundle")},
    "check_bundle": "check",
}

__all__ = ["export_bundle", "check_bundle", "ExportError", "Tolerances", "read_onnx_metadata",
           "read_archive_metadata", "TORCHSCRIPT", "TORCH_EXPORT", "ONNX_FP32", "ONNX_FP16", "ONNX_INT8",
           "PARITY_REPORT", "INT8_REPORT", "MODEL_ARTIFACTS", "EXPORT_ARTIFACTS"]


def __getattr__(name):
    # Lazy so that `cxr-deploy export --help` does not pay for importing torch and onnx (5-7 s cold).
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
