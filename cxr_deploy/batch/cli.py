"""``cxr-deploy batch`` and ``cxr-deploy evaluate``.

Exit codes (for PACS scripts):

- ``0``: every input has an ``ok`` (or ``skipped``: not an image) row;
- ``3``: finished, but some inputs have ``error`` rows (unreadable files) — see the CSV;
- ``2``: nothing done: bad options, inputs not found or an input folder with no files, an output
  folder that does not exist, bundle missing/corrupt, backend unavailable, ``--out`` (or the report
  folder) exists without ``--resume``/``--overwrite``, or a results CSV that cannot be resumed;
  ``evaluate``: also when no results row matches a label;
- ``130``: interrupted (Ctrl-C / SIGTERM); rows already written are complete, rerun with ``--resume``.
"""

from __future__ import annotations

import os
import sys
from itertools import chain
from pathlib import Path

import click

from ..artifacts import Backend, Device
from ..cli import fail as _fail
from ..signals import deferred
from ..imaging import DEFAULT_MAX_PIXELS
from .choices import CAM_FOR, CAM_FORMATS, ENGINES, PREPROCESS_ON

BACKEND_CHOICES = tuple(b.value for b in Backend)
DEVICE_CHOICES = tuple(d.value for d in Device)


def _labels_for(labels_path, from_folders, class_names, positive):
    from .labels import FolderLabels, LabelIndex, LabelsError

    if labels_path and from_folders:
        _fail("use either --labels or --labels-from-folders, not both")
    try:
        if labels_path:
            return LabelIndex.from_csv(labels_path, class_names, positive)
    except LabelsError as exc:
        _fail(str(exc))
    if from_folders:
        return FolderLabels(class_names, positive)
    return None


def _report(rows, labels, class_names, positive, results_path, out_dir, *, unmatched_fatal=False,
            operating_points=None) -> dict | None:
    from .report import NoMatch, build_report

    try:
        report = build_report(rows, labels, class_names=class_names, positive=positive,
                              results_path=results_path, out_dir=out_dir, operating_points=operating_points)
    except NoMatch as exc:
        if unmatched_fatal:
            _fail(str(exc))
        click.echo(f"report: not written: {exc}", err=True)
        return None
    m = report["metrics"]
    if m.get("n"):
        ci = m["ci95"]["roc_auc"]
        auc = "n/a" if m["roc_auc"] is None else f"{m['roc_auc']:.3f}" + (
            f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else " [CI not estimable]")
        click.echo(f"report: {m['n']} labelled images: accuracy {m['accuracy']:.3f}, sensitivity "
                   f"{m['recall_sensitivity']:.3f}, specificity {m['specificity']:.3f}, F1 {m['f1']:.3f}, "
                   f"ROC AUC {auc}", err=True)
    else:
        click.echo(f"report: {m.get('note')}", err=True)
    click.echo(f"report: {report['files']['html']} (+ report.json, curves)", err=True)
    return report


def _named_threshold(bundle, threshold, name: str) -> float:
    from ..decision import operating_point

    if threshold is not None:
        _fail("use either --threshold or --operating-point, not both")
    try:
        return operating_point(bundle.manifest, name)
    except ValueError as exc:
        _fail(str(exc))


def _check_report_dir(target: Path, results: str, overwrite: bool, same_results_ok: bool) -> None:
    from .report import ReportDirError, check_report_dir

    try:
        check_report_dir(target, results, overwrite=overwrite, same_results_ok=same_results_ok)
    except ReportDirError as exc:
        _fail(str(exc))


@click.command("batch")
@click.argument("inputs", nargs=-1, required=True)
@click.option("--model", "-m", "model", required=True, type=click.Path(), help="Model bundle directory.")
@click.option("--out", "-o", "out", required=True, type=click.Path(dir_okay=False), help="Results CSV (schema v2, see README). Its folder must exist.")
@click.option("--create-dirs", is_flag=True, help="Create missing parent folders of --out, --cam-dir and --report-dir.")
@click.option("--backend", type=click.Choice(BACKEND_CHOICES), default="onnx", show_default=True,
              help="onnx: model.onnx (fp16 on CUDA if exported); onnx-int8: model.int8.onnx; torchscript: model.ts; torch: eager PyTorch from weights.pt.")
