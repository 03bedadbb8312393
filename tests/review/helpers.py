"""Helpers the review tests share: the Wilson interval written out independently of the project's,
and the real ``cxr-deploy review`` server as a subprocess (:class:`Server`)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path


def wilson(successes: int, n: int, z: float = 1.959963984540054):
    """Wilson score interval, written out here (not the project's function) to check its figures."""
    if n == 0:
        return None
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * (p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5
    return [max(0.0, centre - half), min(1.0, centre + half)]


class Server:
    """A running ``cxr-deploy review``: its base URL, token, process and stderr so far."""

    def __init__(self, args, cwd, timeout=60):
        env = dict(os.environ, OMP_NUM_THREADS="1")
        self.err_path = Path(cwd) / f"review-stderr-{time.monotonic_ns()}.txt"
        self._err = open(self.err_path, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "cxr_deploy.cli", "review", *map(str, args), "--port", "0"],
                                     cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=self._err, text=True)
        try:
            line = readline(self.proc, timeout)
            assert line.startswith("review: http://127.0.0.1:"), (line, self.stderr())
            self.url = line.split("review: ", 1)[1].strip()
            self.base, self.token = self.url.split("/?token=")
            self.wait_loaded()
        except BaseException:
            self.stop()
            raise

    def request(self, method, path, body=None, token=True, headers=None) -> "Reply":
        """One real HTTP request (http.client: no redirect followed, nothing added)."""
        import http.client
        import json
        from urllib.parse import urlsplit

        where = urlsplit(self.base)
        conn = http.client.HTTPConnection(where.hostname, where.port, timeout=30)
        sent = {"Authorization": f"token {self.token}"} if token else {}
        sent.update(headers or {})
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            sent.setdefault("Content-Type", "application/json")
        try:
            conn.request(method, path, body=data, headers=sent)
            response = conn.getresponse()
            return Reply(response.status, dict(response.getheaders()), response.read())
        finally:
            conn.close()

    def get(self, path, **kw) -> "Reply":
        return self.request("GET", path, **kw)

    def post(self, path, body, **kw) -> "Reply":
        return self.request("POST", path, body=body, **kw)

    def wait_loaded(self, timeout=60):
        deadline = time.monotonic() + timeout
        while not self.get("/api/meta").json()["loading"]["done"]:
            assert time.monotonic() < deadline, "the results were not read in time"
            time.sleep(0.05)

    def stderr(self) -> str:
        if not self._err.closed:
            self._err.flush()
        return self.err_path.read_text()

    def stop(self, sig=signal.SIGTERM, timeout=15) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc.stdout.close()
        self._err.close()
        return self.proc.returncode


class Reply:
    def __init__(self, status, headers, content):
        self.status, self.headers, self.content = status, {k.lower(): v for k, v in headers.items()}, content

    def json(self):
        import json

        return json.loads(self.content)


def readline(proc, timeout) -> str:
    import selectors

    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    try:
        if not sel.select(timeout):
            raise AssertionError(f"no URL printed within {timeout} s")
        return proc.stdout.readline()
    finally:
        sel.close()
