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

import hashlib
import os
import sys
import time
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from ..errors import CxrDeployError
from ..imaging import DEFAULT_MAX_PIXELS
from ..imaging.scan import iter_candidate_files
from .csv_writer import ResultsWriter, open_for_resume
from .decode import DecodeConfig, Decoded, decode_file, init_worker, overlay_task
from .overlay import VIEW_SIZE

EXIT_OK = 0
EXIT_FATAL = 2
EXIT_SOME_FAILED = 3
EXIT_INTERRUPTED = 130


class BatchUsageError(CxrDeployError):
    """Bad options or inputs detected before any work (exit code 2)."""


@dataclass
class BatchConfig:
    inputs: Sequence[str]
    model: str | Path
    out: str | Path
    backend: str = "onnx"
    device: str = "auto"
    batch_size: int = 16
    workers: int | None = None  # decode processes; None = auto, 0 = decode in this process
    threads: int | None = None  # inference threads on CPU; None = all cores
    cam_dir: str | Path | None = None
    cam_for: str = "all"  # "all" | "positive"
    cam_format: str = "png"  # "png" | "jpeg"
    threshold: float | None = None  # None = the bundle's threshold
    shard: tuple[int, int] = (0, 1)  # (index, count), index 0-based
    resume: bool = False
    overwrite: bool = False
    max_pixels: int = DEFAULT_MAX_PIXELS
    progress: bool = True
    fsync: bool = True
    decode_timeout: float | None = 120.0  # seconds per file; None or 0 = wait forever


@dataclass
class BatchSummary:
    out: str
    counts: dict = field(default_factory=lambda: {"ok": 0, "error": 0, "skipped": 0})
    previous: dict = field(default_factory=lambda: {"ok": 0, "error": 0, "skipped": 0})
    seconds: float = 0.0
    backend: str = ""
    model_id: str = ""
    cam_dir: str | None = None
    overlays: int = 0
    interrupted: bool = False

    @property
    def processed(self) -> int:
        return sum(self.counts.values())

    @property
    def images_per_second(self) -> float:
        return self.processed / self.seconds if self.seconds > 0 else 0.0

    @property
    def exit_code(self) -> int:
        if self.interrupted:
            return EXIT_INTERRUPTED
        return EXIT_SOME_FAILED if self.counts["error"] or self.previous["error"] else EXIT_OK

    def lines(self) -> list[str]:
        c, p = self.counts, self.previous
        out = [f"{self.processed} inputs processed in {self.seconds:.1f} s ({self.images_per_second:.1f} images/s, "
               f"backend {self.backend}, model {self.model_id}): {c['ok']} ok, {c['error']} error, {c['skipped']} skipped"]
        if sum(p.values()):
            out.append(f"already in the CSV from an earlier run (skipped by --resume): {p['ok']} ok, "
                       f"{p['error']} error, {p['skipped']} skipped")
        out.append(f"results: {self.out}")
        if self.cam_dir:
            out.append(f"overlays: {self.overlays} images in {self.cam_dir}")
        if self.interrupted:
            out.append("INTERRUPTED: rows written so far are complete; rerun the same command with --resume")
        return out


# -- inputs ---------------------------------------------------------------------------------------
def expand_inputs(inputs: Iterable[str]) -> Iterator[tuple[str, str | None]]:
    """(input, root) pairs: ``@list.txt`` expands to the paths it lists (one a line, ``#`` comments)."""
    for item in inputs:
        item = str(item)
        if item.startswith("@"):
            list_file = Path(item[1:])
            try:
                with open(list_file, encoding="utf-8", errors="surrogateescape") as fh:
                    for line in fh:
                        line = line.rstrip("\r\n")
                        if line.strip() and not line.lstrip().startswith("#"):
                            yield line, None
            except OSError as exc:
                raise BatchUsageError(f"cannot read input list {list_file}: {exc.strerror or exc}") from None
        else:
            yield item, item if os.path.isdir(item) else None


def shard_key(path: str, root: str | None) -> str:
    """What decides a file's shard: its path relative to the input folder it was found under, so
    machines that mount the share at different places still agree; a file named directly uses the
    path as given."""
    return os.path.relpath(path, root).replace(os.sep, "/") if root else path


