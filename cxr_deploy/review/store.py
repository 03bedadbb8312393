"""The verdict store: ``REVIEWS.csv``, append-only, shared by every tab and every reviewer.

Layout: :data:`cxr_deploy.labels.REVIEW_COLUMNS` (defined beside the labels reader, which turns a
reviews file into labels: :func:`cxr_deploy.labels.labels_from_reviews`). One line per verdict:

- appended under an exclusive ``flock`` on the file itself (a bounded wait: concurrent reviewers,
  in one server or several, queue for a few milliseconds and never interleave half lines);
- each line written with one ``write``, flushed and fsync'ed before the browser hears "saved": a
  crash or a power cut loses at most the verdict being written, and a line torn by a crash is cut
  off (under the lock) before the next one is appended;
- never rewritten: a changed mind is a new line, and the latest line of a key (input path + SOP
  Instance UID + model id) wins on read, so a second tab or a second reviewer never overwrites
  another's verdict, and the file is its own audit trail;
- text cells carry the results CSV's formula-injection guard (a leading ``'`` before ``= + - @``).

The server keeps the verdicts in force in memory and reads only what other processes appended
since (:meth:`VerdictStore.refresh`, from the byte offset it reached).
"""

from __future__ import annotations

import datetime as _dt
import os
import threading
import time
from pathlib import Path

from ..batch.results_file import complete_prefix_length, guard, records_text, repair_tail
from ..errors import CxrDeployError
from ..labels import REVIEW_COLUMNS, REVIEW_VERSION, VERDICTS, is_reviews_file, latest_reviews, review_key

LOCK_WAIT_S = 10.0
MAX_COMMENT, MAX_REVIEWER = 2000, 40
NUMBER_CELLS = frozenset({"review_version", "probability", "threshold"})


class ReviewsError(CxrDeployError):
    """The reviews file cannot be used (not a reviews file, locked for too long, a bad verdict)."""


class VerdictStore:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.latest: dict[tuple[str, str, str], dict] = {}
        self._size = -1  # bytes of the file already taken into account
        self._changed: set[tuple[str, str, str]] = set()  # keys changed since take_changed()
        self._guard = threading.Lock()
        if self.path.exists() and self.path.stat().st_size and not is_reviews_file(self.path):
            raise ReviewsError(f"{self.path} exists and is not a reviews file of cxr-deploy review "
                               f"(its header is not {','.join(REVIEW_COLUMNS[:5])},...); give another --reviews")
        if not self.path.parent.is_dir():
            raise ReviewsError(f"the folder of --reviews {self.path} does not exist")
        target = self.path if self.path.exists() else self.path.parent
        if not os.access(target, os.W_OK):
            raise ReviewsError(f"cannot write verdicts to {self.path} (permission denied); give --reviews elsewhere")
        self.refresh()

    def refresh(self) -> set[tuple[str, str, str]]:
        """Take in what was appended since the last call (by this or any process); the keys whose
        verdict changed. Cheap when nothing changed (one ``stat``)."""
        with self._guard:
            try:
                size = self.path.stat().st_size
            except FileNotFoundError:
                size = 0
            if size == self._size:
                return set()
            before = dict(self.latest)
            # Whole-file read when it changed: simple and exact (100,000 verdicts read in ~0.5 s;
            # a day's reviewing is a few thousand lines).
            self.latest = latest_reviews(self.path) if size else {}
            self._size = size
            changed = {k for k in set(before) | set(self.latest) if before.get(k) != self.latest.get(k)}
            self._changed |= changed
            return changed

    def take_changed(self) -> set[tuple[str, str, str]]:
        """The keys whose verdict changed since the last call (by whoever's refresh saw it)."""
        with self._guard:
            changed, self._changed = self._changed, set()
            return changed

    def verdict(self, key: tuple[str, str, str]) -> dict | None:
        return self.latest.get(key)

    def append(self, row: dict, *, verdict: str, correct_class: str = "", comment: str = "",
               reviewer: str = "", class_names=()) -> dict:
        """Record a verdict on results ``row``; returns the line as read back."""
        entry = make_entry(row, verdict=verdict, correct_class=correct_class, comment=comment,
                           reviewer=reviewer, class_names=class_names)
        cells = [entry[c] if c in NUMBER_CELLS else guard(entry[c]) for c in REVIEW_COLUMNS]
        try:
            append_line(self.path, records_text([cells]))
        except OSError as exc:  # disk full, share gone: the page says "not saved" and why
            raise ReviewsError(f"verdict not saved to {self.path}: {exc.strerror or exc}") from None
        self.refresh()
        return self.latest.get(review_key(entry), entry)


def make_entry(row: dict, *, verdict: str, correct_class: str, comment: str, reviewer: str, class_names) -> dict:
    """A verdict line's cells, checked: ``ReviewsError`` with one line when it cannot be recorded."""
    if verdict not in VERDICTS:
        raise ReviewsError(f"verdict must be one of {', '.join(VERDICTS)}, got {verdict!r}")
    decision = row.get("predicted_label") or ""
    if row.get("status") != "ok" or not decision:
        raise ReviewsError("only a scored row (status ok) can be reviewed")
    correct_class = (correct_class or "").strip()
    if verdict == "disagree":
        if correct_class not in class_names or correct_class == decision:
            raise ReviewsError(f"disagree needs the correct class, one of {', '.join(c for c in class_names if c != decision)}")
    else:
        correct_class = ""
    return {
        "review_version": REVIEW_VERSION, "path": row.get("path", ""),
        "sop_instance_uid": row.get("sop_instance_uid") or "", "model_id": row.get("model_id") or "",
        "verdict": verdict, "decision": decision, "correct_class": correct_class,
        "probability": row.get("probability") or "", "threshold": row.get("threshold") or "",
        "operating_point": row.get("operating_point") or "",
        "reviewer": _one_line(reviewer)[:MAX_REVIEWER], "comment": _one_line(comment)[:MAX_COMMENT],
        "reviewed_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def _one_line(text: str) -> str:
    return " ".join(str(text or "").split())


def append_line(path: Path, text: str, *, wait_s: float = LOCK_WAIT_S) -> None:
    """Append ``text`` (whole CSV lines) to the reviews file under its lock: header first if the
    file is new, a torn last line cut off first, one write, flush, fsync."""
    import fcntl

    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND | getattr(os, "O_CLOEXEC", 0), 0o644)
    try:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise ReviewsError(f"{path} stayed locked by another writer for {wait_s:g} s; verdict not saved")
                time.sleep(0.01)
        size = os.fstat(fd).st_size
        if size and _torn(fd, size):
            repair_tail(path)  # a crash mid-line: keep whole lines only (we hold the lock)
            size = os.fstat(fd).st_size
        if size == 0:
            text = records_text([list(REVIEW_COLUMNS)]) + text
        data = memoryview(text.encode("utf-8", "surrogateescape"))
        while data:
            data = data[os.write(fd, data):]
        os.fsync(fd)
        if size == 0:
            from ..atomic import fsync_dir

            fsync_dir(path.absolute().parent)  # the new file's name survives a power cut too
    finally:
        os.close(fd)  # releases the lock


def _torn(fd: int, size: int) -> bool:
    tail = os.pread(fd, min(size, 1 << 16), max(0, size - (1 << 16)))
    return not tail.endswith(b"\n") or (size <= (1 << 16) and complete_prefix_length(tail) != len(tail))
