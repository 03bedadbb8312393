"""The report folder: its file names (one definition), and the guard that never replaces a report
folder's contents without ``--overwrite`` nor, even with it, a file this tool did not write."""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import CxrDeployError


class ReportDirError(CxrDeployError):
    """The report folder exists and holds something this run must not replace."""


REPORT_JSON, REPORT_HTML = "report.json", "report.html"
CURVES = ("roc", "pr", "calibration")  # written as <kind>.png
REPORT_FILES = (REPORT_JSON, REPORT_HTML, *(f"{kind}.png" for kind in CURVES))
SOFTWARE = "cxr-deploy"  # the curves' PNG "Software" text: how a rerun knows they are its own
HTML_HEAD = "<!doctype html><html><head><meta charset=utf-8><title>cxr-deploy report</title>"


def _our_report_json(folder: Path) -> dict | None:
    """The folder's report.json when it is a report of ours, else ``None``."""
    try:
        data = json.loads((folder / REPORT_JSON).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and "metrics" in data and "cxr_deploy_version" in data else None


def _foreign_report_file(folder: Path) -> Path | None:
    """A file at one of the report's names that this tool did not write (``None``: all ours).
    Ours: report.json of ours, the files it lists, an HTML page that begins like ours."""
    ours = _our_report_json(folder)
    listed = {Path(p).name for p in (ours or {}).get("files", {}).values()}
    for name in REPORT_FILES:
        path = folder / name
        if not os.path.lexists(path):
            continue
        if not path.is_file() or path.is_symlink():
            return path
        if name == REPORT_JSON and ours is None:
            return path
        if name == REPORT_HTML and name not in listed:
            try:
                with open(path, encoding="utf-8", errors="replace") as fh:
                    if fh.read(len(HTML_HEAD)) != HTML_HEAD:
                        return path
            except OSError:
                return path
        elif name not in (REPORT_JSON, REPORT_HTML) and name not in listed and not _our_png(path):
            return path
    return None


def _our_png(path: Path) -> bool:
    from PIL import Image

    try:
        with Image.open(path) as image:
            return image.format == "PNG" and image.text.get("Software", "").startswith(SOFTWARE)
    except Exception:  # noqa: BLE001 - not an image we can read: not provably ours
        return False


def check_report_dir(target: str | Path, results: str, *, overwrite: bool, same_results_ok: bool) -> None:
    """Never replace a report folder's contents without ``--overwrite``, and never, even with it, a
    file at one of the report's names that this tool did not write. ``same_results_ok``: a folder
    whose report.json was written for this same results file may be refreshed (``batch --resume``
    completing its own report). Hidden names (``.lock``) do not count."""
    target = Path(target)
    if not target.exists():
        return
    if not target.is_dir():
        raise ReportDirError(f"report folder {target} exists and is not a directory")
    if not any(not p.name.startswith(".") for p in target.iterdir()):
        return
    foreign = _foreign_report_file(target)
    if foreign is not None:
        raise ReportDirError(f"report folder {target}: {foreign.name} there was not written by cxr-deploy; "
                             "not replaced: choose another folder")
    previous = (_our_report_json(target) or {}).get("results")
    if overwrite or (same_results_ok and previous == str(results)):
        return
    what = f"holds the report for {previous}" if previous else "is not empty"
    raise ReportDirError(f"report folder {target} already exists and {what}; add --overwrite to replace it, "
                         "or choose another folder")