def in_shard(key: str, shard: tuple[int, int]) -> bool:
    index, count = shard
    if count == 1:
        return True
    digest = hashlib.blake2b(key.encode("utf-8", "surrogateescape"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % count == index


def iter_entries(inputs: Iterable[str], shard: tuple[int, int] = (0, 1)):
    """Yield ``(absolute path, shard key)`` for this shard's files, lazily, in scan order.

    Names only: this process never reads a file's content. Format detection happens in the decode
    workers, where a read that blocks (a hung network share, a FIFO) is caught by the decode
    timeout instead of freezing the whole run."""
    for item, root in expand_inputs(inputs):
        for path in iter_candidate_files([item]):
            key = shard_key(str(path), root)
            if in_shard(key, shard):
                yield os.path.abspath(path), key


def parse_shard(text: str) -> tuple[int, int]:
    """``"i/n"`` with 1 <= i <= n (1-based, as people count machines) → (i-1, n)."""
    try:
        i, n = (int(part) for part in str(text).split("/"))
    except ValueError:
        raise BatchUsageError(f"--shard must look like 2/4 (this is part 2 of 4), got {text!r}") from None
    if not 1 <= i <= n:
        raise BatchUsageError(f"--shard {text}: need 1 <= i <= n")
    return i - 1, n


IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".dcm", ".dicom", ".dic"})


def skip_or_error(path: str, reason: str) -> tuple[str, str]:
    """A non-image file is ``skipped`` (README.txt in an export folder is normal) unless its name
    says it is an image: a ``.png`` holding random bytes is a corrupt file, an ``error``."""
    suffix = os.path.splitext(path)[1].lower()
    if suffix in IMAGE_SUFFIXES and "DICOMDIR" not in reason:
        return "error", f"named {suffix} but the content is not PNG, JPEG or DICOM (corrupt or mislabelled file)"
    return "skipped", reason


OVERLAY_SUFFIXES = {"png": ".png", "jpeg": ".jpg"}


def overlay_name(key: str, path: str, cam_format: str = "png") -> str:
    """Overlay file name, unique per input: the shard key flattened, plus a short hash if long."""
    flat = key.lstrip("/").replace("/", "__") or os.path.basename(path)
    if len(flat) > 180:
        flat = flat[-150:] + "." + hashlib.blake2b(path.encode("utf-8", "surrogateescape"), digest_size=6).hexdigest()
    return flat + OVERLAY_SUFFIXES[cam_format]


