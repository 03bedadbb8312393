"""Option values of ``cxr-deploy batch`` that are not backends or devices (those live in the
artifact registry, :mod:`cxr_deploy.artifacts`). Imports nothing heavy: ``--help`` reads them."""

from __future__ import annotations

from enum import Enum


class CamFor(str, Enum):
    """``--cam-for``: which rows get a Grad-CAM overlay."""

    ALL = "all"
    """Every scored image."""
    POSITIVE = "positive"
    """Only images called positive (``probability >= threshold``)."""


CAM_FOR = tuple(c.value for c in CamFor)


class CamFormat(str, Enum):
    """``--cam-format``: the overlay file format."""

    PNG = "png"
    """Lossless (the default)."""
    JPEG = "jpeg"
    """Quality 90, no chroma subsampling: ~6x faster to write and ~10x smaller."""


CAM_FORMATS = tuple(c.value for c in CamFormat)


class Engine(str, Enum):
    """``--engine``: what runs the batch. Both write the same CSV rows."""

    LOCAL = "local"
    """This machine: decode worker processes and the model in the main process (the default)."""
    RAY = "ray"
    """A Ray cluster (Ray Data): decode tasks and model actors; needs ``pip install 'cxr-deploy[ray]'``."""


ENGINES = tuple(e.value for e in Engine)


class PreprocessOn(str, Enum):
    """``--preprocess-on``: where the per-pixel float work runs (see :mod:`.staging`)."""

    WORKERS = "workers"
    """The decode workers: pixel transforms and the Pillow resize in numpy (the CPU default)."""
    DEVICE = "device"
    """The model's device, batched torch ops; workers only read and decode (the CUDA default)."""


PREPROCESS_ON = tuple(p.value for p in PreprocessOn)
