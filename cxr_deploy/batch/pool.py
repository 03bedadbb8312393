"""The decode pool: worker processes that read and resize files (and render overlays), with the
recovery rules for a worker that hangs or dies.

- Spawned processes (never forked): workers do not inherit ONNX Runtime / torch thread pools.
- Workers do not re-import the user's ``__main__`` script: they need nothing from it, and a PACS
  script without an ``if __name__ == "__main__":`` guard would otherwise run once per worker.
- Workers die with the parent (see :func:`cxr_deploy.batch.decode.die_with_parent`).
"""

from __future__ import annotations

import os
import sys
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterable

from .decode import DecodeConfig, Decoded, decode_file, init_worker, timeout_reason
from .shm import ShmTarget, decode_to_slot


def default_workers(device: str) -> int:
    """Decode worker processes: one per core, at most 8 on CPU (16 for a GPU to keep it fed).

    Measured on 2 cores (benchmarks/batch_throughput.py): 2 workers beat 1 by 10-35 % with
    overlays on, although inference also uses both cores — workers run at lower priority and ONNX
    Runtime's threads do not spin, so they take the CPU only when the model leaves it idle.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(cores, 16 if device == "cuda" else 8))


@contextmanager
def _main_module_hidden():
    """While worker processes start, make ``__main__`` look like an interactive session, so
    multiprocessing's spawn does not re-run the caller's script in every worker (it only does so to
    find functions defined there; ours all live in this package)."""
    main = sys.modules.get("__main__")
    saved = {k: getattr(main, k) for k in ("__file__", "__spec__") if main is not None and hasattr(main, k)}
    try:
        if main is not None:
            main.__spec__ = None
            if "__file__" in saved:
                del main.__file__
        yield
    finally:
        for key, value in saved.items():
            setattr(main, key, value)


def _worker_processes(executor: ProcessPoolExecutor) -> list:
    """The executor's worker processes (``multiprocessing.Process``), to join and kill them.

    ``_processes`` is private: before Python 3.14 (``kill_workers()``) the executor has no public way
    to stop a worker stuck in a read, and ``shutdown`` waits for it forever. Its shape (a dict pid ->
    Process, filled by the first submit) is checked by ``tests/test_private_apis.py``, which
    fails if CPython changes it."""
    return list((getattr(executor, "_processes", None) or {}).values())


class DecodePool:
    def __init__(self, workers: int, config: DecodeConfig):
        self.workers, self.config = workers, config
        self._pool: ProcessPoolExecutor | None = None

    def submit(self, fn, *args) -> Future:
        if self.workers == 0:
            future: Future = Future()
            try:
                future.set_result(fn(*args, config=self.config))
            except BaseException as exc:  # noqa: BLE001 - handed to the caller like a pool would
                future.set_exception(exc)
            return future
        with _main_module_hidden():  # processes are started inside submit()
            if self._pool is None:
                import multiprocessing

                self._pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"),
                                                 initializer=init_worker, initargs=(self.config, os.getpid()))
            try:
                return self._pool.submit(fn, *args)
            except BrokenProcessPool:
                # A worker died (OOM killer, kill -9) with nothing of ours in hand: the futures it
                # broke say so to whoever waits on them (isolate_crash); new work goes to a new pool.
                self.kill()
                return self.submit(fn, *args)  # once: a new executor is not broken before its first submit

    def warm_up(self) -> None:
        """Start the worker processes now (they spend ~1 s importing numpy/Pillow/pydicom)."""
        if self.workers:
            for _ in range(self.workers):
                self.submit(len, ())

    def stop(self, grace: float = 3.0) -> None:
        """Shut down without hanging: queued work is cancelled, workers get ``grace`` seconds to
        finish the file in hand and exit, and any still alive after that (stuck in a read) is
        killed. Workers are not killed straight away because one killed while sending its result
        leaves a half message in the result pipe, and the pool's manager thread (which the
        interpreter joins at exit) then waits for the rest of it for ever."""
        if self._pool is None:
            return
        import time

        processes = _worker_processes(self._pool)
        self._pool.shutdown(wait=False, cancel_futures=True)
        deadline = time.monotonic() + grace
        for process in processes:
            process.join(max(0.0, deadline - time.monotonic()))
        for process in processes:
            if process.is_alive():
                process.kill()
        for process in processes:
            process.join(5)
        self._pool = None

    def kill(self) -> None:
        """Stop now, even with a worker stuck in a read or a decoder, which ``shutdown`` would wait
        for forever. The pool is recreated on the next submit."""
        if self._pool is not None:
            processes = _worker_processes(self._pool)
            self._pool.shutdown(wait=False, cancel_futures=True)
            for process in processes:
                process.kill()
            for process in processes:
                process.join(5)
            self._pool = None

    def close(self, cancel: bool = False) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=not cancel, cancel_futures=cancel)
            self._pool = None


def open_pool_and_backend(config, bundle, backend=None) -> tuple["DecodePool", object]:
    """The decode pool (workers started) and the model backend for ``config`` (a
    :class:`~.settings.BatchConfig`): opened together, the workers importing while the model loads."""
    from ..serving.backends import likely_device, open_backend
    from .overlay import VIEW_SIZE
    from .staging import preprocess_mode

    def decode_config(device: str) -> DecodeConfig:
        send = "stored" if preprocess_mode(config.preprocess_on, device, bundle.spec) == "device" else "gray"
        return DecodeConfig(spec=bundle.spec, max_pixels=config.max_pixels, send=send,
                            view_size=VIEW_SIZE if config.cam_dir or config.dicom_out else 0,
                            eligibility=config.eligibility)

    if backend is not None:
        workers = default_workers(backend.device) if config.workers is None else max(0, int(config.workers))
        return DecodePool(workers, decode_config(backend.device)), backend
    # Start the decode workers first: they import while the model loads.
    device_guess = likely_device(config.backend, config.device)
    workers = default_workers(device_guess) if config.workers is None else max(0, int(config.workers))
    pool = DecodePool(workers, decode_config(device_guess))
    pool.warm_up()
    try:
        backend = open_backend(bundle, config.backend, config.device, threads=config.threads)
    except BaseException:
        pool.kill()
        raise
    wanted = default_workers(backend.device) if config.workers is None else workers
    if wanted != workers or decode_config(backend.device) != pool.config:  # the guess was wrong
        pool.close()
        pool = DecodePool(wanted, decode_config(backend.device))
        pool.warm_up()
    return pool, backend


@dataclass
class Slot:
    """One input in flight: decoding, then predicted, then waiting for its overlay."""

    path: str
    key: str
    future: Future | None = None
    result: Decoded | None = None
    row: dict | None = None
    overlay: Future | None = None
    shm: ShmTarget | None = None  # the shared-memory slot the worker writes the stored samples into

    @property
    def ready(self) -> bool:
        return self.result is not None or self.future is None or self.future.done()


def submit_decode(slot: Slot, pool: DecodePool) -> Future:
    """Decode ``slot``'s file in ``pool`` (into its shared-memory slot when it holds one)."""
    if slot.shm is None:
        return pool.submit(decode_file, slot.path)
    return pool.submit(decode_to_slot, slot.path, slot.shm)


