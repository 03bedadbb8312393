"""Fixtures for the review tests: a real results CSV with Grad-CAM overlays, made by the real
``batch`` on the bundled samples (8 JPEGs, 4 DICOMs, 3 non-images) with a tiny random-init bundle
that carries named operating points; and the real ``cxr-deploy review`` server, started as a
subprocess and always stopped."""

from __future__ import annotations

import shutil

import pytest

from tests.review.helpers import Server
from tests.support import SAMPLES, TINY_INPUT_SIZE

POINTS = {"sens95": {"threshold": 0.41, "sensitivity": 0.95, "specificity": 0.4},
          "youden": {"threshold": 0.415, "sensitivity": 0.8, "specificity": 0.7}}


@pytest.fixture(scope="session")
def review_run(tmp_path_factory) -> dict:
    """``{"dir", "results", "labels", "bundle", "samples"}``: batch run over a copy of samples/."""
    import torch

    import cxr_deploy
    from cxr_deploy.bundle import ModelBundle, save_bundle
    from cxr_deploy.model import build_model
    from cxr_deploy.preprocessing import PreprocessSpec

    root = tmp_path_factory.mktemp("review")
    samples = root / "samples"
    shutil.copytree(SAMPLES, samples)  # inside the test's folder: symlink tests may add files beside them
    torch.manual_seed(0)
    model = build_model(None)
    with torch.no_grad():
        model.fc.weight.mul_(0.05)
    bundle = root / "bundle"
    save_bundle(bundle, model, spec=PreprocessSpec(input_size=TINY_INPUT_SIZE))  # no export: --backend torch
    ModelBundle.load(bundle).update(training={"operating_points": POINTS})
    results = root / "results.csv"
    summary = cxr_deploy.run_batch([samples], model=bundle, out=results, backend="torch", device="cpu",
                                   workers=0, cam_dir=root / "overlays")
    assert summary.exit_code == 0, summary.lines()
    return {"dir": root, "results": results, "labels": samples / "labels.csv", "bundle": bundle, "samples": samples}


@pytest.fixture()
def start_server():
    """``start_server(args, cwd)`` -> :class:`Server`; every server started is stopped at the end."""
    started = []

    def start(args, cwd):
        server = Server(args, cwd)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()
