import json

import pytest
import torch

from cxr_deploy.bundle import BUNDLE_FORMAT_VERSION, ModelBundle, save_bundle
from cxr_deploy.errors import BundleError
from cxr_deploy.model import build_model
from cxr_deploy.preprocessing import PreprocessSpec


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(weights=None).eval()


@pytest.fixture
def bundle_dir(tmp_path, model):
    save_bundle(tmp_path / "bundle", model, spec=PreprocessSpec(input_size=64), threshold=0.37,
                training={"epoch": 3, "val_auc": 0.91})
    return tmp_path / "bundle"


def test_round_trip_restores_identical_predictions(bundle_dir, model):
    bundle = ModelBundle.load(bundle_dir)
    assert bundle.threshold == 0.37 and bundle.class_names == ("NORMAL", "PNEUMONIA")
    assert bundle.spec == PreprocessSpec(input_size=64)
    assert bundle.manifest.training["val_auc"] == 0.91 and bundle.manifest.positive_index == 1
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(bundle.build_model()(x), model(x))
    assert len(bundle.model_id) == 16


def test_loading_a_bundle_builds_its_model_from_the_weights_alone(bundle_dir, model):
    """No random initialisation is drawn only to be overwritten: the caller's random stream is left
    where it was (a script seeding torch before loading gets the same numbers after), every tensor
    is the bundle's, in float32, trainable, and on the CPU."""
    torch.manual_seed(123)
    before = torch.get_rng_state()
    loaded = ModelBundle.load(bundle_dir).build_model()
    assert torch.equal(torch.get_rng_state(), before)
    tensors = list(loaded.parameters()) + list(loaded.buffers())
    assert all(t.device.type == "cpu" for t in tensors)
    assert all(p.dtype == torch.float32 and p.requires_grad for p in loaded.parameters())
    expected = model.state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in loaded.state_dict().items())
    assert not loaded.training


def test_flipped_byte_is_refused(bundle_dir):
    weights = bundle_dir / "weights.pt"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="sha256"):
        ModelBundle.load(bundle_dir)


def test_truncated_weights_are_refused(bundle_dir):
    weights = bundle_dir / "weights.pt"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(BundleError, match="truncated"):
        ModelBundle.load(bundle_dir)


def test_newer_format_and_bad_manifest_are_refused(bundle_dir):
    manifest = json.loads((bundle_dir / "manifest.json").read_text())
    (bundle_dir / "manifest.json").write_text(json.dumps({**manifest, "format_version": BUNDLE_FORMAT_VERSION + 1}))
    with pytest.raises(BundleError, match="upgrade"):
        ModelBundle.load(bundle_dir)
    (bundle_dir / "manifest.json").write_text(json.dumps({**manifest, "threshold": 7}))
    with pytest.raises(BundleError, match="threshold"):
        ModelBundle.load(bundle_dir)
    (bundle_dir / "manifest.json").write_text('{"format": "cxr-deploy-bundle", "format_ver')
    with pytest.raises(BundleError, match="not valid JSON"):
        ModelBundle.load(bundle_dir)
    with pytest.raises(BundleError, match="does not exist"):
        ModelBundle.load(bundle_dir.parent / "nowhere")


def test_added_artifact_is_verified(bundle_dir):
    bundle = ModelBundle.load(bundle_dir)
    (bundle_dir / "extra.bin").write_bytes(b"abc")
    bundle.add_artifact("extra.bin", kind="test")
    assert ModelBundle.load(bundle_dir).has("extra.bin")
    (bundle_dir / "extra.bin").write_bytes(b"abd")
    with pytest.raises(BundleError, match="extra.bin"):
        ModelBundle.load(bundle_dir)


def test_a_wrong_model_path_says_what_is_there_instead(tiny_bundle, tmp_path):
    """Not just "manifest.json missing": a folder that does not exist, a file, and a training run
    whose bundle is RUN/best each get their own one-line reason."""
    import shutil

    from cxr_deploy.bundle import ModelBundle
    from cxr_deploy.errors import BundleError

    run = tmp_path / "runs" / "night1"
    run.mkdir(parents=True)
    shutil.copytree(tiny_bundle, run / "best")
    (tmp_path / "model.onnx").write_bytes(b"x")
    cases = {tmp_path / "nope": "does not exist", tmp_path / "model.onnx": "is a file",
             run: f"training run, not a model bundle; its best model is the bundle {run / 'best'}",
             tmp_path / "runs": "manifest.json missing"}
    for path, reason in cases.items():
        with pytest.raises(BundleError) as info:
            ModelBundle.load(path)
        assert reason in str(info.value) and "\n" not in str(info.value)
    assert ModelBundle.load(run / "best").model_id
