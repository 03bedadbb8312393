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
  Instance size and spool size are capped (status A700, out of resources): the size cap and a
  full disk while the data arrives (:mod:`.intake`), the spool cap in one locked step; sent
  instances leave the spool by :mod:`.retention`. Nothing received is executed or unpickled: it
  is parsed as DICOM by pydicom, nothing else.
- **One SOP Instance UID, one image** (:func:`.spool.place`): a re-send is a no-op; the same UID
  for another patient, study or image is kept apart with an error row, never over the first.
- **Bad instances are answered, not fatal**: a data set that cannot be parsed gets status C000 and
  a logged reason; non-chest or non-image objects are stored and skipped by scoring with their
  reason (a refusal would make the sender retry them for ever).
- SIGTERM (systemd stop) or Ctrl-C: stop accepting, finish the scoring pass, exit 0.

The scoring passes (when they run, what they push, each instance's log line) are :mod:`.passes`.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from pathlib import Path

from .config import ListenSettings
from .spool import REUSED_ERROR, copy_atomic, place, reused_dir
from .uids import UidError

log = logging.getLogger("cxr_deploy.pacs.listen")

SUCCESS, OUT_OF_RESOURCES, CANNOT_UNDERSTAND = 0x0000, 0xA700, 0xC000


class StoreHandler:
    """The C-STORE handler: validate, limit, spool (fsync) — then answer. Disk and size limits
    are enforced while the data set arrives (:mod:`.intake`); a failed write is answered A700
    (Out of Resources) with a one-line log, and leaves no file behind."""

    def __init__(self, settings: ListenSettings, incoming: Path, metrics=None):
        from .intake import Intake
        from .metrics import ListenMetrics

        self.settings, self.incoming = settings, incoming
        self.metrics = metrics or ListenMetrics()
        self.received = threading.Event()  # set after each stored instance: wakes the scorer
        self.kept_apart = threading.Event()  # set when an instance went to <spool>/reused: it needs its row
        self.intake = Intake(incoming.parent, settings.max_instance_bytes)
        self._lock = threading.Lock()
        # what max_spool_gb counts: the spooled instances and those kept apart
        self._spool_bytes = sum(p.stat().st_size for folder in (incoming, reused_dir(incoming.parent))
                                for p in folder.rglob("*.dcm"))
        self.metrics.spool_bytes.set(self._spool_bytes)
        self.arrivals: dict[str, tuple[str, float]] = {}  # SOP UID -> (source, time stored): for its log line

    def __call__(self, event) -> int:
        source = f"{event.assoc.requestor.ae_title}@{event.assoc.requestor.address}"
        received = self.intake.claim(event.dataset_path)
        try:
            return self._store(event, received, source)
        finally:
            if received is not None:
                received.discard()  # stored by a rename, or refused: nothing stays in receiving/

    def _store(self, event, received, source: str) -> int:
        import pydicom

        from .intake import write_failure

        cap = self.settings.max_instance_bytes
        asked = str(event.request.AffectedSOPInstanceUID)[:64]  # for the log line of a refusal
        if received is not None:
            received.finish()
        if received is not None and received.over:
            return self._refuse(OUT_OF_RESOURCES, asked, source, f"instance over the {cap:,}-byte limit: transfer stopped "
                                f"at {cap:,} bytes, {received.received:,} bytes received and dropped")
        if received is not None and received.error:
            return self._refuse(OUT_OF_RESOURCES, asked, source, write_failure(received.error))
        path = Path(event.dataset_path)
        try:
            size = path.stat().st_size
        except OSError as exc:  # removed: the connection closed before the handler ran
            return self._refuse(OUT_OF_RESOURCES, asked, source, f"received data set is gone ({exc.strerror})")
        if size > cap:
            return self._refuse(OUT_OF_RESOURCES, asked, source, f"instance of {size:,} bytes is over the {cap:,}-byte limit")
        try:
            header = pydicom.dcmread(path, stop_before_pixels=True, force=True)
            sop, study = str(header.SOPInstanceUID), str(header.StudyInstanceUID)
        except Exception as exc:  # noqa: BLE001 - truncated or not DICOM: answer, keep listening
            return self._refuse(CANNOT_UNDERSTAND, asked, source, f"data set cannot be parsed: {type(exc).__name__}")
        if sop != str(event.request.AffectedSOPInstanceUID):
            return self._refuse(CANNOT_UNDERSTAND, asked, source, "SOP Instance UID differs from the C-STORE request's")
        try:
            verdict, target = place(self.incoming.parent, study, sop, path)
        except UidError as exc:
            return self._refuse(CANNOT_UNDERSTAND, asked, source, str(exc))
        except OSError as exc:  # the spool cannot be read
            return self._refuse(OUT_OF_RESOURCES, asked, source, f"cannot read the spool: {exc.strerror or exc}")
        if verdict == "same" or target.exists():  # a re-send of what is spooled (or kept apart) already
            log.info("instance %s from %s: sent again, already scored or waiting to be (same patient, study and "
                     "pixels): nothing to do", sop, source)
            return SUCCESS
        if not self._reserve(size):  # checked and counted in one step: parallel associations cannot overshoot
            self.received.set()  # a pass (then retention) now: sent instances make room
            return self._refuse(OUT_OF_RESOURCES, asked, source, f"spool is full ({self.spool_bytes:,} of "
                                f"{self.settings.max_spool_bytes:,} bytes, max_spool_gb); instances whose results "
                                "were sent are deleted to make room (spool_target_gb, keep_days)")
        try:
            if received is not None:
                received.commit(target)  # fsync'ed, renamed into place before the success status goes back
            else:
                copy_atomic(target, path)
        except OSError as exc:
            self.release(size)
            return self._refuse(OUT_OF_RESOURCES, asked, source, write_failure(exc))
        if verdict == "reused":
            log.warning("%s from %s: %s; kept apart as %s, no result is made for it", sop, source, REUSED_ERROR,
                        target.relative_to(self.incoming.parent))
            self.kept_apart.set()
        else:
            log.debug("stored %s from %s", target.relative_to(self.incoming), source)  # its line comes once scored
            with self._lock:
                self.arrivals[sop] = (source, time.time())
        self.metrics.received.inc()
        self.metrics.spool_bytes.set(self.spool_bytes)
        self.received.set()
        return SUCCESS

    @property
    def spool_bytes(self) -> int:
        return self._spool_bytes

    def _reserve(self, size: int) -> bool:
        with self._lock:
            if self._spool_bytes + size > self.settings.max_spool_bytes:
                return False
            self._spool_bytes += size
            return True

    def release(self, size: int) -> None:
        """``size`` bytes left the spool (a failed store, or retention)."""
        with self._lock:
            self._spool_bytes = max(0, self._spool_bytes - size)
            self.metrics.spool_bytes.set(self._spool_bytes)

    def take_arrival(self, sop: str) -> tuple[str, float | None]:
        """``(source, time stored)`` of an instance received by this process (forgotten now)."""
        with self._lock:
            return self.arrivals.pop(sop, ("an earlier run", None))

    def prune(self) -> None:
        """Retention (:mod:`.retention`) after a pass; what it frees is room for new instances."""
        from .retention import Retention, prune

        settings = self.settings
        target = settings.spool_target_bytes
        retention = Retention(settings.keep_days, int(0.9 * settings.max_spool_bytes) if target is None else target)
        self.release(prune(self.incoming.parent, retention, self.spool_bytes))

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

    handlers = [(evt.EVT_C_STORE, handler), (evt.EVT_CONN_OPEN, on_open), (evt.EVT_REQUESTED, on_request),
                *handler.intake.handlers()]
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


def clean_partials(incoming: Path) -> None:
    """Remove our own temp files of writes a crash interrupted, and the data sets it was receiving
    (never acknowledged, so the sender sends those instances again)."""
    os.makedirs(incoming, exist_ok=True)
    from ..atomic import TEMP_MARK
    from .intake import Intake

    Intake(incoming.parent, 0).clear()

    for partial in incoming.rglob(f".*.dcm{TEMP_MARK}*"):
        partial.unlink(missing_ok=True)
