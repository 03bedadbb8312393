"""INT8 ONNX for CPU servers (``model.int8.onnx``) and its statistical gate.

Static quantization with onnxruntime's own tools (``quant_pre_process`` then ``quantize_static``),
calibrated on images the user points to, read and preprocessed exactly as ``batch`` will.

Settings (:data:`DEFAULT_SETTINGS`) were chosen by measurement on this project's CPU box, not taken
from the defaults (``python benchmarks/export_backends.py --compare-int8-settings``). On a 2-core
AMD EPYC VM whose CPU flags show AVX2 but no AVX-512/VNNI, 224x224, one thread, images/s at
batch 1/8/32:

- fp32 ONNX: 7.0 / 7.0 / 7.1;
- ``quantize_static`` default, signed 8-bit activations and weights (S8S8): 7.6 / 7.3 / 6.9,
  i.e. no speed-up at all;
- unsigned 8-bit activations + signed 8-bit weights (U8S8): 12.9 / 13.2 / 13.1 (about 1.9x);
  per-channel weight scales, ``reduce_range`` and QOperator vs QDQ made no measurable difference
  to speed (12.9-14.0).

So activations are unsigned. Weights: 8-bit (full range) on a CPU with VNNI, 7-bit
(``reduce_range``) without. onnxruntime documents 7-bit weights as the accurate choice for U8S8 on
CPUs without VNNI, whose AVX2 u8*s8 instruction saturates its 16-bit pair sums; with VNNI there is
no such saturation and the 8th bit is free accuracy. Measured on a real model (ResNet50 trained from
scratch on Kermany at 64², 895 patient-level validation images, 100 calibration images, threshold
0.163; ``benchmarks/kermany_quality.py --compare-int8``) on a Xeon with AVX512-VNNI/AMX: 7-bit
weights agreed with fp32 on 99.33% of decisions (max |Δp| 0.140) and failed the 99.5% gate; 8-bit
weights agreed on 99.66% (max |Δp| 0.088) and passed, at the same speed. The choice is made where
the model is exported and recorded in the manifest (``quantization.reduce_range``); the gate ran
there. On a serving CPU of the other kind, re-gate with ``cxr-deploy export --check --int8-eval``.
``export_bundle(..., int8_settings={...})`` and ``--int8-method`` override the defaults.

Only the backbone is quantized. The head (global pooling, the linear layer, temperature, softmax)
the CAM and the population score stay float32: :func:`head_nodes` finds every node the backbone's
output does not need and they are excluded from quantization. With the softmax inside the quantized part (version 0.1),
probabilities came out in k/255 steps and each row summed to 254/255; a threshold between two steps
could never be met exactly, and the CAM's per-image max-normalization amplified the 8-bit error.

INT8 cannot meet fp32 tolerances, so its gate is statistical, on a labelled folder: agreement of
the thresholded decision with the fp32 ONNX model, the ROC-AUC difference against the labels and
probabilities that sum to 1. CAM agreement (per-image Pearson r with fp32: median, 10th percentile,
minimum) is reported, not gated: the map is re-normalized to its maximum, so small quantization
errors in weakly activated maps become large relative differences. It goes into the manifest, and
overlays drawn from the INT8 model say so in their footer when it is low
(:func:`cxr_deploy.cam.int8_cam_caveat`).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from cxr_deploy.errors import CxrDeployError
import numpy as np

from cxr_deploy.artifacts import INPUT_NAME, INT8_CALIBRATION_METHODS, POPULATION_OUTPUT
from cxr_deploy.decision import positive_decisions

from .inputs import ImageSet
from .parity import Runner, Tolerances

DEFAULT_SETTINGS = {
    "quant_format": "QDQ",
    "activation_type": "QUInt8",
    "weight_type": "QInt8",
    "per_channel": True,
    "reduce_range": None,  # None: 7-bit weights only on a CPU without VNNI (see cpu_has_vnni)
    "calibrate_method": "MinMax",
    "float_head": True,
}
CALIBRATE_METHODS = INT8_CALIBRATION_METHODS
PROB_SUM_TOLERANCE = 1e-4
CALIBRATION_BATCH = 8
MIN_CALIBRATION_IMAGES = 1


class QuantizationError(CxrDeployError, RuntimeError):
    pass


def cpu_has_vnni(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether this CPU has an 8-bit dot-product instruction (AVX512-VNNI, AVX-VNNI or AMX-INT8);
    ``False`` where it cannot be told (no /proc/cpuinfo), the cautious answer."""
    try:
        flags = set(Path(cpuinfo).read_text().split())
    except OSError:
        return False
    return bool(flags & {"avx512_vnni", "avx_vnni", "amx_int8"})


