"""A model output that is NaN or inf never becomes a prediction. The Python API, the local batch
engine, the Ray engine's model stage and ``pacs listen`` make their rows through one function
(:func:`cxr_deploy.batch.rows.score_row`): each gets an ``error`` row, never ``ok, nan, NORMAL``.

The model is real: the tiny bundle's ONNX model with a NaN classifier bias (``nan_bundle``), or
its real ONNX session with the probabilities turned to inf."""

from __future__ import annotations

import dataclasses
import shutil

import numpy as np
import pytest

from cxr_deploy.batch.results_file import read_results
from tests.support import SAMPLES, run_cli

INPUTS = sorted((SAMPLES / "images" / "NORMAL").iterdir())[:2] + [SAMPLES / "dicom" / "IM000004"]


def assert_error_rows(rows, n: int) -> None:
    assert len(rows) == n
    for row in rows:
        assert row["status"] == "error", row
        assert "non-finite" in row["error"], row
        assert row["probability"] in (None, "") and row["predicted_label"] in (None, ""), row


def test_api_nan_output_is_an_error_row(nan_bundle):
    import cxr_deploy

    records = cxr_deploy.load(nan_bundle).predict(INPUTS, return_cam=True)
    assert_error_rows(records, len(INPUTS))
    assert all("cam" not in r for r in records)


def test_api_inf_output_is_an_error_row(tiny_bundle):
    import cxr_deploy

    model = cxr_deploy.load(tiny_bundle)
    real = model.backend

    def inf_probabilities(batch):
        probabilities, cams, scores = real(batch)
        return np.full_like(probabilities, np.inf), cams, scores

    model.backend = dataclasses.replace(real, run=inf_probabilities)
    assert_error_rows(model.predict(INPUTS), len(INPUTS))


def test_local_engine_nan_output_is_an_error_row(nan_bundle, tmp_path):
    out = tmp_path / "r.csv"
    result = run_cli("batch", *INPUTS, "-m", nan_bundle, "-o", out, "-j", "0", "--no-progress")
    assert result.returncode == 3, result.stderr
    assert_error_rows(read_results(out), len(INPUTS))


def test_ray_model_stage_nan_output_is_an_error_row(nan_bundle):
    import csv

    from cxr_deploy.batch.decode import DecodeConfig
    from cxr_deploy.batch.ray_stages import ModelStage, decode_batch
    from cxr_deploy.batch.results_file import COLUMNS, parse_row
    from cxr_deploy.bundle import ModelBundle

    bundle = ModelBundle.load(nan_bundle)
    decoded = decode_batch({"path": np.array([str(p) for p in INPUTS], dtype=object)}, DecodeConfig(spec=bundle.spec))
    from cxr_deploy.run_settings import resolve_decision

    stage = ModelStage(str(nan_bundle), bundle.model_id, "onnx", "cpu", 1, resolve_decision(bundle.manifest), COLUMNS)
    lines = stage(decoded)["line"]
    rows = [parse_row(row) for row in csv.DictReader(["".join(lines)][0].splitlines(), fieldnames=COLUMNS)]
    assert_error_rows(rows, len(INPUTS))


def test_pacs_listen_scoring_pass_nan_output_is_an_error_row_and_no_sr(nan_bundle, tmp_path):
    from cxr_deploy.pacs.passes import score_and_push

    spool = tmp_path / "spool"
    incoming = spool / "incoming" / "study"
    incoming.mkdir(parents=True)
    for name in ("IM000004", "normal_dx_16bit_rescale_window.dcm"):
        shutil.copy(SAMPLES / "dicom" / name, incoming / f"{name}.dcm")
    done = score_and_push(spool, spool / "incoming", str(nan_bundle), None, workers=0, uid_root="2.25")
    assert done["scored"] == 2
    assert_error_rows(read_results(spool / "results.csv"), 2)
    assert not list((spool / "results").glob("*.sr.dcm"))
