"""The results CSV contract, and "nothing lost": SIGKILL mid-run, then --resume."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time

import pytest

from cxr_deploy.batch.results_file import COLUMNS, SCHEMA_VERSION, read_results
from tests.support import write_old_layout


def _rows(path):
    return read_results(path)


def test_csv_schema_and_contents(tiny_bundle, png_folder, shared_data, cli, tmp_path):
    import cxr_deploy

    # A CT slice, scored on purpose (--no-dicom-filter) so the DICOM columns of an ok row are checked.
    dicom = shared_data / "dicom" / "pydicom_test_files" / "CT_small.dcm"
    out = tmp_path / "results.csv"
    proc = cli("batch", png_folder, dicom, "--model", tiny_bundle, "--out", out, "-b", "4", "-j", "1",
               "--no-dicom-filter")
    assert proc.returncode == 0, proc.stderr
    assert "11 inputs processed" in proc.stderr and "11 ok, 0 error, 0 skipped" in proc.stderr

    with open(out, newline="") as fh:
        header = next(csv.reader(fh))
    assert tuple(header) == COLUMNS
    rows = _rows(out)
    paths = [r["path"] for r in rows]
    assert len(rows) == len(set(paths)) == 11
    assert all(os.path.isabs(p) for p in paths)

    from cxr_deploy.bundle import ModelBundle

    bundle = ModelBundle.load(tiny_bundle)
    for row in rows:
        assert row["status"] == "ok" and row["error"] == ""
        p = float(row["probability"])
        assert 0.0 <= p <= 1.0
        assert float(row["threshold"]) == bundle.threshold
        assert row["predicted_label"] == ("PNEUMONIA" if p >= bundle.threshold else "NORMAL")
        assert row["model_id"] == bundle.model_id
        assert row["backend"] == "onnx:cpu"
        assert row["schema_version"] == str(SCHEMA_VERSION)
        assert row["overlay_path"] == ""
    by_path = {r["path"]: r for r in rows}
    ct = by_path[str(dicom)]
    assert ct["format"] == "dicom"
    import pydicom

    ds = pydicom.dcmread(dicom)
    assert ct["study_instance_uid"] == ds.StudyInstanceUID and ct["sop_instance_uid"] == ds.SOPInstanceUID
    assert (ct["modality"], ct["body_part"], ct["view_position"]) == ("CT", "", "")
    # no patient identifiers anywhere in the file
    text = out.read_text()
    for keyword in ("PatientName", "PatientID"):
        value = str(ds.get(keyword, "")).strip()
        if value:
            assert value not in text

    # the same probabilities as the Python API (same backend, in-process decoding)
    from cxr_deploy.eligibility import NO_FILTER

    model = cxr_deploy.load(tiny_bundle, eligibility=NO_FILTER)
    for record in model.predict(paths):
        assert float(by_path[record["path"]]["probability"]) == pytest.approx(record["probability"], abs=2e-6)

    # --out exists: refuse without --resume/--overwrite (exit 2), and leave the file alone
    before = out.read_bytes()
    again = cli("batch", png_folder, "--model", tiny_bundle, "--out", out)
    assert again.returncode == 2 and "--resume" in again.stderr
    assert out.read_bytes() == before


def test_sigkill_then_resume_loses_nothing(tiny_bundle, tmp_path, make_pngs):
    images = make_pngs(tmp_path / "in", 24)
    listing = tmp_path / "all.txt"
    listing.write_text("".join(f"{p}\n" for p in images))

    # Reference: one uninterrupted run.
    from cxr_deploy.api import run_batch

    reference = tmp_path / "reference.csv"
    summary = run_batch([f"@{listing}"], model=tiny_bundle, out=reference, batch_size=2, workers=0)
    assert summary.exit_code == 0
    expected = {r["path"]: float(r["probability"]) for r in _rows(reference)}
    assert len(expected) == 24

    # The interrupted run reads its inputs from a FIFO the test feeds: it can never finish on its
    # own, so the kill lands mid-run deterministically, after some batches were written.
    fifo = tmp_path / "inputs.fifo"
    os.mkfifo(fifo)
    out = tmp_path / "results.csv"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "cxr_deploy.cli", "batch", f"@{fifo}", "--model",
                             str(tiny_bundle), "--out", str(out), "-b", "2", "-j", "1"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        with open(fifo, "w") as feed:
            for path in images[:12]:
                feed.write(f"{path}\n")
            feed.flush()
            deadline = time.monotonic() + 90
            while time.monotonic() < deadline:
                if out.exists() and out.read_text().count("\n") >= 1 + 4 and proc.poll() is None:
                    break
                assert proc.poll() is None, proc.stderr.read().decode()
                time.sleep(0.05)
            else:
                pytest.fail("batch wrote no rows within 90 s")
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL

    partial = _rows(out)
    assert 4 <= len(partial) < 24
    # A power cut can also tear the last line: simulate one.
    with open(out, "a") as fh:
        fh.write(f'{images[20]},ok,,0.12')

    resumed = run_batch([f"@{listing}"], model=tiny_bundle, out=out, batch_size=2, workers=0, resume=True)
    assert resumed.exit_code == 0
    assert sum(resumed.previous.values()) == len(partial)
    assert resumed.counts["ok"] == 24 - len(partial)

    rows = _rows(out)
    paths = [r["path"] for r in rows]
    assert len(paths) == len(set(paths)) == 24, "exactly one row per input"
    assert set(paths) == set(expected)
    for row in rows:
        assert row["status"] == "ok"
        assert float(row["probability"]) == pytest.approx(expected[row["path"]], abs=2e-6)
    assert out.read_text().endswith("\n")
    with open(out, newline="") as fh:
        assert all(len(record) == len(COLUMNS) for record in csv.reader(fh))


def test_resume_refuses_another_model(tiny_bundle, tmp_path, make_pngs):
    from cxr_deploy.api import run_batch
    from cxr_deploy.batch.inputs import BatchUsageError

    images = make_pngs(tmp_path / "in", 2)
    out = tmp_path / "r.csv"
    run_batch(images, model=tiny_bundle, out=out, workers=0)
    text = out.read_text().replace(read_results(out)[0]["model_id"], "0123456789abcdef")
    out.write_text(text)
    with pytest.raises(BatchUsageError, match="mixing models"):
        run_batch(images, model=tiny_bundle, out=out, workers=0, resume=True)


def test_backends_agree(tiny_bundle, png_folder):
    import cxr_deploy

    paths = sorted(png_folder.rglob("*.png"))[:4]
    reference = [r["probability"] for r in cxr_deploy.load(tiny_bundle, backend="torch").predict(paths)]
    for backend in ("onnx", "torchscript"):
        model = cxr_deploy.load(tiny_bundle, backend=backend, device="cpu")
        assert model.backend.name == f"{backend}:cpu"
        got = [r["probability"] for r in model.predict(paths, batch_size=3)]
        assert got == pytest.approx(reference, abs=1e-4)


def test_version_1_files_are_resumed_in_v1_layout_and_evaluated(tiny_bundle, tmp_path, make_pngs):
    """CSV schema v2 adds modality/body_part/view_position; files written by 0.1 (v1) keep working."""
    from click.testing import CliRunner

    from cxr_deploy.api import run_batch
    from cxr_deploy.reporting.cli import evaluate_command
    from cxr_deploy.batch.results_file import COLUMNS_V1

    images = make_pngs(tmp_path / "NORMAL", 4)
    full = tmp_path / "full.csv"
    run_batch(images, model=tiny_bundle, out=full, workers=0)
    # A v1 file as cxr-deploy 0.1 wrote it: v1 header, the first two rows, schema_version 1.
    v1 = tmp_path / "v1.csv"
    write_old_layout(full, v1, COLUMNS_V1, 1, rows=2)
    summary = run_batch(images, model=tiny_bundle, out=v1, workers=0, resume=True)
    assert summary.previous["ok"] == 2 and summary.counts["ok"] == 2
    with open(v1, newline="") as fh:
        raw = list(csv.reader(fh))
    assert tuple(raw[0]) == COLUMNS_V1 and all(len(r) == len(COLUMNS_V1) for r in raw)
    assert {r[COLUMNS_V1.index("schema_version")] for r in raw[1:]} == {"1"}
    assert sorted(r["path"] for r in read_results(v1)) == sorted(map(str, images))
    # evaluate reads v1 and v3 files together; both score the same 4 images: each counts once
    result = CliRunner().invoke(evaluate_command, [str(v1), str(full), "--labels-from-folders", "--dedupe",
                                                   "--out-dir", str(tmp_path / "rep")])
    assert result.exit_code == 0, result.output
    assert "report: 4 labelled images" in result.output
