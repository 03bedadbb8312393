"""``pacs listen`` stays available: idle or half-open TCP connections (port scans, health checks,
a modality that connects and never speaks) neither count against ``max_associations`` nor hold the
TLS accept loop, and each association refused for the limit is logged with its AE and address."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from tests.support import (SAMPLES, STORESCU, free_port, self_signed_cert, start_listener, start_tls_listener,
                           stop_process, storescu)

pytestmark = pytest.mark.skipif(STORESCU is None, reason="dcmtk's storescu not installed (.ci/run installs dcmtk)")


def _idle_sockets(port: int, n: int) -> list[socket.socket]:
    return [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(n)]


def _closed_by_peer(sock: socket.socket, within: float) -> bool:
    """True if the listener closes ``sock`` (EOF or reset) within ``within`` seconds."""
    sock.settimeout(within)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def test_idle_connections_do_not_lock_allowed_senders_out(orthanc, tiny_bundle, tmp_path):
    port = free_port()
    proc, _ = start_listener(tmp_path, orthanc, tiny_bundle, port, association_timeout=2)
    idle = []
    try:
        for _ in range(3):  # connect-and-close probes, as a monitoring check does
            socket.create_connection(("127.0.0.1", port), timeout=5).close()
        idle = _idle_sockets(port, 6)  # more than a max_associations of 4 would allow
        start = time.monotonic()
        answer = storescu(port, SAMPLES / "dicom" / "IM000004")
        elapsed = time.monotonic() - start
        assert "Received Store Response (Success)" in answer, answer
        assert elapsed < 2.5, f"send took {elapsed:.1f} s with 6 idle connections open"
        # and the listener drops connections that never associate once association_timeout (2 s) is up
        assert all(_closed_by_peer(sock, 4) for sock in idle)
    finally:
        for sock in idle:
            sock.close()
        stop_process(proc)
    log = (tmp_path / "listen.log").read_text()
    assert "refused" not in log, log[-2000:]


def _tls_listener(tmp_path, bundle, port):
    made = self_signed_cert(tmp_path)
    if isinstance(made, str):
        pytest.skip(made)
    return start_tls_listener(tmp_path, bundle, port, *made, ["CXRDEPLOY"], "association_timeout = 2\n")


def test_an_idle_connection_does_not_block_tls_senders(tiny_bundle, tmp_path):
    from cxr_deploy.pacs.config import load_pacs_config
    from cxr_deploy.pacs.listen import wait_for_port
    from cxr_deploy.pacs.transfer import push

    if not __import__("shutil").which("openssl"):
        pytest.skip("neither the cryptography package nor the openssl command is installed")
    port = free_port()
    proc, config = _tls_listener(tmp_path, tiny_bundle, port)
    idle, sender = [], threading.Thread(target=int)
    sender.start()
    try:
        wait_for_port("127.0.0.1", port, timeout=60)
        idle = _idle_sockets(port, 1)  # connects, never starts the TLS handshake
        start, result = time.monotonic(), {}
        # in a thread: a listener whose accept loop is stuck in a handshake holds the sender too
        sender = threading.Thread(target=lambda: result.update(summary=push(
            load_pacs_config(config), [SAMPLES / "dicom" / "IM000004"], log_dir=tmp_path, retry_delays=())))
        sender.start()
        sender.join(6)
        elapsed = time.monotonic() - start
        assert "summary" in result, f"no TLS send within {elapsed:.1f} s while one idle connection was open"
        assert result["summary"].counts["done"] == 1, result["summary"].failures
        assert elapsed < 2, f"TLS send took {elapsed:.1f} s with one idle connection open"
        assert _closed_by_peer(idle[0], 4)  # the handshake timed out (association_timeout = 2 s)
    finally:
        for sock in idle:
            sock.close()  # unblocks a stuck accept loop, and with it the sender thread
        stop_process(proc)
        sender.join(30)


def test_associations_over_the_limit_are_refused_and_logged(orthanc, tiny_bundle, tmp_path):
    from pynetdicom import AE

    port = free_port()
    proc, _ = start_listener(tmp_path, orthanc, tiny_bundle, port, max_associations=2)
    ae = AE(ae_title="STORESCU")
    ae.add_requested_context("1.2.840.10008.1.1")
    ae.acse_timeout = 5
    held = []
    try:
        for _ in range(5):  # five senders at once against a limit of two
            held.append(ae.associate("127.0.0.1", port, ae_title="CXRDEPLOY"))
        established = [a for a in held if a.is_established]
        rejected = [a for a in held if a.is_rejected]
        assert len(established) == 2 and len(rejected) == 3, [a.is_established for a in held]
        assert all(a.send_c_echo().Status == 0 for a in established)
    finally:
        for assoc in held:
            if assoc.is_established:
                assoc.release()
        stop_process(proc)
    log = (tmp_path / "listen.log").read_text()
    lines = [line for line in log.splitlines() if "max_associations" in line]
    assert len(lines) == 3, log[-3000:]
    assert all("STORESCU" in line and "127.0.0.1" in line for line in lines), lines


def test_max_associations_default_is_at_least_eight(tmp_path):
    from cxr_deploy.pacs.config import load_pacs_config

    config = tmp_path / "p.toml"
    config.write_text('[listen]\nallowed_ae_titles = ["X"]\n\n[pacs]\npush = "cstore"\n')
    settings = load_pacs_config(config).listen
    assert settings.max_associations >= 8
    assert 1 <= settings.association_timeout <= 10
