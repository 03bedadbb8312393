"""``cxr-deploy pacs pull`` and ``pacs push``: DICOMweb QIDO/WADO into the spool, and results out by
STOW-RS or C-STORE.

- **pull** searches instances (QIDO-RS, every page, checked against each series' instance count:
  :mod:`.search`) by study date range, modality and/or study UID and retrieves (WADO-RS) each one
  not already in the spool, ``parallel`` at a time: a rerun fetches nothing it already has.
- **push** sends DICOM files (the SR and SC of ``batch --dicom-out``) and records every instance's
  outcome in ``push-log.jsonl`` next to them: an instance already stored is never sent again. A
  refusal fails at once; a transient failure is retried with back-off within a 10 s budget
  (:mod:`.network`); a PACS that is down stops the push with the rest not sent.
- C-STORE associations turn Nagle off (``TCP_NODELAY``): with it on, each small instance waited
  for the delayed-ACK timer (~43 ms per C-STORE measured in an earlier trial).
"""

from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from .config import PacsConfig, PushMethod
from .network import (CONNECT_TIMEOUT, READ_TIMEOUT, RETRY_DELAYS, AssociationRefused, Refused, TransferError,
                      Unreachable, is_transient, reason, redact_url, with_retries)
from .spool import REUSED_ERROR, incoming_dir, place, spool_path, spooled_for_another_patient, write_atomic
from .uids import UidError

PUSH_LOG = "push-log.jsonl"
# WADO-RS retrievals at a time: the server (and its disk) works on several instances while the
# client writes others; measured in benchmarks/pacs_pull_rate.py
PULL_PARALLEL = 4
PROGRESS_EVERY = 100  # push: a progress line every this many files (with each retry and failure)

__all__ = ["TransferError", "TransferSummary", "pull", "push"]


@dataclass
class TransferSummary:
    counts: dict = field(default_factory=lambda: {"done": 0, "already": 0, "failed": 0})
    failures: list = field(default_factory=list)
    seconds: float = 0.0
    stored_files: set = field(default_factory=set)  # str(path) of each file this push stored

    @property
    def exit_code(self) -> int:
        return 3 if self.counts["failed"] else 0


# -- pull --------------------------------------------------------------------------------------------
def pull(config: PacsConfig, *, study_date: str | None = None, modality: str | None = None,
         study_uid: str | None = None, limit: int | None = None, parallel: int = PULL_PARALLEL) -> TransferSummary:
    """Search (every page, see :mod:`.search`), then retrieve ``parallel`` instances at a time."""
    from .dicomweb import make_client
    from .search import list_instances

    filters = {k: v for k, v in (("StudyDate", study_date), ("Modality", modality)) if v}
    if not (filters or study_uid):
        raise TransferError("give --study-date, --modality or --study-uid (pulling a whole PACS is not a default)")
    summary, start = TransferSummary(), time.perf_counter()
    try:
        listing = list_instances(make_client(config.pacs), study_uid=study_uid, filters=filters, limit=limit)
    except Exception as exc:  # noqa: BLE001 - one line for the user, whatever the client raised
        url = redact_url(config.pacs.dicomweb_url)
        if is_transient(exc):
            raise TransferError(f"cannot reach {url}: {reason(exc)}") from None
        raise TransferError(f"QIDO-RS search at {url} failed: {reason(exc)}") from None
    summary.counts["failed"] += listing.missing
    summary.failures += listing.notes
    jobs = []
    for study, series, sop, patient in listing.instances:
        try:
            target = spool_path(incoming_dir(config.local.spool), study, sop)
        except UidError as exc:
            summary.counts["failed"] += 1
            summary.failures.append(str(exc))
            continue
        if target.is_file() and not spooled_for_another_patient(target, patient):
            summary.counts["already"] += 1
        else:
            jobs.append((study, series, sop, target))
    not_tried = 0
    for (*_, sop, _target), (verdict, error) in zip(jobs, _retrieve_all(config, jobs, parallel)):
        if verdict is None:
            not_tried += 1
        elif error:
            summary.counts["failed"] += 1
            summary.failures.append(f"{sop}: {error}")
        else:
            summary.counts["already" if verdict == "same" else "done"] += 1
    if not_tried:
        summary.counts["failed"] += not_tried
        summary.failures.append(f"{not_tried} more not retrieved: the PACS stopped answering; rerun the same pull "
                                "when it is back")
    summary.seconds = time.perf_counter() - start
    return summary


