"""Where and how numerically a run happens: device choice, mixed precision, memory layout, seeding."""

from __future__ import annotations

import contextlib
import os
import random
import sys
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it to be deterministic
        _deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    else:
        _deterministic_algorithms(False)  # a previous run in this process may have set it
        torch.backends.cudnn.deterministic = False
        torch.backends.cudnn.benchmark = True


def _deterministic_algorithms(mode: bool, warn_only: bool = False) -> None:
    """``torch.use_deterministic_algorithms``, without importing TorchInductor when nothing has.

    torch 2.14's function imports ``torch._inductor.config`` to set Inductor's own flag as well: 1.5 s
    of imports at the start of every training process here (5 s on a loaded 2-core machine), for a
    compiler training never uses. So the flag is set through the private ``torch._C`` call the
    public function makes; once Inductor is loaded (someone compiles), the public function sets both.
    ``tests/test_private_apis.py`` checks both flags, and that Inductor stays unloaded."""
    if "torch._inductor.config" in sys.modules or not hasattr(torch._C, "_set_deterministic_algorithms"):
        torch.use_deterministic_algorithms(mode, warn_only=warn_only)
    else:
        torch._C._set_deterministic_algorithms(mode, warn_only=warn_only)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda asked for, but PyTorch sees no CUDA GPU here")
    return device


def memory_format(device: torch.device) -> torch.memory_format:
    """Channels-last (NHWC) on CUDA, where tensor-core convolutions (fp16 under autocast, TF32
    otherwise) want it and NCHW costs a transpose around every convolution; the default elsewhere."""
    return torch.channels_last if device.type == "cuda" else torch.contiguous_format


def place_model(model: nn.Module, device: torch.device) -> nn.Module:
    """The model onto ``device`` in the layout batches there use (see :func:`memory_format`)."""
    return model.to(device, memory_format=memory_format(device))


def to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """An image batch onto ``device`` in the layout the model there uses."""
    return x.to(device, non_blocking=True, memory_format=memory_format(device))


def cpu_has_native_bf16() -> bool:
    cpu = getattr(torch, "cpu", None)
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(cpu, c, lambda: False)()) for c in checks)


@dataclass(frozen=True)
class Precision:
    """Autocast settings: CUDA → float16 with a GradScaler; CPU → bfloat16, no scaler needed (bf16
    has float32's exponent range, so gradients do not underflow)."""

    device_type: str
    dtype: torch.dtype | None  # None: full float32

    @property
    def name(self) -> str:
        return {None: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[self.dtype]

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.dtype)

    def grad_scaler(self) -> torch.amp.GradScaler:
        return torch.amp.GradScaler(self.device_type, enabled=self.dtype == torch.float16)


def resolve_precision(amp: str | bool, device: torch.device) -> Precision:
    """``amp``: "auto" (CUDA fp16; CPU bf16 only with native bf16 instructions, because emulated
    bf16 is slower than fp32), "on"/True, "off"/False."""
    mode = {True: "on", False: "off"}.get(amp, amp)
    if mode == "off":
        return Precision(device.type, None)
    if device.type == "cuda":
        return Precision("cuda", torch.float16)
    if device.type == "cpu" and (mode == "on" or cpu_has_native_bf16()):
        return Precision("cpu", torch.bfloat16)
    return Precision(device.type, None)

