"""Work done in the decode worker processes: file → resized gray, and CAM → overlay image.

Imports no torch or onnxruntime, so workers start fast and stay small. Workers send back the
spec's resized gray ``(S, S)`` float32 (a third of the normalized 3-channel tensor's bytes) and
the main process normalizes whole batches at once with :meth:`PreprocessSpec.normalize` — or,
with ``DecodeConfig(send="stored")`` (``--preprocess-on device``), only the stored samples and
their :class:`~cxr_deploy.imaging.pixel_plan.PixelPlan`, and the main process does all the float
work on the model's device (:mod:`.device_stage`).

Workers never outlive the run: they ignore SIGINT/SIGTERM (the parent owns shutdown and kills the
pool), and on Linux the kernel kills them the moment the parent dies (``PR_SET_PDEATHSIG``), even
after ``kill -9``; a watchdog thread covers the rest (a parent gone before the prctl took effect,
non-Linux systems).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from ..eligibility import DEFAULT_FILTER, ChestFilter
from ..errors import NotAnImage, NotEligible, UnreadableImage
from ..imaging import DEFAULT_MAX_PIXELS, DecodedImage, read_image
from ..imaging.pixel_plan import PixelPlan, StoredImage
from ..imaging.reader import gray_from_stored, read_stored
from ..preprocessing import PreprocessSpec
from .results_file import image_columns

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".dcm", ".dicom", ".dic"})
PARENT_POLL_SECONDS = 1.0


@dataclass
class Decoded:
    status: str  # "ok" | "error" | "skipped"
    error: str | None = None
    gray: np.ndarray | None = None  # (S, S) float32 [0, 1] — the spec's resize_gray output
    view: np.ndarray | None = None  # uint8 original at overlay size, only when overlays are on
    original_hw: tuple[int, int] | None = None
    columns: dict = field(default_factory=dict)  # the CSV's image columns (results_file.image_columns)
    # DecodeConfig(send="stored") (--preprocess-on device): instead of ``gray``, the stored samples
    # (uint8/uint16 ...) and the plan of the float work, which the main process runs on the device.
    stored: np.ndarray | None = None
    plan: PixelPlan | None = None
    # From a worker with a shared-memory slot (.shm.decode_to_slot): ``stored`` is None and ``shm``
    # (a ShmPixels header) says where the samples are; ``transfer`` says how they travelled:
    # "shm", or "pickled: <why>" when they did not fit or shared memory failed.
    shm: object = None
    transfer: str = ""

    @property
    def sop_instance_uid(self) -> str | None:
        return self.columns.get("sop_instance_uid")

    @property
    def is_dicom(self) -> bool:
        return self.columns.get("format") == "dicom"


@dataclass(frozen=True)
class DecodeConfig:
    spec: PreprocessSpec
    max_pixels: int = DEFAULT_MAX_PIXELS
    view_size: int = 0  # 0: overlays off, don't make a view image
    eligibility: ChestFilter = DEFAULT_FILTER
    send: str = "gray"  # "gray": resized float gray (Decoded.gray); "stored": Decoded.stored + .plan


def skip_or_error(path: str, reason: str) -> tuple[str, str]:
    """A non-image file is ``skipped`` (README.txt in an export folder is normal) unless its name
    says it is an image: a ``.png`` holding random bytes is a corrupt file, an ``error``."""
    suffix = os.path.splitext(path)[1].lower()
    if suffix in IMAGE_SUFFIXES and "DICOMDIR" not in reason:
        return "error", f"named {suffix} but the content is not PNG, JPEG or DICOM (corrupt or mislabelled file)"
    return "skipped", reason


def timeout_reason(timeout: float) -> str:
    """The error of a file whose reading/decoding ran past ``--decode-timeout``."""
    return f"reading/decoding took over {timeout:g} s (hung read or decoder); the file was left behind"


_CONFIG: DecodeConfig | None = None


def init_worker(config: DecodeConfig, parent_pid: int | None = None) -> None:
    """Pool initializer: the config travels once per worker, not once per file."""
    import signal

    global _CONFIG
    _CONFIG = config
    # Ctrl-C and systemd's SIGTERM reach the whole process group: only the main process handles
    # them (it kills the pool and exits 130). A worker killed by SIGTERM halfway through sending
    # its result left the parent waiting for the rest of the message for ever.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    die_with_parent(parent_pid)
    # One process = one core: a multi-threaded BLAS inside a worker (overlay resampling) only
    # fights the other workers and the model for the same cores.
    try:
        from threadpoolctl import threadpool_limits

        threadpool_limits(1)
    except ImportError:  # scikit-learn's dependency; without it BLAS just keeps its default
        pass
    try:  # workers should yield the CPU to inference, which gates throughput
        os.nice(2)
    except (OSError, AttributeError):  # AttributeError: no os.nice on Windows
        pass
    # Import the readers now, while the main process loads the model, not on each worker's first
    # file: measured on 2 cores (benchmarks/batch_profile.py), pydicom + our DICOM reader take
    # ~260 ms to import and a fresh worker's first 2048² DICOM took 317 ms against 45 ms for the
    # next; with 16 workers and 64 files that start-up was most of a run's time.
    from ..imaging import dicom, raster  # noqa: F401
    from ..quiet import dicom_warnings_once

    dicom_warnings_once()  # each kind once per worker, values redacted (see cxr_deploy.quiet)


def die_with_parent(parent_pid: int | None) -> None:
    """Exit when the parent process dies, however it dies (``kill -9`` included)."""
    import signal
    import sys
    import threading

    parent_pid = parent_pid or os.getppid()
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG = 1
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent_pid:  # the parent died before the prctl: nobody will signal us
        os._exit(1)

    def watch():
        import time

        while True:
            time.sleep(PARENT_POLL_SECONDS)
            if os.getppid() != parent_pid:
                os._exit(1)

    threading.Thread(target=watch, name="cxr-deploy-parent-watch", daemon=True).start()


def decode_file(path: str, config: DecodeConfig | None = None) -> Decoded:
    """Never raises for a bad file: every failure becomes ``Decoded(status="error", ...)``."""
    config = config or _CONFIG
    stored = None
    try:
        if config.send == "stored":
            stored = read_stored(path, max_pixels=config.max_pixels, eligibility=config.eligibility)
            # the view image for overlays is still made here, from the numpy gray (display only)
            image = read_image_from(stored, path) if config.view_size else stored
            gray = None
        else:
            image = read_image(path, max_pixels=config.max_pixels, eligibility=config.eligibility)
            gray = config.spec.resize_gray(image.pixels)
    except NotEligible as exc:  # readable, but not a frontal chest radiograph: never scored
        return Decoded("skipped", exc.reason, columns=image_columns(format="dicom", **exc.header))
    except NotAnImage as exc:
        return Decoded(*skip_or_error(path, exc.reason))  # DICOMDIR & co. found by the reader, not the scan
    except UnreadableImage as exc:
        return Decoded("error", exc.reason)
    except MemoryError:
        return Decoded("error", "out of memory while decoding")
    except Exception as exc:  # a reader bug must cost one row, not the night's run
        return Decoded("error", f"unexpected {type(exc).__name__} while decoding: {' '.join(str(exc).split())[:200]}")
    view = None
    if config.view_size:
        from .overlay import view_image

        view = view_image(image.pixels, config.view_size)
    if stored is not None:
        return Decoded("ok", None, None, view, tuple(stored.stored.shape[:2]), image_columns(stored.meta),
                       stored=stored.stored, plan=stored.plan)
    return Decoded("ok", None, gray, view, tuple(image.pixels.shape), image_columns(image.meta))


def read_image_from(stored: StoredImage, path: str) -> DecodedImage:
    from pathlib import Path

    return DecodedImage(gray_from_stored(stored, Path(path)), stored.meta)


def results_task(candidates: list[str] | None, identity: str, view: np.ndarray, cam: np.ndarray,
                 original_hw: tuple[int, int], caption: str, footer: str, weight: float = 1.0,
                 dicom: tuple | None = None, config: DecodeConfig | None = None) -> dict:
    """Render the overlay once; write it to ``candidates`` (``--cam-dir``) and/or as DICOM SR + SC
    (``dicom = (source path, DicomResultSpec, probability, positive, caveat)``, ``--dicom-out``; the
    caveat: :func:`cxr_deploy.in_population.row_caveat`, or empty).

    Returns ``{"overlay": path or "", "sr": path or "", "sc": path or "", "dicom_error": reason or ""}``;
    an overlay-file failure raises (the row says so), a DICOM failure is reported, not raised."""
    from .overlay import render_overlay, save_overlay

    config = config or _CONFIG
    image, _ = render_overlay(view, cam, config.spec, original_hw, caption, footer, weight=weight)
    out = {"overlay": "", "sr": "", "sc": "", "dicom_error": ""}
    if dicom is not None:
        from ..pacs.results import write_dicom_results

        source_path, spec, probability, positive, caveat = dicom
        try:
            out["sr"], out["sc"] = write_dicom_results(source_path, spec, probability=probability, positive=positive,
                                                       overlay_rgb=np.asarray(image.convert("RGB")), caveat=caveat)
        except Exception as exc:  # noqa: BLE001 - the prediction stands; the row says what is missing
            out["dicom_error"] = f"DICOM results not written: {type(exc).__name__}: {' '.join(str(exc).split())}"[:300]
    if candidates:
        out["overlay"] = save_overlay(image, candidates, identity, "\n".join(filter(None, (caption, footer))))
    return out
