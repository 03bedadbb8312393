"""Inference backends: one interface over ONNX Runtime, TorchScript and eager PyTorch.

Every backend takes a float32 batch ``(N, 3, S, S)`` (already normalized by the bundle's
preprocessing spec) and returns ``(probabilities (N, C), cam (N, S/32, S/32), population_score (N,)
or None)`` as numpy arrays — the contract of :class:`cxr_deploy.cam.ClassifierWithCAM` and of every
exported artifact; the score is None for a graph without population statistics (an older bundle).

Choosing a device: ``auto`` uses CUDA only when it really works — for ONNX Runtime that means
the created session lists ``CUDAExecutionProvider`` in ``get_providers()``;
``get_available_providers()`` lists CUDA for the GPU wheel even on machines with no GPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import numpy as np

from .. import artifacts
from ..artifacts import INPUT_NAME, OUTPUT_NAMES, POPULATION_OUTPUT, Device
from ..artifacts import Backend as BackendName
from ..bundle import ModelBundle
from ..errors import BundleError, CxrDeployError, require_torch
from ..quiet import quiet_export

BACKENDS = tuple(b.value for b in BackendName)
DEVICES = tuple(d.value for d in Device)

# File names from the artifact registry (cxr_deploy.artifacts), never spelled out here.
ARTIFACT_ONNX = artifacts.ONNX_FP32.file
ARTIFACT_ONNX_FP16 = artifacts.ONNX_FP16.file
ARTIFACT_ONNX_INT8 = artifacts.ONNX_INT8.file
ARTIFACT_TORCHSCRIPT = artifacts.TORCHSCRIPT.file


class BackendUnavailable(CxrDeployError):
    """The requested backend/device cannot run here (missing artifact, no usable GPU...)."""


@dataclass
class Backend:
    """A ready-to-run model. ``name`` goes into the CSV's ``backend`` column (e.g. ``onnx:cpu``)."""

    name: str
    device: str  # "cpu" | "cuda"
    artifact: str
    run: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray, np.ndarray | None]]
    pin_memory: bool = False
    takes_tensors: bool = False  # run() also accepts a torch tensor already on ``device`` (--preprocess-on device)

    def __call__(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        return self.run(batch)


def default_threads() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))


