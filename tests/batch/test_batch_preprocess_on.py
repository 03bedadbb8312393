"""``batch --preprocess-on device``: workers send stored samples + a pixel plan, the main process
does the float work with torch (CPU tensors here; tests/batch/test_batch_cuda.py runs it on a GPU).
Same rows and the same decisions as the worker path on the real shared images."""

from __future__ import annotations

import pytest

import cxr_deploy
from cxr_deploy.batch.inputs import BatchUsageError
from cxr_deploy.batch.results_file import read_results
from cxr_deploy.batch.staging import preprocess_mode
from cxr_deploy.eligibility import ChestFilter
from cxr_deploy.preprocessing import PreprocessSpec
from tests.support import dicom_sample


def _rows(inputs, tiny_bundle, out, mode):
    summary = cxr_deploy.run_batch(inputs, tiny_bundle, out, workers=1,
                                   preprocess_on=mode, eligibility=ChestFilter.build("", "", False, False))
    assert summary.counts["ok"] > 100
    return {r["path"]: r for r in read_results(out)}


def test_device_path_decides_like_the_worker_path_on_every_kind_of_real_image(shared_data, dicom_manifest,
                                                                              tiny_bundle, tmp_path):
    """A shared DICOM of every kind of stored pixels, every one that does not decode, and 40 CXRs
    (no eligibility filter). Measured on all 200 CXRs and every shared DICOM: identical statuses,
    errors and labels; max |Δ probability| 1e-6."""
    inputs = dicom_sample(dicom_manifest, shared_data / "dicom") + sorted((shared_data / "cxr").glob("*/*.*"))[::5]
    workers = _rows(inputs, tiny_bundle, tmp_path / "workers.csv", "workers")
    device = _rows(inputs, tiny_bundle, tmp_path / "device.csv", "device")
    assert workers.keys() == device.keys()
    worst = 0.0
    for path, row in workers.items():
        other = device[path]
        assert (row["status"], row["error"], row["predicted_label"]) == \
               (other["status"], other["error"], other["predicted_label"]), path
        if row["status"] == "ok":
            worst = max(worst, abs(float(row["probability"]) - float(other["probability"])))
    print(f"\n{len(workers)} rows, max |Δp| {worst:.1e}")
    assert worst <= 2e-6


@pytest.mark.parametrize("backend", ["onnx", "torch"])
def test_cli_device_path_with_overlays(tiny_bundle, png_folder, tmp_path, cli, backend):
    out, cams = tmp_path / "r.csv", tmp_path / "cams"
    proc = cli("batch", png_folder, "--model", tiny_bundle, "--out", out, "--backend", backend, "-j", "1",
               "--preprocess-on", "device", "--cam-dir", cams, "--no-progress")
    assert proc.returncode == 0, proc.stderr
    rows = read_results(out)
    assert len(rows) == 10 and {r["status"] for r in rows} == {"ok"}
    assert len(list(cams.glob("*.png"))) == 10


def test_mode_choice():
    spec = PreprocessSpec()
    assert preprocess_mode(None, "cpu", spec) == "workers"
    assert preprocess_mode(None, "cuda", spec) == "device"
    assert preprocess_mode("device", "cpu", spec) == "device"
    assert preprocess_mode("workers", "cuda", spec) == "workers"
    crop = PreprocessSpec(resize="center_crop")
    assert preprocess_mode(None, "cuda", crop) == "workers"  # auto: falls back quietly
    with pytest.raises(BatchUsageError, match="--preprocess-on device: .*center_crop"):
        preprocess_mode("device", "cpu", crop)
    with pytest.raises(BatchUsageError, match="must be one of"):
        preprocess_mode("gpu", "cpu", spec)
