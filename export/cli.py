"""``cxr-deploy export``: write TorchScript + ONNX (+ fp16/INT8) into a bundle, gated by parity.

Exit status: 0 every artifact passed its gate; 1 a gate failed (failing files were not kept, the
report says why); 2 export could not start (bad options, missing/tampered bundle, unsuitable model).
"""

from __future__ import annotations

import json
import os
import sys
import time

import click

from cxr_deploy.artifacts import INT8_CALIBRATION_METHODS
from cxr_deploy.errors import CxrDeployError

EXIT_GATE_FAILED = 1
EXIT_CANNOT_START = 2


class _CannotStart(click.ClickException, CxrDeployError):
    exit_code = EXIT_CANNOT_START


_START = time.monotonic()


def _progress(message: str) -> None:
    click.echo(f"[export {time.monotonic() - _START:6.1f}s] {message}", err=True)


def _fmt(value, spec=".1e") -> str:
    return "-" if value is None else format(value, spec)


def print_summary(report: dict) -> None:
    rows = [("artifact", "precision", "gate", "max|Δprob|", "max|Δcam|", "decisions", "result")]
    for name, r in report["artifacts"].items():
        if r.get("gate") == "statistical":
            decisions = f"{_fmt(r.get('label_agreement'), '.2%')} agree, ΔAUC {_fmt(r.get('delta_auc'), '+.4f')}"
        elif r.get("label_agreement") is None:
            decisions = "-"
        else:
            decisions = _fmt(r.get("label_agreement"), ".2%") + " agree"
        rows.append((name, r.get("precision", "-"), str(r.get("gate", "-")).split(" ")[0],
                     _fmt(r.get("max_abs_diff_prob")), _fmt(r.get("max_abs_diff_cam")), decisions,
                     "PASS" if r["passed"] else "FAIL"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        click.echo("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    images = report["inputs"]["images"]["count"]
    click.echo(f"inputs: {report['inputs']['random']['count']} random tensors + {images} real images")
    if images == 0:
        click.echo("note: parity was checked on random tensors only; pass --parity-images DIR (a few real "
                   "X-rays) to also check real inputs", err=True)
    for name, r in report["artifacts"].items():
        if r.get("gate") == "statistical" and r.get("n"):
            click.echo(_statistical_line(name, r))
        if r.get("left_out"):
            click.echo(f"note: {name}: {r['left_out']}", err=True)
        if str(r.get("gate", "")).startswith("runs"):
            click.echo(f"note: {name} was only run (finite outputs, right shapes); pass --int8-eval DIR to "
                       "re-run its statistical gate", err=True)
        for failure in r.get("failures", []):
            click.echo(f"FAIL {name}: {failure}", err=True)


def _statistical_line(name: str, r: dict) -> str:
    """What the INT8 gate covered and the CAM agreement it measured (reported, not gated)."""
    line = (f"{name}: statistical gate on {r['n']} labelled images ({r.get('n_positive', '?')} positive): "
            f"decisions agree {_fmt(r.get('label_agreement'), '.2%')} with fp32, AUC {_fmt(r.get('auc_fp32'), '.4f')} "
            f"fp32 / {_fmt(r.get('auc_int8'), '.4f')} int8")
    corr = r.get("cam_correlation")
    if corr:
        line += (f"; CAM correlation with fp32 (reported, not gated) median {corr['median']:.3f}, "
                 f"p10 {corr['p10']:.3f}, min {corr['min']:.3f} over {corr['n']} images")
    else:
        line += "; CAM correlation with fp32: none measurable (flat maps)"
    return line


@click.command("export")
@click.argument("bundle", type=click.Path(file_okay=False))
@click.option("--check", is_flag=True, help="Re-validate an exported bundle (hashes, embedded metadata, parity); changes nothing.")
@click.option("--torchscript/--no-torchscript", default=True, show_default=True, help="Write model.ts.")
@click.option("--onnx/--no-onnx", "onnx_", default=True, show_default=True, help="Write model.onnx (fp32).")
@click.option("--torch-export", is_flag=True, help="Also write model.pt2, a torch.export program (PyTorch-native serving, AOTInductor).")
@click.option("--fp16", is_flag=True, help="Also write model.fp16.onnx (for GPU serving; float32 inputs/outputs).")
@click.option("--int8", is_flag=True, help="Also write model.int8.onnx (static quantization for CPU servers).")
@click.option("--calibration", type=click.Path(exists=True), help="Images to calibrate INT8 on (folder/file; PNG/JPEG/DICOM).")
@click.option("--calibration-limit", type=click.IntRange(1), default=100, show_default=True, help="Use at most this many calibration images (spread over the folder).")
@click.option("--int8-eval", type=click.Path(exists=True), help="Labelled images for the INT8 gate: folder with NORMAL/ PNEUMONIA/ sub-folders, or a CSV with file,label columns.")
@click.option("--int8-eval-limit", type=click.IntRange(1), default=None, help="Use at most this many labelled images for the INT8 gate, spread over the set (default: all of them; a limit that leaves images out says how many).")
@click.option("--int8-min-agreement", type=click.FloatRange(0, 1), default=0.995, show_default=True, help="INT8 gate: minimum decision agreement with fp32.")
@click.option("--int8-max-auc-delta", type=click.FloatRange(0, 1), default=0.002, show_default=True, help="INT8 gate: maximum |AUC(int8) - AUC(fp32)|.")
@click.option("--int8-min-population-agreement", type=click.FloatRange(0, 1), default=0.98, show_default=True, help="INT8 gate, bundles with population statistics: minimum agreement of the in-population flag with fp32.")
@click.option("--int8-method", type=click.Choice(INT8_CALIBRATION_METHODS), default=None, help="INT8 activation-range calibration (default: the measured choice, see README).")
@click.option("--parity-images", multiple=True, type=click.Path(exists=True), help="Real images (files/folders) for the parity gate, besides random tensors; repeatable. Default: the calibration / INT8-eval folders.")
@click.option("--prob-tol", type=click.FloatRange(0), default=1e-4, show_default=True, help="fp32 gate: max |Δprobability| vs eager PyTorch.")
@click.option("--cam-tol", type=click.FloatRange(0), default=1e-3, show_default=True, help="fp32 gate: max |ΔCAM| vs eager PyTorch.")
@click.option("--opset", type=click.IntRange(17, 23), default=None, help="ONNX opset (default 20).")
@click.option("--exporter", type=click.Choice(["dynamo", "legacy"]), default="dynamo", show_default=True, help="ONNX exporter: torch.export-based (dynamo) or the deprecated TorchScript-based one.")
@click.option("--json", "as_json", is_flag=True, help="Print the full report as JSON on stdout.")
def export_command(bundle, check, torchscript, onnx_, torch_export, fp16, int8, calibration, calibration_limit, int8_eval, int8_eval_limit,
                   int8_min_agreement, int8_max_auc_delta, int8_min_population_agreement, int8_method, parity_images, prob_tol, cam_tol, opset, exporter, as_json):
    """Export BUNDLE to TorchScript and ONNX, with Grad-CAM computed inside the graph.

    Each file is checked against the eager PyTorch model (random tensors and real images) before it
    is registered in the bundle; parity.json records the result. Failing files are not kept and the
    command exits 1. `--check` re-validates an already exported bundle.
    """
    from cxr_deploy.errors import BundleError

    from .check import check_bundle
    from .exporter import ExportError, export_bundle

    tolerances = {"prob": prob_tol, "cam": cam_tol, "int8_min_agreement": int8_min_agreement,
                  "int8_max_auc_delta": int8_max_auc_delta,
                  "int8_min_population_agreement": int8_min_population_agreement}
    try:
        if check:
            report = check_bundle(bundle, parity_inputs=parity_images, tolerances=tolerances,
                                  int8_eval=int8_eval, int8_eval_limit=int8_eval_limit, progress=_progress)
        else:
            report = export_bundle(
                bundle, torchscript=torchscript, onnx=onnx_, torch_export=torch_export, fp16=fp16, int8=int8, calibration=calibration,
                int8_eval=int8_eval, opset=opset, exporter=exporter, parity_inputs=parity_images,
                tolerances=tolerances, calibration_limit=calibration_limit, int8_eval_limit=int8_eval_limit,
                int8_settings={"calibrate_method": int8_method} if int8_method else None, progress=_progress)
    except (BundleError, ExportError) as exc:
        raise _CannotStart(str(exc)) from None
    except Exception as exc:  # an exporter/runtime failure: one clear line, traceback on request
        if os.environ.get("CXR_DEPLOY_DEBUG"):
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise _CannotStart(f"export failed: {type(exc).__name__}: {first} (set CXR_DEPLOY_DEBUG=1 for "
                           "the traceback; no partial artifact was registered)") from None
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        print_summary(report)
    if not report["passed"]:
        what = "check" if check else "export"
        click.echo(f"{what} FAILED for {', '.join(report['failed_artifacts'])}"
                   + ("" if check else f"; those files were not kept, see {bundle}/parity.json"), err=True)
        sys.exit(EXIT_GATE_FAILED)
    click.echo(("check passed: " if check else "export passed: ") + ", ".join(report["artifacts"]), err=True)
