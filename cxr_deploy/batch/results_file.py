"""The results CSV: a versioned contract for PACS scripts, written so a crash never corrupts it.

Schema (version :data:`SCHEMA_VERSION`), one row per input file, columns in this order:

=======================  ===================================================================
path                     absolute path of the input file
status                   ``ok`` | ``error`` (could not be read/predicted) | ``skipped`` (not an image)
error                    one-line reason when status is not ``ok``, else empty
probability              probability of the positive class (e.g. PNEUMONIA), exact (see below); empty unless ok
predicted_label          class name: positive class when probability >= threshold, else the other one
threshold                decision threshold used (from the bundle, or ``--threshold``), exact
study_instance_uid       DICOM StudyInstanceUID when present (never patient identifiers)
series_instance_uid      DICOM SeriesInstanceUID when present
sop_instance_uid         DICOM SOPInstanceUID when present
format                   ``png`` | ``jpeg`` | ``dicom`` as detected from content
model_id                 16-hex id of the bundle (weights + classes + threshold + preprocessing)
backend                  what ran the model, e.g. ``onnx:cpu``, ``onnx-int8:cpu``, ``torch:cuda-fp16``
overlay_path             Grad-CAM overlay written for this row (PNG, or JPEG with --cam-format jpeg), else empty
processed_at             UTC time the row was written (ISO 8601)
schema_version           ``4`` for this layout (``1``-``3`` for files begun before; a column, so
                         concatenated shards keep it)
modality                 DICOM Modality (e.g. ``DX``, ``CT``), empty for PNG/JPEG     (v2)
body_part                DICOM BodyPartExamined when present                          (v2)
view_position            DICOM ViewPosition when present (``PA``, ``AP``, ``LL`` ...)  (v2)
operating_point          where ``threshold`` comes from: the bundle's named point      (v3)
                         (``sens95`` ...), ``custom`` (a number given) or ``default``
                         (the bundle's own threshold)
population_score         distance of the image from the model's training population    (v4)
                         (:mod:`cxr_deploy.in_population`); empty for a bundle without
                         population statistics
in_population            ``yes`` | ``no`` (outside: still scored, less reliable) | empty  (v4)
                         (nothing to judge: no statistics and no known age)
population_reason        why ``no``: the score above the bundle's threshold, and/or the (v4)
                         DICOM patient age outside the training ages; else empty
=======================  ===================================================================

Version 3 is the same layout without the three v4 columns, version 2 also without
``operating_point``, version 1 also without the three v2 columns. All are read
(:func:`iter_results`, ``evaluate``); ``--resume`` continues a file in its own layout (v1 in v1,
v2 in v2 ...), so one file never mixes layouts.

Guarantees:

- ``probability`` and ``threshold`` are written exactly (the shortest decimal that reads back as
  the same float, :func:`cxr_deploy.decision.number_text`), so ``probability >= threshold`` as
  written always gives ``predicted_label`` (files before this rule hold 6-decimal probabilities);

- rows are appended in whole batches, flushed and fsync'ed, so ``kill -9`` or a power cut loses at
  most the batch in flight; a torn last line (if the OS wrote half a buffer) is cut off by
  :func:`open_for_resume` before anything is appended;
- formula-injection guard: a *text* cell starting with ``= + - @``, tab, CR or ``'`` gets one
  leading ``'``; :func:`unguard` (used by :func:`read_results`) strips it again. Numbers are never
  prefixed, so a spreadsheet still sees them as numbers.
"""

from __future__ import annotations

import csv
import io
import os
from enum import Enum
from pathlib import Path
from typing import Iterable, Iterator

from ..decision import number_text
from ..errors import CxrDeployError

SCHEMA_VERSION = 4
COLUMNS_V1 = (
    "path", "status", "error", "probability", "predicted_label", "threshold",
    "study_instance_uid", "series_instance_uid", "sop_instance_uid", "format",
    "model_id", "backend", "overlay_path", "processed_at", "schema_version",
)
COLUMNS_V2 = COLUMNS_V1 + ("modality", "body_part", "view_position")
COLUMNS_V3 = COLUMNS_V2 + ("operating_point",)
COLUMNS = COLUMNS_V3 + ("population_score", "in_population", "population_reason")
LAYOUTS = {1: COLUMNS_V1, 2: COLUMNS_V2, 3: COLUMNS_V3, 4: COLUMNS}  # schema version -> columns, in file order
# The columns that describe the input image (never the patient), filled from the reader's ImageMeta.
# Not a column: the patient's age travels with the image cells to the row, where the in-population
# check reads it (cxr_deploy.in_population); the CSV never holds it.
AGE_KEY = "patient_age_years"
IMAGE_COLUMNS = ("format", "study_instance_uid", "series_instance_uid", "sop_instance_uid",
                 "modality", "body_part", "view_position")


