"""`cxr-deploy export` end to end on a random-init model (64 px input to stay fast).

One export (TorchScript + ONNX fp32/fp16/INT8, parity on the repository's real sample images and
DICOMs) is shared by the tests of this module; tests that change a bundle work on a copy.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner

from cxr_deploy.artifacts import INPUT_NAME, OUTPUT_NAMES
from cxr_deploy.bundle import ModelBundle, save_bundle
from cxr_deploy.cam import ClassifierWithCAM
from cxr_deploy.cli import main
from cxr_deploy.errors import BundleError
from cxr_deploy.export import (INT8_REPORT, ONNX_FP16, ONNX_FP32, ONNX_INT8, PARITY_REPORT, TORCH_EXPORT,
                               TORCHSCRIPT, read_archive_metadata, read_onnx_metadata)
from cxr_deploy.export.parity import onnx_runner, program_runner, torchscript_runner
from cxr_deploy.model import build_model
from cxr_deploy.preprocessing import PreprocessSpec

from tests.support import built_once

REPO = Path(__file__).resolve().parents[2]
SAMPLES = REPO / "samples"
SIZE = 64
MODELS = (TORCHSCRIPT, TORCH_EXPORT, ONNX_FP32, ONNX_FP16, ONNX_INT8)


def _export(*args: str):
    return CliRunner().invoke(main, ["export", *map(str, args)], catch_exceptions=False)


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    """A random-init bundle exported every way, once per test session (every worker shares it)."""

    def build(folder: Path) -> None:
        torch.manual_seed(0)
        bundle = folder / "bundle"
        save_bundle(bundle, build_model(None), spec=PreprocessSpec(input_size=SIZE))
        # A random-init model scores every image about the same, so its AUC is noise: the INT8 gate's
        # thresholds are opened here and its arithmetic is checked in test_int8_gate_report instead.
        result = _export(bundle, "--torch-export", "--fp16", "--int8", "--calibration", SAMPLES / "dicom",
                         "--int8-eval", SAMPLES / "images", "--int8-min-agreement", "0", "--int8-max-auc-delta", "1",
                         "--parity-images", SAMPLES)
        assert result.exit_code == 0, result.output

    return built_once(tmp_path_factory, "export-cli-bundle", build) / "bundle"


@pytest.fixture(scope="module")
def loaded(exported) -> ModelBundle:
    return ModelBundle.load(exported)  # verifies every sha256 once


@pytest.fixture(scope="module")
def runners(exported) -> dict:
    """Each artifact loaded once (TorchScript module / onnxruntime CPU session) from the bundle."""
    return {TORCHSCRIPT: torchscript_runner(exported / TORCHSCRIPT), TORCH_EXPORT: program_runner(exported / TORCH_EXPORT),
            **{name: onnx_runner(exported / name) for name in (ONNX_FP32, ONNX_FP16, ONNX_INT8)}}


def _copy(bundle: Path, tmp_path: Path, edited: tuple[str, ...] = ()) -> Path:
    """The shared bundle as hard links (the tool replaces the files it changes, never edits them),
    with a private copy of each file the test itself edits in place. A full copy wrote 400 MB a test."""
    target = tmp_path / "copy"
    shutil.copytree(bundle, target, copy_function=os.link)
    for name in edited:
        (target / name).unlink()
        shutil.copyfile(bundle / name, target / name)
    return target


def test_export_registers_every_artifact_with_its_description(exported):
    bundle = ModelBundle.load(exported)  # verifies every sha256
    artifacts = bundle.manifest.artifacts
    for name, kind, precision in ((TORCHSCRIPT, "torchscript", "fp32"), (TORCH_EXPORT, "torch.export", "fp32"),
                                  (ONNX_FP32, "onnx", "fp32"),
                                  (ONNX_FP16, "onnx", "fp16"), (ONNX_INT8, "onnx", "int8")):
        info = artifacts[name]
        assert (info["kind"], info["precision"]) == (kind, precision), name
        assert info["input_name"] == INPUT_NAME and info["output_names"] == list(OUTPUT_NAMES)
        assert info["io_dtype"] == "float32", name  # fp16/int8 keep float32 inputs and outputs
        assert info["torch_version"] == torch.__version__ and info["exporter"]
        assert info["parity"] == "passed"
        if kind == "onnx":
            assert info["opset"] >= 17 and info["onnx_version"] == onnx.__version__
            assert info["input_shape"][0] == "N"  # dynamic batch axis
    assert artifacts[PARITY_REPORT]["passed"] is True
    report = json.loads(bundle.verified_path(PARITY_REPORT).read_text())
    assert report["passed"] and set(report["artifacts"]) == set(MODELS)
    assert report["inputs"]["images"]["count"] == 8 and report["inputs"]["random"]["batch_sizes"] == [1, 5]
    assert any(p.endswith(".dcm") for p in report["inputs"]["images"]["paths"])  # real DICOMs too
    # Self-contained: nothing in the bundle but the registered files (no ONNX external-data files).
    assert {p.name for p in exported.iterdir()} == set(artifacts) | {"manifest.json"}


@pytest.mark.parametrize("batch", [1, 5])
def test_round_trip_agrees_across_runtimes(loaded, runners, batch):
    bundle = loaded
    x = np.random.default_rng(batch).standard_normal((batch, 3, SIZE, SIZE)).astype(np.float32)
    with torch.no_grad():
        p_ref, c_ref = (t.numpy() for t in ClassifierWithCAM(bundle.build_model(), 1)(torch.from_numpy(x)))
    assert p_ref.shape == (batch, 2) and c_ref.shape == (batch, SIZE // 32, SIZE // 32)
    np.testing.assert_allclose(p_ref.sum(1), 1.0, atol=1e-6)  # probabilities, not logits
    for name, prob_tol, cam_tol in ((TORCHSCRIPT, 1e-5, 1e-5), (TORCH_EXPORT, 1e-5, 1e-5), (ONNX_FP32, 1e-5, 1e-4),
                                    (ONNX_FP16, 1e-2, 5e-2)):
        p, c = runners[name](x)
        assert p.dtype == np.float32 and c.dtype == np.float32
        np.testing.assert_allclose(p, p_ref, atol=prob_tol, rtol=0, err_msg=name)
        np.testing.assert_allclose(c, c_ref, atol=cam_tol, rtol=0, err_msg=name)
    p8, c8 = runners[ONNX_INT8](x)
    assert p8.shape == p_ref.shape and c8.shape == c_ref.shape and np.isfinite(p8).all()


def test_exported_cam_equals_autograd_gradcam(loaded, runners):
    """Grad-CAM by autograd on the eager model == the CAM output of every fp32 artifact."""
    bundle = loaded
    model = bundle.build_model()
    from cxr_deploy.export.inputs import collect_images

    x = collect_images([SAMPLES / "images"], bundle.spec).tensors  # real radiographs
    captured = {}

    def keep(module, args, output):
        output.retain_grad()
        captured["a"] = output

    handle = model.layer4.register_forward_hook(keep)
    model(torch.from_numpy(x))[:, bundle.manifest.positive_index].sum().backward()
    handle.remove()
    a = captured["a"]
    alpha = a.grad.mean(dim=(2, 3), keepdim=True)  # Grad-CAM channel weights
    gradcam = torch.relu((alpha * a).sum(1)).detach()
    gradcam = (gradcam / gradcam.flatten(1).amax(1).clamp_min(1e-12)[:, None, None]).numpy()
    assert (gradcam.reshape(len(x), -1).max(1) > 0).any()  # not a vacuous all-zero comparison
    for name in (TORCHSCRIPT, TORCH_EXPORT, ONNX_FP32):
        _, cam = runners[name](x)
        np.testing.assert_allclose(cam, gradcam, atol=1e-5, rtol=0, err_msg=name)


def test_metadata_is_embedded_in_every_artifact(exported, loaded):
    bundle = loaded
    for name in MODELS:
        path = exported / name
        meta = read_archive_metadata(path) if name in (TORCHSCRIPT, TORCH_EXPORT) else read_onnx_metadata(path)
        assert meta["class_names"] == ["NORMAL", "PNEUMONIA"] and meta["positive_class"] == "PNEUMONIA"
        assert meta["threshold"] == 0.5 and meta["model_id"] == bundle.model_id
        assert PreprocessSpec.from_dict(meta["preprocessing"]) == bundle.spec
        assert meta["precision"] == bundle.manifest.artifacts[name]["precision"]
        assert meta["input"]["name"] == INPUT_NAME and set(meta["outputs"]) == set(OUTPUT_NAMES)
        assert "softmax" in meta["outputs"]["probabilities"]["semantics"]
    # The documented ways a consumer reads it without cxr-deploy:
    props = {p.key: p.value for p in onnx.load(str(exported / ONNX_FP32), load_external_data=False).metadata_props}
    assert json.loads(props["class_names"]) == ["NORMAL", "PNEUMONIA"] and props["positive_class"] == "PNEUMONIA"
    assert PreprocessSpec.from_json(props["preprocessing"]) == bundle.spec
    extra = {"cxr_deploy.json": ""}
    with pytest.warns(FutureWarning):  # torch's own deprecation notice; our loader filters it
        torch.jit.load(str(exported / TORCHSCRIPT), _extra_files=extra)
    assert json.loads(extra["cxr_deploy.json"])["model_id"] == bundle.model_id
    extra = {"cxr_deploy.json": ""}
    torch.export.load(str(exported / TORCH_EXPORT), extra_files=extra)
    assert json.loads(extra["cxr_deploy.json"])["model_id"] == bundle.model_id


def test_int8_gate_report(exported):
    report = json.loads((exported / INT8_REPORT).read_text())
    from sklearn.metrics import roc_auc_score

    images = report["images"]
    assert report["n"] == len(images) == 8 and report["n_positive"] == 4
    labels = [i["label"] == 1 for i in images]
    p32, p8 = np.array([i["p_fp32"] for i in images]), np.array([i["p_int8"] for i in images])
    assert report["label_agreement"] == pytest.approx(((p32 >= 0.5) == (p8 >= 0.5)).mean())
    assert report["auc_fp32"] == pytest.approx(roc_auc_score(labels, p32))
    assert report["delta_auc"] == pytest.approx(roc_auc_score(labels, p8) - roc_auc_score(labels, p32))
    assert report["settings"]["activation_type"] == "QUInt8" and report["calibration"]["count"] == 4
    from cxr_deploy.export.quantize import cpu_has_vnni

    assert report["settings"]["reduce_range"] is (not cpu_has_vnni())  # resolved, recorded
    model = onnx.load(str(exported / ONNX_INT8))
    assert any(n.op_type == "QuantizeLinear" for n in model.graph.node)
    assert report["max_prob_sum_error"] <= 1e-4
    corr = report["cam_correlation"]
    assert -1 <= corr["min"] <= corr["p10"] <= corr["median"] <= 1 and corr["n"] <= report["n"]
    assert ModelBundle.load(exported).manifest.artifacts[ONNX_INT8]["cam_correlation"] == corr


def test_int8_model_keeps_head_softmax_and_cam_in_float(exported):
    """Only the backbone is quantized: probabilities sum to 1 and are not on a k/255 grid (0.1's
    INT8 model had its softmax inside the quantized part: rows summed to 254/255)."""
    model = onnx.load(str(exported / ONNX_INT8))
    producers = {o: n for n in model.graph.node for o in n.output}
    dequantized = set()
    for op in ("ReduceMean", "Gemm", "Softmax", "Einsum", "ReduceMax", "Div"):
        node = next(n for n in model.graph.node if n.op_type == op)
        assert not node.op_type.startswith("QLinear")
        dequantized |= {i for i in node.input if i in producers and producers[i].op_type == "DequantizeLinear"}
    assert len(dequantized) == 1  # only the backbone's output (read by the pooling and the CAM)
    assert all(n.op_type != "QuantizeLinear" or n.input[0] != "linear" for n in model.graph.node)
    p, cam = onnx_runner(exported / ONNX_INT8)(np.random.default_rng(0).standard_normal((16, 3, SIZE, SIZE),
                                                                                        dtype=np.float32))
    assert np.abs(p.sum(axis=1) - 1).max() < 1e-5
    steps = p * 255
    assert np.abs(steps - np.round(steps)).max() > 1e-3  # not quantized probabilities
    assert np.isclose(cam.reshape(len(cam), -1).max(axis=1), 1, atol=1e-5).any()


def test_tampered_artifact_is_refused(exported, tmp_path):
    bundle = _copy(exported, tmp_path, edited=(ONNX_FP32,))
    with open(bundle / ONNX_FP32, "r+b") as fh:
        fh.seek(-100, os.SEEK_END)
        byte = fh.read(1)
        fh.seek(-100, os.SEEK_END)
        fh.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(BundleError, match="sha256"):
        ModelBundle.load(bundle)
    result = _export("--check", bundle)
    assert result.exit_code == 2 and "sha256" in result.output


def test_perturbed_model_fails_the_parity_gate(exported, tmp_path):
    """A wrong but correctly registered ONNX file (hashes match) is caught by `export --check`."""
    bundle_dir = _copy(exported, tmp_path, edited=(ONNX_FP32,))
    model = onnx.load(str(bundle_dir / ONNX_FP32))
    conv = next(n for n in model.graph.node if n.op_type == "Conv")
    weight = next(t for t in model.graph.initializer if t.name == conv.input[1])
    array = onnx.numpy_helper.to_array(weight).copy()
    array.flat[0] += 0.5
    weight.CopyFrom(onnx.numpy_helper.from_array(array, weight.name))
    onnx.save_model(model, str(bundle_dir / ONNX_FP32))
    bundle = ModelBundle.load(bundle_dir, verify=False)
    info = {k: v for k, v in bundle.manifest.artifacts[ONNX_FP32].items() if k not in ("sha256", "bytes")}
    bundle.add_artifact(ONNX_FP32, **info)
    ModelBundle.load(bundle_dir)  # hashes are consistent again: only parity can tell

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = _export("--check", bundle_dir)
    assert result.exit_code == 1, result.output
    assert "FAIL model.onnx" in result.stderr and "check FAILED for model.onnx" in result.stderr
    # Only the perturbed file fails; every other artifact re-validates (fresh-export check passes).
    table = {line.split()[0]: line.split()[-1] for line in result.stdout.splitlines() if line.startswith("model.")}
    assert table == {TORCHSCRIPT: "PASS", TORCH_EXPORT: "PASS", ONNX_FP32: "FAIL", ONNX_FP16: "PASS",
                     ONNX_INT8: "PASS"}, result.stdout
    # Upstream TorchScript/ONNX deprecation notices stay off the user's terminal.
    assert not [w for w in caught if "deprecat" in str(w.message).lower()], [str(w.message) for w in caught]


def report_passed(bundle: ModelBundle, name: str) -> bool:
    return json.loads(bundle.verified_path(PARITY_REPORT).read_text())["artifacts"][name]["passed"]


def test_failed_gate_leaves_no_failing_artifact(exported, tmp_path):
    """INT8 gated on a one-class folder cannot pass (AUC undefined): not kept, exit 1, report kept."""
    bundle_dir = _copy(exported, tmp_path)
    normal_only = tmp_path / "eval"
    shutil.copytree(SAMPLES / "images" / "NORMAL", normal_only / "NORMAL")
    # A crashed export's staging folder (ours, marked) and a folder of the user's with a similar name.
    (bundle_dir / ".export-crashed").mkdir()
    (bundle_dir / ".export-crashed" / ".cxr-deploy-staging").write_text("")
    (bundle_dir / ".export-notes").mkdir()
    (bundle_dir / ".export-notes" / "mine.txt").write_text("keep")
    # The legacy (TorchScript-based) ONNX exporter: much faster, and its code path gets covered too.
    result = _export(bundle_dir, "--no-torchscript", "--int8", "--calibration", SAMPLES / "dicom",
                     "--int8-eval", normal_only, "--calibration-limit", "2", "--exporter", "legacy")
    assert result.exit_code == 1, result.output
    bundle = ModelBundle.load(bundle_dir)
    assert not bundle.has(ONNX_INT8) and not (bundle_dir / ONNX_INT8).exists()
    assert not bundle.has(TORCHSCRIPT) and not bundle.has(ONNX_FP16)  # previous export removed
    assert bundle.has(ONNX_FP32) and "dynamo=False" in bundle.manifest.artifacts[ONNX_FP32]["exporter"]
    assert report_passed(bundle, ONNX_FP32)
    report = json.loads(bundle.verified_path(PARITY_REPORT).read_text())
    assert report["passed"] is False and report["failed_artifacts"] == [ONNX_INT8]
    assert bundle.manifest.artifacts[PARITY_REPORT]["passed"] is False
    gate = json.loads(bundle.verified_path(INT8_REPORT).read_text())
    assert any("AUC undefined" in f for f in gate["failures"])
    # no staging left behind, and nothing removed that the tool did not create
    assert [p.name for p in bundle_dir.iterdir() if p.name.startswith(".")] == [".export-notes"]
    assert (bundle_dir / ".export-notes" / "mine.txt").read_text() == "keep"


@pytest.mark.parametrize("p10, caveat", [(0.2, True), (0.97, False)])
def test_int8_overlays_say_when_their_map_differs_from_fp32(exported, tmp_path, p10, caveat):
    """The INT8 gate's CAM correlation travels with the model: overlays from a model whose maps
    diverge from fp32's say so in their footer (kept in the PNG's Description chunk too)."""
    from PIL import Image

    bundle_dir = _copy(exported, tmp_path)
    bundle = ModelBundle.load(bundle_dir)
    bundle.manifest.artifacts[ONNX_INT8]["cam_correlation"] = {"n": 8, "median": 0.95, "p10": p10, "min": 0.1}
    bundle.save_manifest()
    cams = tmp_path / "cams"
    cams.mkdir()
    result = CliRunner().invoke(main, ["batch", str(SAMPLES / "images" / "PNEUMONIA"), "--out", str(tmp_path / "r.csv"),
                                       "--model", str(bundle_dir), "--backend", "onnx-int8", "--cam-dir", str(cams),
                                       "--workers", "0", "--no-progress"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    overlays = sorted(cams.glob("*.png"))
    assert overlays
    for path in overlays:
        with Image.open(path) as image:
            text = image.text["Description"]
        assert "Decision support only" in text
        assert ("INT8 heat map differs from fp32" in text) == caveat
        assert (f"10th percentile {p10:.2f}" in text) == caveat


def test_int8_gate_from_a_labels_csv_says_what_it_covered(tmp_path):
    """A labels CSV given to --int8-eval: its images (not the CSV itself) are parity inputs; the summary
    gives the INT8 gate's image count and CAM correlation; every labelled image is used unless
    --int8-eval-limit says otherwise, and a limit that leaves images out says how many."""
    import csv

    torch.manual_seed(0)
    bundle_dir = tmp_path / "bundle"
    save_bundle(bundle_dir, build_model(None), spec=PreprocessSpec(input_size=SIZE))
    labels = SAMPLES / "labels.csv"
    listed = {str((SAMPLES / r["path"]).resolve()) for r in csv.DictReader(open(labels))}
    result = _export(bundle_dir, "--no-torchscript", "--exporter", "legacy", "--int8", "--calibration",
                     SAMPLES / "dicom", "--calibration-limit", "2", "--int8-eval", labels,
                     "--int8-min-agreement", "0", "--int8-max-auc-delta", "1")
    assert result.exit_code == 0, result.output
    parity = json.loads((bundle_dir / PARITY_REPORT).read_text())["inputs"]["images"]
    assert parity["unreadable"] == [] and set(parity["paths"]) & listed, parity
    gate = json.loads((bundle_dir / INT8_REPORT).read_text())
    assert gate["n"] == len(listed) == 12  # all of them: no silent default limit
    corr = gate["cam_correlation"]
    summary = " ".join(result.stdout.split())
    assert (f"{ONNX_INT8}: statistical gate on {gate['n']} labelled images ({gate['n_positive']} positive)"
            in summary), result.stdout
    assert (f"CAM correlation with fp32 (reported, not gated) median {corr['median']:.3f}, "
            f"p10 {corr['p10']:.3f}, min {corr['min']:.3f} over {corr['n']} images") in summary, result.stdout
    assert "left out" not in result.output

    checked = _export(bundle_dir, "--check", "--int8-eval", labels, "--int8-eval-limit", "5",
                      "--int8-min-agreement", "0", "--int8-max-auc-delta", "1")
    assert checked.exit_code == 0, checked.output
    assert "--int8-eval-limit 5: 7 of 12 labelled images left out" in checked.stderr
    assert f"{ONNX_INT8}: statistical gate on 5 labelled images" in " ".join(checked.stdout.split())
