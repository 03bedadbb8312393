"""The listener's results go to the PACS from a thread of their own: a scoring pass never waits
for the PACS. Pushing in the pass cost as much as scoring itself (C-STORE of the SR + SC to a local
Orthanc: ~15 objects/s on 2 cores, as fast as Orthanc stores them) and a PACS that is down held
every pass for its retries (3.5 s per object); now the next pass starts at once.

Each hand-over sends every result object not yet in ``push-log.jsonl`` (so one that failed is
tried again with the next), then writes each instance's log line (:func:`.passes.report_instances`).
``failed`` counts the objects the last push could not send; while it is not 0 the pusher tries
again by itself (5 s, doubling to 5 min), so a PACS that was down gets them without a new arrival.
On a stop the object in hand is finished, the rest are sent by the next start's first pass.
"""

from __future__ import annotations

import logging
import queue
import threading
from pathlib import Path

log = logging.getLogger(__name__)  # printed with the listener's lines (its logging set-up is the root's)


class Pusher:
    def __init__(self, push_config, results: Path, handler, config):
        self.push_config, self.results, self.handler, self.config = push_config, Path(results), handler, config
        self._queue: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self._stored: set[str] = set()  # result objects pushed whose instance's line is not written yet
        self.failed = 0  # result objects the last push did not send
        self._thread = threading.Thread(target=self._run, name="pusher", daemon=True)
        self._thread.start()

    def submit(self, rows: list[dict], bundle) -> None:
        """Push the results of a pass whose ``rows`` were scored with ``bundle``."""
        self._queue.put((rows, bundle))

    def stop(self, timeout: float = 10.0) -> None:
        """Finish the object in hand (never a half-written push-log line), then stop."""
        self._stop.set()
        self._queue.put(None)
        self._thread.join(timeout)

    FIRST_RETRY, LAST_RETRY = 5.0, 300.0  # a push that left objects unsent is tried again after these

    def _run(self) -> None:
        from .passes import report_instances

        retry_in, waiting = None, []  # waiting: hand-overs whose instances' lines wait for their push
        while not self._stop.is_set():
            try:
                items = [self._queue.get(timeout=retry_in)]
            except queue.Empty:  # nothing new, but objects were left unsent: try them again
                items = []
            while not self._queue.empty():  # passes that ended while the last push ran: one push
                items.append(self._queue.get())
            if None in items or self._stop.is_set():
                return
            waiting += items
            sent = self._push_unsent()
            if sent is None or self.failed:
                retry_in = min(self.LAST_RETRY, retry_in * 2) if retry_in else self.FIRST_RETRY
                log.info("%d result objects not sent: next push in %g s", max(1, self.failed), retry_in)
            else:
                retry_in = None
            if sent is not None and not items and sent.counts["done"]:
                log.info("sent %d result objects an earlier push could not send", sent.counts["done"])
            if sent is not None:
                self._stored |= sent.stored_files
                for rows, bundle in waiting:
                    report_instances(rows, self.handler, self._stored, self.config, bundle)
                waiting = []

    def _push_unsent(self):
        """Push every result object not yet in the push log; the summary, or None if the push
        itself failed (logged). Sets :attr:`failed`."""
        from .transfer import not_pushed, push

        try:
            files = not_pushed(sorted(self.results.glob("*.dcm"), key=sr_first), self.results) \
                if self.results.is_dir() else []
            sent = push(self.push_config, files, log_dir=self.results, stop=self._stop)
        except Exception as exc:  # noqa: BLE001 - tried again later; never kill the thread
            log.warning("push failed: %s: %s", type(exc).__name__, exc)
            self.failed = max(1, self.failed)
            return None
        self.failed = sent.counts["failed"]
        for failure in sent.failures:
            log.warning("push failed: %s", failure)
        self.handler.metrics.pushed.inc(sent.counts["done"])
        self.handler.metrics.push_failed.inc(sent.counts["failed"])
        return sent


def sr_first(path: Path) -> tuple[str, bool]:
    """Sort key: each instance's SR (the finding a viewer shows) before its SC (the overlay image,
    ~10x larger): by name alone the SC (``.sc.dcm``) would go first."""
    return path.name.rsplit(".", 2)[0], not path.name.endswith(".sr.dcm")
