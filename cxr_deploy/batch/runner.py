"""The streaming batch runner behind ``cxr-deploy batch`` and :func:`cxr_deploy.run_batch`.

Data flow (memory bounded by the in-flight window, never by the number of inputs)::

    scan (lazy, names only) ─► shard filter ─► resume filter ─► decode pool (worker processes, bounded window)
        ─► batches of --batch-size ─► model (main process) ─► overlay jobs (same pool)
        ─► CSV rows (appended per batch, flushed + fsync'ed)

- Decoding overlaps inference: while the model runs on batch k, workers decode batch k+1.
- Results are consumed in input order; a worker that dies (decoder crash, OOM kill) costs only the
  file that killed it: every in-flight file is retried alone and the culprit gets an error row.
- This process never reads file contents (the workers detect formats), so a read that blocks (a
  hung network share) stalls one worker, not the run: after ``decode_timeout`` seconds the file
  gets an error row, the pool is killed and rebuilt, and the files queued behind it go on.
- A batch's rows are written only once its overlays exist, so a row never points at a missing PNG.
- Nothing but counts is kept after a row is written; the report is computed from the CSV.
"""

from __future__ import annotations

import sys
import time
from collections import deque
from concurrent.futures import TimeoutError as FutureTimeout
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import numpy as np

from .. import in_population, signals
from ..artifacts import ONNX_INT8, int8_cam_caveat
from ..atomic import fsync_dir
from ..decision import check_threshold, is_positive
from .results_file import COLUMNS, ResultsWriter, drop_rows, open_for_resume
from .choices import CAM_FOR, CamFor
from .settings import BatchConfig, BatchSummary
from .decode import Decoded, results_task, timeout_reason
from .inputs import BatchUsageError, check_inputs, check_output_parent, countable, iter_entries, new_inputs
from .outputs import check_outputs, check_writable, rows_missing_outputs, run_lock
from .overlay import SUFFIXES as OVERLAY_SUFFIXES
from .overlay import decision_caption, identity_text, overlay_names
from .progress import progress_bar, show_total_when_counted
from .pool import DecodePool, Slot, isolate_crash, open_pool_and_backend, replace_hung_pool, submit_decode
from .rows import base_row, new_row, population_cells, run_decision, score_row, stamp
from .shm import open_ring
from .staging import make_stager

# -- the run ------------------------------------------------------------------------------------------
def run_batch(config: BatchConfig, *, backend=None, bundle=None, pool: DecodePool | None = None,
              on_rows=None) -> BatchSummary:
    """Run a whole batch; returns the summary (``summary.exit_code`` for scripts).

    ``backend``, ``bundle`` and ``pool`` (with ``backend``): already loaded, kept by the caller
    across runs (``pacs listen``); a pool given is not closed at the end of a clean run.
    ``on_rows(rows)``: called with each batch's rows once they are in the CSV.

    Raises :class:`BatchUsageError`, :class:`~cxr_deploy.errors.BundleError` or
    :class:`~cxr_deploy.serving.backends.BackendUnavailable` before any row is written when the
    options, the inputs, the bundle or the backend are unusable.
    """
    from ..bundle import ModelBundle

    validate(config)
    with run_lock(config):  # one run per --out, --resume included, for the whole run
        bundle = bundle or ModelBundle.load(config.model)
        decision = run_decision(bundle, config)  # an unknown operating point: exit 2 before any work
        owned = pool is None
        if owned:
            pool, backend = open_pool_and_backend(config, bundle, backend)
        try:
            done, columns = resume_state(config, bundle)
            for folder in (config.cam_dir, config.dicom_out):
                if folder:
                    Path(folder).mkdir(exist_ok=True)
            writer = ResultsWriter(config.out, append=config.resume, fsync=config.fsync, columns=columns)
        except OSError as exc:
            if owned:
                pool.close(cancel=True)
            # chained (not "from None"): pacs listen tells a full disk, retried later, from a usage error
            raise BatchUsageError(f"cannot write {exc.filename or config.out}: {exc.strerror or exc}") from exc
        except BaseException:
            if owned:
                pool.close(cancel=True)
            raise
        try:
            run = _Run(config, bundle, backend, pool, writer, done, decision, owns_pool=owned, on_rows=on_rows)
        except BaseException:  # a signal during start-up: no worker or open file left behind
            with signals.deferred(raise_at_end=False):
                pool.stop()
                writer.close()
            raise
        return run.execute()


