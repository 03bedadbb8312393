"""TorchScript export (``model.ts``).

TorchScript is deprecated upstream (torch 2.14 emits a ``FutureWarning`` on every ``torch.jit``
trace/save/load) but it is what many existing C++/LibTorch and Triton deployments load, so we still
write it. The deprecation notices are filtered for exactly those calls (see :mod:`.quiet`), not
globally, so a user's own warnings still show.

Tracing (not scripting) is used: :class:`cxr_deploy.cam.ClassifierWithCAM` has no data-dependent
control flow, and every shape it uses is taken from the input at run time, so a trace at batch 2
serves any batch size (the parity gate runs the saved file at batch 1 and 5 to prove it).
"""

from __future__ import annotations

from pathlib import Path

import torch

from cxr_deploy.bundle import fsync_file

from .metadata import EXTRA_FILE, to_json
from cxr_deploy.quiet import quiet_export


def export_torchscript(wrapper: torch.nn.Module, example: torch.Tensor, path: str | Path, metadata: dict) -> dict:
    """Trace ``wrapper`` and save it with the metadata as an extra file; returns manifest info."""
    path = Path(path)
    wrapper = wrapper.eval()
    with quiet_export(), torch.no_grad():
        traced = torch.jit.trace(wrapper, (example,), check_trace=False)
        torch.jit.save(traced, str(path), _extra_files={EXTRA_FILE: to_json(metadata)})
    fsync_file(path)
    return {"kind": "torchscript", "exporter": "torch.jit.trace", "torch_version": torch.__version__}


def load_torchscript(path: str | Path, map_location: str = "cpu") -> torch.jit.ScriptModule:
    with quiet_export():
        return torch.jit.load(str(path), map_location=map_location).eval()

