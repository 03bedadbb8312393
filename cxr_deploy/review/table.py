"""The rows under review: results CSV(s) read into columns, joined with labels and verdicts, and
filtered, sorted and paged on the server (a 100,000-row file opens in well under 2 s; the browser
only ever holds one page).

Rows are known by their index (``id``): URLs carry ids, never paths or UIDs.
"""

from __future__ import annotations

import csv
import itertools
import math
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from ..batch.results_file import ENCODING, LAYOUTS, NUMERIC_COLUMNS, ResultsFileError, unguard
from ..labels import review_class, review_key

STATUSES = ("ok", "error", "skipped")
REVIEW_NAMES = ("agree", "disagree", "unsure")  # codes 0, 1, 2; -1: not reviewed
NOT_REVIEWED = -1
SORT_KEYS = ("row", "image", "probability", "status", "decision", "label", "review")
MAX_PAGE = 500
# Shown in the table and given to the viewer (population columns: when the CSV has them).
ROW_FIELDS = ("path", "status", "error", "probability", "predicted_label", "threshold", "operating_point",
              "sop_instance_uid", "model_id", "format", "modality", "overlay_path", "in_population",
              "population_score", "population_reason")


class NotResults(ResultsFileError):
    """An input that is not a cxr-deploy results CSV (one line: exit 2)."""


def read_header(path: str | Path) -> list[str]:
    """The header of a results CSV; :class:`NotResults` (one line) for anything else. Checked for
    every file before the server starts, so a wrong file is an error at once (exit 2)."""
    try:
        with open(path, newline="", **ENCODING) as fh:
            header = next(csv.reader(fh), None)
    except UnicodeDecodeError:
        raise NotResults(f"{path} is not a cxr-deploy results CSV (not UTF-8 text)") from None
    except csv.Error as exc:
        raise NotResults(f"{path} is not a cxr-deploy results CSV ({exc})") from None
    except OSError as exc:
        raise NotResults(f"cannot read {path}: {exc.strerror or exc}") from None
    if not header or "path" not in header or "status" not in header:
        found = ",".join(header or [])[:120] or "an empty file"
        raise NotResults(f"{path} is not a cxr-deploy results CSV (no path/status header; found {found})")
    return header


def column_chunks(path: str | Path, sizes: Iterable[int]) -> Iterator[dict[str, list[str]]]:
    """A results CSV as column chunks of the given sizes (the last size repeats), cells unguarded as
    :func:`~cxr_deploy.batch.results_file.iter_results` does; :class:`NotResults` on a bad row.
    Column-wise: 2x faster and half the memory of one dict per row at 100,000 rows."""
    header = read_header(path)
    width, readable = len(header), {str(v) for v in LAYOUTS} | {""}
    sizes = iter(sizes)
    size = next(sizes)
    with open(path, newline="", **ENCODING) as fh:
        reader = csv.reader(fh)
        next(reader)
        while True:
            try:
                cells = list(itertools.zip_longest(*(r if len(r) == width else r[:width]
                                                     for r in itertools.islice(reader, size)), fillvalue=""))
            except (csv.Error, UnicodeDecodeError) as exc:
                raise NotResults(f"{path} line {reader.line_num}: not a results CSV row ({exc})") from None
            if not cells:
                return
            n = len(cells[0])
            columns = {name: list(cells[i]) if i < len(cells) else [""] * n for i, name in enumerate(header)}
            bad = set(columns.get("schema_version", ())) - readable
            if bad:
                raise NotResults(f"{path}: schema_version {sorted(bad)[0]}, this cxr-deploy reads "
                                 f"{', '.join(sorted(readable - {''}))}")
            for name, column in columns.items():
                if name not in NUMERIC_COLUMNS and "\n'" in "\n" + "\n".join(column):  # any guarded cell
                    columns[name] = [unguard(v) for v in column]
            if set(columns["status"]) - set(STATUSES):
                raise NotResults(f"{path}: a row has status {sorted(set(columns['status']) - set(STATUSES))[0]!r}, "
                                 "not one of ok/error/skipped: not a results CSV")
            yield columns
            size = next(sizes, size)


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return math.nan


