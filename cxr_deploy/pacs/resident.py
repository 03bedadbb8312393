"""The listener's model, resident for its whole life: the bundle verified once (sha256 of every
artifact), one runtime session, one decode pool whose workers stay up between scoring passes.

Each pass used to load the bundle again: sha256 of every artifact, a new ONNX Runtime session and
new decode processes (spawned, importing numpy/Pillow/pydicom), and the population check verified
the bundle once more. The bundle is verified again only when its files change: before each pass
the directory and its files are ``stat``-ed (inode, size, mtime); a bundle replaced (``mv`` of a new
directory, or re-exported) is verified and loaded again, one that fails its check stops the
listener with the one-line reason, as at start-up.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from ..batch.settings import BatchConfig

log = logging.getLogger(__name__)  # printed with the listener's lines (its logging set-up is the root's)


def bundle_stamp(directory: str | Path) -> tuple:
    """What changes when any file of the bundle does: inode, size and mtime of the directory and of
    each file in it (``os.scandir``: one ``stat`` each, no file read)."""
    directory = Path(directory)
    top, files = directory.stat(), []
    with os.scandir(directory) as entries:
        for entry in entries:
            info = entry.stat()
            files.append((entry.name, info.st_ino, info.st_size, info.st_mtime_ns))
    return top.st_ino, top.st_mtime_ns, tuple(sorted(files))


WARM_UP_TIMEOUT_S = 60.0  # the imports take 1-3 s; a worker stuck past this is not waited for


class ResidentModel:
    """``current()`` -> ``(bundle, backend, pool)`` for ``config`` (a :class:`BatchConfig`; its
    ``model`` is the bundle directory), loaded on the first call and again only when the bundle's
    files change. Raises :class:`~cxr_deploy.errors.BundleError` /
    :class:`~cxr_deploy.serving.backends.BackendUnavailable` when the bundle fails its check."""

    def __init__(self, config: BatchConfig):
        self.config = config
        self.loads = 0  # how many times the bundle was verified and loaded
        self.bundle = self.backend = self.pool = None
        self._stamp: tuple | None = None

    def current(self) -> tuple:
        stamp = bundle_stamp(self.config.model)
        if stamp != self._stamp:
            self._load(stamp)
        return self.bundle, self.backend, self.pool

    def _load(self, stamp: tuple) -> None:
        from ..batch.pool import open_pool_and_backend
        from ..bundle import ModelBundle

        changed = self._stamp is not None
        self.close()  # a bundle that fails its check leaves nothing loaded: it is never used again
        bundle = ModelBundle.load(self.config.model)  # sha256 of every artifact
        self.pool, self.backend = open_pool_and_backend(self.config, bundle)
        self._warm_up(bundle)
        self.bundle, self._stamp = bundle, stamp
        self.loads += 1
        log.info("model loaded%s: bundle %s (model %s) verified, backend %s, %d decode workers",
                 " again, its files changed" if changed else "", self.config.model, bundle.model_id,
                 self.backend.name, self.pool.workers)

    def _warm_up(self, bundle) -> None:
        """Pay the first-call costs now, not on the first instance: ONNX Runtime's first run
        (memory planning) and each worker's imports of the overlay and DICOM-result code (highdicom).
        Measured on the 2-core CI machine (224 px, 1.5 MiB DX): the first instance's pass took
        1.26 s without this, 0.5 s with it; the next ones 0.13-0.29 s."""
        import numpy as np

        from concurrent.futures import wait

        size = bundle.spec.input_size
        self.backend(np.zeros((1, 3, size, size), np.float32))
        futures = [self.pool.submit(warm_worker) for _ in range(max(1, self.pool.workers))]
        done, pending = wait(futures, timeout=WARM_UP_TIMEOUT_S)  # a warm-up never holds the start up
        for future in done:
            future.result()
        if pending:
            log.warning("%d decode worker(s) still warming up after %g s; the listener starts anyway (a worker "
                        "that hangs on a file is replaced as in any pass)", len(pending), WARM_UP_TIMEOUT_S)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.stop()
        self.bundle = self.backend = self.pool = None
        self._stamp = None


def warm_worker(config=None) -> None:
    """In a decode worker: import what writing an overlay and the DICOM results needs, and load
    highdicom's table of the standard's modules (0.4-0.7 s of JSON on the first SR it builds).
    The table's loader is private (``highdicom._standard_utils``): if it goes, only this warm-up
    does less, so it is not among tests/test_private_apis.py's checks."""
    from ..batch import overlay  # noqa: F401
    from . import results  # noqa: F401

    try:
        from highdicom._standard_utils import get_module_attribute_map

        get_module_attribute_map()
    except Exception:  # noqa: BLE001 - a warm-up only
        pass
