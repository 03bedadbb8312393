"""The listener's association server: what keeps ``pacs listen`` available to allowed senders.

- **Idle connections cost nothing.** pynetdicom counts every accepted connection, associated or
  not, against ``maximum_associations``, and waits ``acse_timeout`` (30 s) for its A-ASSOCIATE-RQ:
  five connect-and-close health checks or idle sockets locked every allowed sender out for
  30.1-30.5 s. Here only associations that asked (A-ASSOCIATE-RQ) and were admitted hold one of the
  ``max_associations`` slots; a connection that never asks is dropped after ``association_timeout``.
- **TLS handshakes off the accept loop.** pynetdicom wraps the socket in
  ``AssociationServer.get_request``, in the accept loop, on a blocking socket: one idle TCP
  connection held every TLS sender for as long as it stayed open (75 s and more). Here the accept
  loop only accepts; the handshake runs in the connection's own thread with ``association_timeout``.
- **Refusals are logged** with the calling AE title and the address, one line each.
"""

from __future__ import annotations

import logging
import threading

from pynetdicom.transport import ThreadedAssociationServer

log = logging.getLogger(__name__)

# pynetdicom's own limit check would count idle connections: set it out of the way, ours applies
UNLIMITED = 1_000_000


class ListenerServer(ThreadedAssociationServer):
    """A ThreadedAssociationServer whose TLS handshake runs in the per-connection thread, bounded
    by ``handshake_timeout``. Overrides two socketserver hooks pynetdicom itself overrides
    (``get_request``, ``process_request_thread``); tests/test_private_apis.py fails if pynetdicom
    moves the wrap out of ``get_request`` (we would then wrap twice)."""

    def __init__(self, *args, handshake_timeout: float = 5.0, **kwargs):
        self.handshake_timeout = handshake_timeout
        super().__init__(*args, **kwargs)

    def get_request(self):
        return self.socket.accept()  # no TLS here: a silent peer would stall the accept loop

    def process_request_thread(self, request, client_address):
        if self.ssl_context is not None:
            try:
                request.settimeout(self.handshake_timeout)
                request = self.ssl_context.wrap_socket(request, server_side=True)
                request.settimeout(None)  # as pynetdicom has it: its own timers bound the rest
            except (OSError, ValueError) as exc:  # ssl.SSLError and TimeoutError are OSErrors
                log.warning("TLS connection from %s dropped: handshake failed (%s)", client_address[0],
                            type(exc).__name__ if isinstance(exc, TimeoutError) else exc)
                self.shutdown_request(request)
                return
        super().process_request_thread(request, client_address)


class AssociationSlots:
    """``max_associations`` slots, taken at A-ASSOCIATE-RQ (EVT_REQUESTED), freed when the
    association's thread ends. ``admit(event)`` refuses with A-ASSOCIATE-RJ (rejected-transient,
    service provider presentation, local limit exceeded: what pynetdicom answers) and logs it."""

    def __init__(self, limit: int):
        self.limit = limit
        self._held: set = set()
        self._lock = threading.Lock()

    def admit(self, event, source: str) -> bool:
        """``source``: "<calling AE> at <address>:<port>", for the log line of a refusal."""
        assoc = event.assoc
        with self._lock:
            self._held = {a for a in self._held if a.is_alive() and not (a.is_aborted or a.is_released)}
            if len(self._held) < self.limit:
                self._held.add(assoc)
                return True
            held = len(self._held)
        log.warning("association from %s refused: %d associations open, the limit (max_associations = %d)",
                    source, held, self.limit)
        assoc.acse.send_reject(0x02, 0x03, 0x02)
        assoc.kill()  # as pynetdicom's own rejections do: the DUL sends the PDU, then stops
        return False


def start(ae, address, *, handlers, ssl_context, handshake_timeout: float) -> ListenerServer:
    """Start a :class:`ListenerServer` in a daemon thread, as ``AE.start_server(block=False)`` does
    (``AE.make_server`` is pynetdicom's documented hook for a custom server class)."""
    server = ae.make_server(address, ssl_context=ssl_context, evt_handlers=handlers, server_class=ListenerServer,
                            handshake_timeout=handshake_timeout)
    threading.Thread(target=server.serve_forever, name="AcceptorServer", daemon=True).start()
    # AssociationServer.shutdown() removes the server from the AE's private list of servers (and
    # raises if it is missing), as start_server adds it: do the same. tests/test_private_apis.py
    # fails if that list goes.
    ae._servers.append(server)
    return server
