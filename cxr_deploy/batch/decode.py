"""Work done in the decode worker processes: file → resized gray, and CAM → overlay PNG.

Imports no torch or onnxruntime, so workers start fast and stay small. Workers send back the
spec's resized gray ``(S, S)`` float32 (a third of the normalized 3-channel tensor's bytes) and
the main process normalizes whole batches at once with :meth:`PreprocessSpec.normalize`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import NotAnImage, UnreadableImage
from ..imaging import DEFAULT_MAX_PIXELS, read_image
from ..preprocessing import PreprocessSpec


@dataclass
class Decoded:
    status: str  # "ok" | "error" | "skipped"
    error: str | None = None
    gray: np.ndarray | None = None  # (S, S) float32 [0, 1] — the spec's resize_gray output
    view: np.ndarray | None = None  # uint8 original at overlay size, only when overlays are on
    original_hw: tuple[int, int] | None = None
    format: str | None = None
    study_instance_uid: str | None = None
    series_instance_uid: str | None = None
    sop_instance_uid: str | None = None


@dataclass(frozen=True)
class DecodeConfig:
    spec: PreprocessSpec
    max_pixels: int = DEFAULT_MAX_PIXELS
    view_size: int = 0  # 0: overlays off, don't make a view image


_CONFIG: DecodeConfig | None = None


def init_worker(config: DecodeConfig) -> None:
    """Pool initializer: the config travels once per worker, not once per file."""
    import os
    import signal

    global _CONFIG
    _CONFIG = config
    # Ctrl-C reaches the whole process group: only the main process handles it (and shuts the
    # pool down), so a terminal does not fill with one traceback per worker.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
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


def decode_file(path: str, config: DecodeConfig | None = None) -> Decoded:
    """Never raises for a bad file: every failure becomes ``Decoded(status="error", ...)``."""
    config = config or _CONFIG
    try:
        image = read_image(path, max_pixels=config.max_pixels)
        gray = config.spec.resize_gray(image.pixels)
    except NotAnImage as exc:
        from .pipeline import skip_or_error  # DICOMDIR & co. found by the reader, not the scan

        return Decoded(*skip_or_error(path, exc.reason))
    except UnreadableImage as exc:
        return Decoded("error", exc.reason)
    except MemoryError:
        return Decoded("error", "out of memory while decoding")
    except Exception as exc:  # a reader bug must cost one row, not the night's run
        return Decoded("error", f"unexpected {type(exc).__name__} while decoding: {' '.join(str(exc).split())[:200]}")
    meta = image.meta
    view = None
    if config.view_size:
        from .overlay import view_image

        view = view_image(image.pixels, config.view_size)
    return Decoded("ok", None, gray, view, tuple(image.pixels.shape), meta.format,
                   meta.study_instance_uid, meta.series_instance_uid, meta.sop_instance_uid)


def overlay_task(path: str, view: np.ndarray, cam: np.ndarray, original_hw: tuple[int, int],
                 caption: str, footer: str, config: DecodeConfig | None = None) -> str:
    from .overlay import write_overlay

    config = config or _CONFIG
    return write_overlay(path, view, cam, config.spec, original_hw, caption, footer)