class Table:
    """Every row of the given results files, in order (file after file), filled in chunks by
    :meth:`load` (the server answers while the rest of a large file is read: the first page of
    100,000 rows does not wait for the last)."""

    FIRST_CHUNK, CHUNK = 2_000, 25_000

    def __init__(self, sources: Sequence[str | Path], class_names: Sequence[str], positive: str, labels=None):
        self.sources = [str(s) for s in sources]
        headers = [read_header(s) for s in self.sources]  # every file checked before anything starts
        self.class_names, self.positive = tuple(class_names), positive
        self.labels, self.labels_source = labels, getattr(labels, "source", "") if labels is not None else ""
        self.has_population = any("in_population" in h for h in headers)
        self.columns: dict[str, list[str]] = {name: [] for h in headers for name in h}
        self.n, self.done, self.error = 0, False, ""
        empty = np.zeros(0)
        self.source, self.probability = empty.astype(np.int16), empty
        self.status, self.decision, self.label = empty.astype(np.int8), empty.astype(np.int16), empty.astype(np.int16)
        self.outside, self.review, self.review_label = empty.astype(bool), empty.astype(np.int8), empty.astype(np.int16)
        self._rows_of_key: dict[tuple[str, str, str], list[int]] = {}
        self._orders: dict[str, np.ndarray] = {}

    def chunks(self) -> Iterator[tuple[int, dict[str, list[str]]]]:
        """``(source index, columns)`` chunks of every file, in order (read outside any lock)."""
        for index, source in enumerate(self.sources):
            for part in column_chunks(source, (self.FIRST_CHUNK, self.CHUNK)):
                yield index, part

    def load(self) -> None:
        """Read every file (tests and scripts; the server appends chunk by chunk under its lock)."""
        for index, part in self.chunks():
            self.append(index, part)
        self.done = True

    def append(self, index: int, part: dict[str, list[str]]) -> list[tuple[str, str, str]]:
        """Add a chunk of rows; returns their review keys."""
        m, start, names = len(part["path"]), self.n, list(self.class_names)
        for name in set(self.columns) | set(part):
            self.columns.setdefault(name, [""] * start).extend(part.get(name) or [""] * m)
        blank = [""] * m
        probability = np.array([_float(v) if v else math.nan for v in part.get("probability", blank)])
        status = np.array([STATUSES.index(v) for v in part["status"]], np.int8)
        decision = np.array([names.index(d) if d in names else -1 for d in part.get("predicted_label", blank)], np.int16)
        label = np.full(m, -1, np.int16)
        if self.labels is not None:
            for i, path in enumerate(part["path"]):
                found = self.labels.lookup(path)
                if found in names:
                    label[i] = names.index(found)
        outside = np.array([v.strip().lower() in ("false", "0", "no") for v in part.get("in_population", blank)], bool)
        keys = list(zip(part["path"], part.get("sop_instance_uid") or blank, part.get("model_id") or blank))
        for i, key in enumerate(keys, start):  # the same tuple as cxr_deploy.labels.review_key
            self._rows_of_key.setdefault(key, []).append(i)
        grow = np.concatenate
        self.source = grow([self.source, np.full(m, index, np.int16)])
        self.probability, self.status = grow([self.probability, probability]), grow([self.status, status])
        self.decision, self.label = grow([self.decision, decision]), grow([self.label, label])
        self.outside = grow([self.outside, outside])
        self.review = grow([self.review, np.full(m, NOT_REVIEWED, np.int8)])
        self.review_label = grow([self.review_label, np.full(m, -1, np.int16)])
        self.n += m
        self._orders.clear()
        return keys

    # -- rows ------------------------------------------------------------------------------------
    def row(self, i: int, fields: Sequence[str] = ROW_FIELDS) -> dict:
        return {f: self.columns[f][i] if f in self.columns else "" for f in fields}

    def key(self, i: int) -> tuple[str, str, str]:
        return review_key(self.row(i, ("path", "sop_instance_uid", "model_id")))

    def apply_verdicts(self, store, keys=None) -> None:
        """Bring the review columns up to date with ``store`` (only ``keys`` when given; else every
        key with a verdict)."""
        names = list(self.class_names)
        for key in (store.latest if keys is None else keys):
            entry = store.verdict(key)
            code = REVIEW_NAMES.index(entry["verdict"]) if entry else NOT_REVIEWED
            given = review_class(entry["verdict"], entry.get("decision", ""), entry.get("correct_class", "")) if entry else None
            for i in self._rows_of_key.get(key, ()):
                self.review[i] = code
                self.review_label[i] = names.index(given) if given in names else -1

    # -- paging ----------------------------------------------------------------------------------
    def order(self, sort: str) -> np.ndarray:
        """Row ids sorted by ``sort`` (ascending; ties and empty values in file order, empties last)."""
        if sort in ("review", "label"):  # change while reviewing: not cached
            values = self.review if sort == "review" else self.label
            return np.lexsort((np.arange(self.n), np.where(values < 0, 127, values)))
        if sort not in self._orders:
            if sort == "probability":
                p = self.probability
                self._orders[sort] = np.lexsort((np.arange(self.n), np.where(np.isnan(p), np.inf, p)))
            elif sort == "image":
                paths = self.columns["path"]
                self._orders[sort] = np.array(sorted(range(self.n), key=paths.__getitem__), np.int64)
            elif sort in ("status", "decision"):
                values = self.status if sort == "status" else np.where(self.decision < 0, 127, self.decision)
                self._orders[sort] = np.argsort(values, kind="stable")
            else:
                self._orders[sort] = np.arange(self.n)
        return self._orders[sort]

    def mask(self, f: dict) -> np.ndarray:
        """Rows that pass the filters ``f`` (see :func:`cxr_deploy.review.server.filters_of`)."""
        keep = np.ones(self.n, bool)
        if f.get("status"):
            keep &= self.status == STATUSES.index(f["status"])
        if f.get("decision"):
            keep &= self.decision == list(self.class_names).index(f["decision"])
        with np.errstate(invalid="ignore"):
            if f.get("pmin") is not None:
                keep &= self.probability >= f["pmin"]
            if f.get("pmax") is not None:
                keep &= self.probability <= f["pmax"]
        if f.get("disagree") == "label":
            keep &= (self.label >= 0) & (self.decision >= 0) & (self.label != self.decision)
        elif f.get("disagree") == "review":
            keep &= self.review == REVIEW_NAMES.index("disagree")
        elif f.get("disagree") == "any":
            keep &= ((self.label >= 0) & (self.decision >= 0) & (self.label != self.decision)) | \
                    (self.review == REVIEW_NAMES.index("disagree"))
        if f.get("unreviewed"):
            keep &= (self.review == NOT_REVIEWED) & (self.status == 0)
        if f.get("outside"):
            keep &= self.outside
        return keep

    def select(self, f: dict, sort: str = "row", descending: bool = False) -> np.ndarray:
        """Row ids passing ``f``, in display order."""
        order = self.order(sort)
        if descending:  # reversed, but ties and empties keep file order and stay last
            order = self._descending(sort, order)
        return order[self.mask(f)[order]]

    def _descending(self, sort: str, order: np.ndarray) -> np.ndarray:
        if sort == "probability":
            p = self.probability
            return np.lexsort((np.arange(self.n), np.isnan(p), -np.nan_to_num(p, nan=0.0)))
        if sort == "image":
            return order[::-1]
        values = {"status": self.status, "decision": self.decision, "label": self.label,
                  "review": self.review}.get(sort)
        if values is None:
            return order[::-1]
        return np.lexsort((np.arange(self.n), -values.astype(np.int64), values < 0))

    def page(self, ids: np.ndarray, offset: int, limit: int) -> list[dict]:
        return [self.page_row(int(i)) for i in ids[offset:offset + min(limit, MAX_PAGE)]]

    def page_row(self, i: int) -> dict:
        names = self.class_names
        row = self.row(i, ("path", "status", "probability", "predicted_label", "threshold", "operating_point",
                           "sop_instance_uid", "error", "in_population"))
        row.update(id=i, label=names[self.label[i]] if self.label[i] >= 0 else "",
                   review=REVIEW_NAMES[self.review[i]] if self.review[i] >= 0 else "",
                   review_class=names[self.review_label[i]] if self.review_label[i] >= 0 else "",
                   outside=bool(self.outside[i]))
        return row
