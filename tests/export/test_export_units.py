"""Fast pieces of the export package: head refusal, labelled inputs, warning filter, tolerances."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
from torch import nn

from cxr_deploy.export.inputs import InputError, labelled_files
from cxr_deploy.export.parity import Tolerances, compare
from cxr_deploy.export.exporter import ExportError, build_wrapper
from cxr_deploy.quiet import quiet_export
from cxr_deploy.model import build_model

SAMPLES = Path(__file__).resolve().parents[2] / "samples"
CLASSES = ("NORMAL", "PNEUMONIA")


def test_non_linear_head_is_refused_with_a_clear_error():
    model = build_model(None)
    model.fc = nn.Sequential(nn.Linear(2048, 64), nn.ReLU(), nn.Linear(64, 2))
    with pytest.raises(ExportError, match="linear head"):
        build_wrapper(model, 1)


def test_labelled_folder_and_csv_give_the_same_images():
    from_folders = labelled_files(SAMPLES / "images", CLASSES, "PNEUMONIA")
    from_csv = labelled_files(SAMPLES / "labels.csv", CLASSES, "PNEUMONIA")  # path,label columns; DICOMs included
    assert {(Path(p).name, y) for p, y in from_folders} <= {(Path(p).name, y) for p, y in from_csv}
    assert sorted(y for _, y in from_folders) == [0] * 4 + [1] * 4
    assert len(from_csv) == 12 and all(Path(p).exists() for p, _ in from_csv)


def test_labelled_csv_with_unknown_label_is_rejected(tmp_path):
    (tmp_path / "labels.csv").write_text("file,label\na.png,NORMAL\nb.png,COVID\n")
    from cxr_deploy.labels import LabelsError

    with pytest.raises(LabelsError, match="COVID"):
        labelled_files(tmp_path, CLASSES, "PNEUMONIA")
    with pytest.raises(InputError, match="sub-folders"):
        labelled_files(_empty(tmp_path / "empty"), CLASSES, "PNEUMONIA")


def _empty(path: Path) -> Path:
    path.mkdir()
    return path


def test_quiet_export_filters_only_the_accepted_notices():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with quiet_export():
            warnings.warn("`torch.jit.trace` is deprecated. Please switch to `torch.compile`", FutureWarning)
            warnings.warn("something else is deprecated", FutureWarning)
            warnings.warn("unrelated", UserWarning)
    assert [str(w.message) for w in caught] == ["something else is deprecated", "unrelated"]


def test_compare_tolerates_borderline_flips_only():
    import numpy as np

    ref = (np.array([[0.5, 0.5], [0.1, 0.9]], np.float32), np.zeros((2, 2, 2), np.float32))
    out = (np.array([[0.50004, 0.49996], [0.1, 0.9]], np.float32), np.zeros((2, 2, 2), np.float32))
    result = compare(ref, out, positive_index=1, threshold=0.5, prob_tol=1e-4)
    assert result["borderline"] == 1 and result["label_flips"] == 0 and result["label_agreement"] == 0.5
    flipped = (np.array([[0.5, 0.5], [0.9, 0.1]], np.float32), out[1])
    assert compare(ref, flipped, positive_index=1, threshold=0.5, prob_tol=1e-4)["label_flips"] == 1


def test_tolerances_reject_unknown_names():
    assert Tolerances.from_any({"prob": 1e-3}).prob == 1e-3
    with pytest.raises(ValueError, match="unknown tolerance"):
        Tolerances.from_any({"probability": 1e-3})


def test_cam_wrapper_keeps_head_and_map_in_float32_under_autocast():
    """The torch backend runs the backbone under fp16 autocast on a GPU; on the CPU the same code
    path is bf16. Outputs stay float32, close to the fp32 ones, and an all-zero map stays zeros
    (not 0/0 = NaN, which a half-precision clamp of 1e-12 would give)."""
    import torch

    from cxr_deploy.cam import ClassifierWithCAM

    torch.manual_seed(0)
    model = ClassifierWithCAM(build_model(None)).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        p32, cam32 = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            p16, cam16 = model(x)
        model.fc.weight.zero_()  # positive-class weights 0 → the map is all zero
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _, zero_cam = model(x)
    assert p16.dtype == torch.float32 and cam16.dtype == torch.float32
    assert float((p16 - p32).abs().max()) < 0.05 and float((cam16 - cam32).abs().max()) < 0.1
    assert torch.isfinite(zero_cam).all() and float(zero_cam.abs().max()) == 0.0


def test_a_calibrated_bundle_exports_calibrated_probabilities(tmp_path):
    import onnxruntime as ort
    import torch

    from cxr_deploy.bundle import ModelBundle, save_bundle
    from cxr_deploy.export import export_bundle
    from cxr_deploy.model import build_model
    from cxr_deploy.preprocessing import PreprocessSpec

    torch.manual_seed(3)
    model = build_model(None).eval()
    with torch.no_grad():
        model.fc.weight.mul_(0.05)
    save_bundle(tmp_path / "b", model, spec=PreprocessSpec(input_size=64), temperature=2.0)
    report = export_bundle(tmp_path / "b", torchscript=False, onnx=True, exporter="legacy")
    assert report["passed"]
    bundle = ModelBundle.load(tmp_path / "b")
    x = np.random.default_rng(0).standard_normal((4, 3, 64, 64)).astype(np.float32)
    session = ort.InferenceSession(str(bundle.verified_path("model.onnx")), providers=["CPUExecutionProvider"])
    p_onnx = session.run(None, {"image": x})[0]
    with torch.no_grad():
        expected = torch.softmax(model(torch.from_numpy(x)) / 2.0, dim=1).numpy()
    assert np.allclose(p_onnx, expected, atol=1e-5)
    assert bundle.model_id != ModelBundle.load(save_bundle(tmp_path / "t1", model, spec=bundle.spec).directory).model_id


def _graph(nodes, outputs):
    from onnx import TensorProto, helper

    value = lambda name: helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, 4])  # noqa: E731
    nodes = [helper.make_node(op, inputs, [out], name=f"n_{out}") for op, inputs, out in nodes]
    return helper.make_model(helper.make_graph(nodes, "g", [value("x")], [value(o) for o in outputs]))


def test_backbone_output_is_the_last_tensor_every_path_passes_through():
    from cxr_deploy.export.quantize import QuantizationError, backbone_output, head_nodes

    # x -> a -> b (residual: b also reads x's branch) -> f, then two heads from f
    model = _graph([("Relu", ["x"], "a"), ("Relu", ["a"], "a2"), ("Add", ["a", "a2"], "f"),
                    ("Relu", ["f"], "p"), ("Sigmoid", ["f"], "q"), ("Add", ["p", "q"], "out1"),
                    ("Relu", ["f"], "out2")], ["out1", "out2"])
    assert backbone_output(model) == "f"
    assert head_nodes(model) == ["n_p", "n_q", "n_out1", "n_out2"]
    # the population score reads an earlier tensor too (layer3's output): the backbone output is
    # still the classifier's, and the score's nodes stay float with the head
    scored = _graph([("Relu", ["x"], "a"), ("Relu", ["a"], "a2"), ("Add", ["a", "a2"], "f"),
                     ("Relu", ["f"], "out1"), ("Sigmoid", ["a"], "s3"), ("Sigmoid", ["f"], "s4"),
                     ("Add", ["s3", "s4"], "population_score")], ["out1", "population_score"])
    assert backbone_output(scored) == "f"
    assert head_nodes(scored) == ["n_out1", "n_s3", "n_s4", "n_population_score"]
    # two branches from the input to two outputs never meet: no single backbone output
    split = _graph([("Relu", ["x"], "out1"), ("Sigmoid", ["x"], "out2")], ["out1", "out2"])
    with pytest.raises(QuantizationError, match="backbone"):
        backbone_output(split)


def test_histogram_calibration_takes_a_set_that_is_not_a_multiple_of_the_batch(tiny_bundle, tmp_path):
    """onnxruntime's histogram calibrators failed on a last calibration batch of another size. The
    shared tiny bundle's exported model.onnx is read (the quantizer writes only beside its output)."""
    from cxr_deploy.bundle import ModelBundle
    from cxr_deploy.export.inputs import ImageSet
    from cxr_deploy.export.metadata import artifact_metadata
    from cxr_deploy.export.quantize import CALIBRATION_BATCH, quantize_int8

    bundle = ModelBundle.load(tiny_bundle)
    size = bundle.spec.input_size
    n = CALIBRATION_BATCH + 3
    images = ImageSet(np.random.default_rng(0).standard_normal((n, 3, size, size), dtype=np.float32),
                      [f"x{i}" for i in range(n)])
    for method in ("Entropy", "Percentile"):
        info = quantize_int8(tiny_bundle / "model.onnx", tmp_path / f"{method}.onnx", images,
                             artifact_metadata(bundle, precision="int8"), {"calibrate_method": method})
        assert info["quantization"]["calibrate_method"] == method and info["calibration_images"] == n
    ModelBundle.load(tiny_bundle)  # still verifies: the shared bundle was only read


def test_weights_are_8_bit_only_on_a_cpu_with_an_8_bit_dot_product(tmp_path):
    from cxr_deploy.export.quantize import cpu_has_vnni

    (tmp_path / "vnni").write_text("processor : 0\nflags : fpu sse avx2 avx512f avx512_vnni\n")
    (tmp_path / "avx2").write_text("processor : 0\nflags : fpu sse avx2 fma\n")
    assert cpu_has_vnni(str(tmp_path / "vnni")) and not cpu_has_vnni(str(tmp_path / "avx2"))
    assert not cpu_has_vnni(str(tmp_path / "missing"))  # cannot tell: the cautious 7-bit weights
