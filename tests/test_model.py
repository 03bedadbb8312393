"""cxr_deploy.model: the ResNet50 builder and where its weights come from."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cxr_deploy.errors import WeightsUnavailable
from cxr_deploy.model import FEATURE_DIM, build_model, head_is_linear


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(weights=None).eval()


def test_random_init_gives_a_two_class_resnet50(model):
    assert isinstance(model.fc, nn.Linear) and (model.fc.in_features, model.fc.out_features) == (FEATURE_DIM, 2)
    with torch.no_grad():
        assert model(torch.zeros(3, 3, 64, 64)).shape == (3, 2)
    assert head_is_linear(model)
    other = build_model(weights=None)
    other.fc = nn.Sequential(nn.Linear(FEATURE_DIM, 2))  # a head for which CAM is not Grad-CAM
    assert not head_is_linear(other)


def test_weights_loading_paths(tmp_path, model):
    torch.save(model.state_dict(), tmp_path / "w.pth")
    loaded = build_model(weights=tmp_path / "w.pth")
    assert torch.equal(loaded.layer1[0].conv1.weight, model.layer1[0].conv1.weight)
    assert head_is_linear(loaded)
    with pytest.raises(WeightsUnavailable, match="not found"):
        build_model(weights=tmp_path / "missing.pth")


def test_offline_imagenet_gives_actionable_message(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # empty cache; no network in CI either
    import socket

    def no_network(*args, **kwargs):
        raise OSError("network disabled for this test")

    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    with pytest.raises(WeightsUnavailable) as info:
        build_model(weights="imagenet")
    assert "resnet50-11ad3fa6.pth" in str(info.value) and str(tmp_path) in str(info.value)


def test_a_copied_torchvision_file_in_the_cache_is_what_imagenet_loads(tmp_path, monkeypatch):
    """The README's offline recipe: torchvision's own file (1000-class head) copied into the cache."""
    from torchvision.models import resnet50

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    torch.manual_seed(1)
    imagenet_like = resnet50(weights=None)  # the layout of resnet50-11ad3fa6.pth, fc 1000 classes
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(imagenet_like.state_dict(), tmp_path / "hub" / "checkpoints" / "resnet50-11ad3fa6.pth")
    loaded = build_model(weights="imagenet")
    assert torch.equal(loaded.conv1.weight, imagenet_like.conv1.weight)
    assert loaded.fc.out_features == 2


def test_a_state_dict_is_loaded_and_an_imagenet_head_dropped(model):
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["fc.weight"], state["fc.bias"] = torch.zeros(1000, FEATURE_DIM), torch.zeros(1000)  # ImageNet head
    loaded = build_model(weights={f"module.{k}": v for k, v in state.items()})  # DataParallel prefix too
    assert torch.equal(loaded.layer4[2].conv3.weight, model.layer4[2].conv3.weight)
    assert loaded.fc.out_features == 2


def test_a_folder_is_not_weights_here(tmp_path):
    """Starting from a bundle is training's business (cxr_deploy.training.weights), not the runtime's."""
    with pytest.raises(WeightsUnavailable, match="is a folder"):
        build_model(weights=tmp_path)
    with pytest.raises(WeightsUnavailable, match="do not fit a ResNet50"):
        build_model(weights={"conv1.weight": torch.zeros(1)})


def test_fit_temperature_recovers_a_known_temperature():
    import numpy as np

    from cxr_deploy.calibration import fit_temperature, nll, sigmoid

    rng = np.random.default_rng(0)
    margins = rng.normal(0, 6, 20000)  # an overconfident model's logit margins
    labels = rng.random(20000) < sigmoid(margins / 2.5)  # the truth is 2.5x softer
    t = fit_temperature(labels, margins)
    assert t == pytest.approx(2.5, rel=0.05)
    assert nll(labels, margins, t) < nll(labels, margins, 1.0)
    assert fit_temperature(labels[:10], margins[:10]) == 1.0  # too few images to fit on


def test_temperature_is_applied_inside_the_classifier(model):
    from cxr_deploy.cam import ClassifierWithCAM

    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        logits = model(x)
        p1, c1 = ClassifierWithCAM(model, 1).eval()(x)
        p2, c2 = ClassifierWithCAM(model, 1, temperature=2.0).eval()(x)
    assert torch.allclose(p2, torch.softmax(logits / 2.0, dim=1), atol=1e-6)
    assert torch.allclose(p1, torch.softmax(logits, dim=1), atol=1e-6)
    assert torch.equal(c1, c2)  # the per-image normalized map does not change


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_the_resnet50_is_torchvisions_network_init_and_outputs(mode):
    """cxr_deploy.resnet against its oracle, torchvision's resnet50: from one seed, the same keys,
    shapes, random initialisation and torch RNG state after; the same outputs from the same weights."""
    from torchvision.models import resnet50

    from cxr_deploy.resnet import ResNet50

    torch.manual_seed(5)
    theirs = resnet50(weights=None)
    after_theirs = torch.get_rng_state()
    torch.manual_seed(5)
    ours = ResNet50()
    assert torch.equal(torch.get_rng_state(), after_theirs)
    a, b = theirs.state_dict(), ours.state_dict()
    assert list(a) == list(b)
    assert all(a[k].shape == b[k].shape and a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
    x = torch.randn(2, 3, 64, 64)
    getattr(theirs, mode)(), getattr(ours, mode)()
    with torch.no_grad():
        assert torch.equal(ours(x), theirs(x))
    b = ours.state_dict()  # train mode moved the BatchNorm statistics alike
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_building_the_model_imports_neither_torchvision_nor_dynamo(tiny_bundle):
    """torchvision (2.4 s of imports) is for the ImageNet download and training's augmentation only;
    a bundle's model (built on the meta device) does not pull in torch._dynamo (1.1-1.5 s) either."""
    import subprocess
    import sys

    code = ("import sys; from cxr_deploy.model import build_model; build_model(None); "
            "from cxr_deploy.bundle import ModelBundle; "
            f"ModelBundle.load({str(tiny_bundle)!r}).classifier(); "
            "print(sorted(m for m in ('torchvision', 'torch._dynamo') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", (out.stdout, out.stderr[-2000:])
