"""The listener's metrics (Prometheus text format, ``prometheus_client``) and health endpoint.

``[listen] metrics_port`` (default 0: off) serves, on ``metrics_bind`` (default 127.0.0.1):

- ``/metrics``: instances received, refused (by DIMSE status), scored, skipped and in error;
  result objects (SR, SC) pushed and failed; the spool's size in bytes; a histogram of the
  latency from an instance's arrival to its results being pushed;
- ``/health``: ``200 ok`` while the listener accepts associations, ``503`` once it is stopping.

Off by default: one port per listener (one per spool) is a choice for the administrator, as is
opening it beyond this machine. Counts start at 0 at each start (Prometheus' counters are per
process; ``rate()`` handles restarts).
"""

from __future__ import annotations

import logging
import threading
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app

log = logging.getLogger(__name__)  # printed with the listener's lines (its logging set-up is the root's)

# seconds from arrival to results pushed: one at a time ~0.3 s, a burst's last instance several s
LATENCY_BUCKETS = (0.1, 0.2, 0.35, 0.5, 0.7, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 300.0)


class ListenMetrics:
    """The listener's counters, in a registry of its own (nothing of the host process leaks in)."""

    def __init__(self):
        self.registry = registry = CollectorRegistry()
        self.received = Counter("cxr_listen_instances_received", "Instances stored in the spool (status Success)",
                                registry=registry)
        self.refused = Counter("cxr_listen_instances_refused", "Instances refused, by DIMSE status",
                               ["status"], registry=registry)
        self.scored = Counter("cxr_listen_instances_scored", "Instances scored (rows with status ok)",
                              registry=registry)
        self.skipped = Counter("cxr_listen_instances_skipped", "Instances not scored: not a chest radiograph",
                               registry=registry)
        self.errors = Counter("cxr_listen_instances_error", "Instances that could not be scored (error rows)",
                              registry=registry)
        self.pushed = Counter("cxr_listen_results_pushed", "Result objects (SR, SC) sent to the PACS",
                              registry=registry)
        self.push_failed = Counter("cxr_listen_results_push_failed", "Result objects the PACS did not take "
                                   "(after retries)", registry=registry)
        self.spool_bytes = Gauge("cxr_listen_spool_bytes", "Bytes of received instances in the spool",
                                 registry=registry)
        self.latency = Histogram("cxr_listen_latency_seconds", "Seconds from an instance's arrival to its "
                                 "results pushed", buckets=LATENCY_BUCKETS, registry=registry)
        self.stopping = False

    def count_row(self, status: str) -> None:
        {"ok": self.scored, "skipped": self.skipped}.get(status, self.errors).inc()


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, *args) -> None:  # a scrape every 15 s is not news
        pass


def serve(metrics: ListenMetrics, bind: str, port: int):
    """Serve ``/metrics`` and ``/health`` in a daemon thread; returns the server (``.shutdown()``)."""
    prometheus = make_wsgi_app(metrics.registry)

    def app(environ, start_response):
        if environ.get("PATH_INFO") == "/health":
            ok = not metrics.stopping
            start_response("200 OK" if ok else "503 Service Unavailable", [("Content-Type", "text/plain")])
            return [b"ok\n" if ok else b"stopping\n"]
        return prometheus(environ, start_response)

    server = make_server(bind, port, app, server_class=_Server, handler_class=_QuietHandler)
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    log.info("metrics on http://%s:%d/metrics, health on /health", bind, port)
    return server