@click.option("--device", type=click.Choice(DEVICE_CHOICES), default="auto", show_default=True,
              help="auto: CUDA when it actually works here, else CPU.")
@click.option("--batch-size", "-b", type=click.IntRange(1, 1024), default=16, show_default=True,
              help="Images per model call (larger: faster on a GPU, more memory; results do not depend on it).")
@click.option("--workers", "-j", type=click.IntRange(0, 64), default=None,
              help="Decode worker processes (default: one per core, at most 8 on CPU, 16 with CUDA; 0 = decode in the main process).")
@click.option("--threads", type=click.IntRange(1, 256), default=None, help="Inference threads on CPU (default: all cores).")
@click.option("--cam-dir", type=click.Path(file_okay=False), default=None, help="Write a Grad-CAM overlay image per image here.")
@click.option("--cam-format", type=click.Choice(CAM_FORMATS), default="png", show_default=True,
              help="Overlay file format: PNG (lossless) or JPEG (quality 90: ~6x faster to write and ~10x "
                   "smaller, for overlays of every image in large runs).")
@click.option("--cam-for", type=click.Choice(CAM_FOR), default="all", show_default=True,
              help="Overlays for every image, or only those predicted positive.")
@click.option("--dicom-out", type=click.Path(file_okay=False), default=None,
              help="Write a DICOM Comprehensive SR (TID 1500) and a Secondary Capture of the overlay for every "
                   "scored DICOM input here, in its study (for a PACS).")
@click.option("--uid-root", default="2.25", show_default=True, metavar="ROOT",
              help="UID root of those DICOM objects; their UIDs derive from (source image, model, kind), so a "
                   "rerun replaces rather than duplicates (2.25 = UUID-derived, no registered root needed).")
@click.option("--threshold", type=click.FloatRange(0, 1), default=None, help="Decision threshold (default: the bundle's).")
@click.option("--operating-point", default=None, metavar="NAME",
              help="Use a threshold chosen on validation at training: sens90, sens95, sens98 or youden "
                   "(`cxr-deploy inspect BUNDLE` lists them with their validation sensitivity/specificity).")
@click.option("--labels", "labels_path", type=click.Path(exists=True, dir_okay=False), default=None,
              help="CSV with path,label columns: write a metric report.")
@click.option("--labels-from-folders", is_flag=True, help="Labels are the parent folder names (NORMAL/PNEUMONIA): write a metric report.")
@click.option("--report-dir", type=click.Path(file_okay=False), default=None,
              help="Where the report goes (default: <out>_report/ next to the CSV).")
@click.option("--shard", default=None, metavar="I/N", help="Process only part I of N (1-based); N runs' CSVs together cover every input exactly once.")
@click.option("--resume", is_flag=True, help="Append to an existing --out, skipping inputs it already has a row for.")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out.")
@click.option("--modality", "modalities", multiple=True, metavar="CODE[,CODE]",
              help="Also score DICOMs of this Modality (default: CR and DX only).")
@click.option("--body-part", "body_parts", multiple=True, metavar="TERM[,TERM]",
              help="Also score DICOMs with this BodyPartExamined (default: CHEST, THORAX, LUNG; absent is accepted).")
@click.option("--accept-any-view", is_flag=True, help="Also score lateral and oblique films (ViewPosition LL, RL, ...).")
@click.option("--no-dicom-filter", is_flag=True,
              help="Score every readable image, whatever its DICOM header says (non-chest images get a meaningless probability).")
