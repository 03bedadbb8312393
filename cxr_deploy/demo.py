"""``cxr-deploy demo``: the whole pipeline on the bundled samples, in a few minutes on a laptop CPU.

An orchestrator over the three parts' Python APIs — training (:func:`cxr_deploy.training.train`),
export (:func:`cxr_deploy.export.export_bundle`) and the runtime (:func:`cxr_deploy.run_batch` and
the metric report) — never over the command line itself. It prints the equivalent ``cxr-deploy``
command before each step, so the demo doubles as a tour of the CLI. The model it trains is a
**demo**: a dozen images, two minutes, no pretrained weights. It says nothing about pneumonia.

With ``cxr_deploy.cli`` (the command router) it is the only module under ``cxr_deploy/`` that
reaches training and export, and only when the command runs.
"""

from __future__ import annotations

import shlex
import shutil
import time
from pathlib import Path

import click

from . import atomic

REPO_SAMPLES = Path(__file__).resolve().parent.parent / "samples"  # the repository's samples/
MARKER = ".cxr-deploy-demo"  # written into every --out the demo creates
OUTPUTS = ("train", "results.csv", "overlays", "report")  # everything the demo writes under --out


def prepare_out_dir(out_dir: Path) -> None:
    """Make ``out_dir`` ready for a demo run without ever deleting what the demo did not create.

    New or empty folder: used, and marked. A folder carrying the marker (an earlier demo run):
    only the demo's own outputs in it are replaced. Anything else: refused with one line.
    """
    if out_dir.exists() and not out_dir.is_dir():
        raise click.UsageError(f"--out {out_dir} is a file, not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        if not (out_dir / MARKER).is_file():
            raise click.UsageError(f"--out {out_dir} is not empty and was not made by 'cxr-deploy demo'; "
                                   "nothing was changed: choose a new or empty folder")
        for name in OUTPUTS:
            target = out_dir / name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            elif target.exists() or target.is_symlink():
                target.unlink()
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic.write_text(out_dir / MARKER, "made by 'cxr-deploy demo'; a rerun replaces only its own outputs here\n")


def _show(*args) -> None:
    click.secho("\n$ cxr-deploy " + " ".join(shlex.quote(str(a)) for a in args), fg="cyan", bold=True)


def _train(labels: Path, run_dir: Path, input_size: int, epochs: int) -> Path:
    from cxr_deploy.training import TrainConfig, train

    _show("train", "--data", labels, "--weights", "none", "--input-size", input_size, "--epochs-stage1", 1,
          "--epochs-stage2", epochs, "--batch-size", 4, "--lr", "1e-3", "--num-workers", 0, "--out", run_dir,
          "--no-progress")
    return train(TrainConfig(data=str(labels), weights="none", input_size=input_size, epochs_stage1=1,
                             epochs_stage2=epochs, batch_size=4, lr=1e-3, num_workers=0, out=str(run_dir),
                             progress=False))


def _export(bundle: Path, samples: Path, labels: Path, int8: bool) -> None:
    from cxr_deploy.export import export_bundle
    from cxr_deploy.export.cli import print_summary

    extra = ["--int8", "--calibration", samples, "--int8-eval", labels, "--int8-min-agreement", "0",
             "--int8-max-auc-delta", "1"] if int8 else []
    _show("export", bundle, "--parity-images", samples, *extra)
    # Twelve images cannot support the production INT8 gate (1% of 12 is not one image), and a
    # barely trained model sits near its threshold; the demo reports the gate's figures but serves
    # with the fp32 ONNX model.
    report = export_bundle(bundle, parity_inputs=[samples], int8=int8, calibration=samples if int8 else None,
                           int8_eval=labels if int8 else None,
                           tolerances={"int8_min_agreement": 0.0, "int8_max_auc_delta": 1.0} if int8 else None,
                           progress=lambda message: click.echo(f"[export] {message}", err=True))
    print_summary(report)
    if not report["passed"]:
        raise click.ClickException(f"export failed its parity gate; see {bundle / 'parity.json'}")


def _batch(samples: Path, bundle: Path, labels: Path, out_dir: Path) -> None:
    from cxr_deploy.api import run_batch
    from cxr_deploy.reporting.label_match import LabelIndex
    from cxr_deploy.reporting.report import build_report
    from cxr_deploy.batch.results_file import iter_results
    from cxr_deploy.bundle import ModelBundle

    results, overlays, report_dir = out_dir / "results.csv", out_dir / "overlays", out_dir / "report"
    _show("batch", samples, "--model", bundle, "--out", results, "--backend", "onnx", "--cam-dir", overlays,
          "--labels", labels, "--report-dir", report_dir, "--no-progress")
    summary = run_batch([samples], model=bundle, out=results, backend="onnx", cam_dir=overlays)
    for line in summary.lines():
        click.echo(line, err=True)
    if summary.exit_code not in (0, 3):
        raise click.ClickException(f"batch failed (exit {summary.exit_code})")
    manifest = ModelBundle.load(bundle).manifest
    index = LabelIndex.from_csv(labels, manifest.class_names, manifest.positive_class)
    report = build_report(iter_results(results), index, class_names=manifest.class_names,
                          positive=manifest.positive_class, results_path=str(results), out_dir=report_dir)
    m = report["metrics"]
    click.echo(f"report: {m['n']} labelled images, ROC AUC {m['roc_auc'] if m['roc_auc'] is None else round(m['roc_auc'], 3)}"
               f"; {report['files']['html']}", err=True)


@click.command("demo")
@click.option("--samples", "samples_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder with images and labels.csv (default: the repository's samples/).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=Path("demo-output"),
              show_default=True, help="Where every output goes: a new or empty folder, or an earlier demo's "
                                      "(only the demo's own outputs in it are replaced).")
@click.option("--input-size", type=int, default=224, show_default=True)
@click.option("--epochs", type=int, default=2, show_default=True, help="Stage-2 epochs (stage 1: 1 epoch).")
@click.option("--int8/--no-int8", default=False, show_default=True,
              help="Also export an INT8 model (adds about a minute) and report its statistical gate.")
def demo_command(samples_dir: Path | None, out_dir: Path, input_size: int, epochs: int, int8: bool):
    """Whole pipeline on samples/: demo train -> export -> batch -> report (a DEMO model, not clinical)."""
    samples_dir = samples_dir or (REPO_SAMPLES if REPO_SAMPLES.is_dir() else Path("samples"))
    labels = samples_dir / "labels.csv"
    if not labels.is_file():
        raise click.UsageError(f"no samples at {samples_dir} (labels.csv missing); pass --samples DIR")
    prepare_out_dir(out_dir)
    started = time.perf_counter()
    click.secho("cxr-deploy demo — a DEMO model trained for minutes on a dozen images from random weights; "
                "its predictions are meaningless.", fg="yellow")
    run_dir = out_dir / "train"
    bundle = _train(labels, run_dir, input_size, epochs)
    _export(bundle, samples_dir, labels, int8)
    _batch(samples_dir, bundle, labels, out_dir)

    click.secho(f"\nDemo finished in {time.perf_counter() - started:.0f} s. Outputs:", fg="green", bold=True)
    for label, path in [("model bundle (weights, TorchScript, ONNX, manifest)", bundle),
                        ("training curves", run_dir / "curves.png"),
                        ("parity report", bundle / "parity.json"),
                        ("predictions CSV", out_dir / "results.csv"),
                        ("Grad-CAM overlays", out_dir / "overlays"),
                        ("metric report (HTML)", out_dir / "report" / "report.html")]:
        mark = "" if path.exists() else "  (missing!)"
        click.echo(f"  {label:<52} {path}{mark}")
