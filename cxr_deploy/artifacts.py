"""The artifact registry: every file an export can put into a bundle, described once.

Export writes and gates these files, batch opens them, the manifest records them: each reads the
file name, precision, format, runtime and serving backend from this table, never from its own
copy. Which function runs a format is looked up by :attr:`ArtifactKind.format` (export's parity
runners and metadata readers; batch's backend openers), not chosen with if/else.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class Backend(str, Enum):
    """What runs the model in ``cxr-deploy batch`` / :func:`cxr_deploy.load`."""

    ONNX = "onnx"
    """``model.onnx`` through ONNX Runtime (``model.fp16.onnx`` on CUDA when it was exported)."""
    ONNX_INT8 = "onnx-int8"
    """``model.int8.onnx`` through ONNX Runtime, CPU."""
    TORCHSCRIPT = "torchscript"
    """``model.ts`` through ``torch.jit``."""
    TORCH = "torch"
    """Eager PyTorch from ``weights.pt`` (works before ``export``); fp16 backbone on CUDA."""


class Device(str, Enum):
    """Where the model runs."""

    AUTO = "auto"
    """CUDA when a GPU actually works here (checked on the created session), else the CPU."""
    CPU = "cpu"
    """Always the CPU."""
    CUDA = "cuda"
    """The GPU; fails (exit 2) when none is usable."""


class Precision(str, Enum):
    """Numeric precision of an artifact's weights and activations."""

    FP32 = "fp32"
    """float32 throughout; gated at 1e-4 against eager PyTorch."""
    FP16 = "fp16"
    """fp16 convolutions, float32 inputs/outputs (GPUs); gated at 1e-2."""
    INT8 = "int8"
    """static INT8 (CPUs); gated statistically on labelled images."""


@dataclass(frozen=True)
class ArtifactKind:
    file: str
    precision: Precision
    format: str  # "torchscript" | "torch_export" | "onnx": selects runners, readers, openers
    runtime: str  # what the parity gate loads it with
    backend: Backend | None  # the batch backend that serves it (None: not served by batch)


TORCHSCRIPT = ArtifactKind("model.ts", Precision.FP32, "torchscript", "torch.jit", Backend.TORCHSCRIPT)
TORCH_EXPORT = ArtifactKind("model.pt2", Precision.FP32, "torch_export", "torch.export", None)
ONNX_FP32 = ArtifactKind("model.onnx", Precision.FP32, "onnx", "onnxruntime CPUExecutionProvider", Backend.ONNX)
ONNX_FP16 = ArtifactKind("model.fp16.onnx", Precision.FP16, "onnx", "onnxruntime CPUExecutionProvider", Backend.ONNX)
ONNX_INT8 = ArtifactKind("model.int8.onnx", Precision.INT8, "onnx", "onnxruntime CPUExecutionProvider",
                         Backend.ONNX_INT8)

MODEL_ARTIFACTS: dict[str, ArtifactKind] = {a.file: a for a in (TORCHSCRIPT, TORCH_EXPORT, ONNX_FP32, ONNX_FP16,
                                                                ONNX_INT8)}
PARITY_REPORT = "parity.json"
INT8_REPORT = "int8_gate.json"
RUN_BEST_BUNDLE = "best"  # a training run folder keeps its best epoch's bundle here (RUN_DIR/best)
WEIGHTS = "weights.pt"  # the state_dict every bundle has (Backend.TORCH)

# The input and outputs every model artifact has (cxr_deploy.cam.ClassifierWithCAM's contract), here
# rather than in the torch module so that serving an ONNX artifact does not import torch.
INPUT_NAME = "image"
OUTPUT_NAMES = ("probabilities", "cam")
POPULATION_OUTPUT = "population_score"  # a third output, in graphs of bundles with population statistics


def output_names(scored: bool) -> tuple[str, ...]:
    """The outputs of a graph exported with (``scored``) or without population statistics."""
    return (*OUTPUT_NAMES, POPULATION_OUTPUT) if scored else OUTPUT_NAMES


# How an INT8 model's activation ranges can be calibrated (onnxruntime's CalibrationMethod names;
# export/quantize.py uses them, `export --int8-method` offers them).
INT8_CALIBRATION_METHODS = ("MinMax", "Entropy", "Percentile")

# Below this 10th-percentile correlation between an INT8 model's maps and fp32's on the export's
# evaluation set, overlays drawn from the INT8 model carry a caveat (see int8_cam_caveat).
LOW_CAM_CORRELATION = 0.9


def int8_cam_caveat(artifact: dict | None) -> str:
    """Footer text for overlays drawn from an INT8 model whose maps diverge from fp32's.

    ``artifact``: the INT8 model's manifest entry; its ``cam_correlation`` (per-image Pearson r with
    the fp32 map on the export's evaluation set: median, p10, min) comes from the INT8 gate. Empty
    when the maps agree (p10 ≥ :data:`LOW_CAM_CORRELATION`); a caveat when they do not, or when the
    agreement was never measured.
    """
    corr = (artifact or {}).get("cam_correlation")
    if not corr:
        return "INT8 heat map, agreement with the fp32 map not measured."
    if corr["p10"] >= LOW_CAM_CORRELATION:
        return ""
    return (f"INT8 heat map differs from fp32 on some films (r median {corr['median']:.2f}, "
            f"10th percentile {corr['p10']:.2f}): check the fp32 overlay before relying on it.")
