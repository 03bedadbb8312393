"""Where the per-pixel float work of a batch runs (``batch --preprocess-on``), and how a batch of
decoded files becomes the model's input.

- ``workers``: each worker runs the whole float pipeline (pixel transforms, Pillow resize) and
  sends a 224² float32 gray; the main process stacks and normalizes (numpy).
- ``device``: workers send the stored samples + a :class:`~cxr_deploy.imaging.pixel_plan.PixelPlan`;
  the main process runs plan, resize and normalization as batched torch ops on the model's device
  (:mod:`.device_stage`).

Default (``None``): ``device`` when the backend runs on CUDA, ``workers`` otherwise. Why workers on
the CPU: on 2 cores the main process also runs the model, so moving the float work there only
moves it onto the busiest process, and the stored samples are bigger to send than the 224² gray
(2048² uint16: 8 MiB vs 196 KiB); measured in benchmarks/batch_profile.py (README, Throughput).
This module imports no torch unless the device path is used (``batch --help`` stays light).
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from ..errors import TRAIN_EXTRA, torch_is_missing
from .choices import PREPROCESS_ON
from .inputs import BatchUsageError



def preprocess_mode(requested: str | None, device: str, spec) -> str:
    """The mode for a backend on ``device`` (``cpu`` | ``cuda``); raises BatchUsageError when
    ``device`` was asked for and the bundle's spec cannot run there."""
    if requested not in (None, *PREPROCESS_ON):
        raise BatchUsageError(f"--preprocess-on must be one of {', '.join(PREPROCESS_ON)}, got {requested!r}")
    if requested == "workers" or (requested is None and device != "cuda"):
        return "workers"
    try:
        from ..preprocessing_torch import device_support
    except ImportError as exc:  # an inference-only install (no torch): the workers preprocess
        if not torch_is_missing(exc):
            raise
        if requested == "device":
            raise BatchUsageError(f"--preprocess-on device needs PyTorch, which is not installed here: {TRAIN_EXTRA}") from None
        return "workers"
    reason = device_support(spec)
    if reason is None:
        return "device"
    if requested == "device":
        raise BatchUsageError(f"--preprocess-on device: the bundle's preprocessing cannot run on the device: {reason}; "
                              "use --preprocess-on workers")
    return "workers"


def make_stager(mode: str, spec, backend, ring=None) -> Callable[[list], object]:
    """``stage(decoded results) -> model input``: a numpy batch, or a torch tensor on the backend's
    device when the backend takes tensors (torch, torchscript).

    Results whose samples are in a shared-memory slot of ``ring`` (:mod:`.shm`) are read in place
    and their slots freed once the batch is staged. The stager's output never aliases its input:
    on CUDA the samples are first copied into its reused pinned buffer (the copy-out), on the CPU
    the float conversion of the pixel plan is the first op and reads the slot directly, so a
    separate copy-out would only add a memcpy per image."""
    if mode == "workers":
        return lambda results: spec.normalize(np.stack([r.gray for r in results]))
    from .device_stage import DeviceStager

    stager = DeviceStager(spec, backend.device)
    takes_tensors = getattr(backend, "takes_tensors", False)

    def stage(results):
        try:
            batch = stager([(r.stored if r.shm is None else ring.view(r.shm), r.plan) for r in results])
        finally:
            for r in results:
                if r.shm is not None:
                    ring.release(r.shm.index)
        return batch if takes_tensors else batch.cpu().numpy()

    return stage
