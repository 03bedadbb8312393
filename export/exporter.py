"""``export_bundle`` and ``check_bundle``: write the artifacts, gate them, commit only what passed.

Order of operations, chosen so the bundle never looks valid when it is not:

1. open the bundle with full sha256 verification and build ``ClassifierWithCAM`` (refuses a
   non-linear head);
2. unregister and delete artifacts of any previous export (a half-finished re-export leaves a
   bundle with weights only, which says "not exported", never "exported, stale");
3. write every new file into a private temporary folder inside the bundle directory;
4. run the parity gate (and the INT8 statistical gate) on those files as they are on disk;
5. move the files that passed into place and register them (sha256 in the manifest); delete the
   ones that failed; write and register ``parity.json`` (and ``int8_gate.json``) either way.

The manifest is written last for each artifact, atomically, by :class:`cxr_deploy.bundle.ModelBundle`.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from cxr_deploy import __version__
from cxr_deploy.bundle import ModelBundle, write_json_atomic
from cxr_deploy.cam import INPUT_NAME, OUTPUT_NAMES, ClassifierWithCAM
from cxr_deploy.errors import CxrDeployError

from . import metadata as md
from .inputs import collect_images, load_labelled
from .parity import (Tolerances, eager_runner, gate_artifact, make_parity_inputs, onnx_runner,
                     program_runner, run_batches, torchscript_runner)

TORCHSCRIPT = "model.ts"
TORCH_EXPORT = "model.pt2"
ONNX_FP32 = "model.onnx"
ONNX_FP16 = "model.fp16.onnx"
ONNX_INT8 = "model.int8.onnx"
PARITY_REPORT = "parity.json"
INT8_REPORT = "int8_gate.json"
MODEL_ARTIFACTS = (TORCHSCRIPT, TORCH_EXPORT, ONNX_FP32, ONNX_FP16, ONNX_INT8)
EXPORT_ARTIFACTS = (*MODEL_ARTIFACTS, PARITY_REPORT, INT8_REPORT)
PRECISION = {TORCHSCRIPT: "fp32", TORCH_EXPORT: "fp32", ONNX_FP32: "fp32", ONNX_FP16: "fp16", ONNX_INT8: "int8"}
# How the gate runs each file from disk, and reads the metadata embedded in it.
RUNNERS = {TORCHSCRIPT: torchscript_runner, TORCH_EXPORT: program_runner}  # else ONNX Runtime
RUNTIME = {TORCHSCRIPT: "torch.jit", TORCH_EXPORT: "torch.export"}
METADATA_READERS = {TORCHSCRIPT: md.read_archive_metadata, TORCH_EXPORT: md.read_archive_metadata}
REPORT_FORMAT = "cxr-deploy-parity-report"
DEFAULT_CALIBRATION_LIMIT = 100
DEFAULT_INT8_EVAL_LIMIT = 1000

STAGING_MARKER = ".cxr-deploy-staging"  # marks the staging folders an export may clean up


class ExportError(CxrDeployError):
    """Export cannot start or cannot proceed (bad options, model unsuitable for CAM export, ...)."""


def _say(progress: Callable[[str], None] | None, message: str) -> None:
    if progress:
        progress(message)


def _versions() -> dict:
    import onnx
    import onnxruntime

    return {"cxr_deploy": __version__, "torch": torch.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__}


def build_wrapper(model: torch.nn.Module, positive_index: int, source: str = "this model") -> ClassifierWithCAM:
    """What every artifact is exported from; a head for which CAM != Grad-CAM is refused."""
    try:
        return ClassifierWithCAM(model, positive_index).eval()
    except ValueError as exc:
        raise ExportError(f"cannot export {source}: {exc}") from None


def _wrapper(bundle: ModelBundle) -> ClassifierWithCAM:
    return build_wrapper(bundle.build_model(), bundle.manifest.positive_index, str(bundle.directory))


def _common_info(bundle: ModelBundle) -> dict:
    spec = bundle.spec
    return {"input_name": INPUT_NAME, "output_names": list(OUTPUT_NAMES), "io_dtype": "float32",
            "batch": "dynamic", "input_shape": ["N", *spec.input_shape],
            "outputs": {"probabilities": "softmax probabilities (not logits), class_names order",
                        "cam": f"positive-class CAM (= Grad-CAM), [N,{spec.input_size // 32},"
                               f"{spec.input_size // 32}], max-normalized to [0,1]"},
            "model_id": bundle.model_id, "metadata_key": md.METADATA_KEY,
            "validated_by": PARITY_REPORT}


def export_bundle(
    bundle_dir: str | Path,
    *,
    torchscript: bool = True,
    onnx: bool = True,
    torch_export: bool = False,
    fp16: bool = False,
    int8: bool = False,
    calibration: str | Path | None = None,
    int8_eval: str | Path | None = None,
    opset: int | None = None,
    exporter: str = "dynamo",
    parity_inputs=(),
    tolerances: Tolerances | dict | None = None,
    calibration_limit: int = DEFAULT_CALIBRATION_LIMIT,
    int8_eval_limit: int = DEFAULT_INT8_EVAL_LIMIT,
    int8_settings: dict | None = None,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Export, gate and register artifacts; returns the parity report (``report["passed"]``).

    ``parity_inputs``: image files/folders used (besides random tensors) by the parity gate; when
    empty, the calibration and INT8 evaluation folders are used if given.
    Raises :class:`ExportError` / :class:`cxr_deploy.errors.BundleError` when export cannot start.
    """
    tolerances = Tolerances.from_any(tolerances)
    if not (torchscript or onnx or torch_export):
        raise ExportError("nothing to export: TorchScript, ONNX and torch.export are all disabled")
    if (fp16 or int8) and not onnx:
        raise ExportError("--fp16/--int8 are derived from the fp32 ONNX model; do not disable ONNX")
    if int8 and (calibration is None or int8_eval is None):
        raise ExportError("--int8 needs --calibration DIR (images to calibrate on) and --int8-eval "
                          "DIR|CSV (labelled images for the statistical gate)")
    for name, path in (("--calibration", calibration), ("--int8-eval", int8_eval)):
        if path is not None and not Path(path).exists():
            raise ExportError(f"{name} {path}: no such file or folder")

    bundle = ModelBundle.load(bundle_dir)  # verifies every artifact's sha256
    wrapper = _wrapper(bundle)
    spec, pos, threshold = bundle.spec, bundle.manifest.positive_index, bundle.threshold

    # Read inputs before touching the bundle: a typo in a folder name must not cost the old export.
    sources = list(parity_inputs or ()) or [p for p in (calibration, int8_eval) if p is not None]
    inputs = make_parity_inputs(spec, sources, seed=seed)
    calibration_set = evaluation_set = None
    if int8:
        _say(progress, f"reading calibration images from {calibration}")
        calibration_set = collect_images([calibration], spec, limit=calibration_limit)
        if len(calibration_set) == 0:
            raise ExportError(f"--calibration {calibration}: no readable images")
        _say(progress, f"reading labelled evaluation images from {int8_eval}")
        try:
            evaluation_set = load_labelled(int8_eval, spec, bundle.class_names, bundle.manifest.positive_class,
                                            limit=int8_eval_limit)
        except ValueError as exc:
            raise ExportError(str(exc)) from None

    for leftover in bundle.directory.glob(".export-*"):  # staging folder of an export that crashed
        if (leftover / STAGING_MARKER).is_file():  # ours: never delete a folder we did not make
            shutil.rmtree(leftover, ignore_errors=True)
    for name in EXPORT_ARTIFACTS:  # step 2: no stale artifacts survive a re-export
        if bundle.has(name):
            bundle.remove_artifact(name)
        else:
            (bundle.directory / name).unlink(missing_ok=True)

    versions = _versions()
    common = _common_info(bundle)
    example = torch.from_numpy(inputs.random[:2].copy())
    report = {
        "format": REPORT_FORMAT, "format_version": 1, "mode": "export",
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "model_id": bundle.model_id, "versions": versions, "tolerances": tolerances.to_dict(),
        "inputs": inputs.describe(), "artifacts": {},
    }
    batches = inputs.batches()
    _say(progress, f"eager reference on {sum(len(x) for _, x in batches)} inputs "
                   f"({len(inputs.random)} random, {len(inputs.images)} real images)")
    reference = run_batches(eager_runner(wrapper), batches)

    staging = Path(tempfile.mkdtemp(prefix=".export-", dir=bundle.directory))
    (staging / STAGING_MARKER).write_text("cxr-deploy export staging; removed when the export ends\n")
    try:
        written: dict[str, dict] = {}
        if torchscript:
            from .torchscript import export_torchscript

            _say(progress, "writing TorchScript (torch.jit.trace)")
            info = export_torchscript(wrapper, example, staging / TORCHSCRIPT, md.artifact_metadata(bundle))
            written[TORCHSCRIPT] = {**info, "precision": "fp32"}
        if torch_export:
            from .torch_export import export_program

            _say(progress, "writing torch.export program")
            info = export_program(wrapper, example, staging / TORCH_EXPORT, md.artifact_metadata(bundle))
            written[TORCH_EXPORT] = {**info, "precision": "fp32"}
        if onnx:
            from .onnx_export import DEFAULT_OPSET, export_onnx, export_onnx_fp16

            _say(progress, f"writing ONNX (exporter={exporter}, opset {opset or DEFAULT_OPSET})")
            written[ONNX_FP32] = export_onnx(wrapper, example, staging / ONNX_FP32,
                                             md.artifact_metadata(bundle), opset=opset, exporter=exporter)
            if fp16:
                _say(progress, "writing fp16 ONNX (fp16 convolutions, float32 inputs/outputs and head)")
                written[ONNX_FP16] = export_onnx_fp16(wrapper, example, staging / ONNX_FP16,
                                                      md.artifact_metadata(bundle, precision="fp16"),
                                                      opset=opset, exporter=exporter)
            if int8:
                from .quantize import quantize_int8

                _say(progress, f"quantizing to INT8, calibrated on {len(calibration_set)} images")
                written[ONNX_INT8] = quantize_int8(staging / ONNX_FP32, staging / ONNX_INT8, calibration_set,
                                                   md.artifact_metadata(bundle, precision="int8"), int8_settings)

        int8_report = None
        for name, info in written.items():
            _say(progress, f"parity gate: {name}")
            if name == ONNX_INT8:
                from .quantize import int8_gate

                int8_report = int8_gate(onnx_runner(staging / ONNX_FP32), onnx_runner(staging / ONNX_INT8),
                                        evaluation_set, positive_index=pos, threshold=threshold,
                                        tolerances=tolerances)
                int8_report["calibration"] = {"source": str(calibration), "count": len(calibration_set),
                                              "paths": calibration_set.paths,
                                              "unreadable": calibration_set.unreadable}
                overlap = set(calibration_set.paths) & set(evaluation_set.paths)
                int8_report["calibration_overlaps_evaluation"] = len(overlap)
                int8_report["settings"] = info.get("quantization")
                result = {k: v for k, v in int8_report.items() if k not in ("images", "unreadable", "calibration")}
                result["detail"] = INT8_REPORT
            else:
                runner = RUNNERS.get(name, onnx_runner)(staging / name)
                result = gate_artifact(runner, reference, inputs, precision=PRECISION[name],
                                       tolerances=tolerances, positive_index=pos, threshold=threshold)
            result["runtime"] = RUNTIME.get(name, "onnxruntime CPUExecutionProvider")
            report["artifacts"][name] = result

        report["passed"] = all(r["passed"] for r in report["artifacts"].values())
        report["failed_artifacts"] = [n for n, r in report["artifacts"].items() if not r["passed"]]

        # Step 5: commit what passed, drop what failed.
        for name, info in written.items():
            if report["artifacts"][name]["passed"]:
                os.replace(staging / name, bundle.directory / name)
                bundle.add_artifact(name, **{**common, **info, "parity": "passed",
                                             "parity_checked_with": versions})
        if int8_report is not None:
            _write_json(bundle.directory / INT8_REPORT, int8_report)
            bundle.add_artifact(INT8_REPORT, kind="report", passed=int8_report["passed"])
        _write_json(bundle.directory / PARITY_REPORT, report)
        bundle.add_artifact(PARITY_REPORT, kind="report", passed=report["passed"],
                            failed_artifacts=report["failed_artifacts"])
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return report


