"""``cxr-deploy batch --engine ray``: the local engine's rows, on a real local Ray cluster (no mocks),
through a dead decode worker and a dead model actor, ``--resume``, and SIGTERM.

One cluster (2 CPUs) serves the module; the CLI test starts its own, as the command does. The inputs
are real: 12 labelled CXRs and DICOMs from ../shared/data (one scored, three skipped for their
headers) plus a corrupt ``.png`` (an error row).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from cxr_deploy.batch.results_file import read_results
from cxr_deploy.batch.runner import run_batch
from cxr_deploy.batch.settings import BatchConfig

HAS_RAY = importlib.util.find_spec("ray") is not None
needs_ray = pytest.mark.skipif(not HAS_RAY, reason="Ray is not installed (pip install -e '.[dev,ray]')")

DICOMS = ("highdicom/dx_image.dcm",  # DX, THORAX: scored
          "pydicom_test_files/dicomdirtests/77654033/CR1/6154",  # CR, CSPINE lateral: skipped
          "pydicom_test_files/rtstruct.dcm",  # RTSTRUCT: skipped
          "pydicom_test_files/MR_truncated.dcm")  # MR: skipped


def _rows(csv_path) -> list[dict]:
    rows = read_results(csv_path)
    for row in rows:
        row.pop("processed_at")  # the only cell that depends on when a row was made
    return rows


@pytest.fixture(scope="module")
def inputs(shared_data, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("ray-inputs")
    files = sorted((shared_data / "cxr" / "NORMAL").iterdir())[:6] + sorted((shared_data / "cxr" / "PNEUMONIA").iterdir())[:6]
    files += [shared_data / "dicom" / name for name in DICOMS]
    broken = folder / "broken.png"
    broken.write_bytes(b"not an image " * 20)
    listing = folder / "inputs.txt"
    listing.write_text("".join(f"{f}\n" for f in [*files, broken]))
    return listing


@pytest.fixture(scope="module")
def local_csv(inputs, tiny_bundle, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ray-local") / "local.csv"
    summary = run_batch(BatchConfig(inputs=[f"@{inputs}"], model=tiny_bundle, out=out, progress=False))
    assert summary.counts == {"ok": 13, "error": 1, "skipped": 3}, summary.counts
    return out


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    # Short: Ray puts unix sockets under it, and a socket path may not exceed 107 bytes.
    folder = Path(tempfile.mkdtemp(prefix="cxr-ray-", dir="/tmp"))
    faults = folder / "faults"
    faults.mkdir()
    from cxr_deploy.batch.ray_stages import FAULT_ENV

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _temp_dir=str(folder / "r"),
             runtime_env={"env_vars": {FAULT_ENV: str(faults)}})
    yield faults
    ray.shutdown()
    shutil.rmtree(folder, ignore_errors=True)


def _run_ray(inputs, bundle, out, **options):
    from cxr_deploy.batch.ray_engine import run_batch_ray

    return run_batch_ray(BatchConfig(inputs=[f"@{inputs}"], model=bundle, out=out, progress=False, **options))


@needs_ray
def test_rows_identical_to_the_local_engine(ray_cluster, inputs, local_csv, tiny_bundle, tmp_path):
    out = tmp_path / "ray.csv"
    summary = _run_ray(inputs, tiny_bundle, out)
    assert summary.exit_code == 3 and summary.counts == {"ok": 13, "error": 1, "skipped": 3}
    assert summary.backend == "onnx:cpu"
    assert _rows(out) == _rows(local_csv)  # same rows, same order, byte-identical cells
    assert not (tmp_path / ".ray.csv.parts").exists()  # merged, then removed


@needs_ray
def test_a_dead_decoder_and_a_dead_actor_cost_a_retry_not_a_row(ray_cluster, inputs, local_csv, tiny_bundle, tmp_path):
    for stage in ("decoder", "actor"):
        (ray_cluster / f"kill-{stage}").touch()  # the first worker of that stage to see it exits
    out = tmp_path / "ray.csv"
    summary = _run_ray(inputs, tiny_bundle, out, batch_size=4)
    assert not list(ray_cluster.iterdir()), "a fault did not fire"
    rows = _rows(out)
    assert len({r["path"] for r in rows}) == len(rows) == 17
    assert rows == _rows(local_csv) and summary.counts == {"ok": 13, "error": 1, "skipped": 3}


@needs_ray
def test_resume_adds_only_the_missing_rows(ray_cluster, inputs, local_csv, tiny_bundle, tmp_path):
    lines = local_csv.read_bytes().split(b"\r\n")
    out = tmp_path / "ray.csv"
    # 7 rows and a torn 8th (a run killed mid-write) ...
    out.write_bytes(b"\r\n".join(lines[:8]) + b"\r\n" + lines[8][:25])
    # ... and the parts of a killed Ray driver: row 8 whole, and row 2 again (already in the CSV).
    parts = tmp_path / ".ray.csv.parts"
    parts.mkdir()
    (parts / "part-000001.csv").write_bytes(b"\r\n".join([lines[0], lines[8], lines[2]]) + b"\r\n")
    summary = _run_ray(inputs, tiny_bundle, out, resume=True)
    assert sum(summary.previous.values()) == 8 and summary.processed == 9
    assert _rows(out) == _rows(local_csv)
    kept = out.read_bytes().split(b"\r\n")
    assert kept[:9] == lines[:9]  # earlier rows untouched, processed_at included
    assert not parts.exists()


def _session_processes(marker: str) -> list[str]:
    found = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/environ", "rb") as fh:
                if marker.encode() in fh.read():
                    with open(f"/proc/{entry}/cmdline", "rb") as cmd:
                        cmdline = cmd.read().replace(b"\0", b" ").decode(errors="replace")
                    found.append(f"{entry}: {cmdline[:120]}")
        except OSError:
            continue
    return found


@needs_ray
def test_sigterm_merges_finished_rows_and_stops_its_own_ray(shared_data, tiny_bundle, tmp_path):
    images = sorted((shared_data / "cxr" / "NORMAL").iterdir())[:60]
    listing = tmp_path / "inputs.txt"
    listing.write_text("".join(f"{f}\n" for f in images))
    out = tmp_path / "ray.csv"
    marker = f"CXR_RAY_TEST_RUN={uuid.uuid4().hex}"
    env = dict(os.environ, OMP_NUM_THREADS="1", **dict([marker.split("=")]))
    proc = subprocess.Popen([sys.executable, "-m", "cxr_deploy.cli", "batch", f"@{listing}", "-m", str(tiny_bundle),
                             "-o", str(out), "--engine", "ray", "-b", "1"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    parts = tmp_path / ".ray.csv.parts"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and proc.poll() is None:  # wait for the first rows
        if any(p.stat().st_size > 600 for p in parts.glob("part-*.csv")):
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr[-2000:]
    assert "INTERRUPTED" in stderr and "Traceback" not in stderr
    rows = read_results(out)
    assert 0 < len(rows) < 60 and len({r["path"] for r in rows}) == len(rows)
    assert {r["status"] for r in rows} == {"ok"} and not parts.exists()
    deadline = time.monotonic() + 15
    while (left := _session_processes(marker)) and time.monotonic() < deadline:
        time.sleep(0.3)
    assert not left, "Ray processes outlived the command:\n" + "\n".join(left)


def test_ray_engine_refuses_options_it_would_ignore(cli, tiny_bundle, tmp_path):
    for extra in (["--cam-dir", str(tmp_path / "cams")], ["--dicom-out", str(tmp_path / "dcm")], ["--workers", "0"],
                  ["--preprocess-on", "device"]):
        proc = cli("batch", str(tmp_path), "-m", tiny_bundle, "-o", tmp_path / "r.csv", "--engine", "ray", *extra)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("cxr-deploy: error: "), proc.stderr
        assert (extra[0] in lines[0]) if HAS_RAY else ("needs Ray" in lines[0])
    proc = cli("batch", str(tmp_path), "-m", tiny_bundle, "-o", tmp_path / "r.csv", "--ray-address", "auto")
    assert proc.returncode == 2 and proc.stderr.strip() == "cxr-deploy: error: --ray-address needs --engine ray"


def test_without_ray_the_engine_says_how_to_install_it(tiny_bundle, tmp_path):
    code = ("import sys\nsys.modules['ray'] = None  # as if not installed\nfrom cxr_deploy.cli import main\n"
            f"main.main(['batch', {str(tmp_path)!r}, '-m', {str(tiny_bundle)!r}, '-o', {str(tmp_path / 'r.csv')!r}, "
            "'--engine', 'ray'], prog_name='cxr-deploy')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "cxr-deploy: error: --engine ray needs Ray: pip install 'cxr-deploy[ray]'"
    assert not (tmp_path / "r.csv").exists()


@needs_ray
def test_parts_of_a_killed_run_are_never_dropped_silently(inputs, tiny_bundle, tmp_path):
    from cxr_deploy.batch.inputs import BatchUsageError

    parts = tmp_path / ".ray.csv.parts"
    parts.mkdir()
    (parts / "part-000001.csv").write_text("path,status\r\n")
    with pytest.raises(BatchUsageError, match="add --resume to keep them, or --overwrite"):
        _run_ray(inputs, tiny_bundle, tmp_path / "ray.csv")  # refused before Ray starts
    assert parts.exists() and not (tmp_path / "ray.csv").exists()
