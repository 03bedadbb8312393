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

log = logging.getLogger("cxr_deploy.pacs.listen")


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
        from ..batch.runner import open_pool_and_backend
        from ..bundle import ModelBundle

        changed = self._stamp is not None
        self.close()  # a bundle that fails its check leaves nothing loaded: it is never used again
        bundle = ModelBundle.load(self.config.model)  # sha256 of every artifact
        self.pool, self.backend = open_pool_and_backend(self.config, bundle)
        self.bundle, self._stamp = bundle, stamp
        self.loads += 1
        log.info("model loaded%s: bundle %s (model %s) verified, backend %s, %d decode workers",
                 " again, its files changed" if changed else "", self.config.model, bundle.model_id,
                 self.backend.name, self.pool.workers)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.stop()
        self.bundle = self.backend = self.pool = None
        self._stamp = None
