"""Where a batch run may write: never onto an input, never over a file that is not ours.

Rules, checked before any work (a violation is a :class:`BatchUsageError`, exit 2, one line):

- no output path (``--out``, ``--cam-dir``, ``--dicom-out``, the Ray parts folder, the report folder
  and its files) may resolve (real path, symlinks followed; hard links by ``samefile``) to an input:
  a file named as an input or listed in a regular-file ``@list``, the ``--labels`` CSV, an input
  folder, or a place inside an input folder that its scan would pick up (hidden names are never
  scanned, so ``folder/.results.csv`` is allowed);
- ``--overwrite`` replaces only a results CSV of ours (its header is one of the schema layouts) or
  an empty file, and never a file with other hard links; ``--resume`` appends only to one of ours;
- every output folder accepts a new file (:func:`check_writable`), before any work;
- one run per output at a time (:func:`run_lock`, :mod:`cxr_deploy.locks`);
- ``--resume`` scores again the rows whose overlay or DICOM results are missing
  (:func:`rows_missing_outputs`), so they get written and the CSV keeps one row per input.
"""

from __future__ import annotations

import os
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Iterable, Iterator

from .inputs import BatchUsageError
from .results_file import is_results_file


def _real(path: str | Path) -> str:
    return os.path.realpath(os.path.abspath(path))


class Protected:
    """The inputs a run reads, and must never write over: named files and folders (real paths),
    ``@list`` files and the paths a regular-file list names (absolute paths only: a list may name a
    million files), and ``extra`` (``--labels``). A FIFO list is read once, by the run itself."""

    def __init__(self, inputs: Iterable[str], extra: Iterable[str | Path] = ()):
        self.named: list[str] = []  # as given, for the message
        self.listed: dict[str, str] = {}  # absolute path -> as listed
        for item in map(str, inputs):
            if item.startswith("@"):
                self.named.append(item[1:])
                self._read_list(item[1:])
            else:
                self.named.append(item)
        self.named += [str(p) for p in extra if p]
        self.real = [(_real(item), item) for item in self.named]

    def _read_list(self, path: str) -> None:
        if not os.path.isfile(path):
            return
        try:
            with open(path, encoding="utf-8", errors="surrogateescape") as fh:
                for line in fh:
                    line = line.rstrip("\r\n")
                    if line.strip() and not line.lstrip().startswith("#"):
                        self.listed[os.path.abspath(line)] = line
        except OSError:
            pass  # the run reports an unreadable list itself

    def conflict(self, output: str | Path) -> str | None:
        """Why ``output`` would write over an input (``None`` when it would not)."""
        real, exists = _real(output), os.path.exists(output)
        for item_real, item in self.real:
            if real == item_real:
                return f"is the input {item}"
            if os.path.isdir(item_real):
                inside = os.path.relpath(real, item_real)
                if not inside.startswith(os.pardir) and not any(p.startswith(".") for p in inside.split(os.sep)):
                    return f"is inside the input folder {item} (its scan would read it)"
            elif exists and os.path.exists(item_real):
                try:
                    if os.path.samefile(output, item_real):
                        return f"is the input {item} (a hard link to it)"
                except OSError:
                    pass
        for path in (os.path.abspath(output), real):
            if path in self.listed:
                return f"is the input {self.listed[path]} (listed in an @list)"
        return None


def check_not_input(output: str | Path | None, option: str, protected: Protected) -> None:
    if output is None or str(output) == "":
        return
    reason = protected.conflict(output)
    if reason:
        raise BatchUsageError(f"{option} {output} {reason}; write the results elsewhere (inputs are never replaced)")


def check_replaceable_results(out: str | Path, *, resume: bool) -> None:
    """An existing non-empty ``--out`` is continued or replaced only when it is a results CSV of
    ours; ``--overwrite`` never truncates a file that has other hard links (they would lose it too)."""
    out = Path(out)
    try:
        st = out.stat()
    except OSError:
        return
    if not out.is_file():
        raise BatchUsageError(f"--out {out} is not a regular file; give a CSV file name")
    if st.st_size == 0:
        return
    if not is_results_file(out):
        verb = "continued" if resume else "replaced"
        raise BatchUsageError(f"--out {out} exists and is not a cxr-deploy results CSV (its first line is not a "
                              f"results header); not {verb}: choose another --out")
    if not resume and st.st_nlink > 1:
        raise BatchUsageError(f"--out {out} has {st.st_nlink - 1} other hard link(s); not replaced: remove them "
                              "or choose another --out")