def replace_hung_pool(pending: Iterable[Slot], pool: DecodePool) -> None:
    """A worker is stuck on a file: kill the pool (a stuck process cannot be cancelled), keep what
    the other workers finished and send the rest of the window to a fresh pool. Overlays still
    queued in the old pool are lost; their rows say so. The old workers are dead before any file is
    resubmitted, so a resubmitted file reuses its shared-memory slot with no other writer."""
    pool.kill()
    for slot in pending:
        if slot.result is not None or slot.future is None:
            continue
        if slot.future.done() and not slot.future.cancelled() and slot.future.exception() is None:
            slot.result = slot.future.result()
        else:
            slot.future = submit_decode(slot, pool)


def isolate_crash(slots: list[Slot], pool: DecodePool, timeout: float | None = None, submit=submit_decode) -> None:
    """A worker process died: retry every in-flight file alone, in a fresh pool, to find the culprit.

    The broken pool's other workers are killed, not left to finish: they ignore SIGTERM, and one still
    running a queued task would write into a shared-memory slot that is handed to another file.
    Each retry is bounded by ``timeout`` (the per-file decode timeout): a file on a stalled share
    that happens to be in flight when another file crashes its worker gets its timeout error row,
    as it would have without the crash, instead of hanging the run. ``submit(slot, pool)`` starts
    one retry (the decode of the slot's file)."""
    pool.kill()
    for slot in slots:
        if slot.result is not None:
            continue
        try:
            slot.result = submit(slot, pool).result(timeout=timeout)
        except FutureTimeout:
            slot.result = Decoded("error", timeout_reason(timeout))
            pool.kill()  # the stuck worker cannot be cancelled
        except BrokenProcessPool:
            slot.result = Decoded("error", "decoder process crashed on this file (killed or out of memory)")
            pool.kill()
