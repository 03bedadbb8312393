"""GPU backends of the batch runner. Skipped where PyTorch sees no GPU; on a GPU box run
``python -m pytest tests -k cuda``."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cxr_deploy.serving.backends import open_backend
from cxr_deploy.batch.results_file import read_results
from cxr_deploy.bundle import ModelBundle

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none visible to PyTorch)")


@pytest.fixture(scope="module")
def batch_x(tiny_bundle):
    shape = ModelBundle.load(tiny_bundle).spec.input_shape
    return np.random.default_rng(0).normal(0, 1, (5, *shape)).astype(np.float32)


@pytest.mark.parametrize("backend, name, tol", [("torch", "torch:cuda-fp16", 1e-2),
                                                ("torchscript", "torchscript:cuda", 2e-3)])
def test_gpu_backend_matches_the_cpu(tiny_bundle, batch_x, backend, name, tol):
    bundle = ModelBundle.load(tiny_bundle)
    gpu, cpu = open_backend(bundle, backend, "cuda"), open_backend(bundle, backend, "cpu")
    assert gpu.name == name and gpu.device == "cuda" and gpu.pin_memory
    (pg, cg, _), (pc, cc, _) = gpu.run(batch_x), cpu.run(batch_x)
    assert pg.dtype == np.float32 and cg.shape == cc.shape
    assert np.abs(pg - pc).max() < tol  # fp16 (torch) / TF32 convolutions (torchscript) vs fp32
    assert np.abs(cg - cc).max() < 10 * tol


def test_onnx_auto_device_picks_a_working_provider_quietly(tiny_bundle, batch_x, capfd):
    import onnxruntime as ort

    bundle = ModelBundle.load(tiny_bundle)
    model = open_backend(bundle, "onnx", "auto")
    probabilities, *_ = model.run(batch_x)
    reference, *_ = open_backend(bundle, "torch", "cpu").run(batch_x)
    assert np.abs(probabilities - reference).max() < 2e-3
    if "CUDAExecutionProvider" in ort.get_available_providers():
        assert model.name == "onnx:cuda"
    else:  # a CPU-only onnxruntime beside a working GPU: CPU, without a word in the log
        assert model.name == "onnx:cpu"
    assert capfd.readouterr().err.strip() == ""


def test_batch_cli_on_cuda_writes_rows_and_overlays(tiny_bundle, png_folder, tmp_path, cli):
    out = tmp_path / "results.csv"
    proc = cli("batch", png_folder, "--model", tiny_bundle, "--out", out, "--backend", "torch",
               "--device", "cuda", "--cam-dir", tmp_path / "cams", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    rows = read_results(out)
    assert len(rows) == 10 and {r["status"] for r in rows} == {"ok"}
    assert {r["backend"] for r in rows} == {"torch:cuda-fp16"}
    assert len(list((tmp_path / "cams").glob("*.png"))) == 10


def test_device_preprocessing_on_cuda_matches_the_cpu(shared_data):
    from cxr_deploy.batch.device_stage import DeviceStager
    from cxr_deploy.imaging.reader import read_stored
    from cxr_deploy.preprocessing import PreprocessSpec

    images = [read_stored(p) for p in sorted((shared_data / "cxr" / "PNEUMONIA").glob("*.jpeg"))[:16]]
    items = [(im.stored, im.plan) for im in images]
    spec = PreprocessSpec()
    gpu, cpu = DeviceStager(spec, "cuda")(items), DeviceStager(spec, "cpu")(items)
    assert gpu.is_cuda
    assert (gpu.cpu() - cpu).abs().max().item() <= 1e-3


def test_batch_cli_preprocess_on_device_auto_on_cuda(tiny_bundle, png_folder, tmp_path, cli):
    out = tmp_path / "r.csv"
    proc = cli("batch", png_folder, "--model", tiny_bundle, "--out", out, "--backend", "torch", "--device", "cuda",
               "--no-progress")  # --preprocess-on defaults to device on CUDA
    assert proc.returncode == 0, proc.stderr
    assert {r["status"] for r in read_results(out)} == {"ok"}