def check_outputs(config, *, labels: str | Path | None = None, extra_outputs: Iterable[tuple[str, Path]] = ()) -> None:
    """Every output of ``config`` (plus ``extra_outputs``: ``(option, path)``, e.g. the report files)
    against every input and ``labels``; then ``--out`` itself (see :func:`check_replaceable_results`)."""
    from .parts import parts_dir

    protected = Protected(config.inputs, [labels] if labels else [])
    outputs = [("--out", config.out), ("--cam-dir", config.cam_dir), ("--dicom-out", config.dicom_out),
               ("the parts folder of --out", parts_dir(config.out)), *extra_outputs]
    for option, path in outputs:
        check_not_input(path, option, protected)
    if config.resume or config.overwrite:
        check_replaceable_results(config.out, resume=config.resume)


def rows_missing_outputs(config, bundle) -> set[str]:
    """Inputs already scored (``ok``) in the ``--out`` being resumed whose requested outputs are
    missing: an overlay (``--cam-dir``; for ``--cam-for positive`` only positive rows) that the row
    does not name or that is gone, or the DICOM SR/SC of a DICOM row (``--dicom-out``). Only inputs
    that still exist: scoring a deleted file again would replace a valid row with an error."""
    if not (config.resume and (config.cam_dir or config.dicom_out)) or not os.path.isfile(config.out):
        return set()
    from .choices import CamFor
    from .results_file import iter_results

    positive, redo, covered = bundle.manifest.positive_class, set(), _covered_by(config)
    for row in iter_results(config.out):
        path = row.get("path", "")
        if row.get("status") != "ok" or not os.path.isfile(path) or not covered(path):
            continue
        if config.cam_dir and (config.cam_for == CamFor.ALL or row.get("predicted_label") == positive):
            if not row.get("overlay_path") or not os.path.isfile(row["overlay_path"]):
                redo.add(path)
                continue
        if config.dicom_out and row.get("format") == "dicom" and _dicom_results_missing(config, bundle, row):
            redo.add(path)
    return redo


def _covered_by(config):
    """``path -> bool``: would this run's inputs and shard yield ``path`` again (as
    :func:`~cxr_deploy.batch.inputs.iter_entries` names it)? A row is only taken out of the CSV to
    be scored again when it will be. A FIFO ``@list`` cannot be read twice: none of its paths."""
    from .inputs import expand_inputs, in_shard, shard_key

    files, folders = {}, []
    for item in config.inputs:
        item = str(item)
        if item.startswith("@") and not os.path.isfile(item[1:]):
            continue
        for entry, root in expand_inputs([item]):
            if root is not None:
                folders.append(os.path.abspath(root))
            else:
                files[os.path.abspath(entry)] = entry

    def covered(path: str) -> bool:
        if path in files:
            return in_shard(shard_key(files[path], None), config.shard)
        for root in folders:
            inside = os.path.relpath(path, root)
            if not inside.startswith(os.pardir) and not any(p.startswith(".") for p in inside.split(os.sep)):
                return in_shard(shard_key(path, root), config.shard)
        return False

    return covered


def _dicom_results_missing(config, bundle, row: dict) -> bool:
    from ..pacs.results import result_paths
    from ..pacs.uids import is_uid_file_name

    uid = row.get("sop_instance_uid") or ""
    if not is_uid_file_name(uid):  # the rule result_paths names files by (a leading zero allowed)
        return False  # no result is ever written for it
    return not all(p.is_file() for p in result_paths(config.dicom_out, uid, bundle.model_id))


def check_writable(folder: str | Path | None, option: str) -> None:
    """``folder`` (or, before it exists, the folder it will be made in) accepts a new file: tried
    for real (``os.access`` says yes to root on a read-only mount)."""
    from ..atomic import check_writable as try_create

    if folder is None or str(folder) == "":
        return
    probe = Path(folder) if Path(folder).is_dir() else Path(os.path.abspath(folder)).parent
    try:
        try_create(probe)
    except OSError as exc:
        raise BatchUsageError(f"{option} {folder}: cannot write in {probe}: {exc.strerror or exc}") from None


@contextmanager
def run_lock(config, *, parts: bool = False, report_dir: str | Path | None = None) -> Iterator[None]:
    """Hold ``--out`` (and with ``parts`` its Ray parts folder, with ``report_dir`` that folder)
    exclusively for the ``with`` block: a second run on them stops at once with
    :class:`~cxr_deploy.locks.InUse` (``<out> is in use by process N``). See :mod:`cxr_deploy.locks`."""
    from ..locks import hold
    from .parts import parts_dir

    targets = [(config.out, str(config.out))]
    if parts:
        targets.append((parts_dir(config.out), f"the parts folder {parts_dir(config.out)}"))
    if report_dir is not None:
        targets.append((report_dir, f"report folder {report_dir}"))
    with ExitStack() as stack:
        for path, what in targets:
            try:
                stack.enter_context(hold(path, what=what))
            except OSError as exc:
                raise BatchUsageError(f"cannot write beside {path} (lock file): {exc.strerror or exc}") from None
        yield
