"""The three private APIs the runtime relies on, each justified where it is used: these tests fail
when an upgrade of CPython or pynetdicom changes one, instead of a batch that hangs on a stuck worker
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
