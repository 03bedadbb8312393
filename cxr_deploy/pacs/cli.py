"""``cxr-deploy pacs pull | push``: move DICOM between the PACS and this tool (see :mod:`.transfer`).

Exit codes: 0 done; 3 some instances failed (each named on stderr, and in ``push-log.jsonl``);
2 nothing done (bad config or options).
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from ..cli import fail


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
def pull_command(config_path, study_date, modality, study_uid, limit):
    """QIDO-RS search + WADO-RS retrieve into the spool; instances already spooled are not fetched."""
    from ..errors import CxrDeployError
    from .transfer import pull

    config = _config(config_path)
    try:
        summary = pull(config, study_date=study_date, modality=modality, study_uid=study_uid, limit=limit)
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
    from .transfer import push

    config = _config(config_path)
    files = []
    for item in map(Path, paths):
        files += sorted(p for p in item.glob("*.dcm") if not p.name.startswith(".")) if item.is_dir() else [item]
    first = Path(paths[0])
    summary = push(config, files, log_dir=Path(log_dir) if log_dir else (first if first.is_dir() else first.parent))
    _report(f"push to {config.pacs.ae_title if config.pacs.push.value == 'cstore' else config.pacs.dicomweb_url}",
            summary)
