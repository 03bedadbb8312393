"""``cxr-deploy batch --engine ray``: the batch run on a Ray cluster, with the local engine's contract
(inputs, CSV schema and rows, resume, exit codes). Ray is imported only here, and only when used.

Dataflow (Ray Data)::

    inputs, scanned here (names only; the local engine's shard, duplicate and --resume filters)
      ─► ray.data.from_items  ─► map_batches(decode_batch)  CPU tasks: the runtime's reader + spec
      ─► map_batches(ModelStage)  actor pool: 1 GPU each when the cluster has GPUs, else CPU actors
      ─► rows, as CSV lines, streamed back here ─► CSV parts ─► one atomic merge into --out

Faults: a decode task whose worker dies is retried; a model actor that dies is restarted and its
batch retried (``max_restarts`` / ``max_task_retries``). Rows are deduplicated by path when parts are
merged, so a retry never duplicates a row, and a row is only ever lost with the whole run (which
then says so and leaves the finished rows in the CSV for ``--resume``).

Every node must see the bundle and the inputs at the same paths (a shared mount); only this process
writes files.
"""

from __future__ import annotations

import importlib.util
import logging
import signal
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from .. import signals
from ..errors import CxrDeployError
from .decode import DecodeConfig
from .inputs import BatchUsageError, iter_entries, new_inputs
from .outputs import run_lock
from .parts import PartWriter, merge_parts, parts_dir
from .ray_stages import ModelStage, decode_batch
from .results_file import ResultsWriter
from .rows import run_decision
from .progress import progress_bar
from .runner import resume_state, validate
from .settings import BatchConfig, BatchSummary

RAY_MISSING = "--engine ray needs Ray: pip install 'cxr-deploy[ray]'"
# A worker that crashes on every try (a decoder segfault on one poison file) must end the run, not
# loop: a few retries absorb a lost node or an OOM kill.
RETRIES = 3
# Each model actor and each decode task asks for half a CPU: one of each per core. A whole CPU per
# actor would leave a 1-CPU node no room for decoding, and the dataset would wait for ever.
STAGE_CPUS = 0.5


class RayJobFailed(CxrDeployError):
    """The Ray job stopped (retries spent, cluster lost); finished rows are in the CSV."""


def ray_installed() -> bool:
    return importlib.util.find_spec("ray") is not None


def check_options(config: BatchConfig) -> None:
    """Options the Ray engine does not support: one-line usage errors, never silently ignored."""
    if not ray_installed():
        raise BatchUsageError(RAY_MISSING)
    for option, value in (("--cam-dir", config.cam_dir), ("--dicom-out", config.dicom_out)):
        if value:
            raise BatchUsageError(f"{option} is not supported with --engine ray yet (overlays and DICOM results "
                                  "need the image beside the CAM); use --engine local")
    if config.workers == 0:
        raise BatchUsageError("--workers 0 (decode in this process) has no meaning with --engine ray; "
                              "leave it out or give the number of decode tasks")
    if config.preprocess_on == "device":
        raise BatchUsageError("--preprocess-on device is not supported with --engine ray yet (its decode "
                              "tasks preprocess); leave it out or use --engine local")


def run_batch_ray(config: BatchConfig, *, bundle=None, address: str | None = None) -> BatchSummary:
    """Run a whole batch on Ray (joins the cluster this process is already connected to, else
    ``address``, else starts a local one and shuts it down at the end). Raises like ``run_batch``."""
    check_options(config)
    validate(config)
    with run_lock(config, parts=True):  # one run per --out and its parts folder, for the whole run
        return _run_locked(config, bundle, address)


def _run_locked(config: BatchConfig, bundle, address: str | None) -> BatchSummary:
    from ..bundle import ModelBundle

    from ..serving.backends import check_artifact

    bundle = bundle or ModelBundle.load(config.model)
    check_artifact(bundle, config.backend)  # here, not in every actor's constructor
    run_decision(bundle, config)  # an unknown operating point: exit 2 before any work
    new_file = not (config.resume and Path(config.out).exists())
    done, columns = _prepare_out(config, bundle)
    summary = BatchSummary(out=str(config.out), model_id=bundle.model_id)
    todo = [path for path, _ in new_inputs(iter_entries(config.inputs, config.shard), done, summary.previous)]
    start = time.perf_counter()
    try:
        if todo:
            with ray_session(address):
                _execute(config, bundle, todo, columns, summary)
    except CxrDeployError:  # no cluster, no GPU for --device cuda...: nothing done, no file left behind
        if new_file and not summary.processed:
            Path(config.out).unlink(missing_ok=True)
        raise
    summary.seconds = time.perf_counter() - start
    return summary


