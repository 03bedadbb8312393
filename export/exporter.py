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
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from cxr_deploy import __version__, artifacts, in_population, signals
from cxr_deploy.artifacts import INPUT_NAME, output_names
from cxr_deploy.in_population import SCORE_OUTPUT
from cxr_deploy.bundle import ModelBundle, write_json_atomic
from cxr_deploy.cam import ClassifierWithCAM
from cxr_deploy.errors import CxrDeployError

from . import metadata as md
from .inputs import InputError, collect_images, labelled_files, load_labelled
from .parity import (Tolerances, eager_runner, gate_artifact, make_parity_inputs, onnx_runner,
                     program_runner, run_batches, torchscript_runner)

# File names, precisions and runtimes come from the runtime's artifact registry (one table).
TORCHSCRIPT, TORCH_EXPORT = artifacts.TORCHSCRIPT.file, artifacts.TORCH_EXPORT.file
ONNX_FP32, ONNX_FP16, ONNX_INT8 = artifacts.ONNX_FP32.file, artifacts.ONNX_FP16.file, artifacts.ONNX_INT8.file
PARITY_REPORT, INT8_REPORT = artifacts.PARITY_REPORT, artifacts.INT8_REPORT
MODEL_ARTIFACTS = tuple(artifacts.MODEL_ARTIFACTS)
EXPORT_ARTIFACTS = (*MODEL_ARTIFACTS, PARITY_REPORT, INT8_REPORT)
# How the gate runs each format from disk, and reads the metadata embedded in it.
RUNNERS = {"torchscript": torchscript_runner, "torch_export": program_runner, "onnx": onnx_runner}
METADATA_READERS = {"torchscript": md.read_archive_metadata, "torch_export": md.read_archive_metadata,
                    "onnx": md.read_onnx_metadata}


def _kind(name: str) -> artifacts.ArtifactKind:
    return artifacts.MODEL_ARTIFACTS[name]
REPORT_FORMAT = "cxr-deploy-parity-report"
DEFAULT_CALIBRATION_LIMIT = 100
DEFAULT_INT8_EVAL_LIMIT = None  # every labelled image: a gate on a silent subset says less than it seems

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


def build_wrapper(model: torch.nn.Module, positive_index: int, source: str = "this model",
                  temperature: float = 1.0, population=None) -> ClassifierWithCAM:
    """What every artifact is exported from (the bundle's temperature and population statistics
    included); a head for which CAM != Grad-CAM is refused."""
    try:
        return ClassifierWithCAM(model, positive_index, temperature, population=population).eval()
    except ValueError as exc:
        raise ExportError(f"cannot export {source}: {exc}") from None


def _wrapper(bundle: ModelBundle) -> ClassifierWithCAM:
    return build_wrapper(bundle.build_model(), bundle.manifest.positive_index, str(bundle.directory),
                         temperature=bundle.manifest.temperature, population=in_population.load(bundle))