def validate(config: BatchConfig) -> None:
    """The checks made before any work, by both engines; raises :class:`BatchUsageError`."""
    if config.batch_size < 1:
        raise BatchUsageError("--batch-size must be >= 1")
    if config.cam_format not in OVERLAY_SUFFIXES:
        raise BatchUsageError(f"cam_format must be one of {', '.join(OVERLAY_SUFFIXES)}, got {config.cam_format!r}")
    if config.cam_for not in CAM_FOR:
        raise BatchUsageError(f"--cam-for must be one of {', '.join(CAM_FOR)}")
    if config.threshold is not None:
        try:
            check_threshold(config.threshold, "--threshold")
        except ValueError as exc:
            raise BatchUsageError(str(exc)) from None
        if config.operating_point:
            raise BatchUsageError("use either --threshold or --operating-point, not both")
    check_inputs(config.inputs)
    out = Path(config.out)
    if out.is_dir():
        raise BatchUsageError(f"--out {out} is a folder; give a CSV file name")
    if out.exists() and out.stat().st_size > 0 and not (config.resume or config.overwrite):
        raise BatchUsageError(f"{out} already exists: add --resume to continue it, or --overwrite to replace it")
    check_output_parent(out, "--out", create=config.create_dirs)
    check_outputs(config)
    for option, folder in (("--cam-dir", config.cam_dir), ("--dicom-out", config.dicom_out)):
        if folder:
            if Path(folder).exists() and not Path(folder).is_dir():
                raise BatchUsageError(f"{option} {folder} is not a directory")
            check_output_parent(folder, option, create=config.create_dirs)
    for option, path in (("--out", config.out), ("--cam-dir", config.cam_dir),
                         ("--dicom-out", config.dicom_out)):
        check_writable(path, option)  # before any work, not one failed overlay per row
    if config.dicom_out:
        from ..pacs.uids import UidError, check_root

        try:
            check_root(config.uid_root)
        except UidError as exc:
            raise BatchUsageError(f"--uid-root: {exc}") from None


def resume_state(config: BatchConfig, bundle) -> tuple[dict[str, str], tuple[str, ...]]:
    """``({path: status} already in --out, its column layout)`` for --resume; nothing otherwise."""
    from .results_file import ResultsFileError

    if not config.resume:
        return {}, COLUMNS
    try:
        done, columns = open_for_resume(config.out, model_id=bundle.model_id)
    except ResultsFileError as exc:
        raise BatchUsageError(str(exc)) from None
    # Rows whose overlay / DICOM results are missing leave the CSV and their inputs are scored
    # again: the outputs get written, and the CSV keeps exactly one row per input.
    redo = rows_missing_outputs(config, bundle)
    if redo:
        drop_rows(config.out, redo, fsync=config.fsync)
        for path in redo:
            done.pop(path, None)
        print(f"--resume: {len(redo)} rows already in {config.out} miss their overlay or DICOM results: "
              "scoring those inputs again to write them", file=sys.stderr)
    return done, columns


def _dicom_spec(config: BatchConfig, bundle, backend, decision):
    from .. import __version__
    from ..pacs.results import DicomResultSpec

    return DicomResultSpec(out_dir=str(Path(config.dicom_out).absolute()), model_id=bundle.model_id,
                           model_name=f"cxr-deploy {bundle.manifest.architecture} {'/'.join(bundle.class_names)}",
                           version=__version__, backend=backend.name, threshold=decision.threshold,
                           operating_point=decision.operating_point, uid_root=config.uid_root)


