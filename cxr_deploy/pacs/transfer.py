"""``cxr-deploy pacs pull`` and ``pacs push``: DICOMweb QIDO/WADO into the spool, and results out by
STOW-RS or C-STORE.

- **pull** searches instances (QIDO-RS) by study date range, modality and/or study UID and
  retrieves (WADO-RS) each one not already in the spool: a rerun fetches nothing it already has.
- **push** sends DICOM files (the SR and SC of ``batch --dicom-out``) and records every instance's
  outcome in ``push-log.jsonl`` next to them: an instance already stored is never sent again, a
  failed send is retried with back-off (4 tries: at once, then after 0.5 s, 1 s and 2 s) and logged with its reason.
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

from ..errors import CxrDeployError
from .config import PacsConfig, PushMethod
from .spool import incoming_dir, spool_path, write_atomic
from .uids import UidError

PUSH_LOG = "push-log.jsonl"
RETRY_DELAYS = (0.5, 1.0, 2.0)


class TransferError(CxrDeployError):
    pass


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
         study_uid: str | None = None, limit: int | None = None) -> TransferSummary:
    from .dicomweb import make_client

    filters = {k: v for k, v in (("StudyDate", study_date), ("Modality", modality)) if v}
    if not (filters or study_uid):
        raise TransferError("give --study-date, --modality or --study-uid (pulling a whole PACS is not a default)")
    client, summary, start = make_client(config.pacs), TransferSummary(), time.perf_counter()
    found = client.search_for_instances(study_instance_uid=study_uid, search_filters=filters or None,
                                        fields=["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"],
                                        limit=limit)
    for attrs in found:
        study, series, sop = (_value(attrs, tag) for tag in ("0020000D", "0020000E", "00080018"))
        try:
            target = spool_path(incoming_dir(config.local.spool), study, sop)
        except UidError as exc:
            summary.counts["failed"] += 1
            summary.failures.append(str(exc))
            continue
        if target.is_file():
            summary.counts["already"] += 1
            continue
        try:
            dataset = client.retrieve_instance(study, series, sop)
            write_atomic(target, _encode(dataset))
            summary.counts["done"] += 1
        except Exception as exc:  # noqa: BLE001 - one instance's failure is reported, the rest go on
            summary.counts["failed"] += 1
            summary.failures.append(f"{sop}: {type(exc).__name__}: {' '.join(str(exc).split())[:200]}")
    summary.seconds = time.perf_counter() - start
    return summary


def _value(attrs: dict, tag: str) -> str:
    values = (attrs.get(tag) or {}).get("Value") or [""]
    return str(values[0])


def _encode(dataset) -> bytes:
    from io import BytesIO

    buffer = BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


# -- push --------------------------------------------------------------------------------------------
def push(config: PacsConfig, files: list[Path], *, log_dir: Path, retry_delays=RETRY_DELAYS,
         stop=None) -> TransferSummary:
    """Send ``files`` by the configured method; idempotent through ``log_dir/push-log.jsonl``.
    ``stop``: a :class:`threading.Event`; once set, no further file is sent (the rest wait for the
    next push)."""
    import pydicom

    log_path, summary, start = Path(log_dir) / PUSH_LOG, TransferSummary(), time.perf_counter()
    stored = _stored_uids(log_path)
    sender = _Sender(config)
    try:
        for path in files:
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
            error = _with_retries(lambda: sender.send(dataset), retry_delays)
            _log(log_path, {"sop_instance_uid": uid, "file": str(path), "method": config.pacs.push.value,
                            "status": "failed" if error else "stored", "error": error})
            if error:
                summary.counts["failed"] += 1
                summary.failures.append(f"{path.name}: {error}")
            else:
                summary.counts["done"] += 1
                summary.stored_files.add(str(path))
                stored.add(uid)
    finally:
        sender.close()
    summary.seconds = time.perf_counter() - start
    return summary


def not_pushed(files: list[Path], log_dir: Path) -> list[Path]:
    """``files`` without those ``log_dir/push-log.jsonl`` records as stored, found by name: a
    listener's pass then reads only its new results, not every result object of the spool again."""
    done = {entry.get("file") for entry in _stored_entries(Path(log_dir) / PUSH_LOG)}
    return [path for path in files if str(path) not in done]


def _with_retries(action, delays) -> str:
    """Run ``action`` until it succeeds; the last error message, or "" on success."""
    error = ""
    for attempt, delay in enumerate((0.0, *delays)):
        if delay:
            time.sleep(delay)
        try:
            action()
            return ""
        except Exception as exc:  # noqa: BLE001 - network and protocol errors alike are retried
            error = f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]} (after {attempt + 1} tries)"
    return error


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
            raise TransferError("C-STORE got no response (association aborted or timed out)")
        if code not in (0x0000, 0xB000, 0xB006, 0xB007):
            raise TransferError(f"C-STORE refused with status 0x{code:04X}")

    def _association(self, dataset):
        if self._assoc is not None and self._assoc.is_established:
            return self._assoc
        from pynetdicom import AE
        from pynetdicom.sop_class import ComprehensiveSRStorage, SecondaryCaptureImageStorage

        remote = self.config.pacs
        self._ae = AE(ae_title=self.config.local.ae_title)
        for context in (ComprehensiveSRStorage, SecondaryCaptureImageStorage, dataset.SOPClassUID):
            self._ae.add_requested_context(context)
        tls = None
        if remote.tls:  # DICOM TLS: verify the PACS against ca_file (or the system store)
            import ssl

            context = ssl.create_default_context(cafile=remote.ca_file or None)
            tls = (context, remote.host)
        self._assoc = self._ae.associate(remote.host, remote.port, ae_title=remote.ae_title, tls_args=tls)
        if not self._assoc.is_established:
            raise TransferError(f"association with {remote.ae_title}@{remote.host}:{remote.port} was rejected "
                                "or could not be opened")
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