def _retrieve_all(config: PacsConfig, jobs: list, parallel: int):
    """Each job's ``(verdict, error)``, in order: verdict ``"new"``/``"same"``/``"reused"`` (the
    spool's rule, :func:`.spool.place`) and error ``""`` when stored; ``(None, None)`` when not tried
    (the PACS had stopped answering). ``parallel`` WADO-RS retrievals at a time, each thread with its
    own client (a requests session is not meant to be shared between threads)."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from .dicomweb import make_client

    local, down = threading.local(), threading.Event()

    def fetch(job) -> tuple:
        study, series, sop, _target = job
        if down.is_set():  # as push: one instance spends the retry budget, not each of thousands
            return None, None
        if not hasattr(local, "client"):
            local.client = make_client(config.pacs)
        client, placed = local.client, []

        def store():
            data = _encode(client.retrieve_instance(study, series, sop))
            verdict, where = place(config.local.spool, study, sop, data)  # the rule pacs listen applies too
            if verdict != "same" and not where.exists():
                write_atomic(where, data)
            placed[:] = [verdict, where]

        # a failure is this instance's (reported, the rest go on); a transient one is retried first
        outcome = with_retries(store)
        if outcome.down:
            down.set()
        if outcome.error or not placed:
            return "failed", outcome.error or "not retrieved"
        verdict, where = placed
        if verdict == "reused":
            return verdict, f"{REUSED_ERROR}; kept apart in {where.parent}, not scored"
        return verdict, ""

    with ThreadPoolExecutor(max_workers=max(1, parallel), thread_name_prefix="cxr-deploy-pull") as pool:
        yield from pool.map(fetch, jobs)


def _encode(dataset) -> bytes:
    from io import BytesIO

    buffer = BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


# -- push --------------------------------------------------------------------------------------------
def push(config: PacsConfig, files: list[Path], *, log_dir: Path, retry_delays=RETRY_DELAYS,
         note=None, stop=None) -> TransferSummary:
    """Send ``files`` by the configured method; idempotent through ``log_dir/push-log.jsonl``.

    A permanent refusal fails that instance at once; transient failures are retried within the
    budget of :mod:`.network`. When that budget is spent on a PACS that is not there, or the PACS
    refuses the association, it is so for all of them: the rest are not tried, and say so.
    ``note(message)`` hears about retries and progress (the CLI prints them on stderr). ``stop``: a
    :class:`threading.Event`; once set, no further file is sent (the rest wait for the next push)."""
    import pydicom

    log_path, summary, start = Path(log_dir) / PUSH_LOG, TransferSummary(), time.perf_counter()
    stored = _stored_uids(log_path)
    sender = _Sender(config)
    try:
        for index, path in enumerate(files):
            if stop is not None and stop.is_set():
                break
            try:
                dataset = pydicom.dcmread(path, force=True)
                uid = str(dataset.SOPInstanceUID)
            except Exception as exc:  # noqa: BLE001
                summary.counts["failed"] += 1
                summary.failures.append(f"{path}: not readable as DICOM: {type(exc).__name__}")
                continue
            if uid in stored:
                summary.counts["already"] += 1
                continue
            if note and index and index % PROGRESS_EVERY == 0:
                note(f"{index} of {len(files)} files: {summary.counts['done']} sent, {summary.counts['failed']} failed")
            tell = (lambda message, name=path.name: note(f"{name}: {message}")) if note else None
            outcome = with_retries(lambda: sender.send(dataset), retry_delays, note=tell)
            _log(log_path, {"sop_instance_uid": uid, "file": str(path), "method": config.pacs.push.value,
                            "status": "failed" if outcome.error else "stored", "error": outcome.error})
            if not outcome.error:
                summary.counts["done"] += 1
                summary.stored_files.add(str(path))
                stored.add(uid)
                continue
            summary.counts["failed"] += 1
            summary.failures.append(f"{path.name}: {outcome.error}")
            if tell:
                tell(f"failed: {outcome.error}")
            if outcome.down or isinstance(outcome.exception, AssociationRefused):
                rest = len(files) - index - 1
                if rest:
                    summary.counts["failed"] += rest
                    summary.failures.append(f"{rest} more not sent: the PACS is down or refuses this node "
                                            f"({reason(outcome.exception)}); rerun the same push when it is back")
                break
    finally:
        sender.close()
    summary.seconds = time.perf_counter() - start
    return summary


def not_pushed(files: list[Path], log_dir: Path) -> list[Path]:
    """``files`` without those ``log_dir/push-log.jsonl`` records as stored, found by name: a
    listener's pass then reads only its new results, not every result object of the spool again."""
    done = {entry.get("file") for entry in _stored_entries(Path(log_dir) / PUSH_LOG)}
    return [path for path in files if str(path) not in done]


