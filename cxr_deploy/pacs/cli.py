"""``cxr-deploy pacs pull | push``: move DICOM between the PACS and this tool (see :mod:`.transfer`);
``cxr-deploy pacs listen``: receive, score and send results as instances arrive (see :mod:`.listen`).

Exit codes of pull and push: 0 done; 3 some instances failed (each named on stderr, and in
``push-log.jsonl``); 2 nothing done (bad config or options).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from ..artifacts import Backend, Device
from ..batch.cli import eligibility_options
from ..errors import fail


def _config(path):
    from ..errors import CxrDeployError
    from .config import load_pacs_config

    try:
        return load_pacs_config(path)
    except CxrDeployError as exc:
        fail(str(exc))


def _report(what: str, summary) -> None:
    c = summary.counts
    click.echo(f"{what}: {c['done']} done, {c['already']} already there, {c['failed']} failed "
               f"in {summary.seconds:.1f} s", err=True)
    for failure in summary.failures[:20]:
        click.echo(f"  failed: {failure}", err=True)
    sys.exit(summary.exit_code)


@click.group("pacs")
def pacs_group():
    """Pull images from a PACS into the spool, push results to it (DICOMweb or DIMSE)."""


@pacs_group.command("pull")
@click.option("--config", "config_path", required=True, type=click.Path(exists=True, dir_okay=False),
              help="PACS config (TOML); see README.")
@click.option("--study-date", default=None, metavar="YYYYMMDD[-YYYYMMDD]", help="Study date or range.")
@click.option("--modality", default=None, help="Modality, e.g. DX or CR.")
@click.option("--study-uid", default=None, help="One study.")
@click.option("--limit", type=click.IntRange(1), default=None, help="At most this many instances.")
@click.option("--parallel", type=click.IntRange(1, 32), default=4, show_default=True,
              help="WADO-RS retrievals at a time.")
def pull_command(config_path, study_date, modality, study_uid, limit, parallel):
    """QIDO-RS search (every page) + WADO-RS retrieve into the spool; instances already spooled are
    not fetched."""
    from ..errors import CxrDeployError
    from .transfer import pull

    config = _config(config_path)
    try:
        summary = pull(config, study_date=study_date, modality=modality, study_uid=study_uid, limit=limit,
                       parallel=parallel)
    except CxrDeployError as exc:
        fail(str(exc))
    _report(f"pull into {config.local.spool}", summary)


@pacs_group.command("push")
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True))
@click.option("--config", "config_path", required=True, type=click.Path(exists=True, dir_okay=False),
              help="PACS config (TOML); [pacs] push = \"stow\" or \"cstore\".")
@click.option("--log-dir", type=click.Path(file_okay=False), default=None,
              help="Where push-log.jsonl lives (default: the first PATH's folder).")
def push_command(paths, config_path, log_dir):
    """Send DICOM files (e.g. a --dicom-out folder) to the PACS, each instance once."""
    from .network import redact_url
    from .transfer import push

    config = _config(config_path)
    files = []
    for item in map(Path, paths):
        files += sorted(p for p in item.glob("*.dcm") if not p.name.startswith(".")) if item.is_dir() else [item]
    first = Path(paths[0])
    remote = config.pacs
    where = f"{remote.ae_title}@{remote.host}:{remote.port}" if remote.push.value == "cstore" else \
        redact_url(remote.dicomweb_url)
    click.echo(f"push: {len(files)} files to {where}", err=True)
    summary = push(config, files, log_dir=Path(log_dir) if log_dir else (first if first.is_dir() else first.parent),
                   note=lambda message: click.echo(f"push: {message}", err=True))
    _report(f"push to {where}", summary)


@pacs_group.command("listen")
@click.option("--config", "config_path", required=True, type=click.Path(exists=True, dir_okay=False),
              help="PACS config (TOML) with a [listen] table.")
@click.option("--model", "-m", "model", required=True, type=click.Path(exists=True, file_okay=False),
              help="Model bundle directory.")
@click.option("--interval", type=click.FloatRange(0), default=0.05, show_default=True, metavar="SECONDS",
              help="How long received instances gather before a scoring pass (instances that arrive during a "
                   "pass are scored together by the next one).")
@click.option("--workers", "-j", type=click.IntRange(0, 64), default=None, help="Decode workers per pass.")
@click.option("--no-push", is_flag=True, help="Score only; do not send results to the PACS.")
@click.option("--uid-root", default="2.25", show_default=True, help="UID root of the result objects.")
@click.option("--operating-point", default=None, metavar="NAME",
              help="Decide with this threshold chosen at training (sens95, youden ...) or by `cxr-deploy "
                   "calibrate` on the site's images (site:sens95 ...). Default: [run] "
                   "operating_point/threshold of the config, else the bundle's threshold.")
@click.option("--threshold", type=click.FloatRange(0, 1), default=None,
              help="Decision threshold (wins over the config's [run] table, like --operating-point).")
@click.option("--backend", type=click.Choice(tuple(b.value for b in Backend)), default=None,
              help="Default: [run] backend of the config, else onnx.")
@click.option("--device", type=click.Choice(tuple(d.value for d in Device)), default=None,
              help="Default: [run] device of the config, else auto.")
@eligibility_options
def listen_command(config_path, model, interval, workers, no_push, uid_root, operating_point, threshold, backend,
                   device, modalities, body_parts, accept_any_view, no_dicom_filter):
    """C-STORE SCP: receive into the spool, score as instances arrive, send SR + SC to the PACS.

    Run settings (threshold, backend, device, which DICOMs are scored): a flag wins over the
    config's [run] table, which wins over the bundle."""
    import logging

    from ..batch.cli import decision_line, eligibility_layer, settings_for_run
    from ..batch.rows import base_row
    from ..bundle import ModelBundle
    from ..errors import CxrDeployError
    from ..locks import hold
    from ..run_settings import RunSettings, resolve_decision
    from ..signals import stop_signals_to_main_thread
    from .listen import StoreHandler, clean_partials
    from .passes import Passes, listen_batch_config
    from .pusher import Pusher
    from .resident import ResidentModel
    from .spool import incoming_dir

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    for noisy in ("pynetdicom", "highdicom"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    config = _config(config_path)
    try:  # the manifest for the run settings; the artifacts are verified when the model loads, below
        bundle = ModelBundle.load(model, verify=False)
        manifest = bundle.manifest
    except CxrDeployError as exc:
        fail(str(exc))
    flags = RunSettings(threshold=threshold, operating_point=operating_point, backend=backend, device=device,
                        **eligibility_layer(modalities, body_parts, accept_any_view, no_dicom_filter))
    layers = [("pacs listen flags", flags), (f"{config_path} [run]", config.run)]
    run = settings_for_run(layers, manifest, announce=False)
    settings = config.listen
    if not settings.allowed_ae_titles:
        fail(f"{config_path}: [listen] allowed_ae_titles is empty; list the AE titles that may send images "
             "(an SCP open to anyone is refused)")
    spool = Path(config.local.spool)
    incoming = incoming_dir(spool)
    try:  # one listener per spool for its whole life (a second would delete the first's partial files)
        spool.mkdir(parents=True, exist_ok=True)
        click.get_current_context().with_resource(hold(spool, inside=True, what=f"spool {spool}"))
    except CxrDeployError as exc:
        fail(str(exc))
    except OSError as exc:
        fail(f"cannot write to the spool {spool}: {exc.strerror or exc}")
    click.echo(decision_line(resolve_decision(manifest, run)), err=True)  # the spool is ours: now say it
    clean_partials(incoming)
    # loaded once for the listener's life (verified again only if the bundle's files change)
    resident = ResidentModel(listen_batch_config(spool, incoming, model, workers=workers, uid_root=uid_root,
                                                 settings=run))
    try:
        resident.current()  # before the first association: the first instance does not wait for it
    except CxrDeployError as exc:
        fail(str(exc))
    handler = StoreHandler(settings, incoming)
    with stop_signals_to_main_thread():
        server = _start_servers(settings, handler)
        click.echo(f"listening as {settings.ae_title} on {settings.bind}:{settings.port}; spool {spool}; "
                   f"allowed: {', '.join(settings.allowed_ae_titles)}", err=True)
        pusher = None if no_push else Pusher(config, Path(resident.config.dicom_out), handler, resident.config)
        base = base_row(resolve_decision(manifest, run), bundle.model_id, "")  # the rows of instances kept apart
        _score_until_stopped(server, handler, resident, pusher, spool, Passes(handler, interval, base))
    # Everything received is fsync'ed in the spool, every row in the CSV, every push in its log:
    # leave at once rather than wait on library threads (a stop must never hang a systemd unit).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _score_until_stopped(server, handler, resident, pusher, spool: Path, passes) -> None:
    """A scoring pass at start-up (what a killed run left unscored), then one per arrival burst, and
    again while results are missing (:class:`~.passes.Passes`), until SIGTERM or Ctrl-C; then the
    SCP, the pusher and the decode workers stop."""
    from ..errors import CxrDeployError
    from ..signals import check as check_stop
    from .passes import score_and_push
    from .spool import incoming_dir

    try:
        while True:
            passes.run(lambda: score_and_push(spool, incoming_dir(spool), resident, None, handler=handler,
                                              pusher=pusher))
            passes.wait(check_stop)
    except KeyboardInterrupt:
        handler.metrics.stopping = True  # /health: 503 from now on
        click.echo("stopping: no new associations; unscored instances stay in the spool for the next start",
                   err=True)
    except CxrDeployError as exc:
        _shutdown(server)
        fail(str(exc))
    _shutdown(server)
    if pusher is not None:
        pusher.stop()  # the object in hand is finished; the rest go at the next start
    resident.close()  # the decode workers go now, not as leaked processes of an os._exit


def _start_servers(settings, handler):
    """The SCP and, with ``metrics_port``, the metrics endpoint; a port taken: exit 2, one line."""
    from .listen import start_scp

    try:
        server = start_scp(settings, handler)
    except OSError as exc:
        fail(f"cannot listen on {settings.bind}:{settings.port}: {exc.strerror or exc}")
    if settings.metrics_port:
        from .metrics import serve

        try:
            serve(handler.metrics, settings.metrics_bind, settings.metrics_port)
        except OSError as exc:
            _shutdown(server)
            fail(f"cannot serve metrics on {settings.metrics_bind}:{settings.metrics_port}: {exc.strerror or exc}")
    return server


def _shutdown(server, timeout: float = 5.0) -> None:
    import threading

    closer = threading.Thread(target=server.shutdown, daemon=True)
    closer.start()
    closer.join(timeout)
