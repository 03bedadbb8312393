"""The private APIs the code relies on, each justified where it is used: these tests fail
when an upgrade of CPython, pynetdicom or torch changes one, instead of a batch that hangs on a stuck worker
or a listener that holds every received instance in memory."""

from __future__ import annotations

import multiprocessing
import os

import pytest


def test_process_pool_executor_exposes_its_worker_processes():
    """cxr_deploy.batch.pool._worker_processes: ``_processes`` maps pid -> Process once a task is in."""
    from concurrent.futures import ProcessPoolExecutor

    from cxr_deploy.batch.pool import _worker_processes

    executor = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
    try:
        assert executor.submit(os.getpid).result(timeout=120) in executor._processes
        processes = _worker_processes(executor)
        assert processes and all(isinstance(p, multiprocessing.process.BaseProcess) and p.is_alive()
                                 for p in processes)
    finally:
        executor.shutdown(wait=True)


def test_decode_pool_kill_stops_its_workers():
    from cxr_deploy.batch.decode import DecodeConfig
    from cxr_deploy.batch.pool import DecodePool, _worker_processes
    from cxr_deploy.preprocessing import PreprocessSpec

    pool = DecodePool(1, DecodeConfig(spec=PreprocessSpec()))
    try:
        pool.submit(len, ()).result(timeout=120)
        processes = _worker_processes(pool._pool)
        assert processes
    finally:
        pool.kill()
    import time

    deadline = time.monotonic() + 20  # SIGKILL is delivered at once; reaping may trail on a busy machine
    while any(p.is_alive() for p in processes) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(p.is_alive() for p in processes)


def test_posixshmem_opens_a_block_made_by_shared_memory():
    """cxr_deploy.batch.shm._attach: ``_posixshmem.shm_open("/" + name, flags, mode=)`` -> fd."""
    pytest.importorskip("_posixshmem")
    import mmap
    from multiprocessing import shared_memory

    import _posixshmem

    block = shared_memory.SharedMemory(create=True, size=4096)
    try:
        block.buf[:3] = b"cxr"
        fd = _posixshmem.shm_open("/" + block.name.lstrip("/"), os.O_RDWR, mode=0o600)
        try:
            with mmap.mmap(fd, os.fstat(fd).st_size) as view:
                assert view[:3] == b"cxr"
        finally:
            os.close(fd)
    finally:
        block.close()
        block.unlink()


def test_pynetdicom_streams_received_data_sets_through_its_config_module():
    """cxr_deploy.pacs.listen.start_scp sets ``pynetdicom._config.STORE_RECV_CHUNKED_DATASET``."""
    from pynetdicom import _config

    assert isinstance(_config.STORE_RECV_CHUNKED_DATASET, bool)


def test_pynetdicom_wraps_tls_in_get_request_and_tracks_servers_in_its_ae():
    """cxr_deploy.pacs.scp_server.ListenerServer moves the TLS wrap out of
    ``AssociationServer.get_request`` (so the wrap must still be there, and only there: else we
    would wrap twice), and ``start`` adds the server to ``AE._servers``, which
    ``AssociationServer.shutdown`` removes it from."""
    import inspect

    from pynetdicom import AE
    from pynetdicom.transport import AssociationServer, RequestHandler, ThreadedAssociationServer

    from cxr_deploy.pacs import scp_server

    assert "wrap_socket" in inspect.getsource(AssociationServer.get_request)
    assert "wrap_socket" not in inspect.getsource(RequestHandler)
    assert "process_request_thread" in vars(ThreadedAssociationServer)
    ae = AE()
    ae.add_supported_context("1.2.840.10008.1.1")
    server = scp_server.start(ae, ("127.0.0.1", 0), handlers=[], ssl_context=None, handshake_timeout=1)
    assert server in ae._servers
    server.shutdown()
    assert server not in ae._servers


def test_pynetdicom_writes_a_received_data_set_through_the_messages_file_attributes():
    """cxr_deploy.pacs.intake swaps ``assoc.dimse.message._data_set_file`` / ``_data_set_path`` at
    the first PDU of a data set: the message must still write each fragment through
    ``_data_set_file.write`` and ``.file.flush()``, and hand ``_data_set_path`` to the request."""
    import inspect

    from pynetdicom.dimse import DIMSEServiceProvider
    from pynetdicom.dimse_messages import DIMSEMessage

    message = DIMSEMessage()
    assert message._data_set_file is None and message._data_set_path is None
    decode = inspect.getsource(DIMSEMessage.decode_msg)
    assert "self._data_set_file.write(" in decode and "self._data_set_file.file.flush()" in decode
    assert "primitive._dataset_path = self._data_set_path" in inspect.getsource(DIMSEMessage.message_to_primitive)
    assert "self.message.decode_msg(" in inspect.getsource(DIMSEServiceProvider.receive_primitive)


def test_deterministic_training_sets_torch_s_flags_without_loading_inductor():
    """cxr_deploy.training.devices._deterministic_algorithms: torch's own flags are set (and unset)
    through ``torch._C._set_deterministic_algorithms`` without importing TorchInductor."""
    import subprocess
    import sys

    code = ("import sys, torch\n"
            "from cxr_deploy.training.devices import seed_everything\n"
            "seed_everything(0, True)\n"
            "on = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())\n"
            "seed_everything(0, False)\n"
            "print(on, torch.are_deterministic_algorithms_enabled(), 'torch._inductor' in sys.modules)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split("\n")[0] == "(True, True) False False", proc.stdout
