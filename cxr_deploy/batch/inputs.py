"""What a batch run reads: input expansion (folders, files, ``@lists``), shards, and the checks made
before any work (inputs exist and are not empty, output folders exist).

Names only: this process never reads a file's content. Format detection happens in the decode
workers, where a read that blocks (a hung network share, a FIFO) is caught by the decode timeout
instead of freezing the whole run.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections import Counter
from pathlib import Path
from typing import Iterable, Iterator

from ..errors import CxrDeployError
from ..imaging.scan import iter_candidate_files


class BatchUsageError(CxrDeployError):
    """Bad options or inputs detected before any work (exit code 2)."""


def expand_inputs(inputs: Iterable[str]) -> Iterator[tuple[str, str | None]]:
    """(input, root) pairs: ``@list.txt`` expands to the paths it lists (one a line, ``#`` comments)."""
    for item in inputs:
        item = str(item)
        if item.startswith("@"):
            list_file = Path(item[1:])
            try:
                with open(list_file, encoding="utf-8", errors="surrogateescape") as fh:
                    for line in fh:
                        line = line.rstrip("\r\n")
                        if line.strip() and not line.lstrip().startswith("#"):
                            yield line, None
            except OSError as exc:
                raise BatchUsageError(f"cannot read input list {list_file}: {exc.strerror or exc}") from None
        else:
            yield item, item if os.path.isdir(item) else None


def shard_key(path: str, root: str | None) -> str:
    """What decides a file's shard: its path relative to the input folder it was found under, so
    machines that mount the share at different places still agree; a file named directly uses the
    path as given."""
    return os.path.relpath(path, root).replace(os.sep, "/") if root else path


def in_shard(key: str, shard: tuple[int, int]) -> bool:
    index, count = shard
    if count == 1:
        return True
    digest = hashlib.blake2b(key.encode("utf-8", "surrogateescape"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % count == index


def iter_entries(inputs: Iterable[str], shard: tuple[int, int] = (0, 1)):
    """Yield ``(absolute path, shard key)`` for this shard's files, lazily, in scan order."""
    for item, root in expand_inputs(inputs):
        for path in iter_candidate_files([item]):
            key = shard_key(str(path), root)
            if in_shard(key, shard):
                yield os.path.abspath(path), key


def new_inputs(entries, done: dict[str, str], previous: dict[str, int]):
    """The entries still to do: each file once (even if it is named twice), and none that the CSV
    being resumed already has a row for (those are counted in ``previous`` by their status)."""
    seen: set[str] = set()
    for path, key in entries:
        if path in seen:
            continue
        seen.add(path)
        if path in done:
            previous[done[path]] += 1
            continue
        yield path, key


def countable(inputs: Iterable[str]) -> bool:
    """Whether the inputs can be scanned a second time, for the progress bar's total: an ``@list``
    that is a pipe or a device (``@/dev/stdin``, a FIFO fed by another program) can be read once."""
    for item in map(str, inputs):
        if item.startswith("@"):
            try:
                if not stat.S_ISREG(os.stat(item[1:]).st_mode):
                    return False
            except OSError:
                return False
    return True


def count_new_inputs(inputs: Iterable[str], shard: tuple[int, int], done: dict[str, str]) -> int:
    """How many inputs a run will process: the same scan, shard and resume filters as the run (names
    only, so a second pass over a folder costs a directory listing, not a read)."""
    return sum(1 for _ in new_inputs(iter_entries(inputs, shard), done, Counter()))


def parse_shard(text: str) -> tuple[int, int]:
    """``"i/n"`` with 1 <= i <= n (1-based, as people count machines) → (i-1, n)."""
    try:
        i, n = (int(part) for part in str(text).split("/"))
    except ValueError:
        raise BatchUsageError(f"--shard must look like 2/4 (this is part 2 of 4), got {text!r}") from None
    if not 1 <= i <= n:
        raise BatchUsageError(f"--shard {text}: need 1 <= i <= n")
    return i - 1, n


def check_inputs(inputs: Iterable[str]) -> None:
    """Every named input exists, and every input folder holds at least one file.

    An empty folder is most often an unmounted share or a mistyped date: reporting it as a
    successful night with a header-only CSV would hide exactly that (exit 2 instead)."""
    for item in inputs:
        item = str(item)
        if item.startswith("@"):
            continue  # a list file may be a FIFO fed as the run goes: never read it twice
        if not os.path.lexists(item):
            raise BatchUsageError(f"input not found: {item}")
        if os.path.isdir(item) and next(iter_candidate_files([item]), None) is None:
            raise BatchUsageError(f"no inputs found under {item} (empty folder, or a share that is not mounted)")


def check_output_parent(path: str | Path, what: str, create: bool = False) -> None:
    """The folder an output goes into must exist (``create``: make it). A mistyped share path must
    not silently become a local folder full of patient results."""
    parent = Path(os.path.abspath(path)).parent
    if parent.is_dir():
        return
    missing = parent
    while not missing.parent.is_dir() and missing.parent != missing:
        missing = missing.parent
    if missing.exists() or os.path.lexists(missing):
        raise BatchUsageError(f"{what} {path}: {missing} is not a directory")
    if not create:
        raise BatchUsageError(f"{what} {path}: folder {parent} does not exist (create it, or add --create-dirs)")
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BatchUsageError(f"{what} {path}: cannot create {parent}: {exc.strerror or exc}") from None
