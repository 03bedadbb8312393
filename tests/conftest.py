"""Shared fixtures: paths to the real test data and small helpers.

Real data lives outside the repository in ``../shared/data`` (DICOM test suites and labelled CXRs);
set ``CXR_SHARED_DATA`` to point elsewhere. Tests needing it are skipped with a clear reason when
it is absent, never silently passed.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import pytest

from tests.support import POINTS, SHARED_DATA, TINY_INPUT_SIZE, built_once, run_cli


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real test data not found at {SHARED_DATA} (set CXR_SHARED_DATA)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def dicom_manifest(shared_data) -> list[dict]:
    with open(shared_data / "dicom" / "manifest.csv", newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="session")
def cxr_manifest(shared_data) -> list[dict]:
    with open(shared_data / "cxr" / "manifest.csv", newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory) -> Path:
    """A random-init ResNet50 bundle at 64 px with its TorchScript and ONNX exports, built once per
    test session and shared by every worker (:func:`tests.support.built_once`): read it, never write it."""

    def build(folder: Path) -> None:
        import torch

        from cxr_deploy.bundle import save_bundle
        from cxr_deploy.export import export_bundle
        from cxr_deploy.model import build_model
        from cxr_deploy.preprocessing import PreprocessSpec

        torch.manual_seed(0)
        model = build_model(None)
        # Random init puts every probability near 0 or 1 for every image; spread the positive logit
        # so thresholds and labels vary across the test images.
        with torch.no_grad():
            model.fc.weight.mul_(0.05)
        save_bundle(folder / "tiny", model, spec=PreprocessSpec(input_size=TINY_INPUT_SIZE))
        export_bundle(folder / "tiny", torchscript=True, onnx=True)  # the real export step: model.ts, model.onnx

    return built_once(tmp_path_factory, "tiny-bundle", build) / "tiny"


@pytest.fixture(scope="session")
def nan_bundle(tiny_bundle, tmp_path_factory) -> Path:
    """The tiny bundle whose real ONNX model outputs NaN for every image (its classifier bias is
    NaN): a non-finite model output must never become a prediction, on any path."""
    import shutil

    import numpy as np
    import onnx
    from onnx import numpy_helper

    from cxr_deploy.bundle import ModelBundle

    directory = tmp_path_factory.mktemp("nan-bundle") / "nan"
    shutil.copytree(tiny_bundle, directory, copy_function=os.link)  # hard links: no 300 MB copy
    path = directory / "model.onnx"
    model = onnx.load(path)
    for i, tensor in enumerate(model.graph.initializer):
        if tensor.name == "fc.bias":
            nan = np.full(numpy_helper.to_array(tensor).shape, np.nan, np.float32)
            model.graph.initializer[i].CopyFrom(numpy_helper.from_array(nan, tensor.name))
    path.unlink()  # a new file: the tiny bundle's model.onnx stays as it is
    onnx.save(model, path)
    bundle = ModelBundle.load(directory, verify=False)
    bundle.add_artifact("model.onnx", **{k: v for k, v in bundle.manifest.artifacts["model.onnx"].items()
                                         if k not in ("sha256", "bytes")})
    return directory


@pytest.fixture(scope="session")
def points_bundle(tiny_bundle, tmp_path_factory) -> Path:
    """The tiny bundle (threshold 0.5) with named operating points recorded as training does
    (:data:`POINTS`: sens95 at 0.25, youden at 0.45)."""
    import shutil

    from cxr_deploy.bundle import ModelBundle

    directory = tmp_path_factory.mktemp("points-bundle") / "points"
    shutil.copytree(tiny_bundle, directory, copy_function=os.link)  # the manifest is replaced, not edited
    ModelBundle.load(directory).update(training={"operating_points": POINTS})
    return directory


@pytest.fixture(scope="session")
def population_bundle(tiny_bundle, shared_data, tmp_path_factory) -> Path:
    """The tiny bundle with out-of-population statistics fitted as training fits them, on real
    pediatric films (60 + 60 training, 20 + 20 validation; training ages 1-5), exported again with
    TorchScript, ONNX fp32/fp16 and INT8, every gate comparing the score (the INT8 gate's thresholds opened: a random-weight model's INT8 AUC
    means nothing; the score's agreement is checked by the tests instead)."""

    def build(folder: Path) -> None:
        import shutil

        from cxr_deploy.bundle import ModelBundle
        from cxr_deploy.export import export_bundle
        from cxr_deploy.training.population_fit import fit_bundle
        from tests.support import kermany_images

        directory = folder / "population"
        shutil.copytree(tiny_bundle, directory, copy_function=os.link)  # every file changed is replaced
        train, val = kermany_images(shared_data, 60), kermany_images(shared_data, 20, skip=60)
        fit_bundle(ModelBundle.load(directory), [p for p, _ in train], [y for _, y in train], [p for p, _ in val],
                   age_range="1-5")
        calibration = folder / "calibration"
        calibration.mkdir()
        for path, _ in val[::4]:
            (calibration / Path(path).name).symlink_to(path)
        labels = folder / "labels.csv"
        labels.write_text("path,label\n" + "".join(f"{p},{'PNEUMONIA' if y else 'NORMAL'}\n" for p, y in val))
        report = export_bundle(directory, torchscript=True, onnx=True, fp16=True, int8=True, calibration=calibration,
                               int8_eval=labels, tolerances={"int8_min_agreement": 0, "int8_max_auc_delta": 1,
                                                             "int8_min_population_agreement": 0})
        assert report["passed"], report["failed_artifacts"]

    return built_once(tmp_path_factory, "population-bundle", build) / "population"


@pytest.fixture(scope="session")
def cli():
    return run_cli


@pytest.fixture(scope="session", autouse=True)
def _small_torch():
    """Tests run on 2 cores: keep torch from oversubscribing them. Each pytest-xdist worker gets its
    share of the cores (one each on 2 cores with 2 workers): two workers of 2 threads each kept 4
    busy threads on 2 cores."""
    try:
        import torch
    except ImportError:  # pragma: no cover
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1)
    torch.set_num_threads(max(1, min(2, cores // workers)))


# -- no process outlives the test session ---------------------------------------------------------
# Every process a test starts inherits this marker in its environment; at the end of the session
# any live process carrying it (other than pytest itself) fails the run. Re-parented orphans are
# found too, which a parent/child walk would miss.
_SESSION_MARK = "CXR_DEPLOY_TEST_SESSION"


_SHM_DIR, _SHM_PREFIX = Path("/dev/shm"), "cxr-deploy-"
_shm_at_start: set[str] = set()


def pytest_configure(config):
    import uuid

    os.environ[_SESSION_MARK] = uuid.uuid4().hex
    _shm_at_start.update(_shm_blocks())


def _shm_blocks() -> set[str]:
    """The runs' shared-memory slots (cxr_deploy/batch/shm.py) now in /dev/shm."""
    try:
        return {name for name in os.listdir(_SHM_DIR) if name.startswith(_SHM_PREFIX)}
    except OSError:  # no /dev/shm (not Linux)
        return set()


def _is_marked(pid: int) -> bool:
    """Whether ``pid`` is alive and carries this test session's marker."""
    mark = f"{_SESSION_MARK}={os.environ.get(_SESSION_MARK, '')}".encode()
    try:
        with open(f"/proc/{pid}/environ", "rb") as fh:
            return mark in fh.read().split(b"\0")
    except OSError:
        return False


def _session_blocks() -> set[str]:
    """Blocks this test session made: new since it began, and made by pytest itself, by a process of
    the session, or by one that is gone (a run a test killed). A block whose creator is alive and not
    ours (a real batch run beside the tests) is not ours to report or unlink. The creator's pid is
    in the name (``cxr-deploy-<pid>-<random>-<slot>``, cxr_deploy/batch/shm.py)."""
    ours = set()
    for name in _shm_blocks() - _shm_at_start:
        pid = name[len(_SHM_PREFIX):].split("-", 1)[0]
        if not pid.isdigit():
            continue
        pid = int(pid)
        if pid == os.getpid() or _is_marked(pid) or not os.path.exists(f"/proc/{pid}"):
            ours.add(name)
    return ours


def _marked_processes() -> list[tuple[int, str]]:
    mark = f"{_SESSION_MARK}={os.environ.get(_SESSION_MARK, '')}".encode()
    me, found = os.getpid(), []
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as fh:
                if mark not in fh.read().split(b"\0"):
                    continue
            with open(f"/proc/{entry}/stat") as fh:
                state, ppid = fh.read().rsplit(")", 1)[1].split()[:2]
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                cmdline = fh.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:  # gone meanwhile, or not ours to read
            continue
        # multiprocessing's resource tracker of *this* pytest process ends when pytest does
        # (it exits on EOF of its pipe): not a leak of any test.
        if state == "Z" or (int(ppid) == me and "resource_tracker" in cmdline):
            continue
        found.append((int(entry), cmdline))
    return found


def pytest_sessionfinish(session, exitstatus):
    import signal
    import time

    if session.config.pluginmanager.hasplugin("dsession"):
        # pytest-xdist's controller: its workers started the tests' processes, under their own
        # markers, and each checks its own at its end (the workers themselves carry this one).
        return

    deadline = time.monotonic() + 10  # workers are given a few seconds to notice their parent died
    leaked, blocks = _marked_processes(), _session_blocks()
    while (leaked or blocks) and time.monotonic() < deadline:  # a tracker unlinks after kill -9
        time.sleep(0.2)
        leaked, blocks = _marked_processes(), _session_blocks()
    if not leaked and not blocks:
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    lines = [f"{len(leaked)} process(es) started by the tests are still running:"] if leaked else []
    lines += [f"  pid {pid}: {cmd[:200]}" for pid, cmd in leaked]
    if blocks:
        lines.append(f"{len(blocks)} shared-memory block(s) created during the tests are left in {_SHM_DIR}: "
                     + ", ".join(sorted(blocks)[:10]))
        for name in blocks:
            (_SHM_DIR / name).unlink(missing_ok=True)
    if reporter:
        reporter.write_line("\n".join(lines), red=True)
    for pid, _ in leaked:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    session.exitstatus = 1


@pytest.fixture(scope="session")
def session_shm_blocks():
    """What the end-of-session check counts as this session's shared-memory blocks."""
    return _session_blocks