def _prepare_out(config: BatchConfig, bundle) -> tuple[dict[str, str], tuple[str, ...]]:
    """Parts left by a killed run join ``--out`` on ``--resume`` and go on ``--overwrite`` (without
    either, the run stops, as for an existing ``--out``); then ``--out`` is opened like the local
    engine does (header written, or checked for resuming)."""
    from .results_file import ResultsFileError

    folder = parts_dir(config.out)
    try:
        if config.resume:
            merge_parts(config.out, folder, fsync=config.fsync)
        elif folder.is_dir():
            if not config.overwrite:
                raise BatchUsageError(f"{folder} holds rows of a run that was killed: add --resume to keep them, "
                                      "or --overwrite to start again")
            for part in folder.glob("part-*.csv"):
                part.unlink()
            folder.rmdir()
    except ResultsFileError as exc:
        raise BatchUsageError(str(exc)) from None
    except OSError as exc:
        raise BatchUsageError(f"cannot write {exc.filename or folder}: {exc.strerror or exc}") from None
    done, columns = resume_state(config, bundle)
    try:
        ResultsWriter(config.out, append=config.resume, fsync=config.fsync, columns=columns).close()
    except OSError as exc:
        raise BatchUsageError(f"cannot write {exc.filename or config.out}: {exc.strerror or exc}") from None
    return done, columns