def image_columns(meta=None, **known) -> dict:
    """The CSV's image-describing cells: from a :class:`~cxr_deploy.imaging.ImageMeta`, or from the
    values known for an image that was not read (a skipped DICOM's header)."""
    if meta is None:
        return {column: known.get(column) for column in IMAGE_COLUMNS}
    return {"format": meta.format, "study_instance_uid": meta.study_instance_uid,
            "series_instance_uid": meta.series_instance_uid, "sop_instance_uid": meta.sop_instance_uid,
            "modality": meta.modality, "body_part": meta.body_part_examined, "view_position": meta.view_position,
            AGE_KEY: meta.patient_age_years}


NUMERIC_COLUMNS = frozenset({"probability", "threshold", "schema_version", "population_score"})
EXACT_COLUMNS = frozenset({"probability", "threshold"})  # written by decision.number_text
class Status(str, Enum):
    """A row's ``status``."""

    OK = "ok"
    """Read and scored: ``probability`` and ``predicted_label`` are set."""
    ERROR = "error"
    """Could not be read or scored; ``error`` says why. Exit code 3."""
    SKIPPED = "skipped"
    """Not an image, or not what the model was made for (a non-chest or lateral DICOM); ``error``
    says which. Not a failure: exit code 0."""


STATUSES = tuple(s.value for s in Status)

_FORMULA_TRIGGERS = ("=", "+", "-", "@", "\t", "\r", "'")
# Paths may hold bytes that are not UTF-8 (Python keeps them as surrogates): write them back as the
# same bytes so a resume matches the path exactly.
ENCODING = {"encoding": "utf-8", "errors": "surrogateescape"}


class ResultsFileError(CxrDeployError):
    """The existing results file cannot be appended to (other schema, other model, corrupt)."""


def guard(value: str) -> str:
    """Neutralize spreadsheet formula injection in a text cell (reversible with :func:`unguard`)."""
    return "'" + value if value.startswith(_FORMULA_TRIGGERS) else value


def unguard(value: str) -> str:
    return value[1:] if value.startswith("'") else value


def format_row(row: dict, columns: tuple[str, ...] = COLUMNS) -> list[str]:
    version = _version_of(columns)
    out = []
    for col in columns:
        value = version if col == "schema_version" else row.get(col)
        if value is None:
            out.append("")
        elif col in EXACT_COLUMNS:
            out.append(number_text(value))
        elif col in NUMERIC_COLUMNS:
            out.append(str(value))
        else:
            out.append(guard(str(value)))
    return out


def parse_row(cells: dict) -> dict:
    row = {}
    for col, value in cells.items():
        if col is None:  # extra cells: csv.DictReader puts them under None
            continue
        value = value or ""
        row[col] = value if col in NUMERIC_COLUMNS else unguard(value)
    return row


def _version_of(columns: tuple[str, ...]) -> int:
    for version, layout in LAYOUTS.items():
        if tuple(columns) == layout:
            return version
    raise ValueError(f"not a results layout: {columns}")


class ResultsWriter:
    """Appends rows batch by batch; each :meth:`write_rows` ends flushed and fsync'ed.

    The parent folder must exist (a mistyped share path must not become a local folder full of
    patient results): the caller decides whether to create it.
    ``columns``: the layout of the file being continued (see :func:`open_for_resume`).
    """

    def __init__(self, path: str | Path, *, append: bool = False, fsync: bool = True,
                 columns: tuple[str, ...] = COLUMNS):
        self.path = Path(path)
        self.fsync = fsync
        self.columns = tuple(columns)
        _version_of(self.columns)
        new = not append or not self.path.exists() or self.path.stat().st_size == 0
        self._fh = open(self.path, "a" if append else "w", newline="", **ENCODING)
        if new:
            self._fh.seek(0)
            self._fh.truncate()
            self._write_text(records_text([list(self.columns)]))
            if fsync:
                from ..atomic import fsync_dir

                fsync_dir(self.path.absolute().parent)  # the new file's name survives a power cut too

    def write_rows(self, rows: Iterable[dict]) -> None:
        text = csv_text(rows, self.columns)
        if text:
            self._write_text(text)

    def _write_text(self, text: str) -> None:
        # One buffered write + flush per batch: a kill between batches leaves whole lines only.
        self._fh.write(text)
        self._fh.flush()
        if self.fsync:
            os.fsync(self._fh.fileno())

    def close(self) -> None:
        if not self._fh.closed:
            self._fh.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def csv_text(rows: Iterable[dict], columns: tuple[str, ...] = COLUMNS) -> str:
    """Rows as the file's text: exactly what :class:`ResultsWriter` appends for them."""
    return records_text(format_row(r, columns) for r in rows)


def records_text(rows) -> str:
    buf = io.StringIO()
    # CRLF (RFC 4180): the csv module then quotes any cell holding a CR or LF, so a stray CR in a
    # path or message can never split a row.
    writer = csv.writer(buf, lineterminator="\r\n")
    writer.writerows(rows)
    return buf.getvalue()