def _stored_uids(log_path: Path) -> set[str]:
    return {entry["sop_instance_uid"] for entry in _stored_entries(log_path)}


def _stored_entries(log_path: Path):
    """The push log's entries of instances stored."""
    if log_path.is_file():
        for line in log_path.read_text().splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue  # a torn last line from a crash
            if entry.get("status") == "stored":
                yield entry


def _log(log_path: Path, entry: dict) -> None:
    entry = {"at": datetime.now(timezone.utc).isoformat(timespec="seconds"), **entry}
    with open(log_path, "a") as fh:
        fh.write(json.dumps(entry) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


class _Sender:
    """One STOW-RS client or one C-STORE association, opened on first use."""

    def __init__(self, config: PacsConfig):
        self.config, self._client, self._assoc, self._ae = config, None, None, None

    def send(self, dataset) -> None:
        if self.config.pacs.push == PushMethod.STOW:
            if self._client is None:
                from .dicomweb import make_client

                self._client = make_client(self.config.pacs)
            self._client.store_instances([dataset])
            return
        self._cstore(dataset)

    def _cstore(self, dataset) -> None:
        assoc = self._association(dataset)
        status = assoc.send_c_store(dataset)
        code = getattr(status, "Status", None)
        if code is None:
            self.close()  # no answer: the association is gone; the retry opens a new one
            raise Unreachable("C-STORE got no response (association aborted or timed out)")
        if code not in (0x0000, 0xB000, 0xB006, 0xB007):
            # a refusal (0xA7xx out of resources, 0xA9xx data set does not match, 0xCxxx cannot
            # understand, 0x01xx): the PACS looked at this instance and said no
            raise Refused(f"C-STORE refused with status 0x{code:04X}")

    def _association(self, dataset):
        if self._assoc is not None and self._assoc.is_established:
            return self._assoc
        from pynetdicom import AE
        from pynetdicom.sop_class import ComprehensiveSRStorage, SecondaryCaptureImageStorage

        remote = self.config.pacs
        self._ae = AE(ae_title=self.config.local.ae_title)
        self._ae.connection_timeout = self._ae.acse_timeout = CONNECT_TIMEOUT  # see .network
        self._ae.dimse_timeout = self._ae.network_timeout = READ_TIMEOUT
        for context in (ComprehensiveSRStorage, SecondaryCaptureImageStorage, dataset.SOPClassUID):
            self._ae.add_requested_context(context)
        tls = None
        if remote.tls:  # DICOM TLS: verify the PACS against ca_file (or the system store)
            import ssl

            context = ssl.create_default_context(cafile=remote.ca_file or None)
            tls = (context, remote.host)
        from pynetdicom import evt

        answers = []  # the A-ASSOCIATE answer, if one came: a rejection says permanent or transient
        self._assoc = self._ae.associate(remote.host, remote.port, ae_title=remote.ae_title, tls_args=tls,
                                         evt_handlers=[(evt.EVT_ACSE_RECV, lambda event: answers.append(
                                             event.primitive))])
        if not self._assoc.is_established:
            where = f"{remote.ae_title}@{remote.host}:{remote.port}"
            rejection = next((a for a in answers if getattr(a, "result", None) in (0x01, 0x02)), None)
            if rejection is None:
                raise Unreachable(f"cannot reach {where}: no association (connection refused, or no answer "
                                  f"within {CONNECT_TIMEOUT:g} s)")
            why = f"association rejected by {where}: {rejection.reason_str} ({rejection.result_str})"
            raise (AssociationRefused if rejection.result == 0x01 else Unreachable)(why)
        set_nodelay(self._assoc)
        return self._assoc

    def close(self) -> None:
        if self._assoc is not None and self._assoc.is_established:
            self._assoc.release()
        self._assoc = None


def set_nodelay(assoc) -> None:
    """Nagle off on an association's socket (see the module docstring)."""
    try:
        assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (AttributeError, OSError):
        pass