def open_backend(bundle: ModelBundle, backend: str = "onnx", device: str = "auto", *,
                 threads: int | None = None) -> Backend:
    """Load ``bundle``'s artifact for ``backend`` on ``device``; raises BackendUnavailable/BundleError."""
    if backend not in BACKENDS:
        raise BackendUnavailable(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if device not in DEVICES:
        raise BackendUnavailable(f"unknown device {device!r}; choose one of {', '.join(DEVICES)}")
    threads = threads or default_threads()
    return _OPENERS[BackendName(backend)](bundle, BackendName(backend).value, Device(device).value, threads)


def check_artifact(bundle: ModelBundle, backend: str) -> None:
    """Raise :class:`BackendUnavailable` now if ``bundle`` lacks the artifact ``backend`` loads (or it
    fails its sha256): for a process that does not run the model itself (the Ray engine's driver)."""
    name = {BackendName.ONNX: ARTIFACT_ONNX, BackendName.ONNX_INT8: ARTIFACT_ONNX_INT8,
            BackendName.TORCHSCRIPT: ARTIFACT_TORCHSCRIPT}.get(BackendName(backend))
    if name:
        _require(bundle, name, backend)


# -- ONNX Runtime ----------------------------------------------------------------------------------
def _require(bundle: ModelBundle, name: str, backend: str) -> str:
    if not bundle.has(name):
        hint = "cxr-deploy export BUNDLE --int8" if name == ARTIFACT_ONNX_INT8 else "cxr-deploy export BUNDLE"
        raise BackendUnavailable(
            f"bundle {bundle.directory} has no {name} for --backend {backend} (has: "
            f"{', '.join(sorted(bundle.manifest.artifacts))}); run `{hint}` or choose another --backend")
    return str(bundle.verified_path(name))


def _open_onnx(bundle: ModelBundle, backend: str, device: str, threads: int) -> Backend:
    import onnxruntime as ort

    # The GPU wheel logs a multi-line warning for every provider it cannot load; keep a nightly
    # log readable. Real failures still raise.
    ort.set_default_logger_severity(3)
    want_cuda = device in ("auto", "cuda") and "CUDAExecutionProvider" in ort.get_available_providers()
    if device == "cuda" and not want_cuda:
        raise BackendUnavailable("--device cuda: this onnxruntime build has no CUDA execution provider")
    if want_cuda and device == "auto" and not _cuda_driver_present():
        want_cuda = False  # no driver: don't even try (ORT would log a loader error first)

    if backend == "onnx-int8":
        # Quantized (QDQ/QOperator) graphs are a CPU optimization; the CUDA provider would fall
        # back op by op. Run INT8 on the CPU whatever --device says, unless CUDA was demanded.
        names = [ARTIFACT_ONNX_INT8]
        if device == "auto":
            want_cuda = False
    elif want_cuda and bundle.has(ARTIFACT_ONNX_FP16):
        names = [ARTIFACT_ONNX_FP16, ARTIFACT_ONNX]  # fp16 on GPU; fp32 if CUDA turns out unusable
    else:
        names = [ARTIFACT_ONNX]

    def make_session(path: str, cuda: bool):
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        # No busy-waiting between runs: on a small CPU the spinning threads would steal the cores
        # the decode workers need while the next batch is being prepared.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        providers = (["CUDAExecutionProvider", "CPUExecutionProvider"] if cuda else ["CPUExecutionProvider"])
        try:
            return ort.InferenceSession(path, sess_options=options, providers=providers)
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types
            raise BundleError(f"ONNX Runtime cannot load {path}: {type(exc).__name__}: "
                              f"{' '.join(str(exc).split())[:300]}") from None

    session, used_cuda, path = None, False, None
    if want_cuda:
        path = _require(bundle, names[0], backend)
        ort.set_default_logger_severity(4)  # a failed CUDA provider load is logged as an ERROR
        try:
            session = make_session(path, cuda=True)
        finally:
            ort.set_default_logger_severity(3)
        used_cuda = "CUDAExecutionProvider" in session.get_providers()
        if not used_cuda:
            if device == "cuda":
                raise BackendUnavailable("--device cuda: ONNX Runtime could not start CUDA on this machine "
                                         "(no GPU, or CUDA/cuDNN libraries missing); use --device auto or cpu")
            session = None  # fall back to the CPU, with the fp32 artifact if we picked fp16
    if session is None:
        path = _require(bundle, names[-1], backend)
        session = make_session(path, cuda=False)

    input_names = [i.name for i in session.get_inputs()]
    if input_names != [INPUT_NAME]:
        raise BundleError(f"{path} takes inputs {input_names}, expected [{INPUT_NAME!r}]")
    outputs = list(OUTPUT_NAMES)
    if POPULATION_OUTPUT in {o.name for o in session.get_outputs()}:
        outputs.append(POPULATION_OUTPUT)

    def run(batch: np.ndarray):
        probabilities, cam, *score = session.run(outputs, {INPUT_NAME: np.ascontiguousarray(batch, dtype=np.float32)})
        return (np.asarray(probabilities, dtype=np.float32), np.asarray(cam, dtype=np.float32),
                np.asarray(score[0], dtype=np.float32) if score else None)

    dev = "cuda" if used_cuda else "cpu"
    suffix = "-fp16" if os.path.basename(path) == ARTIFACT_ONNX_FP16 else ""
    return Backend(name=f"{backend}:{dev}{suffix}", device=dev, artifact=os.path.basename(path), run=run)


def likely_device(backend: str, device: str) -> str:
    """A cheap guess of where :func:`open_backend` will run, made before torch or ONNX Runtime are
    imported, so the batch runner can size and start its decode workers while the model loads. The
    runner corrects the pool if the guess was wrong."""
    if device != "auto":
        return device
    if backend == "onnx-int8" or not _cuda_driver_present():
        return "cpu"
    if backend == "onnx":
        import onnxruntime as ort

        return "cuda" if "CUDAExecutionProvider" in ort.get_available_providers() else "cpu"
    return "cuda"


def _cuda_driver_present() -> bool:
    import ctypes

    for name in ("libcuda.so.1", "libcuda.so", "nvcuda.dll"):
        try:
            ctypes.CDLL(name)
            return True
        except OSError:
            continue
    return False


# -- PyTorch -----------------------------------------------------------------------------------------
def torch_cuda_usable() -> bool:
    torch = require_torch("the torch backends")
    try:
        return torch.cuda.is_available() and torch.cuda.device_count() > 0
    except Exception:  # broken driver installs raise instead of returning False
        return False


def _open_torch(bundle: ModelBundle, backend: str, device: str, threads: int) -> Backend:
    torch = require_torch(f"--backend {backend}")  # the one line an inference-only install shows
    cuda = device in ("auto", "cuda") and torch_cuda_usable()
    if device == "cuda" and not cuda:
        raise BackendUnavailable("--device cuda: PyTorch sees no usable CUDA GPU here")
    dev = torch.device("cuda" if cuda else "cpu")
    # On the CPU the model needs the cores. On a GPU this process only stages batches, and idle
    # OpenMP threads spin for a while after each CPU op, stealing the cores the decode workers need.
    torch.set_num_threads(1 if cuda else threads)

    if backend == "torchscript":
        path = _require(bundle, ARTIFACT_TORCHSCRIPT, backend)
        try:
            with quiet_export():  # torch flags jit.load as deprecated; exactly that notice is muted
                module = torch.jit.load(path, map_location=dev)
        except Exception as exc:
            raise BundleError(f"cannot load TorchScript {path}: {type(exc).__name__}: {exc}") from None
        artifact = ARTIFACT_TORCHSCRIPT
    else:

        module = bundle.classifier().to(dev)
        artifact = artifacts.WEIGHTS
    module.eval()
    # On a GPU the eager model runs its backbone in fp16 (autocast; the head and the map stay fp32,
    # see ClassifierWithCAM) with channels-last tensors, which tensor cores want. The traced
    # TorchScript graph is fixed at fp32 and runs as it was exported.
    fp16 = cuda and backend == "torch"
    if fp16:
        module = module.to(memory_format=torch.channels_last)
    if cuda:
        # A first forward loads the CUDA kernels now, while the decode workers start, not on batch
        # one. cuDNN autotuning (cudnn.benchmark) stays off: partial batches come in many sizes and
        # each new size would be re-tuned in the middle of the run.
        with torch.inference_mode(), torch.autocast(dev.type, dtype=torch.float16, enabled=fp16):
            module(torch.zeros((1, *bundle.spec.input_shape), device=dev))

    staging: list[torch.Tensor] = []  # one pinned host buffer, reused: pinning is a costly allocation

    def run(batch):
        if isinstance(batch, torch.Tensor):  # made on the device by --preprocess-on device
            return infer(batch.to(dev, torch.float32))
        x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32))
        if cuda:
            if not staging or staging[0].shape[1:] != x.shape[1:] or staging[0].shape[0] < len(x):
                staging[:] = [torch.empty(x.shape, dtype=torch.float32).pin_memory()]
            host = staging[0][: len(x)]
            host.copy_(x)
            # The outputs' .cpu() below waits for the GPU, so the buffer is free again on return.
            x = host.to(dev, non_blocking=True)
        return infer(x)

    def infer(x):
        if fp16:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), torch.autocast(dev.type, dtype=torch.float16, enabled=fp16):
            probabilities, cam, *score = module(x)
        return (probabilities.float().cpu().numpy(), cam.float().cpu().numpy(),
                score[0].float().cpu().numpy() if score else None)

    name = f"{backend}:{dev.type}" + ("-fp16" if fp16 else "")
    return Backend(name=name, device=dev.type, artifact=artifact, run=run, pin_memory=cuda, takes_tensors=True)


# Which function opens each backend (the registry says which artifact each one serves).
_OPENERS = {BackendName.ONNX: _open_onnx, BackendName.ONNX_INT8: _open_onnx,
            BackendName.TORCHSCRIPT: _open_torch, BackendName.TORCH: _open_torch}