def complete_prefix_length(data: bytes) -> int:
    """Byte length of the longest prefix of ``data`` made of complete CSV records.

    A record ends at a newline outside quotes; CSV escapes quotes by doubling them, so "outside
    quotes" is simply "an even number of quote characters so far". Works on bytes: in UTF-8 the
    bytes of ``"`` and newline never occur inside a multi-byte character.
    """
    good = 0
    quotes = 0
    start = 0
    while True:
        nl = data.find(b"\n", start)
        if nl < 0:
            return good
        quotes += data.count(b'"', start, nl)
        start = nl + 1
        if quotes % 2 == 0:
            good = start


def repair_tail(path: str | Path) -> int:
    """Cut a torn last record (from a crash mid-write) off the file; returns bytes removed."""
    path = Path(path)
    data = path.read_bytes()
    keep = complete_prefix_length(data)
    if keep < len(data):
        with open(path, "r+b") as fh:
            fh.truncate(keep)
            fh.flush()
            os.fsync(fh.fileno())
    return len(data) - keep


def iter_results(path: str | Path) -> Iterator[dict]:
    """Rows of a results CSV as dicts (cells unguarded). Raises :class:`ResultsFileError`."""
    with open(path, newline="", **ENCODING) as fh:
        reader = csv.DictReader(fh)
        header = tuple(reader.fieldnames or ())
        if not header:
            return
        if "path" not in header or "status" not in header:
            raise ResultsFileError(f"{path} is not a cxr-deploy results CSV (header: {','.join(header)[:200]})")
        readable = {str(v) for v in LAYOUTS}
        for row in reader:
            version = row.get("schema_version") or ""
            if version and version not in readable:
                raise ResultsFileError(f"{path} row {reader.line_num}: schema_version {version}, "
                                       f"this cxr-deploy reads {', '.join(sorted(readable))}")
            yield parse_row(row)


def read_results(path: str | Path) -> list[dict]:
    return list(iter_results(path))


def results_header(path: str | Path) -> tuple[str, ...] | None:
    """The header of ``path`` when it is one of the results layouts, else ``None``."""
    try:
        with open(path, newline="", **ENCODING) as fh:
            header = tuple(next(csv.reader(fh), ()))
    except (OSError, UnicodeError, csv.Error):
        return None
    return header if header in LAYOUTS.values() else None


def torn_header(path: str | Path) -> bool:
    """``path`` holds only the beginning of a results header (a run killed while writing it)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(4097)
    except OSError:
        return False
    return len(head) <= 4096 and b"\n" not in head and any(
        records_text([list(c)]).encode().startswith(head) for c in LAYOUTS.values())


def is_results_file(path: str | Path) -> bool:
    """A results CSV of ours (by its header), or one whose header a kill cut short."""
    return results_header(path) is not None or torn_header(path)


def drop_rows(path: str | Path, paths: set[str], *, fsync: bool = True) -> None:
    """Rewrite ``path`` without the rows of the inputs in ``paths`` (one atomic replace: a crash
    leaves the file as it was or without them, never half of it). Other rows keep their cells."""
    from ..atomic import open_atomic

    with open(path, newline="", **ENCODING) as src, \
            open_atomic(path, "w", fsync=fsync, newline="", **ENCODING) as dst:
        reader = csv.reader(src)
        header = next(reader)
        at, kept = header.index("path"), [header]
        for cells in reader:
            if unguard(cells[at]) not in paths:
                kept.append(cells)
            if len(kept) >= 10_000:
                dst.write(records_text(kept))
                kept = []
        dst.write(records_text(kept))


def open_for_resume(path: str | Path, *, model_id: str) -> tuple[dict[str, str], tuple[str, ...]]:
    """Prepare an existing results file for appending: repair its tail, check it, return
    ``({path: status} of the rows already there, the file's column layout)``.

    A v1 or v2 file is continued in its own layout (new rows lose the later columns, the file stays
    consistent).
    Refuses (``ResultsFileError``) a file with an unknown header, or rows from another model:
    mixing two models' predictions in one file would be silently wrong.
    """
    path = Path(path)
    if not path.exists() or path.stat().st_size == 0:
        return {}, COLUMNS
    if torn_header(path):
        repair_tail(path)  # killed while writing the header: nothing to keep
        return {}, COLUMNS
    # The header first: a file that is not ours is refused before anything (the tail repair) touches it.
    header = results_header(path)
    if header is None:
        raise ResultsFileError(
            f"{path} has a column layout that is not a results schema (v{', v'.join(map(str, LAYOUTS))}); "
            "write to a new --out file")
    repair_tail(path)
    done: dict[str, str] = {}
    for row in iter_results(path):
        if row.get("model_id") and row["model_id"] != model_id:
            raise ResultsFileError(
                f"{path} holds results of model {row['model_id']}, this run uses model {model_id}; "
                "write to a new --out file instead of mixing models")
        if row.get("status") not in STATUSES:
            raise ResultsFileError(f"{path}: row for {row.get('path')!r} has invalid status {row.get('status')!r}")
        done[row["path"]] = row["status"]
    return done, header
