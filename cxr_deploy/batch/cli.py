"""``cxr-deploy batch``; its exit codes are ``cxr-deploy evaluate``'s too (:mod:`cxr_deploy.reporting.cli`).

Exit codes (for PACS scripts):

- ``0``: every input has an ``ok`` (or ``skipped``: not an image) row;
- ``3``: finished, but some inputs have ``error`` rows (unreadable files) — see the CSV;
- ``4``: finished, but some outputs are missing: an overlay or DICOM result (SR/SC) that could not
  be written (its row's ``error`` says why; ``--resume`` writes them once the cause is fixed), or the
  report; wins over ``3``;
- ``2``: nothing done: bad options, inputs not found or an input folder with no files, an output
  folder that does not exist, bundle missing/corrupt, backend unavailable, ``--out`` (or the report
  folder) exists without ``--resume``/``--overwrite``, an output folder that is not writable, ``--out`` (or the report folder) in use by
  another run (``... is in use by process N``), an output that would land on an input or on a
  file that is not ours (``--overwrite`` replaces only a results CSV), or a results CSV that cannot be resumed;
  ``batch --labels`` and ``evaluate``: also when no results row matches a label (``batch``: after
  the CSV is written); ``evaluate``: also when an image is scored in several rows (without
  ``--dedupe``) or the rows mix models or thresholds;
- ``130``: interrupted (Ctrl-C / SIGTERM); rows already written are complete, rerun with ``--resume``.
"""

from __future__ import annotations

import os
import sys
from contextlib import ExitStack
from pathlib import Path

import click

from ..artifacts import Backend, Device
from ..errors import fail as _fail
from ..signals import deferred
from ..imaging import DEFAULT_MAX_PIXELS
from ..reporting.cli import check_report_target, labels_for, report_outputs, write_report
from .choices import CAM_FOR, CAM_FORMATS, ENGINES, PREPROCESS_ON
from .settings import EXIT_OUTPUTS_MISSING

BACKEND_CHOICES = tuple(b.value for b in Backend)
DEVICE_CHOICES = tuple(d.value for d in Device)


_ELIGIBILITY_OPTIONS = (
    click.option("--modality", "modalities", multiple=True, metavar="CODE[,CODE]",
                 help="Also score DICOMs of this Modality (default: CR and DX only)."),
    click.option("--body-part", "body_parts", multiple=True, metavar="TERM[,TERM]",
                 help="Also score DICOMs with this BodyPartExamined (default: CHEST, THORAX, LUNG; absent is accepted)."),
    click.option("--accept-any-view", is_flag=True, help="Also score lateral and oblique films (ViewPosition LL, RL, ...)."),
    click.option("--no-dicom-filter", is_flag=True,
                 help="Score every readable image, whatever its DICOM header says (non-chest images get a "
                      "meaningless probability)."),
)


def eligibility_options(command):
    """The flags that choose which DICOMs are scored (``modalities``, ``body_parts``,
    ``accept_any_view``, ``no_dicom_filter``): one definition for ``batch`` and ``pacs listen``;
    :func:`eligibility_layer` turns their values into run settings."""
    for option in reversed(_ELIGIBILITY_OPTIONS):
        command = option(command)
    return command


def eligibility_layer(modalities, body_parts, accept_any_view: bool, no_dicom_filter: bool) -> dict:
    """The eligibility flags as :class:`~cxr_deploy.run_settings.RunSettings` fields; a flag not
    given is ``None``, so a lower layer (the config's ``[run]`` table) can still set it."""
    return {"modalities": tuple(modalities) or None, "body_parts": tuple(body_parts) or None,
            "accept_any_view": accept_any_view or None, "dicom_filter": False if no_dicom_filter else None}


