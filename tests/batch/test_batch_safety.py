"""Issue 9 safety: every result belongs to the right image, outputs go only where the user said,
an empty night is not a good night, and SIGTERM ends a run (exit 130) instead of hanging it."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cxr_deploy.batch.results_file import COLUMNS, read_results

from tests.support import session_members

SAMPLES = Path(__file__).resolve().parents[2] / "samples"


def _png(path: Path, seed: int) -> Path:
    """A distinct smooth film per seed, saved as PNG under a name without extension (as PACS do)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:120, 0:100]
    img = sum(rng.uniform(0.3, 1) * np.exp(-((y - rng.uniform(0, 120)) ** 2 + (x - rng.uniform(0, 100)) ** 2)
                                           / (2 * rng.uniform(10, 30) ** 2)) for _ in range(4))
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.round(img / img.max() * 255).astype(np.uint8)).save(path, format="PNG")
    return path


def _identity(overlay: str) -> dict:
    with Image.open(overlay) as image:
        text = image.text["cxr-deploy:input"] if image.format == "PNG" else \
            image.info["comment"].decode().split("=", 1)[1]
    return json.loads(text)


def _film_correlation(overlay: str, source: str) -> float:
    """How much the overlay's gray content looks like ``source`` (the film it should show)."""
    from cxr_deploy.batch.overlay import view_image
    from cxr_deploy.imaging import read_image

    view = view_image(read_image(source).pixels).astype(float)
    shown = np.asarray(Image.open(overlay).convert("L"), float)[:, :view.shape[1]]
    band = view.shape[0] // 6  # leave out caption and footer
    a, b = view[band:-band].ravel(), shown[band:-band].ravel()
    return float(np.corrcoef(a, b)[0, 1])


def test_same_name_in_two_folders_gets_two_overlays_each_showing_its_own_film(tiny_bundle, tmp_path, cli):
    first, second = _png(tmp_path / "d1" / "IM0001", 1), _png(tmp_path / "d2" / "IM0001", 2)
    out, cams = tmp_path / "r.csv", tmp_path / "ov"
    proc = cli("batch", tmp_path / "d1", tmp_path / "d2", "--model", tiny_bundle, "--out", out,
               "--cam-dir", cams, "-j", "1")
    assert proc.returncode == 0, proc.stderr
    rows = read_results(out)
    overlays = [r["overlay_path"] for r in rows]
    assert len(rows) == 2 and all(overlays) and len(set(overlays)) == 2, overlays
    assert len(list(cams.iterdir())) == 2
    for row in rows:
        assert _identity(row["overlay_path"])["path"] == row["path"]
        own, other = (first, second) if row["path"] == str(first) else (second, first)
        assert _film_correlation(row["overlay_path"], str(own)) > _film_correlation(row["overlay_path"], str(other))


def test_second_night_into_the_same_cam_dir_never_replaces_the_first_nights_overlays(tiny_bundle, tmp_path, cli):
    cams = tmp_path / "ov"
    night1 = _png(tmp_path / "2026-11-24" / "IM0001", 1)
    _png(tmp_path / "2026-11-25" / "IM0001", 2)
    assert cli("batch", night1.parent, "--model", tiny_bundle, "--out", tmp_path / "n1.csv", "--cam-dir", cams,
               "-j", "0").returncode == 0
    (row1,) = read_results(tmp_path / "n1.csv")
    before = Path(row1["overlay_path"]).read_bytes()

    proc = cli("batch", tmp_path / "2026-11-25", "--model", tiny_bundle, "--out", tmp_path / "n2.csv",
               "--cam-dir", cams, "-j", "0", "--cam-format", "jpeg")
    assert proc.returncode == 0, proc.stderr
    (row2,) = read_results(tmp_path / "n2.csv")
    assert row2["overlay_path"] != row1["overlay_path"]
    assert Path(row1["overlay_path"]).read_bytes() == before  # night 1's CSV still shows night 1's film
    assert _identity(row1["overlay_path"])["path"] == str(night1)
    assert _identity(row2["overlay_path"])["path"] == row2["path"]

    # Rerunning night 1 is stable: same name, its own overlay replaced in place.
    assert cli("batch", night1.parent, "--model", tiny_bundle, "--out", tmp_path / "n1.csv", "--overwrite",
               "--cam-dir", cams, "-j", "0").returncode == 0
    assert read_results(tmp_path / "n1.csv")[0]["overlay_path"] == row1["overlay_path"]


def test_a_file_that_is_not_ours_is_never_overwritten(tiny_bundle, tmp_path, cli):
    source = _png(tmp_path / "in" / "IM0001", 3)
    cams = tmp_path / "ov"
    args = ("batch", source.parent, "--model", tiny_bundle, "--cam-dir", cams, "-j", "0")
    assert cli(*args, "--out", tmp_path / "a.csv").returncode == 0
    taken = Path(read_results(tmp_path / "a.csv")[0]["overlay_path"])
    taken.write_bytes(b"the radiologist's own notes")  # someone put their own file at that name
    assert cli(*args, "--out", tmp_path / "b.csv").returncode == 0
    assert taken.read_bytes() == b"the radiologist's own notes"
    (row,) = read_results(tmp_path / "b.csv")
    assert row["overlay_path"] != str(taken) and _identity(row["overlay_path"])["path"] == str(source)


