"""``cxr-deploy pacs listen``: a C-STORE SCP (pynetdicom) that receives images into the spool and
scores them as they arrive, then sends the results to the PACS.

- **Nothing lost.** A received instance is written to ``<spool>/incoming/<Study UID>/<SOP UID>.dcm``
  (temp name, fsync, rename, directory fsync) *before* the success status goes back. Scoring is
  the ordinary streaming batch over the spool with ``--resume`` on ``<spool>/results.csv``: after a
  ``kill -9`` a restart scores every file that has no row yet, and none twice.
- **Bounded memory.** Incoming data sets are streamed to disk by pynetdicom
  (``STORE_RECV_CHUNKED_DATASET``), at most ``max_associations`` at a time; scoring streams.
- **Only who belongs.** Associations only from ``allowed_ae_titles`` (and, if given,
  ``allowed_addresses``). Spool names are built from validated UIDs only (``../`` is not a UID).
  Instance size and spool size are capped (status A700, out of resources). Nothing received is
  executed or unpickled: it is parsed as DICOM by pydicom, nothing else.
- **Bad instances are answered, not fatal**: a data set that cannot be parsed gets status C000 and
  a logged reason; non-chest or non-image objects are stored and skipped by scoring with their
  reason (a refusal would make the sender retry them for ever).
- SIGTERM (systemd stop) or Ctrl-C: stop accepting, finish the scoring pass, exit 0.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from pathlib import Path

from .config import ListenSettings
from .spool import copy_atomic, spool_path
from .uids import UidError

log = logging.getLogger("cxr_deploy.pacs.listen")

SUCCESS, OUT_OF_RESOURCES, CANNOT_UNDERSTAND = 0x0000, 0xA700, 0xC000


class StoreHandler:
    """The C-STORE handler: validate, limit, spool (fsync) — then answer."""

    def __init__(self, settings: ListenSettings, incoming: Path, metrics=None):
        from .metrics import ListenMetrics

        self.settings, self.incoming = settings, incoming
        self.metrics = metrics or ListenMetrics()
        self.received = threading.Event()  # set after each stored instance: wakes the scorer
        self.arrivals: dict[str, tuple[str, float]] = {}  # SOP UID -> (source, time stored): for its log line
        self._lock = threading.Lock()
        self._spool_bytes = sum(p.stat().st_size for p in incoming.rglob("*.dcm")) if incoming.exists() else 0
        self.metrics.spool_bytes.set(self._spool_bytes)

    def __call__(self, event) -> int:
        import pydicom

        source = f"{event.assoc.requestor.ae_title}@{event.assoc.requestor.address}"
        path = Path(event.dataset_path)
        size = path.stat().st_size
        asked = str(event.request.AffectedSOPInstanceUID)[:64]  # for the log line of a refusal
        if size > self.settings.max_instance_bytes:
            return self._refuse(OUT_OF_RESOURCES, asked, source, f"instance of {size:,} bytes is over the "
                                f"{self.settings.max_instance_bytes:,}-byte limit")
        with self._lock:
            if self._spool_bytes + size > self.settings.max_spool_bytes:
                return self._refuse(OUT_OF_RESOURCES, asked, source, "spool is full")
        try:
            header = pydicom.dcmread(path, stop_before_pixels=True, force=True)
            sop, study = str(header.SOPInstanceUID), str(header.StudyInstanceUID)
        except Exception as exc:  # noqa: BLE001 - truncated or not DICOM: answer, keep listening
            return self._refuse(CANNOT_UNDERSTAND, asked, source, f"data set cannot be parsed: {type(exc).__name__}")
        if sop != str(event.request.AffectedSOPInstanceUID):
            return self._refuse(CANNOT_UNDERSTAND, asked, source, "SOP Instance UID differs from the C-STORE request's")
        try:
            target = spool_path(self.incoming, study, sop)
        except UidError as exc:
            return self._refuse(CANNOT_UNDERSTAND, asked, source, str(exc))
        copy_atomic(target, path)  # streamed, and fsync'ed before the success status goes back
        with self._lock:
            self._spool_bytes += size
            self.arrivals[sop] = (source, time.time())
            self.metrics.spool_bytes.set(self._spool_bytes)
        self.metrics.received.inc()
        log.debug("stored %s from %s", target.relative_to(self.incoming), source)  # its line comes once scored
        self.received.set()
        return SUCCESS

    def take_resent(self, before: float, scored: set[str]) -> list[tuple[str, str]]:
        """``(SOP UID, source)`` of instances stored before ``before`` (a pass's start, so the pass
        saw them) that got no row: sent again after they were scored, and not scored twice."""
        with self._lock:
            resent = [sop for sop, (_, at) in self.arrivals.items() if at < before and sop not in scored]
            return [(sop, self.arrivals.pop(sop)[0]) for sop in resent]

    def take_arrival(self, sop: str) -> tuple[str, float | None]:
        """``(source, time stored)`` of an instance received by this process (forgotten now)."""
        with self._lock:
            return self.arrivals.pop(sop, ("an earlier run", None))

    def _refuse(self, status: int, sop: str, source: str, reason: str) -> int:
        # the instance's one log line: UIDs, AE, address and status only, never a patient attribute
        log.warning("instance %s from %s: refused, status 0x%04X: %s", sop, source, status, reason)
        self.metrics.refused.labels(f"0x{status:04X}").inc()
        return status


def start_scp(settings: ListenSettings, handler: StoreHandler):
    """Start the SCP in background threads; returns the pynetdicom server (``.shutdown()``)."""
    from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, _config, evt

    from . import scp_server
    from .transfer import set_nodelay

    # Stream data sets to disk: memory does not grow with size. pynetdicom's documented configuration
    # is this module, underscore and all (docs: "Configuration Options (pynetdicom._config)"); it is
    # process-wide, which suits a process that is the listener. tests/test_private_apis.py fails
    # if the option goes.
    _config.STORE_RECV_CHUNKED_DATASET = True
    ae = AE(ae_title=settings.ae_title)
    ae.maximum_associations = scp_server.UNLIMITED  # the limit is AssociationSlots', on associations only
    ae.acse_timeout = settings.association_timeout  # connect -> A-ASSOCIATE-RQ; also the release wait
    ae.network_timeout = settings.idle_timeout  # an established association that stays silent
    ae.require_calling_aet = list(settings.allowed_ae_titles)
    for context in AllStoragePresentationContexts:
        ae.add_supported_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES)
    ae.add_supported_context("1.2.840.10008.1.1")  # Verification (C-ECHO)
    slots = scp_server.AssociationSlots(settings.max_associations)

    def on_open(event):
        set_nodelay(event.assoc)

    def on_request(event):
        # A refused address gets an A-ASSOCIATE-RJ (rejected-permanent, service user, calling AE not
        # recognized: what dcm4chee answers when a calling host does not match). Aborting at
        # connection open instead left the sender waiting out its ACSE timeout (30 s for storescu).
        requestor = event.assoc.requestor
        # the calling AE of the A-ASSOCIATE-RQ: pynetdicom copies it to requestor.ae_title only later
        calling = str(requestor.primitive.calling_ae_title).strip()
        source = f"{calling} at {requestor.address}:{requestor.port}"
        if not settings.address_allowed(requestor.address):
            log.warning("association from %s refused: address not allowed", source)
            event.assoc.acse.send_reject(0x01, 0x01, 0x03)
            event.assoc.kill()  # as pynetdicom's own rejections do: the DUL sends the PDU, then stops
        elif calling not in settings.allowed_ae_titles:
            log.warning("association from %s refused: calling AE title not allowed", source)  # pynetdicom rejects
        else:
            slots.admit(event, source)

    handlers = [(evt.EVT_C_STORE, handler), (evt.EVT_CONN_OPEN, on_open), (evt.EVT_REQUESTED, on_request)]
    context = None
    if settings.tls_cert or settings.tls_key:
        import ssl

        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(settings.tls_cert, settings.tls_key)
    return scp_server.start(ae, (settings.bind, settings.port), handlers=handlers, ssl_context=context,
                            handshake_timeout=settings.association_timeout)


def wait_for_port(host: str, port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {host}:{port}")


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
                   uid_root: str = "2.25", settings=None, handler: StoreHandler | None = None,
                   pusher=None) -> dict:
    """One scoring pass over the spool (resumed: each file scored once), then push new results.
    ``model``: a :class:`~.resident.ResidentModel` (the listener's: loaded once, its decode workers
    kept) or a bundle directory (loaded for this pass; ``workers``, ``uid_root`` and ``settings``
    as :func:`listen_batch_config` takes them). ``handler``: the listener's, whose metrics and
    arrival times give each instance scored its log line (with a resident model). ``pusher``: a
    :class:`~.pusher.Pusher` that sends the results in its own thread (then ``push_config`` is
    not used here and ``pushed`` is None)."""
    from ..batch.runner import run_batch
    from .resident import ResidentModel

    if not any(incoming.rglob("*.dcm")):
        return {"scored": 0, "pushed": 0}
    rows: list[dict] = []
    if isinstance(model, ResidentModel):
        config, started = model.config, time.time()
        bundle, backend, pool = model.current()
        summary = run_batch(config, bundle=bundle, backend=backend, pool=pool, on_rows=rows.extend)
        if handler is not None and not summary.interrupted:
            scored = {row.get("sop_instance_uid") or Path(row["path"]).stem for row in rows}
            for sop, source in handler.take_resent(started, scored):
                log.info("instance %s from %s: sent again, already scored: not scored twice", sop, source)
    else:
        config = listen_batch_config(spool, incoming, model, workers=workers, uid_root=uid_root, settings=settings)
        bundle, summary = None, run_batch(config)
    for line in summary.lines():  # with a handler each instance has its own line: the pass's are detail
        detail = handler is not None and not line.startswith(("OUTPUTS MISSING", "INTERRUPTED"))
        (log.debug if detail else log.info)(line)
    if summary.interrupted:  # SIGTERM/Ctrl-C arrived during the pass: stop, don't wait for the next one
        raise KeyboardInterrupt
    pushed, sent = 0, None
    results = Path(config.dicom_out)
    if pusher is not None:
        pusher.submit(rows, bundle)
        pushed = None
    elif push_config is not None and results.is_dir():
        from .transfer import not_pushed, push

        sent = push(push_config, not_pushed(sorted(results.glob("*.dcm")), results), log_dir=results)
        pushed = sent.counts["done"]
        for failure in sent.failures:
            log.warning("push failed: %s", failure)
    if handler is not None and pusher is None:
        report_instances(rows, handler, sent and sent.stored_files, config, bundle)
        if sent is not None:
            handler.metrics.pushed.inc(sent.counts["done"])
            handler.metrics.push_failed.inc(sent.counts["failed"])
    from ..population import spool_check

    return {"scored": summary.processed, "pushed": pushed, "interrupted": summary.interrupted,
            "population": spool_check(config, spool / "population.json", log, bundle=bundle)}


def report_instances(rows: list[dict], handler: StoreHandler, stored: set | None, config, bundle) -> None:
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


def clean_partials(incoming: Path) -> None:
    """Remove our own temp files of writes a crash interrupted (never acknowledged, so the sender
    sends those instances again)."""
    os.makedirs(incoming, exist_ok=True)
    from ..atomic import TEMP_MARK

    for partial in incoming.rglob(f".*.dcm{TEMP_MARK}*"):
        partial.unlink(missing_ok=True)
