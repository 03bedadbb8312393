"""Spool retention for ``pacs listen``: what may leave ``<spool>/incoming``, and when.

An instance may be deleted only when it is *done*: it has a row in ``<spool>/results.csv`` and
either that row is ``skipped`` (not a chest radiograph: nothing to send) or it is ``ok`` and both
its SR and its SC are recorded as stored in ``<spool>/results/push-log.jsonl``. An unscored
instance, an error row (kept for whoever looks into it) or a result not (yet) sent is never
deleted. With a done instance go its SR and SC (the PACS has them; the push log and the row stay).

Two rules, ``[listen]`` keys, applied after every scoring pass:

- ``keep_days``: done instances received more than that many days ago go (0: no age limit);
- ``spool_target_gb``: while ``incoming/`` holds more than that, done instances go, oldest
  (received first) first. The default, 90 % of ``max_spool_gb``, keeps a spool that reached its cap
  from answering A700 for ever: once results are sent, room comes back by itself.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Retention:
    keep_days: float = 0.0  # 0: no age limit
    target_bytes: int | None = None  # None: no size target


def pushed_files(log_path: Path) -> set[str]:
    """Names of the files the push log (:mod:`.transfer`, one JSON object a line) records as stored."""
    names: set[str] = set()
    if not log_path.is_file():
        return names
    for line in log_path.read_text().splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue  # a torn last line from a crash
        if entry.get("status") == "stored" and entry.get("file"):
            names.add(Path(entry["file"]).name)
    return names


def done_instances(spool: Path) -> dict[Path, list[Path]]:
    """``{spooled instance: [its result files]}`` for every instance that may be deleted (see the
    module docstring)."""
    from ..batch.results_file import iter_results
    from .results import result_paths
    from .uids import UidError

    out, results = {}, spool / "results"
    csv = spool / "results.csv"
    if not csv.is_file():
        return out
    pushed = pushed_files(results / "push-log.jsonl")
    incoming = os.path.abspath(spool / "incoming") + os.sep
    for row in iter_results(csv):
        path = os.path.abspath(row.get("path", "") or os.sep)
        if not path.startswith(incoming):
            continue
        if row.get("status") == "skipped":
            out[Path(path)] = []
        elif row.get("status") == "ok" and not row.get("error"):
            try:
                files = result_paths(results, row.get("sop_instance_uid", ""), row.get("model_id", ""))
            except UidError:
                continue
            if all(f.name in pushed for f in files):
                out[Path(path)] = list(files)
    return out


def prune(spool: Path, retention: Retention, spool_bytes: int, now: float | None = None) -> int:
    """Delete done instances per ``retention``; ``spool_bytes``: what ``incoming/`` holds now.
    Returns the bytes freed in ``incoming/``."""
    if not retention.keep_days and retention.target_bytes is None:
        return 0
    if retention.target_bytes is not None and spool_bytes <= retention.target_bytes and not retention.keep_days:
        return 0
    now = time.time() if now is None else now
    candidates = []
    for path, results in done_instances(Path(spool)).items():
        try:
            st = path.stat()
        except OSError:
            continue  # deleted already
        candidates.append((st.st_mtime, st.st_size, path, results))
    candidates.sort(key=lambda c: (c[0], str(c[2])))  # received first, first
    freed = deleted = 0
    for mtime, size, path, results in candidates:
        too_old = retention.keep_days and now - mtime > retention.keep_days * 86400
        over = retention.target_bytes is not None and spool_bytes - freed > retention.target_bytes
        if not (too_old or over):
            continue
        for file in (path, *results):
            file.unlink(missing_ok=True)
        try:
            path.parent.rmdir()  # the study folder, once empty
        except OSError:
            pass
        freed += size
        deleted += 1
    if deleted:
        log.info("retention: deleted %d sent instances (%.1f MB) from the spool", deleted, freed / 2**20)
    return freed