@click.option("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, show_default=True, help="Refuse larger images (decompression-bomb guard).")
@click.option("--decode-timeout", type=click.FloatRange(min=0), default=120.0, show_default=True, metavar="SECONDS",
              help="Give up on a file whose reading/decoding takes longer (a hung network share, a stuck "
                   "decoder): it gets an error row and the run goes on. 0 = wait forever.")
@click.option("--preprocess-on", type=click.Choice(PREPROCESS_ON), default=None,
              help="Where pixel transforms, resize and normalization run: in the decode workers (numpy/Pillow) "
                   "or batched on the model's device (torch; workers then only read and decode). "
                   "Default: device when the model runs on CUDA, else workers.")
@click.option("--no-progress", is_flag=True, help="No progress bar (it is off anyway when stderr is not a terminal).")
@click.option("--engine", type=click.Choice(ENGINES), default="local", show_default=True,
              help="local: this machine's decode processes and model; ray: a Ray cluster (Ray Data: decode tasks, "
                   "model actors), same CSV rows (pip install 'cxr-deploy[ray]').")
@click.option("--ray-address", default=None, metavar="ADDR",
              help="With --engine ray: the cluster to join (HEAD_IP:6379, auto, ray://HEAD_IP:10001); "
                   "default: a local Ray started for this run and shut down after it.")
def batch_command(inputs, model, out, create_dirs, backend, device, batch_size, workers, threads, cam_dir, cam_format,
                  cam_for, dicom_out, uid_root, threshold, operating_point, labels_path, labels_from_folders, report_dir, shard, resume, overwrite,
                  modalities, body_parts, accept_any_view, no_dicom_filter, max_pixels, decode_timeout, no_progress,
                  preprocess_on, engine, ray_address):
    """Predict over INPUT files, folders (recursive) and @lists (one path a line) into a CSV.

    Only frontal chest radiographs are scored: a DICOM whose Modality, SOP class, BodyPartExamined
    or ViewPosition says otherwise is 'skipped' with the reason. PNG/JPEG carry no such metadata
    and are always scored.

    \b
    Exit codes: 0 all inputs ok (non-image and non-chest files are 'skipped', still 0);
    3 some inputs unreadable (error rows in the CSV); 2 nothing done (usage, inputs missing or
    empty, output folder missing, bundle, backend or results-file problem); 130 interrupted
    (rerun with --resume).
    """
    from ..eligibility import ChestFilter
    from ..errors import CxrDeployError
    from .runner import BatchConfig, BatchUsageError, parse_shard

    if resume and overwrite:
        _fail("use either --resume or --overwrite, not both")
    if ray_address and engine != "ray":
        _fail("--ray-address needs --engine ray")
    try:
        shard_tuple = parse_shard(shard) if shard else (0, 1)
    except BatchUsageError as exc:
        _fail(str(exc))

    config = BatchConfig(inputs=list(inputs), model=model, out=out, backend=backend, device=device,
                         batch_size=batch_size, workers=workers, threads=threads, cam_dir=cam_dir,
                         cam_format=cam_format, cam_for=cam_for, threshold=threshold, shard=shard_tuple, resume=resume,
                         overwrite=overwrite, max_pixels=max_pixels, decode_timeout=decode_timeout,
                         progress=not no_progress, create_dirs=create_dirs, dicom_out=dicom_out, uid_root=uid_root,
                         preprocess_on=preprocess_on,
                         eligibility=ChestFilter.build(",".join(modalities), ",".join(body_parts),
                                                       accept_any_view, not no_dicom_filter))
    if engine == "ray":
        from .ray_engine import check_options

        try:
            check_options(config)  # Ray installed, no option it would ignore: before the bundle loads
        except BatchUsageError as exc:
            _fail(str(exc))
    try:
        from ..bundle import ModelBundle

        bundle = ModelBundle.load(model)
    except CxrDeployError as exc:
        _fail(str(exc))
    positive = bundle.manifest.positive_class
    if operating_point:
        config.threshold = _named_threshold(bundle, threshold, operating_point)
    labels = _labels_for(labels_path, labels_from_folders, bundle.class_names, positive)
    report_target = Path(report_dir) if report_dir else Path(out).with_name(Path(out).stem + "_report")
    if labels is not None:
        from .inputs import check_output_parent

        try:
            check_output_parent(report_target, "--report-dir", create=create_dirs)
        except BatchUsageError as exc:
            _fail(str(exc))
        _check_report_dir(report_target, str(out), overwrite, same_results_ok=resume)
    summary = _run(config, bundle, engine, ray_address)
    # Every row is written: the report is written whole even if a signal comes now (the signal
    # then gives exit 130 once it is), never half.
    with deferred():
        if labels is not None:
            from .results_file import iter_results

            _report(iter_results(out), labels, bundle.class_names, positive, str(out), report_target,
                    operating_points=(bundle.manifest.training or {}).get("operating_points"))
    sys.exit(summary.exit_code)


def _run(config, bundle, engine: str, ray_address: str | None):
    """Run the batch on ``engine``; print the summary; on an interrupt, exit 130 at once."""
    from ..errors import CxrDeployError
    from ..signals import stop_signals_to_main_thread
    from .settings import INTERRUPTED_NOTE

    # systemd/cron timeouts send SIGTERM: stop like Ctrl-C (complete rows only, exit 130).
    with stop_signals_to_main_thread():
        try:
            if engine == "ray":
                from .ray_engine import run_batch_ray

                summary = run_batch_ray(config, bundle=bundle, address=ray_address)
            else:
                from .runner import run_batch

                summary = run_batch(config, bundle=bundle)
        except CxrDeployError as exc:
            _fail(str(exc))
        except OSError as exc:  # e.g. disk full while appending rows: rows written so far are complete
            _fail(f"{exc.strerror or exc} ({getattr(exc, 'filename', '') or config.out}); fix it and rerun with --resume")
        with deferred(raise_at_end=False) as late:
            for line in summary.lines():
                click.echo(line, err=True)
        if late.signalled and not summary.interrupted:  # after the last row: the same as during the run
            summary.interrupted = True
            click.echo(INTERRUPTED_NOTE, err=True)
        if summary.interrupted:
            # The CSV is closed and fsync'ed (and Ray shut down). Leave at once: never wait on the
            # decode pool's threads.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(summary.exit_code)
    return summary


@click.command("evaluate")
@click.argument("results", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--labels", "labels_path", type=click.Path(exists=True, dir_okay=False), default=None,
              help="CSV with path,label columns.")
@click.option("--labels-from-folders", is_flag=True, help="Labels are the parent folder names (NORMAL/PNEUMONIA).")
@click.option("--out-dir", type=click.Path(file_okay=False), default=None,
              help="Where the report goes (default: <first results>_report/).")
@click.option("--class-names", default="NORMAL,PNEUMONIA", show_default=True, help="Comma-separated class names.")
@click.option("--positive-class", default="PNEUMONIA", show_default=True)
@click.option("--overwrite", is_flag=True, help="Replace the files of an existing report folder.")
def evaluate_command(results, labels_path, labels_from_folders, out_dir, class_names, positive_class, overwrite):
    """Metric report (JSON + self-contained HTML + ROC/PR PNGs) from results CSV(s) and labels.

    Several RESULTS files (e.g. the CSVs of --shard runs) are scored together. Exit 2 when no
    results row matches a label (the counts and an unmatched path of each kind are printed).
    """
    from .results_file import ResultsFileError, iter_results

    names = tuple(n.strip() for n in class_names.split(",") if n.strip())
    if positive_class not in names:
        _fail(f"--positive-class {positive_class} is not among --class-names {','.join(names)}")
    labels = _labels_for(labels_path, labels_from_folders, names, positive_class)
    if labels is None:
        _fail("give --labels FILE or --labels-from-folders")
    target = Path(out_dir) if out_dir else Path(results[0]).with_name(Path(results[0]).stem + "_report")
    _check_report_dir(target, ", ".join(results), overwrite, same_results_ok=False)
    try:
        with deferred():  # a report is written whole or not at all, even on Ctrl-C/SIGTERM
            _report(chain.from_iterable(iter_results(r) for r in results), labels, names, positive_class,
                    ", ".join(results), target, unmatched_fatal=True)
    except ResultsFileError as exc:
        _fail(str(exc))