class _ImageCalibrationReader:
    """Feeds preprocessed calibration images to ``quantize_static`` in small batches."""

    def __init__(self, tensors: np.ndarray, batch: int = CALIBRATION_BATCH):
        self._batches = [tensors[i:i + batch] for i in range(0, len(tensors), batch)]
        self._iter = iter(self._batches)

    def get_next(self):
        batch = next(self._iter, None)
        return None if batch is None else {INPUT_NAME: np.ascontiguousarray(batch, dtype=np.float32)}

    def rewind(self):
        self._iter = iter(self._batches)


def quantize_int8(fp32_path: str | Path, dst: str | Path, calibration: ImageSet, metadata: dict,
                  settings: dict | None = None) -> dict:
    """Write the INT8 model with metadata; returns manifest info (settings included)."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from .onnx_export import finalize_onnx

    settings = {**DEFAULT_SETTINGS, **(settings or {})}
    if settings["reduce_range"] is None:
        settings["reduce_range"] = not cpu_has_vnni()
    if len(calibration) < MIN_CALIBRATION_IMAGES:
        raise QuantizationError("no readable calibration images: --calibration must point to real "
                                "images (PNG/JPEG/DICOM) like those the model will see")

    class Reader(_ImageCalibrationReader, CalibrationDataReader):
        pass

    with tempfile.TemporaryDirectory(prefix="cxr-int8-", dir=Path(dst).parent) as tmp:
        pre = Path(tmp) / "pre.onnx"
        # Shape inference + ORT graph optimizations before quantizing. The symbolic shape inference
        # pass cannot type the CAM branch's Unsqueeze after Einsum in the dynamo-exported graph,
        # so ONNX's own shape inference is used (sufficient: only the batch axis is dynamic).
        quant_pre_process(str(fp32_path), str(pre), skip_symbolic_shape=True)
        quantized = Path(tmp) / "int8.onnx"
        if settings["calibrate_method"] not in CALIBRATE_METHODS:
            raise QuantizationError(f"unknown INT8 calibration method {settings['calibrate_method']!r} "
                                    f"(choose from {', '.join(CALIBRATE_METHODS)})")
        exclude = head_nodes(onnx.load(str(pre))) if settings["float_head"] else []
        # onnxruntime's histogram calibrators (Entropy, Percentile) stack every batch's outputs into
        # one array and fail on a last batch of another size ("inhomogeneous shape", onnxruntime
        # 1.31): they get one image at a time.
        batch = CALIBRATION_BATCH if settings["calibrate_method"] == "MinMax" else 1
        quantize_static(
            str(pre), str(quantized), Reader(calibration.tensors, batch), nodes_to_exclude=exclude,
            quant_format=getattr(QuantFormat, settings["quant_format"]),
            activation_type=getattr(QuantType, settings["activation_type"]),
            weight_type=getattr(QuantType, settings["weight_type"]),
            per_channel=bool(settings["per_channel"]),
            reduce_range=bool(settings["reduce_range"]),
            calibrate_method=getattr(CalibrationMethod, settings["calibrate_method"]),
        )
        model = onnx.load(str(quantized))
        info = finalize_onnx(model, dst, metadata)
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    import onnxruntime
    import torch

    return {"kind": "onnx", "precision": "int8", "opset": opset, "torch_version": torch.__version__,
            "exporter": "onnxruntime.quantization.quantize_static", "onnxruntime_version": onnxruntime.__version__,
            "quantization": settings, "calibration_images": len(calibration), **info}


def backbone_output(model) -> str:
    """Name of the backbone's output: the last tensor through which everything the graph input
    reaches on its way to the classifier's outputs (probabilities, CAM) must pass (``relu_48``,
    layer4's output, for ResNet50).

    Walks the topologically sorted nodes those outputs need, keeping the set of input-derived
    tensors that later nodes (or the outputs) still need; where that set is one tensor, the graph is
    cut in two. (``population_score`` also reads layer3's output, so it is left out of this walk.)
    """
    graph = model.graph
    outputs = {o.name for o in graph.output} - {POPULATION_OUTPUT}
    needed = _ancestors(graph, outputs)
    nodes = [n for n in graph.node if n.name in needed]
    derived = {i.name for i in graph.input} - {t.name for t in graph.initializer}
    last_use = {}
    for index, node in enumerate(nodes):
        for name in node.input:
            last_use[name] = index
    live, cut = set(derived), None
    for index, node in enumerate(nodes):
        if any(name in derived for name in node.input):
            derived.update(node.output)
            live.update(node.output)
        live = {t for t in live if last_use.get(t, -1) > index or t in outputs}
        if len(live) == 1 and not live & outputs:
            cut = next(iter(live))
    if cut is None:
        raise QuantizationError("cannot find the backbone's output in the ONNX graph (no single tensor "
                                "separates the input from the outputs); refusing to quantize the head")
    return cut


def _ancestors(graph, tensors: set[str]) -> set[str]:
    """Names of the nodes the given tensors are computed from."""
    producer = {out: node for node in graph.node for out in node.output}
    found, todo = set(), list(tensors)
    while todo:
        node = producer.get(todo.pop())
        if node is None or node.name in found:
            continue
        found.add(node.name)
        todo.extend(node.input)
    return found


def head_nodes(model) -> list[str]:
    """Names of the nodes that stay float: every node the backbone's output (:func:`backbone_output`)
    does not need: pooling, linear, softmax, the CAM and the population score."""
    features = backbone_output(model)
    backbone = _ancestors(model.graph, {features})
    nodes = [n for n in model.graph.node if n.name not in backbone]
    unnamed = [n for n in nodes if not n.name]
    if unnamed:
        raise QuantizationError(f"{len(unnamed)} head nodes have no name; cannot exclude them from quantization")
    return [n.name for n in nodes]


def _auc(labels: np.ndarray, scores: np.ndarray) -> float | None:
    from sklearn.metrics import roc_auc_score

    if len(np.unique(labels)) < 2:
        return None
    return float(roc_auc_score(labels, scores))


def int8_gate(fp32: Runner, int8: Runner, evaluation: ImageSet, *, positive_index: int, threshold: float,
              tolerances: Tolerances, batch: int = 8, population_threshold: float | None = None) -> dict:
    """Label agreement with fp32 and |ΔAUC| on a labelled set (and, for a bundle with population
    statistics, agreement of the in-population flag); returns the gate report."""
    failures = []
    if len(evaluation) == 0:
        return {"gate": "statistical", "passed": False, "n": 0,
                "failures": ["no readable labelled images for the INT8 evaluation"]}
    outs = {"fp32": ([], [], []), "int8": ([], [], [])}
    for start in range(0, len(evaluation), batch):
        x = evaluation.tensors[start:start + batch]
        for name, runner in (("fp32", fp32), ("int8", int8)):
            for kept, value in zip(outs[name], runner(x)):
                kept.append(value)
    p32, c32 = (np.concatenate(v) for v in outs["fp32"][:2])
    p8, c8 = (np.concatenate(v) for v in outs["int8"][:2])
    labels = np.asarray(evaluation.labels) == positive_index
    s32, s8 = p32[:, positive_index], p8[:, positive_index]
    agreement = float((positive_decisions(s32, threshold) == positive_decisions(s8, threshold)).mean())
    auc32, auc8 = _auc(labels, s32), _auc(labels, s8)
    delta_auc = None if auc32 is None or auc8 is None else auc8 - auc32
    if not np.isfinite(p8).all() or not np.isfinite(c8).all():
        failures.append("INT8 model produced non-finite outputs")
    if agreement < tolerances.int8_min_agreement:
        failures.append(f"decision agreement with fp32 {agreement:.2%} < {tolerances.int8_min_agreement:.2%}")
    if delta_auc is None:
        failures.append("ROC AUC undefined: the labelled set needs images of both the positive and "
                        "another class")
    elif abs(delta_auc) > tolerances.int8_max_auc_delta:
        failures.append(f"|ΔAUC| {abs(delta_auc):.4f} > {tolerances.int8_max_auc_delta}")
    prob_sum_error = float(np.abs(p8.sum(axis=1) - 1).max())
    if prob_sum_error > PROB_SUM_TOLERANCE:
        failures.append(f"INT8 probabilities do not sum to 1 (off by up to {prob_sum_error:.2g})")
    population = {}
    if population_threshold is not None:
        population = _population_agreement(outs, population_threshold, tolerances)
        failures += population.pop("failures")
    cam_corr = [_corr(a.ravel(), b.ravel()) for a, b in zip(c32, c8)]
    cam_corr = [v for v in cam_corr if v is not None]
    return {
        "gate": "statistical",
        "precision": "int8",
        "n": int(len(evaluation)),
        "n_positive": int(labels.sum()),
        "reference": "fp32 ONNX model (onnxruntime CPU)",
        "thresholds": {"min_label_agreement": tolerances.int8_min_agreement,
                       "max_abs_delta_auc": tolerances.int8_max_auc_delta},
        "label_agreement": agreement,
        "auc_fp32": auc32,
        "auc_int8": auc8,
        "delta_auc": delta_auc,
        "max_abs_diff_prob": float(np.abs(p8 - p32).max()),
        "mean_abs_diff_prob": float(np.abs(p8 - p32).mean()),
        "max_abs_diff_cam": float(np.abs(c8 - c32).max()),
        "mean_abs_diff_cam": float(np.abs(c8 - c32).mean()),
        "mean_cam_correlation": float(np.mean(cam_corr)) if cam_corr else None,
        "cam_correlation": cam_correlation_summary(cam_corr),
        "max_prob_sum_error": prob_sum_error,
        **population,
        "images": [{"path": path, "label": int(y), "p_fp32": float(a), "p_int8": float(b)}
                   for path, y, a, b in zip(evaluation.paths, evaluation.labels, s32, s8)],
        "unreadable": evaluation.unreadable,
        "failures": failures,
        "passed": not failures,
    }


def _population_agreement(outs: dict, threshold: float, tolerances: Tolerances) -> dict:
    """INT8's in-population flag against fp32's on the labelled set (the score is computed in float
    from INT8's features, which quantization moves)."""
    if not outs["fp32"][2] or len(outs["int8"][2]) != len(outs["fp32"][2]):
        return {"failures": ["the INT8 model has no population_score output"]}
    s32, s8 = np.concatenate(outs["fp32"][2]), np.concatenate(outs["int8"][2])
    agreement = float(((s32 > threshold) == (s8 > threshold)).mean())
    failures = [] if np.isfinite(s8).all() else ["INT8 model produced non-finite population scores"]
    if agreement < tolerances.int8_min_population_agreement:
        failures.append(f"in-population flag agreement with fp32 {agreement:.2%} < "
                        f"{tolerances.int8_min_population_agreement:.2%}")
    return {"population_flag_agreement": agreement,
            "max_rel_diff_score": float(np.abs(s8 - s32).max() / threshold),
            "population_score_correlation": _corr(s32, s8), "failures": failures}


def _corr(a: np.ndarray, b: np.ndarray) -> float | None:
    if a.std() == 0 or b.std() == 0:
        return None
    return float(np.corrcoef(a, b)[0, 1])


def cam_correlation_summary(values: list[float]) -> dict | None:
    """Per-image CAM correlation with fp32: median, 10th percentile and minimum over the set."""
    if not values:
        return None
    v = np.asarray(values, dtype=float)
    return {"n": int(v.size), "median": float(np.median(v)), "p10": float(np.percentile(v, 10)),
            "min": float(v.min())}