def _common_info(bundle: ModelBundle) -> dict:
    spec = bundle.spec
    scored = bundle.has(in_population.STATS_NAME)
    outputs = {"probabilities": "softmax probabilities (not logits), class_names order",
               "cam": f"positive-class CAM (= Grad-CAM), [N,{spec.input_size // 32},"
                      f"{spec.input_size // 32}], max-normalized to [0,1]"}
    if scored:
        outputs[SCORE_OUTPUT] = f"[N] Mahalanobis distance of {in_population.FEATURE} from the training population"
    return {"input_name": INPUT_NAME, "output_names": list(output_names(scored)), "io_dtype": "float32",
            "batch": "dynamic", "input_shape": ["N", *spec.input_shape], "outputs": outputs,
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
    int8_eval_limit: int | None = DEFAULT_INT8_EVAL_LIMIT,
    int8_settings: dict | None = None,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Export, gate and register artifacts; returns the parity report (``report["passed"]``).

    Steps: validate the options → read every input (before touching the bundle: a typo in a folder
    name must not cost the old export) → clear the previous export → write into a staging folder →
    gate each file → commit what passed, drop what failed.

    ``parity_inputs``: image files/folders used (besides random tensors) by the parity gate; when
    empty, the calibration images and the INT8 evaluation's labelled images are used if given.
    Raises :class:`ExportError` / :class:`cxr_deploy.errors.BundleError` when export cannot start.
    """
    request = _ExportRequest(torchscript, onnx, torch_export, fp16, int8, calibration, int8_eval, opset, exporter,
                             list(parity_inputs or ()), Tolerances.from_any(tolerances), calibration_limit,
                             int8_eval_limit, int8_settings, seed)
    request.validate()
    run = _ExportRun(ModelBundle.load(bundle_dir), request, progress)  # verifies every artifact's sha256
    run.read_inputs()
    run.clear_previous_export()
    reference = run.reference()
    staging = Path(tempfile.mkdtemp(prefix=".export-", dir=run.bundle.directory))
    (staging / STAGING_MARKER).write_text("cxr-deploy export staging; removed when the export ends\n")
    try:
        written = run.write_artifacts(staging)
        int8_report = run.gate(staging, written, reference)
        with signals.deferred():  # the manifest and its artifacts change together, even on Ctrl-C/SIGTERM
            run.commit(staging, written, int8_report)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return run.report


@dataclass
class _ExportRequest:
    torchscript: bool
    onnx: bool
    torch_export: bool
    fp16: bool
    int8: bool
    calibration: str | Path | None
    int8_eval: str | Path | None
    opset: int | None
    exporter: str
    parity_inputs: list
    tolerances: Tolerances
    calibration_limit: int
    int8_eval_limit: int | None
    int8_settings: dict | None
    seed: int

    def validate(self) -> None:
        if not (self.torchscript or self.onnx or self.torch_export):
            raise ExportError("nothing to export: TorchScript, ONNX and torch.export are all disabled")
        if (self.fp16 or self.int8) and not self.onnx:
            raise ExportError("--fp16/--int8 are derived from the fp32 ONNX model; do not disable ONNX")
        if self.int8 and (self.calibration is None or self.int8_eval is None):
            raise ExportError("--int8 needs --calibration DIR (images to calibrate on) and --int8-eval "
                              "DIR|CSV (labelled images for the statistical gate)")
        for name, path in (("--calibration", self.calibration), ("--int8-eval", self.int8_eval)):
            if path is not None and not Path(path).exists():
                raise ExportError(f"{name} {path}: no such file or folder")


class _ExportRun:
    """One export: the bundle, its wrapped model, the inputs, the report being filled."""

    def __init__(self, bundle: ModelBundle, request: _ExportRequest, progress):
        self.bundle, self.request, self.progress = bundle, request, progress
        self.wrapper = _wrapper(bundle)
        self.inputs = self.calibration_set = self.evaluation_set = None
        self.report: dict = {}

    def read_inputs(self) -> None:
        r, spec = self.request, self.bundle.spec
        self.inputs = make_parity_inputs(spec, r.parity_inputs or self._default_parity_sources(), seed=r.seed)
        if not r.int8:
            return
        _say(self.progress, f"reading calibration images from {r.calibration}")
        self.calibration_set = collect_images([r.calibration], spec, limit=r.calibration_limit)
        if len(self.calibration_set) == 0:
            raise ExportError(f"--calibration {r.calibration}: no readable images")
        _say(self.progress, f"reading labelled evaluation images from {r.int8_eval}")
        try:
            self.evaluation_set = load_labelled(r.int8_eval, spec, self.bundle.class_names,
                                                self.bundle.manifest.positive_class, limit=r.int8_eval_limit)
        except ValueError as exc:
            raise ExportError(str(exc)) from None

    def _default_parity_sources(self) -> list[str]:
        """The calibration images and the images the INT8 evaluation names (a labels CSV is a list of
        images, not one: read as an image it was only ever "not an image")."""
        r = self.request
        sources = [str(r.calibration)] if r.calibration is not None else []
        if r.int8_eval is not None:
            try:
                sources += [path for path, _ in labelled_files(r.int8_eval, self.bundle.class_names,
                                                               self.bundle.manifest.positive_class)]
            except (InputError, ValueError) as exc:
                raise ExportError(str(exc)) from None
        return sources

    def clear_previous_export(self) -> None:
        bundle = self.bundle
        for leftover in bundle.directory.glob(".export-*"):  # staging folder of an export that crashed
            if (leftover / STAGING_MARKER).is_file():  # ours: never delete a folder we did not make
                shutil.rmtree(leftover, ignore_errors=True)
        for name in EXPORT_ARTIFACTS:  # no stale artifacts survive a re-export
            if bundle.has(name):
                bundle.remove_artifact(name)
            else:
                (bundle.directory / name).unlink(missing_ok=True)

    def reference(self):
        """Eager PyTorch outputs on every parity input, and the report skeleton."""
        self.versions, self.common = _versions(), _common_info(self.bundle)
        self.report = {
            "format": REPORT_FORMAT, "format_version": 1, "mode": "export",
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "model_id": self.bundle.model_id, "versions": self.versions,
            "tolerances": self.request.tolerances.to_dict(), "inputs": self.inputs.describe(), "artifacts": {},
        }
        batches = self.inputs.batches()
        _say(self.progress, f"eager reference on {sum(len(x) for _, x in batches)} inputs "
                            f"({len(self.inputs.random)} random, {len(self.inputs.images)} real images)")
        return run_batches(eager_runner(self.wrapper), batches)

    def write_artifacts(self, staging: Path) -> dict[str, dict]:
        r, bundle, wrapper, say = self.request, self.bundle, self.wrapper, self.progress
        example = torch.from_numpy(self.inputs.random[:2].copy())
        written: dict[str, dict] = {}
        if r.torchscript:
            from .torchscript import export_torchscript

            _say(say, "writing TorchScript (torch.jit.trace)")
            info = export_torchscript(wrapper, example, staging / TORCHSCRIPT, md.artifact_metadata(bundle))
            written[TORCHSCRIPT] = {**info, "precision": "fp32"}
        if r.torch_export:
            from .torch_export import export_program

            _say(say, "writing torch.export program")
            info = export_program(wrapper, example, staging / TORCH_EXPORT, md.artifact_metadata(bundle))
            written[TORCH_EXPORT] = {**info, "precision": "fp32"}
        if r.onnx:
            from .onnx_export import DEFAULT_OPSET, export_onnx, export_onnx_fp16

            _say(say, f"writing ONNX (exporter={r.exporter}, opset {r.opset or DEFAULT_OPSET})")
            written[ONNX_FP32] = export_onnx(wrapper, example, staging / ONNX_FP32, md.artifact_metadata(bundle),
                                             opset=r.opset, exporter=r.exporter)
            if r.fp16:
                _say(say, "writing fp16 ONNX (fp16 convolutions, float32 inputs/outputs and head)")
                written[ONNX_FP16] = export_onnx_fp16(wrapper, example, staging / ONNX_FP16,
                                                      md.artifact_metadata(bundle, precision="fp16"),
                                                      opset=r.opset, exporter=r.exporter)
            if r.int8:
                from .quantize import quantize_int8

                calibration = self.calibration_set
                _say(say, f"quantizing to INT8, calibrated on {len(calibration)} of {calibration.available} images "
                          f"(--calibration-limit {r.calibration_limit}, spread over the folder)")
                written[ONNX_INT8] = quantize_int8(staging / ONNX_FP32, staging / ONNX_INT8, self.calibration_set,
                                                   md.artifact_metadata(bundle, precision="int8"), r.int8_settings)
        return written

    def gate(self, staging: Path, written: dict[str, dict], reference) -> dict | None:
        """Every written file against eager PyTorch (INT8: the statistical gate); fills the report."""
        pos, threshold, tolerances = self.bundle.manifest.positive_index, self.bundle.threshold, \
            self.request.tolerances
        int8_report = None
        for name, info in written.items():
            _say(self.progress, f"parity gate: {name}")
            if name == ONNX_INT8:
                int8_report = self._int8_gate(staging, info)
                result = {k: v for k, v in int8_report.items() if k not in ("images", "unreadable", "calibration")}
                result["detail"] = INT8_REPORT
            else:
                runner = RUNNERS[_kind(name).format](staging / name)
                result = gate_artifact(runner, reference, self.inputs, precision=_kind(name).precision.value,
                                       tolerances=tolerances, positive_index=pos, threshold=threshold,
                                       population_threshold=in_population.threshold_of(self.bundle))
            result["runtime"] = _kind(name).runtime
            self.report["artifacts"][name] = result
        self.report["passed"] = all(r["passed"] for r in self.report["artifacts"].values())
        self.report["failed_artifacts"] = [n for n, r in self.report["artifacts"].items() if not r["passed"]]
        return int8_report

    def _int8_gate(self, staging: Path, info: dict) -> dict:
        from .quantize import int8_gate

        calibration, evaluation = self.calibration_set, self.evaluation_set
        report = int8_gate(onnx_runner(staging / ONNX_FP32), onnx_runner(staging / ONNX_INT8), evaluation,
                           positive_index=self.bundle.manifest.positive_index, threshold=self.bundle.threshold,
                           tolerances=self.request.tolerances,
                           population_threshold=in_population.threshold_of(self.bundle))
        report["calibration"] = {"source": str(self.request.calibration), "count": len(calibration),
                                 "paths": calibration.paths, "unreadable": calibration.unreadable}
        report["calibration_overlaps_evaluation"] = len(set(calibration.paths) & set(evaluation.paths))
        report["labelled_available"] = evaluation.available
        report["left_out"] = evaluation.left_out(self.request.int8_eval_limit, "--int8-eval-limit")
        report["settings"] = info.get("quantization")
        return report

    def commit(self, staging: Path, written: dict[str, dict], int8_report: dict | None) -> None:
        """Move what passed into the bundle and register it; drop what failed; write the reports."""
        bundle, report = self.bundle, self.report
        for name, info in written.items():
            if report["artifacts"][name]["passed"]:
                os.replace(staging / name, bundle.directory / name)
                extra = {"cam_correlation": int8_report.get("cam_correlation")} if name == ONNX_INT8 else {}
                bundle.add_artifact(name, **{**self.common, **info, **extra, "parity": "passed",
                                             "parity_checked_with": self.versions})
        if int8_report is not None:
            _write_json(bundle.directory / INT8_REPORT, int8_report)
            bundle.add_artifact(INT8_REPORT, kind="report", passed=int8_report["passed"])
        _write_json(bundle.directory / PARITY_REPORT, report)
        bundle.add_artifact(PARITY_REPORT, kind="report", passed=report["passed"],
                            failed_artifacts=report["failed_artifacts"])


def _write_json(path: Path, data: dict) -> None:
    write_json_atomic(path, data, default=_json_default)


def _json_default(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    raise TypeError(f"not JSON serializable: {type(value).__name__}")