def settings_for_run(layers, manifest, announce: bool = True):
    """Merge ``(where, RunSettings)`` layers (flags first) by the one precedence rule and resolve the
    threshold on the bundle (:mod:`cxr_deploy.run_settings`); warn when it is next to 0 or 1 and
    (``announce``) say which threshold the run uses. Exit 2 with one line when they contradict or
    the bundle lacks the operating point. Used by ``batch`` and ``pacs listen``."""
    from ..decision import threshold_warning
    from ..run_settings import RunSettingsError, merge, resolve_decision

    try:
        settings = merge(*layers)
        decision = resolve_decision(manifest, settings) if manifest is not None else None
    except RunSettingsError as exc:
        _fail(str(exc))
    if decision is not None:
        if announce:
            click.echo(decision_line(decision), err=True)
        warning = threshold_warning(decision.threshold)
        if warning:
            click.echo(f"WARNING: {warning}", err=True)
    return settings


def decision_line(decision) -> str:
    from ..decision import number_text

    return f"decision threshold {number_text(decision.threshold)} (operating point {decision.operating_point})"


def _claim_outputs(config, engine: str, labels_path, report_target: Path | None) -> ExitStack:
    """Before any work: no output lands on an input, and ``--out`` (with its Ray parts folder) is
    locked until the command ends (``os._exit`` / ``kill -9``: the kernel releases it)."""
    from ..errors import CxrDeployError
    from .inputs import check_output_parent
    from .outputs import check_outputs, run_lock

    locks = ExitStack()
    click.get_current_context().call_on_close(locks.close)
    try:
        check_outputs(config, labels=labels_path, extra_outputs=report_outputs(report_target) if report_target else ())
        check_output_parent(config.out, "--out", create=config.create_dirs)
        locks.enter_context(run_lock(config, parts=engine == "ray"))  # a second run on --out stops here
    except CxrDeployError as exc:
        _fail(str(exc))
    return locks


@click.command("batch")
@click.argument("inputs", nargs=-1, required=True)
@click.option("--model", "-m", "model", required=True, type=click.Path(), help="Model bundle directory.")
@click.option("--out", "-o", "out", required=True, type=click.Path(dir_okay=False), help="Results CSV (schema v4, see README). Its folder must exist.")
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
              help="Use a threshold chosen on validation at training: sens90, sens95, sens98, spec90/95/98 or "
                   "youden (`cxr-deploy inspect BUNDLE` lists them with their validation sensitivity/specificity), "
                   "or on a site's images by `cxr-deploy calibrate`: site:sens95, site:youden ...")
@click.option("--labels", "labels_path", type=click.Path(exists=True, dir_okay=False), default=None,
              help="CSV with path,label columns: write a metric report.")
@click.option("--labels-from-folders", is_flag=True, help="Labels are the parent folder names (NORMAL/PNEUMONIA): write a metric report.")
@click.option("--report-dir", type=click.Path(file_okay=False), default=None,
              help="Where the report goes (default: <out>_report/ next to the CSV).")
