"""What an arriving instance may cost the listener's disk, enforced while it arrives.

pynetdicom streams a received data set (``STORE_RECV_CHUNKED_DATASET``) into a temporary file of
the system temp folder and hands it to the C-STORE handler only once complete: a 60 MB instance
over a 1 MB ``max_instance_mb`` was written whole before its A700, and a write error (a full disk)
was raised in pynetdicom's reader thread, which killed the association and left the partial file
behind. Here, at the first PDU of each data set (``EVT_PDU_RECV``, in that same reader thread,
before the PDU is decoded), the message's file is swapped for a :class:`Received`:

- it lives in ``<spool>/receiving/`` (same file system as ``incoming/``: a stored instance is
  renamed into place, never copied, so storing it needs no second copy's worth of free space);
- it stops writing, and deletes what it wrote, once the data set crosses ``max_instance_mb``
  (the file never holds more than the cap) or a write fails (ENOSPC): the rest of the transfer
  is read and dropped, and the handler answers A700 (Out of Resources), so the sender gets a
  status for that instance and its association goes on with the next one;
- a transfer cut off (abort, dropped connection) has its file removed when the connection closes
  (``EVT_CONN_CLOSE``); whatever a killed process left is removed at the next start.

pynetdicom's own temp file holds only the 128-byte preamble and the file meta (written before the
swap, copied into ours) and is removed at the swap. The private attributes used
(``assoc.dimse.message``, ``_data_set_file``, ``_data_set_path``) are checked by
tests/test_private_apis.py.
"""

from __future__ import annotations

import errno
import os
import secrets
import threading
from pathlib import Path

from ..atomic import TEMP_MARK, move_into_place


RECEIVING = "receiving"  # <spool>/receiving: data sets on their way in
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


class Received:
    """One data set being received into ``<spool>/receiving``: pynetdicom writes it through
    :meth:`write` (and calls ``.file.flush()``, ``.close()`` and unlinks ``.name`` after the
    handler). Stopped at the cap (``over``) or at the first write error (``error``)."""

    def __init__(self, original, folder: Path, cap: int, assoc):
        self.cap, self.assoc = cap, assoc
        self.received, self.over, self.error = 0, False, None
        self.path = folder / f".{secrets.token_hex(8)}.dcm{TEMP_MARK}{os.getpid()}"
        self._fh = None
        try:
            original.flush()  # the preamble and file meta pynetdicom wrote, still in its buffer
            folder.mkdir(parents=True, exist_ok=True)
            self._fh = open(self.path, "wb")
            with open(original.name, "rb") as head:
                self.write(head.read())
        except OSError as exc:
            self._stop(exc)
        finally:
            original.close()
            Path(original.name).unlink(missing_ok=True)

    @property
    def name(self) -> str:
        return str(self.path)

    @property
    def file(self):  # pynetdicom flushes ``file.file`` after each fragment
        return self

    def flush(self) -> None:
        """A no-op for pynetdicom's flush after each fragment: :meth:`finish` flushes once."""

    def finish(self) -> None:
        """The data set is complete: flush what is buffered, so the file can be read by name (a write
        error stops it, as in :meth:`write`)."""
        if self._fh is not None:
            try:
                self._fh.flush()
            except OSError as exc:
                self._stop(exc)

    def write(self, data: bytes) -> None:
        self.received += len(data)
        if self._fh is None:  # stopped: read and dropped
            return
        if self.received > self.cap:
            self.over = True
            self._stop(None)
            return
        try:
            self._fh.write(data)
        except OSError as exc:
            self._stop(exc)

    def _stop(self, error: OSError | None) -> None:
        self.error = self.error or error
        self.discard()

    def close(self) -> None:
        if self._fh is not None:
            try:
                self._fh.close()
            except OSError as exc:  # the last buffered bytes did not fit
                self.error = self.error or exc
            self._fh = None

    def discard(self) -> None:
        """Close and remove the file (whatever happened before)."""
        fh, self._fh = self._fh, None
        if fh is not None:
            try:
                fh.close()
            except OSError:
                pass
        self.path.unlink(missing_ok=True)

    def commit(self, target: Path) -> None:
        """Make the complete data set ``target``: fsync, rename, fsync the folder. ``OSError``
        (the file is removed) if any step fails."""
        try:
            if self._fh is None:
                raise self.error or FileNotFoundError(errno.ENOENT, "transfer not complete", self.name)
            self.close()
            if self.error:
                raise self.error
            move_into_place(self.path, target)  # fsync, rename (the folder made again if it went), fsync
        except OSError:
            self.discard()
            raise


class Intake:
    """The event handlers that put every received data set into a :class:`Received`, and the
    register the C-STORE handler takes it from (:meth:`claim`)."""

    def __init__(self, spool: Path, cap: int):
        self.folder, self.cap = Path(spool) / RECEIVING, cap
        self._lock = threading.Lock()
        self._open: dict[str, Received] = {}

    def clear(self) -> None:
        """Remove what a killed process was receiving (never acknowledged: the sender sends it again).
        Call with the spool held, before the server starts."""
        # our own temp names only (as Received makes them): never a file we did not write
        for partial in self.folder.glob(f".*.dcm{TEMP_MARK}*"):
            partial.unlink(missing_ok=True)

    def handlers(self) -> list:
        from pynetdicom import evt

        return [(evt.EVT_PDU_RECV, self.on_pdu), (evt.EVT_CONN_CLOSE, self.on_close)]

    def on_pdu(self, event) -> None:
        message = event.assoc.dimse.message
        original = getattr(message, "_data_set_file", None)
        if original is None or isinstance(original, Received):
            return
        received = Received(original, self.folder, self.cap, event.assoc)
        message._data_set_file, message._data_set_path = received, received.path
        with self._lock:
            self._open[received.name] = received

    def claim(self, path) -> Received | None:
        """The :class:`Received` behind a complete data set's ``event.dataset_path``; ``None`` for a
        data set that was never swapped (it then came whole with its command) or was removed."""
        with self._lock:
            return self._open.pop(str(path), None)

    def on_close(self, event) -> None:
        with self._lock:
            gone = [r for r in self._open.values() if r.assoc is event.assoc]
            for received in gone:
                del self._open[received.name]
        for received in gone:  # cut off mid-transfer, or complete but never handled
            received.discard()


def write_failure(exc: OSError) -> str:
    """The log reason of a failed spool write."""
    if exc.errno in DISK_FULL:
        return f"spool disk is full ({exc.strerror})"
    return f"cannot write to the spool: {exc.strerror or exc}"