class _Run:
    """One batch run's moving parts: the input stream, the decode window, batches for the model,
    rows waiting for their overlays, and the CSV writer."""

    def __init__(self, config: BatchConfig, bundle, backend, pool: DecodePool, writer: ResultsWriter,
                 done: dict[str, str], decision, owns_pool: bool = True, on_rows=None):
        self.config, self.bundle, self.backend, self.pool, self.writer, self.done = \
            config, bundle, backend, pool, writer, done
        self.owns_pool, self.on_rows = owns_pool, on_rows  # owns_pool False: left running after a clean run
        self.threshold = decision.threshold
        self.positive = bundle.manifest.positive_index
        self.cam_dir = Path(config.cam_dir).absolute() if config.cam_dir else None
        self.dicom_spec = _dicom_spec(config, bundle, backend, decision) if config.dicom_out else None
        self.summary = BatchSummary(out=str(config.out), backend=backend.name, model_id=bundle.model_id,
                                    cam_dir=str(self.cam_dir) if self.cam_dir else None,
                                    dicom_out=str(config.dicom_out) if config.dicom_out else None)
        self.base_row = base_row(decision, bundle.model_id, backend.name)
        # one row per file even if it is named twice; none for files the resumed CSV already has
        self.entries = new_inputs(iter_entries(config.inputs, config.shard), done, self.summary.previous)
        self.exhausted = False
        self.overlay_names_used: set[str] = set()  # one overlay per row within this run
        self.dicom_sops: dict[str, str] = {}  # SOP Instance UID -> the input whose DICOM results were written
        self.pending: deque[Slot] = deque()  # decode in flight, in input order
        self.window = max(2 * config.batch_size, 4 * max(1, pool.workers))
        self.to_write: deque[list[Slot]] = deque()  # predicted, waiting for their overlays
        self.progress = progress_bar(config.progress)
        if not self.progress.disable and countable(config.inputs):
            show_total_when_counted(self.progress, config, done)
        # a decode task holds its slot until its batch is staged: window + one batch of held results
        self.ring = open_ring(pool, self.window + config.batch_size, config.max_pixels)
        self.stage = make_stager("device" if pool.config.send == "stored" else "workers", bundle.spec, backend,
                                 ring=self.ring)
        self.population = in_population.load(bundle)
        self.cam_caveat = int8_cam_caveat(bundle.manifest.artifacts.get(ONNX_INT8.file)) \
            if backend.artifact == ONNX_INT8.file else ""

    def execute(self) -> BatchSummary:
        start = time.perf_counter()
        clean = False
        try:
            chunk, n_ok = [], 0  # decoded, waiting for a full batch
            while True:
                self.fill()
                if not self.pending:
                    break
                signals.check()  # an interrupt lost in a finalizer (tqdm's __del__...) still stops the run
                slot = self.pending.popleft()
                chunk.append(slot)
                n_ok += self.resolve(slot).status == "ok"
                # Predict a full batch; or a partial one (>= 1/4) when the next file is still being
                # decoded, so the model never idles waiting for a batch to fill (start-up, slow
                # files); or a long run of unreadable files, so their rows keep flowing.
                size = self.config.batch_size
                starving = n_ok >= max(1, size // 4) and self.pending and not self.pending[0].ready
                if n_ok >= size or starving or len(chunk) >= 8 * size:
                    self.predict_chunk(chunk)
                    chunk, n_ok = [], 0
                    self.write(block=False)
            if chunk:
                self.predict_chunk(chunk)
            self.write(block=True)
            clean = True
        except KeyboardInterrupt:  # Ctrl-C, or SIGTERM turned into one by the CLI
            self.summary.interrupted = True
        finally:
            # Completed whatever signal comes: a second Ctrl-C or systemd's SIGTERM to the process
            # group must not leave workers, shared memory or an unclosed CSV behind.
            with signals.deferred(raise_at_end=False) as stopping:
                self.summary.seconds = time.perf_counter() - start
                if clean:
                    if self.owns_pool:
                        self.pool.close()
                else:  # never wait long for workers on the way out: a stuck one would hang the exit
                    self.pool.stop()
                if self.ring is not None:  # after the pool: no worker writes into a block while it goes
                    self.ring.close()
                    self.summary.transfers = dict(self.ring.stats)
                self.writer.close()
                self.progress.close()
            if stopping.signalled:  # every row is written, but the run was asked to stop
                self.summary.interrupted = True
        return self.summary

    def fill(self) -> None:
        while not self.exhausted and len(self.pending) < self.window:
            try:
                path, key = next(self.entries)
            except StopIteration:
                self.exhausted = True
                return
            slot = Slot(path, key, shm=self.ring.acquire() if self.ring is not None else None)
            slot.future = submit_decode(slot, self.pool)
            self.pending.append(slot)

    def resolve(self, slot: Slot) -> Decoded:
        if slot.result is not None:
            return slot.result
        timeout = self.config.decode_timeout or None
        try:
            slot.result = slot.future.result(timeout=timeout)
        except FutureTimeout:
            slot.result = Decoded("error", timeout_reason(timeout))
            replace_hung_pool(self.pending, self.pool)
        except BrokenProcessPool:
            isolate_crash([slot, *self.pending], self.pool, timeout)
        if self.ring is not None:  # a slot whose task came back without pixels in it is free again
            slot.shm = self.ring.settle(slot.shm, slot.result)
        return slot.result

    def predict_chunk(self, slots: list[Slot]) -> None:
        ok = [s for s in slots if s.result.status == "ok"]
        if ok:
            probabilities, cams, scores = self.backend(self.stage([s.result for s in ok]))
        processed_at = stamp()
        i = 0
        for slot in slots:
            r = slot.result
            slot.row = new_row(self.base_row, slot.path, r.status, r.error, r.columns, processed_at)
            if r.status == "ok":
                self._score(slot, probabilities[i], cams[i], None if scores is None else scores[i])
                i += 1
            slot.result = None  # drop pixels now; the row is all we keep
            slot.future = None
        self.to_write.append(slots)

    def _score(self, slot: Slot, probs: np.ndarray, cam: np.ndarray, population_score) -> None:
        names = self.bundle.class_names
        p = score_row(slot.row, probs, self.positive, self.threshold, names)
        if p is None:
            return
        population_cells(slot.row, population_score, self.population)
        caveat = in_population.row_caveat(slot.row)
        label = slot.row["predicted_label"]
        r = slot.result
        targets = self._overlay_targets(slot) if self.cam_dir and (
            self.config.cam_for == CamFor.ALL or is_positive(p, self.threshold)) else None
        dicom = self._dicom_job(slot, p, caveat)
        if targets or dicom:
            caption = decision_caption(label, p, self.threshold, names[self.positive])
            footer = (f"cxr-deploy model {self.bundle.model_id}. Decision support only, not a diagnosis. "
                      f"Heat = class activation map x p({names[self.positive]}). {self.cam_caveat} {caveat}")
            footer = " ".join(footer.split())
            slot.overlay = self.pool.submit(results_task, targets, identity_text(slot.path, r.sop_instance_uid),
                                            r.view, cam, r.original_hw, caption, footer, p, dicom)
            slot.row["overlay_path"] = targets[0] if targets else ""

    def _dicom_job(self, slot: Slot, p: float, caveat: str = ""):
        """The SR + SC job of a scored DICOM: one per SOP instance in a run (two files carrying the same
        SOP Instance UID would otherwise write the same objects, the second silently replacing the first)."""
        r = slot.result
        if not (self.dicom_spec and r.is_dicom):
            return None
        first = self.dicom_sops.setdefault(r.sop_instance_uid or slot.path, slot.path)
        if first != slot.path:
            slot.row["error"] = (f"DICOM results not written: SOP Instance UID {r.sop_instance_uid} was already "
                                 f"written for {first} in this run")
            return None
        return slot.path, self.dicom_spec, p, is_positive(p, self.threshold), caveat

    def _overlay_targets(self, slot: Slot) -> list[str]:
        r = slot.result
        candidates = overlay_names(slot.path, r.sop_instance_uid if r.is_dicom else None,
                                   self.config.cam_format)
        if candidates[0] in self.overlay_names_used:  # another input of this run has that name
            candidates = candidates[1:]
        self.overlay_names_used.add(candidates[0])
        return [str(self.cam_dir / name) for name in candidates]

    def write(self, block: bool) -> None:
        summary = self.summary
        while self.to_write:
            slots = self.to_write[0]
            # Wait for overlays only when too many rows are held back (bounded memory: each waiting
            # overlay holds one small view image in the pool's queue).
            held = sum(len(chunk) for chunk in self.to_write)
            if not block and held <= 2 * self.config.batch_size + self.window and \
                    any(s.overlay and not s.overlay.done() for s in slots):
                return
            pictures = [slot for slot in slots if slot.overlay is not None]
            for slot in pictures:
                self._collect_results(slot)
            if pictures and self.cam_dir and self.config.fsync:
                fsync_dir(self.cam_dir)  # the overlays' names are on disk before the rows naming them
            self.writer.write_rows(s.row for s in slots)
            if self.on_rows:
                self.on_rows([s.row for s in slots])
            for slot in slots:
                summary.counts[slot.row["status"]] += 1
                summary.outside_population += slot.row.get("in_population") == "no"
            self.to_write.popleft()
            self.progress.update(len(slots))
            self.progress.set_postfix(ok=summary.counts["ok"], error=summary.counts["error"],
                                      skipped=summary.counts["skipped"], refresh=False)

    def _collect_results(self, slot: Slot) -> None:
        timeout = self.config.decode_timeout or None
        try:
            # bounded like a decode: an overlay folder on a stalled share must not hang the run
            done = slot.overlay.result(timeout=timeout)
        except FutureTimeout:
            replace_hung_pool(self.pending, self.pool)  # the stuck worker goes; queued decodes move
            slot.row["overlay_path"] = ""
            what = "overlay and DICOM results" if self.dicom_spec and slot.row.get("format") == "dicom" else "overlay"
            slot.row["error"] = f"{what} not written: writing them took over {timeout:g} s"
            self.summary.missing_outputs += 1  # a hung share is a missing output like a full disk
        except Exception as exc:  # noqa: BLE001 - the prediction stands without its picture
            slot.row["overlay_path"] = ""
            slot.row["error"] = f"overlay not written: {type(exc).__name__}: {exc}"[:300]
            self.summary.missing_outputs += 1
        else:
            slot.row["overlay_path"] = done["overlay"]
            self.summary.overlays += bool(done["overlay"])
            self.summary.dicom_results += bool(done["sr"])
            if done["dicom_error"]:
                slot.row["error"] = done["dicom_error"]
                self.summary.missing_outputs += 1
        slot.overlay = None
