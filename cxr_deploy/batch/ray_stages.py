"""The two stages of ``--engine ray``, as they run on the cluster's workers. Imports no Ray: Ray Data
calls them with numpy batches (``batch_format="numpy"``).

- :func:`decode_batch` (CPU tasks): the local engine's :func:`~cxr_deploy.batch.decode.decode_file`
  (the same reader, eligibility filter and preprocessing spec), file by file;
- :class:`ModelStage` (actors): the bundle's backend, and rows made by :mod:`cxr_deploy.batch.rows`,
  returned already formatted as CSV lines in the results file's layout.
"""

from __future__ import annotations

import json
import os
import threading

import numpy as np

from .decode import DecodeConfig, Decoded, decode_file, timeout_reason
from .results_file import csv_text
from .. import in_population
from .rows import base_row, new_row, population_cells, score_row, stamp

# Test hook for the fault tests (tests/batch/test_ray_engine.py): a folder; a worker that finds
# ``kill-<stage>`` in it deletes the file and exits at once, as a crashed process would (exactly
# once, whichever worker gets there first). Unset in production.
FAULT_ENV = "CXR_DEPLOY_RAY_FAULTS"


def inject_fault(stage: str) -> None:
    folder = os.environ.get(FAULT_ENV)
    if not folder:
        return
    try:
        os.unlink(os.path.join(folder, f"kill-{stage}"))
    except OSError:
        return
    os._exit(1)


def decode_batch(batch: dict, config: DecodeConfig, timeout: float | None = None) -> dict:
    """Paths → decode outcome, image columns (JSON) and the spec's resized gray (zeros unless ok)."""
    inject_fault("decoder")
    paths = [str(p) for p in batch["path"]]
    results = [_decode(path, config, timeout) for path in paths]
    size = config.spec.input_size
    gray = np.zeros((len(paths), size, size), np.float32)
    for i, r in enumerate(results):
        if r.status == "ok":
            gray[i] = r.gray
    return {"path": np.array(paths, dtype=object),
            "status": np.array([r.status for r in results], dtype=object),
            "error": np.array([r.error or "" for r in results], dtype=object),
            "columns": np.array([json.dumps(r.columns) for r in results], dtype=object),
            "gray": gray}


def _decode(path: str, config: DecodeConfig, timeout: float | None) -> Decoded:
    """``decode_file`` with ``--decode-timeout``: a Ray task cannot be stopped from outside without
    losing the rest of its block, so each file is read in a thread that is waited for ``timeout``
    seconds and, if stuck (a hung share), left behind: the file gets the local engine's error row."""
    if not timeout:
        return decode_file(path, config)
    box: list[Decoded] = []
    thread = threading.Thread(target=lambda: box.append(decode_file(path, config)), daemon=True,
                              name="cxr-deploy-decode")
    thread.start()
    thread.join(timeout)
    return box[0] if box else Decoded("error", timeout_reason(timeout))


class ModelStage:
    """One model actor: loads the bundle (the same path on every node) and scores batches."""

    def __init__(self, model: str, model_id: str, backend: str, device: str, threads: int | None,
                 decision, columns: tuple[str, ...]):
        from ..bundle import ModelBundle
        from ..errors import BundleError
        from ..serving.backends import open_backend

        bundle = ModelBundle.load(model)
        if bundle.model_id != model_id:
            raise BundleError(f"{model} on this node holds model {bundle.model_id}, the run uses {model_id}: "
                              "every node must see the same bundle")
        self.backend = open_backend(bundle, backend, device, threads=threads)
        self.spec, self.positive, self.names = bundle.spec, bundle.manifest.positive_index, bundle.class_names
        self.threshold, self.columns = decision.threshold, tuple(columns)
        self.base = base_row(decision, model_id, self.backend.name)
        self.population = in_population.load(bundle)

    def __call__(self, batch: dict) -> dict:
        inject_fault("actor")
        status = np.asarray(batch["status"])
        ok = np.flatnonzero(status == "ok")
        probabilities, _, scores = self.backend(self.spec.normalize(batch["gray"][ok])) if len(ok) else (None,) * 3
        processed_at, rows, j = stamp(), [], 0
        for i, path in enumerate(batch["path"]):
            row = new_row(self.base, str(path), str(status[i]), str(batch["error"][i]) or None,
                          json.loads(batch["columns"][i]), processed_at)
            if status[i] == "ok":
                if score_row(row, probabilities[j], self.positive, self.threshold, self.names) is not None:
                    population_cells(row, None if scores is None else scores[j], self.population)
                j += 1
            rows.append(row)
        return {"path": np.array([r["path"] for r in rows], dtype=object),
                "status": np.array([r["status"] for r in rows], dtype=object),
                "backend": np.array([self.backend.name] * len(rows), dtype=object),
                "line": np.array([csv_text([r], self.columns) for r in rows], dtype=object)}
