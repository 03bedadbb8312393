"""Fixtures for the review tests: a real results CSV with Grad-CAM overlays, made by the real
``batch`` on the bundled samples (8 JPEGs, 4 DICOMs, 3 non-images) with a tiny random-init bundle
that carries named operating points; and the real ``cxr-deploy review`` server, started as a
subprocess and always stopped."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import SAMPLES, TINY_INPUT_SIZE

POINTS = {"sens95": {"threshold": 0.41, "sensitivity": 0.95, "specificity": 0.4},
          "youden": {"threshold": 0.415, "sensitivity": 0.8, "specificity": 0.7}}


def wilson(successes: int, n: int, z: float = 1.959963984540054):
    """Wilson score interval, written out here (not the project's function) to check its figures."""
    if n == 0:
        return None
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * (p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5
    return [max(0.0, centre - half), min(1.0, centre + half)]


@pytest.fixture(scope="session")
def review_run(tmp_path_factory) -> dict:
    """``{"dir", "results", "labels", "bundle", "samples"}``: batch run over a copy of samples/."""
    import torch

    import cxr_deploy
    from cxr_deploy.bundle import ModelBundle, save_bundle
    from cxr_deploy.model import build_model
    from cxr_deploy.preprocessing import PreprocessSpec

    root = tmp_path_factory.mktemp("review")
    samples = root / "samples"
    shutil.copytree(SAMPLES, samples)  # inside the test's folder: symlink tests may add files beside them
    torch.manual_seed(0)
    model = build_model(None)
    with torch.no_grad():
        model.fc.weight.mul_(0.05)
    bundle = root / "bundle"
    save_bundle(bundle, model, spec=PreprocessSpec(input_size=TINY_INPUT_SIZE))  # no export: --backend torch
    ModelBundle.load(bundle).update(training={"operating_points": POINTS})
    results = root / "results.csv"
    summary = cxr_deploy.run_batch([samples], model=bundle, out=results, backend="torch", device="cpu",
                                   workers=0, cam_dir=root / "overlays")
    assert summary.exit_code == 0, summary.lines()
    return {"dir": root, "results": results, "labels": samples / "labels.csv", "bundle": bundle, "samples": samples}


class Server:
    """A running ``cxr-deploy review``: its base URL, token, process and stderr so far."""

    def __init__(self, args, cwd, timeout=60):
        env = dict(os.environ, OMP_NUM_THREADS="1")
        self.err_path = Path(cwd) / f"review-stderr-{time.monotonic_ns()}.txt"
        self._err = open(self.err_path, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "cxr_deploy.cli", "review", *map(str, args), "--port", "0"],
                                     cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=self._err, text=True)
        try:
            line = _readline(self.proc, timeout)
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


def _readline(proc, timeout) -> str:
    import selectors

    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    try:
        if not sel.select(timeout):
            raise AssertionError(f"no URL printed within {timeout} s")
        return proc.stdout.readline()
    finally:
        sel.close()


@pytest.fixture()
def start_server():
    """``start_server(args, cwd)`` -> :class:`Server`; every server started is stopped at the end."""
    started = []

    def start(args, cwd):
        server = Server(args, cwd)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()
