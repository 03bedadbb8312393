"""Result parts of a distributed batch run (``--engine ray``), and their merge into the one results CSV.

The driver appends every block of rows it receives from the cluster to a part file in a hidden
folder next to ``--out`` (``.results.csv.parts/``), flushed and fsync'ed per block like the local
engine's CSV. At the end of the run — also after Ctrl-C, SIGTERM or a failed job — the parts are
merged into ``--out`` by one atomic replace:

- the rows already in ``--out`` stay byte for byte (a resumed file keeps its rows and layout);
- new rows follow in input order (the local engine's order), whatever order the cluster finished in;
- one row per input: a row that a retried task produced twice, or that ``--out`` already has, is
  dropped (the safety net behind Ray's task retries);
- a torn last line of a part (a driver killed mid-write) is cut off, as :func:`open_for_resume` does.

A driver killed outright (``kill -9``) leaves the parts folder behind; ``--resume`` merges it first.
Merging holds the new rows in memory (about 300 bytes each) to sort them; the CSV already there is
copied, not read into memory.
"""

from __future__ import annotations

import csv
import io
import os
import shutil
from collections import Counter
from pathlib import Path

from .. import atomic
from .results_file import (ENCODING, ResultsFileError, complete_prefix_length, iter_results, records_text,
                           repair_tail, unguard)

PART_ROWS = 4096  # rows per part file: few files for a large run, none of them large


def parts_dir(out: str | Path) -> Path:
    out = Path(out)
    return out.with_name(f".{out.name}.parts")


class PartWriter:
    """Appends blocks of formatted rows to numbered part files, each begun with the header."""

    def __init__(self, folder: Path, columns: tuple[str, ...], *, fsync: bool = True):
        self.folder, self.columns, self.fsync = Path(folder), tuple(columns), fsync
        self.folder.mkdir(exist_ok=True)
        self.number = len(_part_files(self.folder))
        self.rows_in_part = 0
        self._fh = None

    def write(self, text: str, rows: int) -> None:
        if self._fh is None or self.rows_in_part >= PART_ROWS:
            self._next_part()
        self._fh.write(text)
        self._fh.flush()
        if self.fsync:
            os.fsync(self._fh.fileno())
        self.rows_in_part += rows

    def _next_part(self) -> None:
        self.close()
        self.number += 1
        self._fh = open(self.folder / f"part-{self.number:06d}.csv", "w", newline="", **ENCODING)
        self._fh.write(records_text([list(self.columns)]))
        if self.fsync:
            atomic.fsync_dir(self.folder)  # the new part's name survives a power cut too
        self.rows_in_part = 0

    def close(self) -> None:
        if self._fh is not None and not self._fh.closed:
            self._fh.close()


def _part_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("part-*.csv")) if folder.is_dir() else []


def read_parts(folder: Path, columns: tuple[str, ...] | None = None) -> tuple[tuple[str, ...] | None, list[list[str]]]:
    """``(layout, rows as formatted cells)`` of every part, complete lines only. Raises
    :class:`ResultsFileError` when parts disagree with ``columns`` or with each other."""
    rows: list[list[str]] = []
    for part in _part_files(folder):
        data = part.read_bytes()
        text = data[: complete_prefix_length(data)].decode(ENCODING["encoding"], ENCODING["errors"])
        records = list(csv.reader(io.StringIO(text, newline="")))
        if not records:
            continue
        header, body = tuple(records[0]), records[1:]
        if columns is not None and header != tuple(columns):
            raise ResultsFileError(f"{part} has columns {','.join(header)[:200]}, the results file "
                                   f"{','.join(columns)[:200]}: move {folder} away and rerun")
        columns = header
        rows.extend(body)
    return columns, rows


def merge_parts(out: str | Path, folder: Path, columns: tuple[str, ...] | None = None,
                order: dict[str, int] | None = None, *, fsync: bool = True) -> Counter:
    """Merge the parts in ``folder`` into ``out`` (atomically) and remove them; returns the statuses
    of the rows added. ``order``: path -> input position (unknown paths go last, in part order)."""
    out, folder = Path(out), Path(folder)
    if not folder.is_dir():
        return Counter()
    has_rows = out.exists() and out.stat().st_size > 0
    if has_rows:
        repair_tail(out)
        with open(out, newline="", **ENCODING) as fh:
            existing_header = tuple(next(csv.reader(fh), ()))
        columns = columns or existing_header
    columns, rows = read_parts(folder, columns)
    added: Counter = Counter()
    if rows:
        path_at, status_at = columns.index("path"), columns.index("status")
        seen = {r["path"] for r in iter_results(out)} if has_rows else set()
        new = []
        for cells in rows:
            path = unguard(cells[path_at])
            if path not in seen:
                seen.add(path)
                new.append(cells)
        if order:
            end = len(order)
            new.sort(key=lambda cells: order.get(unguard(cells[path_at]), end))
        _replace(out, None if has_rows else columns, records_text(new), fsync)
        added.update(cells[status_at] for cells in new)
    for part in _part_files(folder):
        part.unlink()
    folder.rmdir()
    return added


def _replace(out: Path, header: tuple[str, ...] | None, text: str, fsync: bool) -> None:
    """``out`` + ``text`` (or ``header`` + ``text`` when ``out`` has no rows yet), swapped in by one
    rename: a reader or a crash sees the old file or the new one, never half of the merge."""
    with atomic.open_atomic(out, "w", fsync=fsync, newline="", **ENCODING) as dst:
        if header is None:
            with open(out, newline="", **ENCODING) as src:
                shutil.copyfileobj(src, dst)
        else:
            dst.write(records_text([list(header)]))
        dst.write(text)
