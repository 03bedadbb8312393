"""``--preprocess-on device``: the main process turns a batch of *stored* samples (what the workers
read and entropy-decoded, uint8/uint16) plus their :class:`~cxr_deploy.imaging.pixel_plan.PixelPlan`
into the model's input, with torch ops on the model's device:

    stored (host) ─► pinned staging buffer (CUDA only, reused) ─► device ─► plan (rescale, VOI,
    inversion, scaling, colour→luma) ─► Pillow-equivalent resize ─► normalize ─► (N, C, S, S)

Pixel transforms: :mod:`cxr_deploy.imaging.pixel_transforms_torch`; geometry:
:mod:`cxr_deploy.preprocessing_torch` (the spec's ``placement()``). Images of one size are resized
together (one ``interpolate`` call per size); ``group_by_size=False`` resizes one by one (kept to
measure: ``benchmarks/batch_profile.py``).
"""

from __future__ import annotations

import warnings
from collections import defaultdict

import numpy as np
import torch

from ..imaging import pixel_transforms_torch as pxt
from ..imaging.pixel_plan import PixelPlan
from ..preprocessing import PreprocessSpec
from ..preprocessing_torch import normalize, resize_gray


class DeviceStager:
    """Callable: ``[(stored, plan), ...]`` → normalized (N, C, S, S) float32 tensor on ``device``."""

    def __init__(self, spec: PreprocessSpec, device: str = "cpu", group_by_size: bool = True):
        self.spec, self.device, self.group_by_size = spec, torch.device(device), group_by_size
        self._pinned: torch.Tensor | None = None  # one reused page-locked byte buffer (CUDA only)
        self._copied: torch.cuda.Event | None = None  # the last uploads out of it are done

    def __call__(self, items: list[tuple[np.ndarray, PixelPlan]]) -> torch.Tensor:
        with torch.inference_mode():
            grays = [pxt.apply_plan(t, plan) for t, (_, plan) in zip(self._upload([s for s, _ in items]), items)]
            size = self.spec.input_size
            out = torch.empty((len(grays), size, size), dtype=torch.float32, device=self.device)
            groups: dict[tuple, list[int]] = defaultdict(list)
            for i, gray in enumerate(grays):
                groups[tuple(gray.shape) if self.group_by_size else (i,)].append(i)
            for members in groups.values():
                resized = resize_gray(torch.stack([grays[i] for i in members]), self.spec)
                out[members] = resized
            return normalize(out, self.spec)

    def _upload(self, arrays: list[np.ndarray]) -> list[torch.Tensor]:
        with warnings.catch_warnings():  # Pillow's arrays are read-only; nothing here writes to them
            warnings.simplefilter("ignore", UserWarning)
            hosts = [torch.from_numpy(_native(a)) for a in arrays]
        if self.device.type != "cuda":
            return hosts
        # Pageable memory is copied to the GPU synchronously through a driver bounce buffer; pinned
        # memory copies asynchronously at full PCIe speed. Pinning costs a lot per allocation, so
        # one buffer is kept and grown, and reused only once its previous uploads are finished.
        total = sum(_aligned(h.numel() * h.element_size()) for h in hosts)
        if self._copied is not None:
            self._copied.synchronize()
        if self._pinned is None or self._pinned.numel() < total:
            self._pinned = torch.empty(int(total * 1.25), dtype=torch.uint8).pin_memory()
        out, offset = [], 0
        for h in hosts:
            nbytes = h.numel() * h.element_size()
            staged = self._pinned[offset:offset + nbytes].view(h.dtype).view(h.shape)
            staged.copy_(h)
            out.append(staged.to(self.device, non_blocking=True))
            offset += _aligned(nbytes)
        self._copied = torch.cuda.Event()
        self._copied.record()
        return out


def _aligned(nbytes: int) -> int:
    return (nbytes + 63) // 64 * 64  # every image starts on a 64-byte boundary (dtype views need it)


def _native(array: np.ndarray) -> np.ndarray:
    """torch.from_numpy needs native byte order and positive strides."""
    if array.dtype.byteorder not in ("=", "|"):
        array = array.astype(array.dtype.newbyteorder("="))
    return np.ascontiguousarray(array)