@click.option("--shard", default=None, metavar="I/N", help="Process only part I of N (1-based); N runs' CSVs together cover every input exactly once.")
@click.option("--resume", is_flag=True, help="Append to an existing --out, skipping inputs it already has a row for.")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out.")
@eligibility_options
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
    3 some inputs unreadable, blank or not scorable (error rows in the CSV); 4 some outputs missing
    (an overlay, DICOM result or the report could not be written: the row's error says why; fix it
    and rerun with --resume, which writes them); 2 nothing done (usage, inputs missing or empty,
    output folder missing or not writable, output in use or on an input, bundle, backend or
    results-file problem), or --labels that match no row (the CSV is written, the report is not);
    130 interrupted (rerun with --resume).
    """
    from ..errors import CxrDeployError
    from ..run_settings import RunSettings
    from .inputs import BatchUsageError, parse_shard
    from .settings import BatchConfig

    flags = RunSettings(threshold=threshold, operating_point=operating_point, backend=backend, device=device,
                        engine=engine, **eligibility_layer(modalities, body_parts, accept_any_view, no_dicom_filter))
    settings = settings_for_run([("--threshold/--operating-point", flags)], None)  # contradictions: before any work
    if resume and overwrite:
        _fail("use either --resume or --overwrite, not both")
    if ray_address and engine != "ray":
        _fail("--ray-address needs --engine ray")
    try:
        shard_tuple = parse_shard(shard) if shard else (0, 1)
    except BatchUsageError as exc:
        _fail(str(exc))

    config = BatchConfig(inputs=list(inputs), model=model, out=out, backend=settings.backend, device=settings.device,
                         batch_size=batch_size, workers=workers, threads=threads, cam_dir=cam_dir,
                         cam_format=cam_format, cam_for=cam_for, threshold=settings.threshold,
                         operating_point=settings.operating_point, shard=shard_tuple, resume=resume,
                         overwrite=overwrite, max_pixels=max_pixels, decode_timeout=decode_timeout,
                         progress=not no_progress, create_dirs=create_dirs, dicom_out=dicom_out, uid_root=uid_root,
                         preprocess_on=preprocess_on, eligibility=settings.eligibility)
    engine = settings.engine
    if engine == "ray":
        from .ray_engine import check_options

        try:
            check_options(config)  # Ray installed, no option it would ignore: before the bundle loads
        except BatchUsageError as exc:
            _fail(str(exc))
    report_target = Path(report_dir) if report_dir else Path(out).with_name(Path(out).stem + "_report")
    locks = _claim_outputs(config, engine, labels_path, report_target if labels_path or labels_from_folders else None)
    try:
        from ..bundle import ModelBundle

        bundle = ModelBundle.load(model)
    except CxrDeployError as exc:
        _fail(str(exc))
    positive = bundle.manifest.positive_class
    # the threshold this run uses: a warning now when it is next to 0 or 1, named after the summary
    settings_for_run([("--threshold/--operating-point", flags)], bundle.manifest, announce=False)
    labels = labels_for(labels_path, labels_from_folders, bundle.class_names, positive)
    if labels is not None:
        _claim_report_dir(locks, report_target, config)
    summary = _run(config, bundle, engine, ray_address)
    _finish(summary, config, bundle, labels, report_target)


def _claim_report_dir(locks, report_target: Path, config) -> None:
    """The report folder: exists (or is created), writable, ours to write, and locked for the run."""
    from ..errors import CxrDeployError
    from ..locks import hold
    from .inputs import check_output_parent
    from .outputs import check_writable

    try:
        check_output_parent(report_target, "--report-dir", create=config.create_dirs)
        check_writable(report_target, "--report-dir")  # before the run, not a traceback after it
        locks.enter_context(hold(report_target, what=f"report folder {report_target}"))
    except CxrDeployError as exc:
        _fail(str(exc))
    except OSError as exc:
        _fail(f"cannot write beside {report_target} (lock file): {exc.strerror or exc}")
    check_report_target(report_target, str(config.out), config.overwrite, same_results_ok=config.resume)


def _finish(summary, config, bundle, labels, report_target: Path) -> None:
    """After the last row: the decision line and the report, then the run's exit code. Written whole
    even if a signal comes now (the signal then gives exit 130 once it is), never half."""
    from .rows import run_decision

    from ..population import announce_run

    with deferred():
        click.echo(decision_line(run_decision(bundle, config)), err=True)
        checked = announce_run(bundle, config.out, run_decision(bundle, config).threshold)
        if labels is not None:
            from .results_file import iter_results

            # like evaluate: labels that match no row are a mistake to stop on (exit 2), not a note
            if write_report(iter_results(config.out), labels, bundle.class_names, bundle.manifest.positive_class,
                            str(config.out), report_target, unmatched_fatal=True,
                            operating_points=(bundle.manifest.training or {}).get("operating_points"),
                            population=checked) is None:
                sys.exit(max(summary.exit_code, EXIT_OUTPUTS_MISSING))  # the CSV stands, the report is missing
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