def check_bundle(bundle_dir: str | Path, *, parity_inputs=(), tolerances: Tolerances | dict | None = None,
                 int8_eval: str | Path | None = None, seed: int = 0,
                 progress: Callable[[str], None] | None = None) -> dict:
    """Re-validate an exported bundle without changing it; returns a report (``report["passed"]``).

    Checks: every artifact's sha256 (a tampered file raises :class:`~cxr_deploy.errors.BundleError`),
    that each model file's embedded metadata belongs to this bundle, and the parity gate again
    (images: ``parity_inputs``, else those recorded in ``parity.json`` that still exist). INT8 is
    re-gated statistically when ``int8_eval`` is given; otherwise it is only run for finite output.
    """
    tolerances = Tolerances.from_any(tolerances)
    bundle = ModelBundle.load(bundle_dir)
    models = [n for n in MODEL_ARTIFACTS if bundle.has(n)]
    if not models:
        raise ExportError(f"{bundle.directory} holds no exported model (run `cxr-deploy export` first)")
    wrapper = _wrapper(bundle)
    pos, threshold = bundle.manifest.positive_index, bundle.threshold
    sources = list(parity_inputs or ())
    if not sources and bundle.has(PARITY_REPORT):
        recorded = json.loads(bundle.verified_path(PARITY_REPORT).read_text())
        sources = [p for p in recorded.get("inputs", {}).get("images", {}).get("paths", []) if Path(p).exists()]
    inputs = make_parity_inputs(bundle.spec, sources, seed=seed)
    report = {
        "format": REPORT_FORMAT, "format_version": 1, "mode": "check",
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "model_id": bundle.model_id, "versions": _versions(), "tolerances": tolerances.to_dict(),
        "inputs": inputs.describe(), "artifacts": {},
    }
    _say(progress, f"eager reference on {len(inputs.random)} random tensors and {len(inputs.images)} real images")
    batches = inputs.batches()
    reference = run_batches(eager_runner(wrapper), batches)
    expected = md.artifact_metadata(bundle)
    for name in models:
        path = bundle.verified_path(name)
        _say(progress, f"checking {name}")
        try:
            embedded = METADATA_READERS.get(name, md.read_onnx_metadata)(path)
            mismatches = md.identity_mismatches(embedded, expected)
        except Exception as exc:
            mismatches = [f"cannot read embedded metadata: {exc}"]
        if name == ONNX_INT8:
            result = _check_int8(bundle, path, inputs, int8_eval, tolerances, pos, threshold)
        else:
            runner = RUNNERS.get(name, onnx_runner)(path)
            result = gate_artifact(runner, reference, inputs, precision=PRECISION[name], tolerances=tolerances,
                                   positive_index=pos, threshold=threshold)
        if mismatches:
            result["failures"] = [*result.get("failures", []), *(f"metadata {m}" for m in mismatches)]
            result["passed"] = False
        result["metadata_matches_bundle"] = not mismatches
        report["artifacts"][name] = result
    report["passed"] = all(r["passed"] for r in report["artifacts"].values())
    report["failed_artifacts"] = [n for n, r in report["artifacts"].items() if not r["passed"]]
    return report


