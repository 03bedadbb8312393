"""``cxr-deploy evaluate``: the metric report of results CSV(s) against labels, each image counted
once (see :mod:`cxr_deploy.reporting.evaluation_set`). Exit codes as ``batch``'s (:mod:`cxr_deploy.batch.cli`)."""

from __future__ import annotations

import os
from pathlib import Path

import click

from ..errors import fail as _fail
from ..signals import deferred


def labels_for(labels_path, from_folders, class_names, positive):
    """The labels of ``--labels FILE`` or ``--labels-from-folders`` (``None``: neither); exit 2 on a bad file."""
    from ..labels import LabelsError
    from .label_match import FolderLabels, LabelIndex

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


def write_report(rows, labels, class_names, positive, results_path, out_dir, *, unmatched_fatal=False,
                 operating_points=None, population=None) -> dict | None:
    """Write the report and print its summary; ``None`` when it could not be written (exit 4)."""
    from .report import NoMatch, build_report

    try:
        report = build_report(rows, labels, class_names=class_names, positive=positive,
                              results_path=results_path, out_dir=out_dir, operating_points=operating_points,
                              population=population)
    except NoMatch as exc:
        if unmatched_fatal:
            _fail(str(exc))
        click.echo(f"report: not written: {exc}", err=True)
        return {}  # not missing: there was nothing to score
    except OSError as exc:  # e.g. the disk filled during the run: the CSV stands, the report is missing
        if unmatched_fatal:  # evaluate: nothing else was done
            _fail(f"report not written: {exc.strerror or exc} ({exc.filename or out_dir})")
        click.echo(f"report: NOT WRITTEN: {exc.strerror or exc} ({exc.filename or out_dir}); fix it, then: "
                   f"cxr-deploy evaluate {results_path} ... --out-dir {out_dir} --overwrite", err=True)
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


def check_report_target(target: Path, results: str, overwrite: bool, same_results_ok: bool) -> None:
    """Exit 2 unless the report folder is ours to write (:func:`.report_dir.check_report_dir`)."""
    from .report_dir import ReportDirError, check_report_dir

    try:
        check_report_dir(target, results, overwrite=overwrite, same_results_ok=same_results_ok)
    except ReportDirError as exc:
        _fail(str(exc))


def report_outputs(target: Path) -> list[tuple[str, Path]]:
    """The report folder and its files, as outputs that must not land on an input."""
    from .report_dir import REPORT_FILES

    return [("--report-dir", target), *(("report file", target / name) for name in REPORT_FILES)]


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
    from ..batch.results_file import ResultsFileError, iter_results

    names = tuple(n.strip() for n in class_names.split(",") if n.strip())
    if positive_class not in names:
        _fail(f"--positive-class {positive_class} is not among --class-names {','.join(names)}")
    labels = labels_for(labels_path, labels_from_folders, names, positive_class)
    if labels is None:
        _fail("give --labels FILE or --labels-from-folders")
    target = Path(out_dir) if out_dir else Path(results[0]).with_name(Path(results[0]).stem + "_report")
    from ..batch.inputs import BatchUsageError
    from ..batch.outputs import Protected, check_not_input

    protected = Protected(results, [labels_path] if labels_path else [])
    try:
        for option, path in report_outputs(target):
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
    check_report_target(target, ", ".join(results), overwrite, same_results_ok=False)
    if not dedupe and len({os.path.realpath(r) for r in results}) < len(results):
        _fail("a results file is given more than once; each image must count once (--dedupe keeps one row per image)")
    try:
        rows = one_scoring(((r, iter_results(r)) for r in results), dedupe=dedupe)
    except (ResultsFileError, MixedResults) as exc:
        _fail(str(exc))
    checked = _population(model, rows) if model else None
    with deferred():  # a report is written whole or not at all, even on Ctrl-C/SIGTERM
        write_report(rows, labels, names, positive_class, ", ".join(results), target, unmatched_fatal=True,
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
