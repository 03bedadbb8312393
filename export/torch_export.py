"""torch.export program (``model.pt2``), written with ``--torch-export``.

For PyTorch-native serving without TorchScript: ``torch.export.load(path).module()`` gives a module
with the same input and outputs as every other artifact (probabilities, CAM), and the program is
what AOTInductor compiles ahead of time. The batch axis is symbolic, like the ONNX file's, and the
same metadata document travels inside as an extra file (``cxr_deploy.json``), readable without
loading the program (:func:`cxr_deploy.export.metadata.read_archive_metadata`).
"""

from __future__ import annotations

from pathlib import Path

import torch

from cxr_deploy.bundle import fsync_file

from .metadata import EXTRA_FILE, to_json
from .onnx_export import BATCH_AXIS, MAX_BATCH


def export_program(wrapper: torch.nn.Module, example: torch.Tensor, path: str | Path, metadata: dict) -> dict:
    """Export ``wrapper`` with a dynamic batch axis and save it with the metadata; returns manifest info."""
    path = Path(path)
    batch = torch.export.Dim(BATCH_AXIS, min=1, max=MAX_BATCH)
    with torch.no_grad():
        program = torch.export.export(wrapper.eval(), (example,), dynamic_shapes=({0: batch},))
    torch.export.save(program, str(path), extra_files={EXTRA_FILE: to_json(metadata)})
    fsync_file(path)
    return {"kind": "torch.export", "exporter": "torch.export.export", "torch_version": torch.__version__}


def load_program(path: str | Path) -> torch.nn.Module:
    return torch.export.load(str(path)).module()