def test_dicom_overlays_are_named_by_sop_instance_uid(tiny_bundle, tmp_path):
    import pydicom

    from cxr_deploy.api import run_batch

    dicom = SAMPLES / "dicom" / "IM000004"
    copy = tmp_path / "copy" / "IM000004"  # the same SOP instance twice in one run
    copy.parent.mkdir()
    shutil.copy(dicom, copy)
    out = tmp_path / "r.csv"
    assert run_batch([dicom, copy], model=tiny_bundle, out=out, workers=0, cam_dir=tmp_path / "ov").exit_code == 0
    uid = pydicom.dcmread(dicom, stop_before_pixels=True).SOPInstanceUID
    names = {Path(r["path"]).parent.name: Path(r["overlay_path"]).name for r in read_results(out)}
    assert names["dicom"] == f"{uid}.png"  # the first copy gets the UID itself ...
    assert names["copy"].startswith(f"{uid}-") and names["copy"].endswith(".png")  # ... the second a path hash


@pytest.mark.parametrize("target, message", [("missing/dir/r.csv", "does not exist"),
                                             ("afile/r.csv", "afile is not a directory")])
def test_out_in_a_missing_folder_is_an_error_unless_asked_for(tiny_bundle, tmp_path, cli, target, message):
    _png(tmp_path / "in" / "a.png", 1)
    (tmp_path / "afile").write_text("a file, not a folder")
    proc = cli("batch", tmp_path / "in", "--model", tiny_bundle, "--out", tmp_path / target, "-j", "0")
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert proc.stderr.startswith("cxr-deploy: error:") and proc.stderr.count("\n") == 1
    assert not (tmp_path / "missing").exists()
    if target.startswith("missing"):
        ok = cli("batch", tmp_path / "in", "--model", tiny_bundle, "--out", tmp_path / target, "-j", "0",
                 "--create-dirs")
        assert ok.returncode == 0 and (tmp_path / target).is_file()


def test_symlink_loop_gets_an_error_row(tiny_bundle, tmp_path):
    from cxr_deploy.api import run_batch

    folder = tmp_path / "d"
    _png(folder / "c.png", 1)
    os.symlink("b.dcm", folder / "a.dcm")
    os.symlink("a.dcm", folder / "b.dcm")
    summary = run_batch([folder], model=tiny_bundle, out=tmp_path / "r.csv", workers=0)
    rows = {Path(r["path"]).name: r for r in read_results(tmp_path / "r.csv")}
    assert sorted(rows) == ["a.dcm", "b.dcm", "c.png"] and summary.exit_code == 3
    assert all(rows[n]["status"] == "error" and "symbolic link loop" in rows[n]["error"] for n in ("a.dcm", "b.dcm"))


def test_an_empty_or_unmounted_input_folder_is_not_a_good_night(tiny_bundle, tmp_path, cli):
    (tmp_path / "mnt" / "pacs").mkdir(parents=True)
    (tmp_path / "mnt" / "pacs" / ".hidden").write_text("")  # what an empty mount point may hold
    proc = cli("batch", tmp_path / "mnt" / "pacs", "--model", tiny_bundle, "--out", tmp_path / "r.csv")
    assert proc.returncode == 2 and "no inputs found under" in proc.stderr, proc.stderr
    assert not (tmp_path / "r.csv").exists()


def test_sigterm_while_the_main_process_is_starved_exits_130_with_an_intact_csv(tiny_bundle, tmp_path, make_pngs):
    images = make_pngs(tmp_path / "in", 12)
    fifo = tmp_path / "inputs.fifo"
    os.mkfifo(fifo)
    out = tmp_path / "r.csv"
    proc = subprocess.Popen([sys.executable, "-m", "cxr_deploy.cli", "batch", f"@{fifo}", "--model", str(tiny_bundle),
                             "--out", str(out), "-b", "2", "-j", "2"], env=dict(os.environ, OMP_NUM_THREADS="1"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        with open(fifo, "w") as feed:
            feed.writelines(f"{p}\n" for p in images)
            feed.flush()
            deadline = time.monotonic() + 90
            while not (out.exists() and out.read_text().count("\n") >= 3) and time.monotonic() < deadline:
                assert proc.poll() is None, proc.stderr.read().decode()
                time.sleep(0.05)
            os.kill(proc.pid, signal.SIGSTOP)  # CPU starvation: workers get the signal first
            os.killpg(proc.pid, signal.SIGTERM)
            time.sleep(0.5)
            started = time.monotonic()
            os.kill(proc.pid, signal.SIGCONT)
            code = proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert code == 130 and time.monotonic() - started < 10
    text = out.read_bytes()
    assert text.endswith(b"\r\n")
    rows = read_results(out)
    assert rows and all(r["status"] == "ok" for r in rows) and len({r["path"] for r in rows}) == len(rows)
    assert all(len(r) == len(COLUMNS) for r in rows)


def test_killed_batch_leaves_no_process_behind(tiny_bundle, tmp_path, make_pngs):
    """kill -9 of the main process: its decode workers and multiprocessing's resource tracker end too."""
    images = make_pngs(tmp_path / "in", 4)
    fifo = tmp_path / "inputs.fifo"
    os.mkfifo(fifo)
    proc = subprocess.Popen([sys.executable, "-m", "cxr_deploy.cli", "batch", f"@{fifo}", "--model", str(tiny_bundle),
                             "--out", str(tmp_path / "r.csv"), "-b", "2", "-j", "2"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    with open(fifo, "w") as feed:  # keep the run waiting for more input, workers alive
        feed.writelines(f"{p}\n" for p in images)
        feed.flush()
        deadline = time.monotonic() + 60
        while len(session_members(proc.pid)) < 3 and time.monotonic() < deadline:
            time.sleep(0.1)
        members = session_members(proc.pid)
        assert len(members) >= 3, members  # main + 2 workers (+ resource tracker)
        proc.kill()
        proc.wait()
        deadline = time.monotonic() + 10
        while session_members(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
    assert session_members(proc.pid) == []