# -- the decode pool ----------------------------------------------------------------------------------
def default_workers(device: str) -> int:
    """Decode worker processes: one per core, at most 8 on CPU (16 for a GPU to keep it fed).

    Measured on 2 cores (benchmarks/batch_throughput.py): 2 workers beat 1 by 10-35 % with
    overlays on, although inference also uses both cores — workers run at lower priority and ONNX
    Runtime's threads do not spin, so they take the CPU only when the model leaves it idle.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(cores, 16 if device == "cuda" else 8))


class _DecodePool:
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
        if self._pool is None:
            import multiprocessing

            # spawn: workers never inherit ONNX Runtime / torch thread pools from this process.
            self._pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"),
                                             initializer=init_worker, initargs=(self.config,))
        return self._pool.submit(fn, *args)

    def warm_up(self) -> None:
        """Start the worker processes now (they spend ~1 s importing numpy/Pillow/pydicom)."""
        if self.workers:
            for _ in range(self.workers):
                self.submit(len, ())

    def restart(self) -> None:
        self.close(cancel=True)

    def kill(self) -> None:
        """Stop now, even with a worker stuck in a read or a decoder, which ``shutdown`` would wait
        for forever. The pool is recreated on the next submit."""
        if self._pool is not None:
            processes = list((getattr(self._pool, "_processes", None) or {}).values())
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


@dataclass
class _Slot:
    path: str
    key: str
    future: Future | None = None
    result: Decoded | None = None
    row: dict | None = None
    overlay: Future | None = None


# -- the run ------------------------------------------------------------------------------------------
def run_batch(config: BatchConfig, *, backend=None, bundle=None) -> BatchSummary:
    """Run a whole batch; returns the summary (``summary.exit_code`` for scripts).

    Raises :class:`BatchUsageError`, :class:`~cxr_deploy.errors.BundleError` or
    :class:`~cxr_deploy.batch.backends.BackendUnavailable` before any row is written when the
    options, the bundle or the backend are unusable.
    """
    from ..bundle import ModelBundle
    from .backends import likely_device, open_backend
    from .csv_writer import ResultsFileError

    if config.batch_size < 1:
        raise BatchUsageError("--batch-size must be >= 1")
    if config.cam_format not in OVERLAY_SUFFIXES:
        raise BatchUsageError(f"cam_format must be one of {', '.join(OVERLAY_SUFFIXES)}, got {config.cam_format!r}")
    if config.cam_for not in ("all", "positive"):
        raise BatchUsageError("--cam-for must be 'all' or 'positive'")
    if config.threshold is not None and not 0.0 <= config.threshold <= 1.0:
        raise BatchUsageError("--threshold must be within [0, 1]")
    for item, _ in expand_inputs(i for i in config.inputs if not str(i).startswith("@")):
        if not os.path.exists(item):
            raise BatchUsageError(f"input not found: {item}")
    out = Path(config.out)
    if out.exists() and out.stat().st_size > 0 and not (config.resume or config.overwrite):
        raise BatchUsageError(f"{out} already exists: add --resume to continue it, or --overwrite to replace it")

    bundle = bundle or ModelBundle.load(config.model)
    if backend is None:
        # Start the decode workers first: they import while the model loads.
        device_guess = likely_device(config.backend, config.device)
        workers = default_workers(device_guess) if config.workers is None else max(0, int(config.workers))
        pool = _DecodePool(workers, _decode_config(bundle, config))
        pool.warm_up()
        try:
            backend = open_backend(bundle, config.backend, config.device, threads=config.threads)
        except BaseException:
            pool.close(cancel=True)
            raise
        if config.workers is None and default_workers(backend.device) != workers:
            pool.close()
            pool = _DecodePool(default_workers(backend.device), pool.config)
    else:
        workers = default_workers(backend.device) if config.workers is None else max(0, int(config.workers))
        pool = _DecodePool(workers, _decode_config(bundle, config))
    done: dict[str, str] = {}
    if config.resume:
        try:
            done = open_for_resume(out, model_id=bundle.model_id)
        except ResultsFileError as exc:
            pool.close(cancel=True)
            raise BatchUsageError(str(exc)) from None

    spec = bundle.spec
    threshold = bundle.threshold if config.threshold is None else float(config.threshold)
    positive = bundle.manifest.positive_index
    class_names = bundle.class_names
    cam_dir = Path(config.cam_dir) if config.cam_dir else None
    workers = pool.workers
    summary = BatchSummary(out=str(out), backend=backend.name, model_id=bundle.model_id,
                           cam_dir=str(cam_dir) if cam_dir else None)
    base_row = {"threshold": f"{threshold:g}", "model_id": bundle.model_id, "backend": backend.name,
                "schema_version": 1}

    progress = _progress(config.progress)
    entries = iter_entries(config.inputs, config.shard)
    seen: set[str] = set()  # one row per file even if it is named twice
    pending: deque[_Slot] = deque()  # decode in flight, in input order
    window = max(2 * config.batch_size, 4 * max(1, workers))
    chunk: list[_Slot] = []  # decoded, waiting for a full batch
    to_write: deque[list[_Slot]] = deque()  # predicted, waiting for their overlays
    try:
        writer = ResultsWriter(out, append=config.resume, fsync=config.fsync)
    except OSError as exc:
        pool.close(cancel=True)
        raise BatchUsageError(f"cannot write {out}: {exc.strerror or exc}") from None
    start = time.perf_counter()
    exhausted = False

    def fill():
        nonlocal exhausted
        while not exhausted and len(pending) < window:
            try:
                path, key = next(entries)
            except StopIteration:
                exhausted = True
                return
            if path in seen:
                continue
            seen.add(path)
            if path in done:
                summary.previous[done[path]] += 1
                continue
            slot = _Slot(path, key)
            slot.future = pool.submit(decode_file, path)
            pending.append(slot)

    def resolve(slot: _Slot) -> Decoded:
        if slot.result is not None:
            return slot.result
        try:
            slot.result = slot.future.result(timeout=config.decode_timeout or None)
        except FutureTimeout:
            slot.result = Decoded("error", f"reading/decoding took over {config.decode_timeout:g} s (hung read or "
                                           "decoder); the file was left behind")
            _replace_hung_pool(pending, pool)
        except BrokenProcessPool:
            _isolate_crash([slot, *pending], pool)
        return slot.result

    def predict(slots: list[_Slot]) -> None:
        ok = [s for s in slots if s.result.status == "ok"]
        if ok:
            batch = spec.normalize(np.stack([s.result.gray for s in ok]))
            probabilities, cams = backend(batch)
        stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
        i = 0
        for slot in slots:
            r = slot.result
            slot.row = dict(base_row, path=slot.path, status=r.status, error=r.error, format=r.format,
                            study_instance_uid=r.study_instance_uid, series_instance_uid=r.series_instance_uid,
                            sop_instance_uid=r.sop_instance_uid, processed_at=stamp)
            if r.status == "ok" and not np.isfinite(probabilities[i]).all():
                # Never a silent NaN "NORMAL": a broken artifact or input shows as an error row.
                slot.row.update(status="error", error="model returned a non-finite probability")
            elif r.status == "ok":
                p = float(probabilities[i, positive])
                label = _label(probabilities[i], positive, threshold, class_names)
                slot.row.update(probability=p, predicted_label=label)
                if cam_dir and (config.cam_for == "all" or p >= threshold):
                    target = str((cam_dir / overlay_name(slot.key, slot.path, config.cam_format)).absolute())
                    caption = f"{label}  p({class_names[positive]})={p:.3f}  threshold {threshold:.2f}"
                    footer = f"cxr-deploy model {bundle.model_id} - decision support only, not a diagnosis"
                    slot.overlay = pool.submit(overlay_task, target, r.view, cams[i], r.original_hw, caption, footer)
                    slot.row["overlay_path"] = target
                i += 1
            slot.result = None  # drop pixels now; the row is all we keep
            slot.future = None
        to_write.append(slots)

    def write(block: bool) -> None:
        while to_write:
            slots = to_write[0]
            # Wait for overlays only when too many rows are held back (bounded memory: each waiting
            # overlay holds one small view image in the pool's queue).
            held = sum(len(chunk_) for chunk_ in to_write)
            if not block and held <= 2 * config.batch_size + window and \
                    any(s.overlay and not s.overlay.done() for s in slots):
                return
            for slot in slots:
                if slot.overlay is not None:
                    try:
                        slot.overlay.result()
                        summary.overlays += 1
                    except Exception as exc:  # noqa: BLE001 - the prediction stands without its picture
                        slot.row["overlay_path"] = ""
                        slot.row["error"] = f"overlay not written: {type(exc).__name__}: {exc}"[:300]
                    slot.overlay = None
            writer.write_rows(s.row for s in slots)
            for slot in slots:
                summary.counts[slot.row["status"]] += 1
            to_write.popleft()
            progress.update(len(slots))
            progress.set_postfix(ok=summary.counts["ok"], error=summary.counts["error"],
                                 skipped=summary.counts["skipped"], refresh=False)

    failed = True
    try:
        n_ok = 0
        while True:
            fill()
            if not pending:
                break
            slot = pending.popleft()
            result = resolve(slot)
            chunk.append(slot)
            n_ok += result.status == "ok"
            # Predict a full batch; or a partial one (>= 1/4) when the next file is still being
            # decoded, so the model never idles waiting for a batch to fill (start-up, slow
            # files); or a long run of unreadable files, so their rows keep flowing.
            starving = n_ok >= max(1, config.batch_size // 4) and pending and not _ready(pending[0])
            if n_ok >= config.batch_size or starving or len(chunk) >= 8 * config.batch_size:
                predict(chunk)
                chunk, n_ok = [], 0
                write(block=False)
        if chunk:
            predict(chunk)
        write(block=True)
        failed = False
    except KeyboardInterrupt:
        summary.interrupted = True
    finally:
        summary.seconds = time.perf_counter() - start
        pool.close(cancel=failed)
        writer.close()
        progress.close()
    return summary


def _ready(slot: _Slot) -> bool:
    return slot.result is not None or slot.future is None or slot.future.done()


def _decode_config(bundle, config: BatchConfig) -> DecodeConfig:
    return DecodeConfig(spec=bundle.spec, max_pixels=config.max_pixels, view_size=VIEW_SIZE if config.cam_dir else 0)


def _replace_hung_pool(pending: Iterable[_Slot], pool: _DecodePool) -> None:
    """A worker is stuck on a file: kill the pool (a stuck process cannot be cancelled), keep what
    the other workers finished and send the rest of the window to a fresh pool. Overlays still
    queued in the old pool are lost; their rows say so."""
    pool.kill()
    for slot in pending:
        if slot.result is not None or slot.future is None:
            continue
        if slot.future.done() and not slot.future.cancelled() and slot.future.exception() is None:
            slot.result = slot.future.result()
        else:
            slot.future = pool.submit(decode_file, slot.path)


def _isolate_crash(slots: list[_Slot], pool: _DecodePool) -> None:
    """A worker process died: retry every in-flight file alone, in a fresh pool, to find the culprit."""
    pool.restart()
    for slot in slots:
        if slot.result is not None:
            continue
        try:
            slot.result = pool.submit(decode_file, slot.path).result()
        except BrokenProcessPool:
            slot.result = Decoded("error", "decoder process crashed on this file (killed or out of memory)")
            pool.restart()


def _label(probabilities: np.ndarray, positive: int, threshold: float, class_names: Sequence[str]) -> str:
    if probabilities[positive] >= threshold:
        return class_names[positive]
    others = [i for i in range(len(class_names)) if i != positive]
    return class_names[max(others, key=lambda i: probabilities[i])]


def _progress(enabled: bool):
    from tqdm import tqdm

    # disable=None: a bar on a terminal, nothing in cron logs (the end summary is always printed).
    return tqdm(unit="img", desc="batch", file=sys.stderr, disable=None if enabled else True,
                dynamic_ncols=True, smoothing=0.1)
