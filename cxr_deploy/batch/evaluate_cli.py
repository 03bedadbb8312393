"""``cxr-deploy evaluate``: the metric report of results CSV(s) against labels, each image counted
once (see :mod:`cxr_deploy.batch.evaluation_set`). Exit codes as ``batch``'s (:mod:`.cli`)."""

from __future__ import annotations

import os
from pathlib import Path

import click

from ..cli import fail as _fail
from ..signals import deferred
from .cli import _check_report_dir, _labels_for, _report, _report_outputs


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
@click.option("--model", "model", type=click.Path(file_okay=False), default=None,
              help="The bundle that scored the results: compare their population with its reference "
                   "(population-shift alarm, docs/site-trust.md).")
@click.option("--dedupe", is_flag=True,
              help="An image scored in several rows (the same file given twice, overlapping runs) counts once: "
                   "its last row, in the order the files are given. Without it such input is refused.")
def evaluate_command(results, labels_path, labels_from_folders, out_dir, class_names, positive_class, overwrite,
                     dedupe, model=None):
    """Metric report (JSON + self-contained HTML + ROC/PR PNGs) from results CSV(s) and labels.

    Several RESULTS files (e.g. the CSVs of --shard runs) are scored together: each image must be
    scored once, by one model at one threshold. Exit 2 when an image is scored in more than one row
    (unless --dedupe), when the rows mix models or thresholds, or when no results row matches a
    label (the counts and an unmatched path of each kind are printed).
    """
    from .evaluation_set import MixedResults, one_scoring
    from ..errors import CxrDeployError
    from .results_file import ResultsFileError, iter_results

    names = tuple(n.strip() for n in class_names.split(",") if n.strip())
    if positive_class not in names:
        _fail(f"--positive-class {positive_class} is not among --class-names {','.join(names)}")
    labels = _labels_for(labels_path, labels_from_folders, names, positive_class)
    if labels is None:
        _fail("give --labels FILE or --labels-from-folders")
    target = Path(out_dir) if out_dir else Path(results[0]).with_name(Path(results[0]).stem + "_report")
    from .inputs import BatchUsageError
    from .outputs import Protected, check_not_input

    protected = Protected(results, [labels_path] if labels_path else [])
    try:
        for option, path in _report_outputs(target):
            check_not_input(path, "--out-dir" if option == "--report-dir" else option, protected)
    except BatchUsageError as exc:
        _fail(str(exc))
    from ..locks import hold

    try:  # one writer per report folder, from the check to the last file
        click.get_current_context().with_resource(hold(target, what=f"report folder {target}"))
    except CxrDeployError as exc:
        _fail(str(exc))
    except OSError as exc:
        _fail(f"cannot write beside {target} (lock file): {exc.strerror or exc}")
    _check_report_dir(target, ", ".join(results), overwrite, same_results_ok=False)
    if not dedupe and len({os.path.realpath(r) for r in results}) < len(results):
        _fail("a results file is given more than once; each image must count once (--dedupe keeps one row per image)")
    try:
        rows = one_scoring(((r, iter_results(r)) for r in results), dedupe=dedupe)
    except (ResultsFileError, MixedResults) as exc:
        _fail(str(exc))
    checked = _population(model, rows) if model else None
    with deferred():  # a report is written whole or not at all, even on Ctrl-C/SIGTERM
        _report(rows, labels, names, positive_class, ", ".join(results), target, unmatched_fatal=True,
                population=checked)


def _population(model: str, rows: list[dict]) -> dict:
    """The population-shift check of these rows against ``model``'s reference, said on the terminal."""
    from ..bundle import ModelBundle
    from ..errors import CxrDeployError
    from ..population import check_rows

    try:
        check = check_rows(ModelBundle.load(model), rows)
    except CxrDeployError as exc:
        _fail(str(exc))
    for line in check.lines():
        click.echo(line, err=True)
    return check.record
