"""ONNX export (``model.onnx``, fp32) and the fp16 variant (``model.fp16.onnx``).

Exporter choice: torch 2.14's default, the ``torch.export``-based ("dynamo") exporter. It gives a
clean graph (BatchNorm folded into Conv, no Identity nodes), one self-contained file when asked
(``external_data=False``; the model is ~100 MB, far under protobuf's 2 GB limit), a named dynamic
batch axis from ``dynamic_shapes`` and opsets up to 23. The legacy TorchScript-based exporter also
produces a correct model here, but it is deprecated upstream (removal announced) and capped at
opset 20; it stays selectable (``exporter="legacy"``) for older runtimes or if the dynamo exporter
ever fails on a future torch. Both are checked by the same parity gate.

Opset: :data:`DEFAULT_OPSET` (20) is the newest opset every onnxruntime from 1.17 on executes,
so a model exported today still loads on the older runtimes hospital inference boxes tend to run;
``--opset`` raises it (the dynamo exporter supports up to 23).
"""

from __future__ import annotations

import copy
import io
from cxr_deploy.errors import CxrDeployError
from pathlib import Path

import onnx
import torch
from torch import nn

from cxr_deploy.bundle import fsync_file
from cxr_deploy.artifacts import INPUT_NAME, output_names
from cxr_deploy.cam import ClassifierWithCAM

from .metadata import onnx_metadata_props
from cxr_deploy.quiet import quiet_export

DEFAULT_OPSET = 20
EXPORTERS = ("dynamo", "legacy")
BATCH_AXIS = "N"
MAX_BATCH = 4096  # upper bound torch.export needs for the symbolic batch; no runtime meaning

class OnnxExportError(CxrDeployError, RuntimeError):
    pass


def export_onnx(wrapper: torch.nn.Module, example: torch.Tensor, path: str | Path, metadata: dict, *,
                opset: int | None = None, exporter: str = "dynamo") -> dict:
    """Export ``wrapper`` to one self-contained ONNX file with metadata; returns manifest info."""
    opset = int(opset or DEFAULT_OPSET)
    if exporter not in EXPORTERS:
        raise OnnxExportError(f"unknown ONNX exporter {exporter!r} (choose from {EXPORTERS})")
    wrapper = wrapper.eval()
    outputs = list(output_names(getattr(wrapper, "scores_population", False)))
    with quiet_export(), torch.no_grad():
        if exporter == "dynamo":
            batch = torch.export.Dim(BATCH_AXIS, min=1, max=MAX_BATCH)
            program = torch.onnx.export(
                wrapper, (example,), None, input_names=[INPUT_NAME], output_names=outputs,
                dynamic_shapes=({0: batch},), opset_version=opset, dynamo=True, external_data=False,
                optimize=True, verbose=False)
            model = program.model_proto
        else:
            buffer = io.BytesIO()
            torch.onnx.export(
                wrapper, (example,), buffer, input_names=[INPUT_NAME], output_names=outputs,
                dynamic_axes={name: {0: BATCH_AXIS} for name in (INPUT_NAME, *outputs)},
                opset_version=opset, dynamo=False, do_constant_folding=True)
            model = onnx.load_model_from_string(buffer.getvalue())
    info = finalize_onnx(model, path, metadata)
    return {"kind": "onnx", "precision": "fp32", "opset": opset,
            "exporter": f"torch.onnx.export(dynamo={exporter == 'dynamo'})", "torch_version": torch.__version__,
            **info}


def finalize_onnx(model: onnx.ModelProto, path: str | Path, metadata: dict) -> dict:
    """Embed metadata, check the model, save it as one file; returns manifest info."""
    set_metadata(model, metadata)
    model.doc_string = (f"cxr-deploy {metadata['architecture']} {'/'.join(metadata['class_names'])} classifier "
                        f"with positive-class CAM; input '{INPUT_NAME}' float32 NCHW, outputs "
                        f"{', '.join(metadata['outputs'])}; see metadata_props['cxr_deploy']")
    onnx.checker.check_model(model)
    path = Path(path)
    onnx.save_model(model, str(path), save_as_external_data=False)
    fsync_file(path)
    check_self_contained(path)
    return {"onnx_version": onnx.__version__, "ir_version": int(model.ir_version),
            **describe_io(model)}


def set_metadata(model: onnx.ModelProto, metadata: dict) -> None:
    props = onnx_metadata_props(metadata)
    keep = [p for p in model.metadata_props if p.key not in props]
    del model.metadata_props[:]
    model.metadata_props.extend(keep)
    for key, value in props.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value


def describe_io(model: onnx.ModelProto) -> dict:
    """Input/output names, dtypes and (symbolic) shapes as recorded in the graph."""
    def shape(value):
        return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]

    def dtype(value):
        return onnx.helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type).name

    inputs, outputs = list(model.graph.input), list(model.graph.output)
    return {
        "input_name": inputs[0].name,
        "output_names": [o.name for o in outputs],
        "io_dtype": sorted({dtype(v) for v in inputs + outputs})[0] if len({dtype(v) for v in inputs + outputs}) == 1
        else ",".join(dtype(v) for v in inputs + outputs),
        "input_shape": shape(inputs[0]),
        "output_shapes": {o.name: shape(o) for o in outputs},
    }


def check_self_contained(path: Path) -> None:
    """Refuse a model whose weights live in a side file (it would break when copied alone)."""
    model = onnx.load(str(path), load_external_data=False)
    external = [t.name for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    if external:
        raise OnnxExportError(f"{path.name} references external data for {len(external)} tensors; "
                              "expected one self-contained file")


class _HalfBody(nn.Module):
    """A convolutional part in fp16 between two casts; the head stays float32."""

    def __init__(self, part: nn.Module):
        super().__init__()
        self.body = copy.deepcopy(part).half()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x.half()).float()


def export_onnx_fp16(wrapper: ClassifierWithCAM, example: torch.Tensor, path: str | Path, metadata: dict, *,
                     opset: int | None = None, exporter: str = "dynamo") -> dict:
    """fp16 ONNX for GPU serving with float32 inputs and outputs (keep-io-types semantics).

    Exported from torch, not converted afterwards: the same :class:`ClassifierWithCAM` forward with
    ``trunk`` and ``layer4`` (all convolutions, 99.9% of the FLOPs) run in fp16, each between a Cast of
    its input and a Cast of its output back to float32 (lossless between the two: the trunk's output
    is fp16 already). Pooling, the linear head, softmax, the population score and the
    CAM normalization stay float32: its 1e-12 floor would underflow to 0 in fp16 and an all-zero map
    would divide 0 by 0. Callers feed the same float32 tensor to every variant. (onnxruntime's
    ``float16.convert_float_to_float16`` was tried first; on this graph it emits duplicate Cast
    output names, which the ONNX checker rejects.)
    """
    half = copy.deepcopy(wrapper).eval()
    half.trunk, half.layer4 = _HalfBody(wrapper.trunk), _HalfBody(wrapper.layer4)
    info = export_onnx(half, example, path, metadata, opset=opset, exporter=exporter)
    return {**info, "precision": "fp16",
            "float32_parts": "input/output, pooling, linear head, softmax, CAM, population score"}
