"""Training batches prepared on the training device: the loader's workers send each image as the
spec's resized gray in 16 bits; the main process draws the batch's augmentation parameters and
the device turns the whole batch into the model's input (augmentation, normalization, layout) in a
few batched kernels. The workers' output no longer depends on the epoch, so they persist across
epochs (``persistent_workers``) instead of being started again for each one.

Why: on a GPU box the per-image float work in the workers (affine warp, jitter, normalization,
float32 tensors 3x larger than needed on the way) kept an H100 at about 40% of its training step rate
(1,020-1,680 img/s against 3,238 img/s, issue 13). Sending 224² uint8 instead of 3x224² float32
is 12x fewer bytes per image through the loader's queues and the host-to-device copy.

``--augment-on auto`` (the default) chooses the device path on CUDA and the workers on a CPU,
where a "device" would be the same cores that run the workers. Both paths apply the same
parameters, drawn by :func:`~.augment.draw_params`, to the same stored pixels, and give the same
input to 1e-5 (tested), so a run's metrics do not depend on the choice.
"""

from __future__ import annotations

import numpy as np
import torch

from cxr_deploy.imaging import pixel_transforms as px
from cxr_deploy.imaging import pixel_transforms_torch as pxt
from cxr_deploy.preprocessing_torch import normalize

from .augment import augment_batch
from .config import AUGMENT_ON
from .devices import to_device



def augment_on_device(choice: str, device: torch.device) -> bool:
    if choice not in AUGMENT_ON:
        raise ValueError(f"augment_on must be one of {', '.join(AUGMENT_ON)}, got {choice!r}")
    return choice == "device" or (choice == "auto" and device.type == "cuda")


def to_storage(gray: np.ndarray, deep: bool = True) -> np.ndarray:
    """Resized gray [0, 1] float → uint16 (``deep``, what training stores) or uint8.

    Training stores 16 bits whatever the source's depth: the resized image is a float (a resize
    blends neighbouring pixels), and rounding it to the source's 8 bits put training up to 0.5/255
    from what inference (float, never rounded) feeds the model, 8.75e-3 per normalized pixel on a
    real JPEG (issue 20). At 16 bits the step is 0.5/65535 (about 3e-5 normalized), and the image
    is half of float32's bytes."""
    top = 65535 if deep else 255
    dtype = np.uint16 if deep else np.uint8
    return np.rint(np.clip(gray, 0.0, 1.0) * top).astype(dtype)


def from_storage(stored: np.ndarray | torch.Tensor):
    """Inverse of :func:`to_storage`, to float32 [0, 1] (numpy or torch, on whatever device): the
    runtime's bit-depth scaling at 8 or 16 bits."""
    if isinstance(stored, torch.Tensor):
        return pxt.scale_by_bit_depth(stored, 16 if stored.dtype == torch.uint16 else 8)
    return px.scale_by_bit_depth(stored, 16 if stored.dtype == np.uint16 else 8)


def batch_to_device(batch, device: torch.device, dataset) -> tuple[torch.Tensor, torch.Tensor]:
    """A loader batch → (model input, labels) on ``device``, whichever path made the batch: float
    inputs prepared in the workers, or stored 8/16-bit pixels whose augmentation parameters are
    drawn here (:meth:`CXRDataset.params`: the same draws the workers would make)."""
    x, y, index = batch
    if x.is_floating_point():  # prepared in the workers
        return to_device(x, device), y.to(device, non_blocking=True)
    gray = from_storage(x.to(device, non_blocking=True))
    if dataset.augment is not None:
        params = torch.from_numpy(np.stack([dataset.params(int(i)) for i in index]))
        gray = augment_batch(gray, params, dataset.spec.pad_value)
    x = normalize(gray, dataset.spec)  # the runtime's device normalization (preprocessing_torch)
    return to_device(x.contiguous(), device), y.to(device, non_blocking=True)
