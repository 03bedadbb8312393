"""``cxr-deploy demo``: the whole pipeline on the bundled samples, in a few minutes on a laptop CPU.

    train (random init, briefly) -> export (TorchScript, ONNX [+ INT8], parity gate)
    -> batch (CSV, Grad-CAM overlays, metric report)

Each step runs the real ``cxr-deploy`` sub-command in this process, and the equivalent command line
is printed first, so the demo doubles as a tour of the CLI. The model it trains is a **demo**: a
dozen images, two minutes, no pretrained weights. It says nothing about pneumonia.
"""

from __future__ import annotations

import shlex
import shutil
import time
from pathlib import Path

import click

DEFAULT_SAMPLES = Path(__file__).resolve().parent.parent / "samples"  # the repository's samples/
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
    (out_dir / MARKER).write_text("made by 'cxr-deploy demo'; a rerun replaces only its own outputs here\n")


def _run(args: list[str]) -> int:
    from cxr_deploy.cli import main

    click.secho("\n$ cxr-deploy " + " ".join(shlex.quote(a) for a in args), fg="cyan", bold=True)
    try:
        code = main.main(args=args, prog_name="cxr-deploy", standalone_mode=False)
    except SystemExit as exc:  # commands end with sys.exit(status) to give scripts their exit codes
        code = exc.code
    return int(code or 0)


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
    samples_dir = samples_dir or (DEFAULT_SAMPLES if DEFAULT_SAMPLES.is_dir() else Path("samples"))
    labels = samples_dir / "labels.csv"
    if not labels.is_file():
        raise click.UsageError(f"no samples at {samples_dir} (labels.csv missing); pass --samples DIR")
    prepare_out_dir(out_dir)
    started = time.perf_counter()
    click.secho("cxr-deploy demo — a DEMO model trained for minutes on a dozen images from random weights; "
                "its predictions are meaningless.", fg="yellow")

    run_dir, bundle = out_dir / "train", out_dir / "train" / "best"
    code = _run(["train", "--data", str(labels), "--weights", "none", "--input-size", str(input_size),
                 "--epochs-stage1", "1", "--epochs-stage2", str(epochs), "--batch-size", "4",
                 "--lr", "1e-3", "--num-workers", "0", "--out", str(run_dir), "--no-progress"])
    if code or not bundle.is_dir():
        raise click.ClickException(f"training failed (exit {code})")

    export_args = ["export", str(bundle), "--parity-images", str(samples_dir)]
    if int8:
        export_args += ["--int8", "--calibration", str(samples_dir), "--int8-eval", str(labels),
                        # Twelve images cannot support the production INT8 gate (1% of 12 is not one
                        # image), and a barely trained model sits near its threshold; the demo
                        # reports the gate's figures but serves with the fp32 ONNX model.
                        "--int8-min-agreement", "0", "--int8-max-auc-delta", "1"]
    code = _run(export_args)
    if code:
        raise click.ClickException(f"export failed its parity gate (exit {code}); see {bundle / 'parity.json'}")

    results = out_dir / "results.csv"
    code = _run(["batch", str(samples_dir), "--model", str(bundle), "--out", str(results),
                 "--backend", "onnx", "--cam-dir", str(out_dir / "overlays"),
                 "--labels", str(labels), "--report-dir", str(out_dir / "report"), "--no-progress"])
    if code not in (0, 3):
        raise click.ClickException(f"batch failed (exit {code})")

    click.secho(f"\nDemo finished in {time.perf_counter() - started:.0f} s. Outputs:", fg="green", bold=True)
    for label, path in [("model bundle (weights, TorchScript, ONNX, manifest)", bundle),
                        ("training curves", run_dir / "curves.png"),
                        ("parity report", bundle / "parity.json"),
                        ("predictions CSV", results),
                        ("Grad-CAM overlays", out_dir / "overlays"),
                        ("metric report (HTML)", out_dir / "report" / "report.html")]:
        mark = "" if path.exists() else "  (missing!)"
        click.echo(f"  {label:<52} {path}{mark}")