@contextmanager
def ray_session(address: str | None):
    """Connected to Ray for the duration. A Ray this process already joined is left running; one
    started here is shut down on the way out, whatever the way (error, Ctrl-C, SIGTERM)."""
    import ray

    if ray.is_initialized():
        yield
        return
    main = threading.current_thread() is threading.main_thread()
    sigterm = signal.getsignal(signal.SIGTERM) if main else None
    try:
        ray.init(address=address, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    except (KeyboardInterrupt, SystemExit) as exc:
        # Ctrl-C/SIGTERM while Ray starts: what did start is stopped again. ray.init installs its own
        # SIGTERM handler (sys.exit(15)) for its duration: that exit is our interrupt too (seen: exit
        # 15 for a SIGTERM 5 s into a run, while the local Ray was starting).
        with signals.deferred(raise_at_end=False):
            ray.shutdown()
        if isinstance(exc, SystemExit) and exc.code != signal.SIGTERM:
            raise
        raise KeyboardInterrupt from None
    except Exception as exc:  # ConnectionError, ValueError, RuntimeError... all one line for the user
        ray.shutdown()
        where = f"the Ray cluster at {address}" if address else "a local Ray"
        raise BatchUsageError(f"cannot start or join {where}: {type(exc).__name__}: {' '.join(str(exc).split())[:300]}") from None
    finally:
        if main:
            # ray.init installs a SIGTERM handler that exits at once; keep the command's (SIGTERM
            # stops like Ctrl-C: finished rows merged into the CSV, Ray shut down, exit 130).
            signal.signal(signal.SIGTERM, sigterm)
    try:
        yield
    finally:
        with signals.deferred(raise_at_end=False):  # never cut short: no Ray process may outlive us
            ray.shutdown()


def _execute(config: BatchConfig, bundle, todo: list[str], columns: tuple[str, ...], summary: BatchSummary) -> None:
    """Stream the rows into parts; merge them into --out however the stream ends."""
    dataset = _dataset(config, bundle, todo, columns)  # a usage error (no GPU) before any part exists
    folder = parts_dir(config.out)
    writer = PartWriter(folder, columns, fsync=config.fsync)
    progress = progress_bar(config.progress, total=len(todo))  # the inputs are listed up front here
    failure = None
    try:
        for block in dataset.iter_batches(batch_size=None, batch_format="numpy"):
            lines = block["line"]
            writer.write("".join(lines), len(lines))
            summary.backend = summary.backend or str(block["backend"][0])
            progress.update(len(lines))
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM turned into one by the CLI
        summary.interrupted = True
    except Exception as exc:  # noqa: BLE001 - retries spent, actor constructor failed, cluster lost
        failure = exc
    finally:
        writer.close()
        progress.close()
        added = merge_parts(config.out, folder, columns, {path: i for i, path in enumerate(todo)}, fsync=config.fsync)
    summary.counts.update(added)
    summary.backend = summary.backend or f"{config.backend} (no row scored)"
    if failure is not None:
        done = sum(added.values())
        raise RayJobFailed(f"the Ray job failed: {_root_cause(failure)[:400]}" + (
            f" ({done} rows finished were written to {config.out}; rerun with --resume)" if done else ""))


def _root_cause(exc: BaseException) -> str:
    """One line for what stopped the job: the task's own exception, or the last line of the remote
    traceback Ray puts in the message (an actor that failed in its constructor)."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, BaseException) and cause is not exc:
        return _root_cause(cause)
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[-1] if len(lines) > 1 else f"{type(exc).__name__}: {' '.join(str(exc).split())}"



def _dataset(config: BatchConfig, bundle, todo: list[str], columns: tuple[str, ...]):
    import warnings

    import ray
    from ray.util.annotations import RayDeprecationWarning

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # the command's own bar (off in logs) counts rows
    logging.getLogger("ray.data").setLevel(logging.ERROR)  # "progress bars disabled" & co.
    plan = resources(config, ray.cluster_resources())
    decode_config = DecodeConfig(spec=bundle.spec, max_pixels=config.max_pixels, eligibility=config.eligibility)
    stage_args = {"model": str(Path(config.model).absolute()), "model_id": bundle.model_id,
                  "backend": config.backend, "device": plan["device"], "threads": plan["threads"],
                  "decision": run_decision(bundle, config), "columns": columns}
    blocks = max(1, -(-len(todo) // config.batch_size))
    ds = ray.data.from_items([{"path": path} for path in todo], override_num_blocks=blocks)
    with warnings.catch_warnings():
        # Ray 2.60 flags retry settings passed as remote args as deprecated but has no named
        # parameter for them yet (hence the <2.64 cap of the [ray] extra); Ray Data's own default
        # is to retry for ever, which would loop on a file that crashes its decoder every time.
        warnings.simplefilter("ignore", RayDeprecationWarning)
        ds = ds.map_batches(decode_batch, batch_size=config.batch_size, batch_format="numpy",
                            fn_kwargs={"config": decode_config, "timeout": config.decode_timeout or None},
                            compute=ray.data.TaskPoolStrategy(size=config.workers), num_cpus=STAGE_CPUS,
                            max_retries=RETRIES)
        return ds.map_batches(ModelStage, batch_size=config.batch_size, batch_format="numpy",
                              fn_constructor_kwargs=stage_args,
                              # all actors from the start: a pool growing from one actor spends
                              # a short run's first batches on a single core
                              compute=ray.data.ActorPoolStrategy(size=plan["actors"]),
                              num_cpus=plan["num_cpus"], num_gpus=plan["num_gpus"],
                              max_restarts=RETRIES, max_task_retries=RETRIES)


def resources(config: BatchConfig, cluster: dict) -> dict:
    """How the model stage runs on a cluster with ``cluster`` resources (``CPU``, ``GPU``): actors,
    their CPU/GPU share, the device and inference threads they open the backend with."""
    gpus, cpus = int(cluster.get("GPU", 0)), max(1, int(cluster.get("CPU", 1)))
    if config.device == "cuda" and not gpus:
        raise BatchUsageError("--device cuda: the Ray cluster has no GPU")
    if gpus and config.device != "cpu" and config.backend != "onnx-int8":
        return {"actors": gpus, "num_cpus": None, "num_gpus": 1, "device": config.device, "threads": config.threads}
    # CPU actors: one per CPU of the cluster, one inference thread each unless --threads says more
    # (several single-threaded actors use the cores without fighting over them).
    return {"actors": cpus, "num_cpus": STAGE_CPUS, "num_gpus": None, "device": "cpu", "threads": config.threads or 1}
