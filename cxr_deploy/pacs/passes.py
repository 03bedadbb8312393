"""The listener's scoring passes: when one runs, what it scores and pushes, and each instance's log line.

A pass is the ordinary streaming batch over the spool's ``incoming/`` with ``--resume`` on
``<spool>/results.csv`` (:func:`listen_batch_config`), run with the listener's resident model
(:mod:`.resident`), its results handed to the pusher thread (:mod:`.pusher`). :class:`Passes`
decides when: after each burst of arrivals, and again after a back-off while a pass left work
undone (results a full disk kept from being written, pushes that failed).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from .spool import REUSED_ERROR, reused_dir
from .uids import UidError

log = logging.getLogger("cxr_deploy.pacs.listen")  # the listener's lines, one logger


def listen_batch_config(spool: Path, incoming: Path, model, *, workers: int | None, uid_root: str,
                        settings=None):
    """The batch a scoring pass runs: the spool's ``incoming/`` resumed into ``results.csv``, DICOM
    results into ``results/``. ``settings``: the merged :class:`~cxr_deploy.run_settings.RunSettings`
    (flags > config [run] > bundle): threshold or operating point, backend, device, eligibility."""
    from ..batch.settings import BatchConfig
    from ..run_settings import merge

    settings = settings or merge()
    return BatchConfig(inputs=[str(incoming)], model=model, out=spool / "results.csv", resume=True,
                       dicom_out=spool / "results", uid_root=uid_root, workers=workers, progress=False,
                       threshold=settings.threshold, operating_point=settings.operating_point,
                       backend=settings.backend, device=settings.device, eligibility=settings.eligibility)


def score_and_push(spool: Path, incoming: Path, model, push_config, *, workers: int | None = None,
                   uid_root: str = "2.25", settings=None, handler=None, pusher=None) -> dict:
    """One scoring pass over the spool (resumed: each file scored once), then push new results.
    ``model``: a :class:`~.resident.ResidentModel` (the listener's: loaded once, its decode workers
    kept) or a bundle directory (loaded for this pass; ``workers``, ``uid_root`` and ``settings``
    as :func:`listen_batch_config` takes them). ``handler``: the listener's
    :class:`~.listen.StoreHandler`, whose metrics and arrival times give each instance scored its
    log line. ``pusher``: a :class:`~.pusher.Pusher` that sends the results in its own thread (then
    ``push_config`` is not used here and ``pushed`` is None). ``incomplete`` in the returned dict:
    results not written (e.g. a full disk), or not sent by the pass's own push: :class:`Passes`
    tries again."""
    from ..batch.runner import run_batch
    from .resident import ResidentModel

    if not any(incoming.rglob("*.dcm")):
        return {"scored": 0, "pushed": 0, "incomplete": 0}
    rows: list[dict] = []
    if isinstance(model, ResidentModel):
        config = model.config
        bundle, backend, pool = model.current()
        summary = _run(run_batch, config, bundle=bundle, backend=backend, pool=pool, on_rows=rows.extend)
    else:
        config = listen_batch_config(spool, incoming, model, workers=workers, uid_root=uid_root, settings=settings)
        bundle, summary = None, _run(run_batch, config)
    for line in summary.lines():  # with a handler each instance has its own line: the pass's are detail
        detail = handler is not None and not line.startswith(("OUTPUTS MISSING", "INTERRUPTED"))
        (log.debug if detail else log.info)(line)
    if summary.interrupted:  # SIGTERM/Ctrl-C arrived during the pass: stop, don't wait for the next one
        raise KeyboardInterrupt
    pushed, sent, push_failed = 0, None, 0
    results = Path(config.dicom_out)
    if pusher is not None:
        pusher.submit(rows, bundle)  # it tries again by itself what it could not send
        pushed = None
    elif push_config is not None and results.is_dir():
        from .transfer import not_pushed, push

        sent = push(push_config, not_pushed(sorted(results.glob("*.dcm")), results), log_dir=results)
        pushed, push_failed = sent.counts["done"], sent.counts["failed"]
        for failure in sent.failures:
            log.warning("push failed: %s", failure)
    if handler is not None and pusher is None:
        report_instances(rows, handler, sent and sent.stored_files, config, bundle)
        if sent is not None:
            handler.metrics.pushed.inc(sent.counts["done"])
            handler.metrics.push_failed.inc(sent.counts["failed"])
    from ..population import spool_check

    return {"scored": summary.processed, "pushed": pushed, "interrupted": summary.interrupted,
            "population": spool_check(config, spool / "population.json", log, bundle=bundle),
            "incomplete": summary.missing_outputs + push_failed}


def _run(run_batch, config, **kwargs):
    from ..batch.inputs import BatchUsageError

    try:
        return run_batch(config, **kwargs)
    except BatchUsageError as exc:
        if isinstance(exc.__cause__, OSError):  # the spool cannot be written now (a full disk): retried
            raise exc.__cause__ from None
        raise


def report_instances(rows: list[dict], handler, stored: set | None, config, bundle) -> None:
    """One log line per instance scored in this pass (SOP UID, sender, status, push outcome, seconds
    since it arrived; no patient attribute), its counts and, once its results are pushed, its
    latency in the metrics. ``stored``: ``str(path)`` of the result objects pushed so far (those
    reported here leave it), None when results are not pushed."""
    from .results import result_paths

    now, metrics = time.time(), handler.metrics
    for row in rows:
        status = row["status"]
        metrics.count_row(status)
        sop = row.get("sop_instance_uid") or Path(row["path"]).stem
        source, arrived = handler.take_arrival(sop)
        outcome = ""
        if stored is not None and status == "ok" and bundle is not None:
            try:
                objects = {str(p) for p in result_paths(config.dicom_out, sop, bundle.model_id)}
            except UidError:  # no results were written for it; its row says why
                objects = set()
            pushed = bool(objects) and objects <= stored
            stored -= objects
            outcome = ", results pushed" if pushed else ", results not pushed (yet: see the push failures)"
            if pushed and arrived is not None:
                metrics.latency.observe(now - arrived)
        elapsed = f", {now - arrived:.2f} s after it arrived" if arrived is not None else ""
        (log.warning if status == "error" else log.info)("instance %s from %s: %s%s%s", sop, source, status,
                                                         outcome, elapsed)


def record_reused(spool: Path, base: dict) -> int:
    """An error row (:data:`~.spool.REUSED_ERROR`) in ``<spool>/results.csv`` for each instance kept
    apart in ``<spool>/reused`` that has none yet; ``base``: the run's shared cells
    (:func:`~cxr_deploy.batch.rows.base_row`). Returns the rows written."""
    import pydicom

    from ..batch.results_file import COLUMNS, ResultsWriter, image_columns, iter_results, repair_tail, results_header
    from ..batch.rows import new_row, stamp
    from ..locks import hold

    files = sorted(reused_dir(spool).rglob("*.dcm"))
    csv = spool / "results.csv"
    if not files:
        return 0
    with hold(csv, what=str(csv)):
        exists = csv.is_file() and csv.stat().st_size > 0
        if exists:
            repair_tail(csv)
        known = {row["path"] for row in iter_results(csv)} if exists else set()
        rows = []
        for path in (p for p in files if str(p) not in known):
            try:
                header = pydicom.dcmread(path, stop_before_pixels=True, force=True)
            except Exception:  # noqa: BLE001 - it was parsed once, when received; the row stands without it
                header = {}
            columns = image_columns(format="dicom", **{column: str(header.get(keyword, "")) for column, keyword in (
                ("study_instance_uid", "StudyInstanceUID"), ("series_instance_uid", "SeriesInstanceUID"),
                ("sop_instance_uid", "SOPInstanceUID"), ("modality", "Modality"),
                ("body_part", "BodyPartExamined"), ("view_position", "ViewPosition"))})
            rows.append(new_row(base, str(path), "error", REUSED_ERROR, columns, stamp()))
        if rows:
            with ResultsWriter(csv, append=exists, columns=(results_header(csv) if exists else None) or COLUMNS) as out:
                out.write_rows(rows)
    return len(rows)


class Passes:
    """When the next scoring pass runs: after each burst of arrivals, and, while a pass left work
    undone (results not written, e.g. a full disk; pushes that failed), again after a back-off
    (5 s, doubling to 5 min) with no arrival needed: results come once space (or the PACS) returns."""

    FIRST_RETRY, LAST_RETRY = 5.0, 300.0

    def __init__(self, handler, interval: float, base: dict | None = None):
        """``base``: the shared cells of the rows :func:`record_reused` writes."""
        self.handler, self.interval, self.base = handler, interval, base
        self.retry_in: float | None = None
        handler.kept_apart.set()  # at start: rows for what a stopped run kept apart, if it had none yet

    def run(self, score) -> None:
        """One pass (``score()`` -> :func:`score_and_push`'s dict); a disk error is logged, not fatal."""
        if self.base is not None and self.handler.kept_apart.is_set():
            self.handler.kept_apart.clear()
            try:
                record_reused(self.handler.incoming.parent, self.base)
            except OSError as exc:
                self.handler.kept_apart.set()
                log.warning("rows for instances kept apart not written: %s; retrying", exc.strerror or exc)
        try:
            incomplete = score().get("incomplete", 0)
        except OSError as exc:  # e.g. the results CSV cannot grow on a full disk: retried
            log.warning("scoring pass stopped: %s; retrying", exc.strerror or exc)
            incomplete = 1
        try:
            self.handler.prune()
        except OSError as exc:
            log.warning("retention stopped: %s", exc.strerror or exc)
        if incomplete:
            self.retry_in = min(self.LAST_RETRY, self.retry_in * 2) if self.retry_in else self.FIRST_RETRY
            log.info("%d results not written or not sent yet: next try in %g s", incomplete, self.retry_in)
        else:
            self.retry_in = None

    def wait(self, check_stop) -> None:
        """Until instances arrive (then ``interval`` more, for the rest of the burst) or a retry is due."""
        deadline = time.monotonic() + self.retry_in if self.retry_in else None
        while not self.handler.received.wait(0.5):
            check_stop()  # an interrupt lost in a finalizer still stops the listener
            if deadline is not None and time.monotonic() >= deadline:
                return
        check_stop()
        time.sleep(self.interval)  # let the rest of the burst arrive
        self.handler.received.clear()