def _check_int8(bundle, path, inputs, int8_eval, tolerances, pos, threshold) -> dict:
    from .quantize import int8_gate

    if int8_eval is not None and bundle.has(ONNX_FP32):
        evaluation = load_labelled(int8_eval, bundle.spec, bundle.class_names, bundle.manifest.positive_class,
                                   limit=DEFAULT_INT8_EVAL_LIMIT)
        result = int8_gate(onnx_runner(bundle.verified_path(ONNX_FP32)), onnx_runner(path), evaluation,
                           positive_index=pos, threshold=threshold, tolerances=tolerances)
        result.pop("images", None)
        return result
    runner = onnx_runner(path)
    failures = []
    for name, x in inputs.batches():
        try:
            p, c = runner(x)
        except Exception as exc:
            failures.append(f"{name}: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}")
            continue
        if p.shape != (len(x), len(bundle.class_names)) or not (np.isfinite(p).all() and np.isfinite(c).all()):
            failures.append(f"{name}: wrong shape or non-finite outputs")
    return {"precision": "int8", "gate": "runs (statistical gate needs --int8-eval)", "failures": failures,
            "passed": not failures}


def _write_json(path: Path, data: dict) -> None:
    write_json_atomic(path, data, default=_json_default)


def _json_default(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    raise TypeError(f"not JSON serializable: {type(value).__name__}")
