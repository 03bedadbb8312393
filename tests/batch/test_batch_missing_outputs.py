"""Missing outputs never look like success: unwritable output folders stop the run before any work
(exit 2); an overlay or DICOM result that cannot be written makes its row say why and the run exit
4; ``--resume`` then writes what is missing, keeping one row per input."""

from __future__ import annotations

import shutil
from pathlib import Path

import pydicom
import pytest

from cxr_deploy import atomic
from cxr_deploy.batch.overlay import overlay_names
from cxr_deploy.batch.results_file import read_results
from cxr_deploy.bundle import ModelBundle
from cxr_deploy.pacs.results import result_paths

from tests.support import write_pngs

SAMPLES = Path(__file__).resolve().parents[2] / "samples"
READ_ONLY = Path("/sys/kernel")  # a folder even root cannot create files in (sysfs)


def _root_cannot_write(folder: Path) -> bool:
    try:
        atomic.check_writable(folder)
    except OSError:
        return folder.is_dir()
    return False


@pytest.mark.skipif(not _root_cannot_write(READ_ONLY), reason=f"{READ_ONLY} is writable here")
def test_unwritable_output_folders_stop_the_run_before_any_work(tiny_bundle, tmp_path, cli):
    images = tmp_path / "images"
    shutil.copytree(SAMPLES / "images", images)
    out = tmp_path / "r.csv"
    for args in (["--cam-dir", READ_ONLY], ["--dicom-out", READ_ONLY],
                 ["--labels-from-folders", "--report-dir", READ_ONLY, "--overwrite"]):
        proc = cli("batch", images, "-m", tiny_bundle, "-o", out, "-j", "0", *args)
        assert proc.returncode == 2, proc.stderr
        (line,) = proc.stderr.strip().splitlines()
        option = "--report-dir" if "--report-dir" in args else args[0]
        assert line.startswith("cxr-deploy: error:") and option in line, line
        assert str(READ_ONLY) in line and "cannot write" in line, line
        assert not out.exists()  # nothing was done


def test_unwritten_overlay_and_dicom_result_exit_4_and_resume_writes_them(tiny_bundle, tmp_path, cli):
    inputs = tmp_path / "in"
    pngs = write_pngs(inputs, 2)
    dicom = Path(shutil.copy(SAMPLES / "dicom" / "IM000004", inputs / "IM000004"))
    cams, results, out = tmp_path / "cams", tmp_path / "dcm", tmp_path / "r.csv"
    # Folders where the first PNG's overlay (both its names) and the DICOM's SR would go: real write failures.
    blockers = [cams / name for name in overlay_names(str(pngs[0].absolute()), None, "png")]
    sop = str(pydicom.dcmread(dicom, stop_before_pixels=True).SOPInstanceUID)
    blockers.append(result_paths(results, sop, ModelBundle.load(tiny_bundle).model_id)[0])
    for folder in blockers:
        folder.mkdir(parents=True)

    first = cli("batch", inputs, "-m", tiny_bundle, "-o", out, "--cam-dir", cams, "--dicom-out", results, "-j", "0")
    assert first.returncode == 4, first.stderr
    assert "OUTPUTS MISSING: 2 rows" in first.stderr and "--resume" in first.stderr
    rows = {Path(r["path"]).name: r for r in read_results(out)}
    assert rows[pngs[0].name]["status"] == "ok" and rows[pngs[0].name]["overlay_path"] == ""
    assert rows[pngs[0].name]["error"].startswith("overlay not written")
    assert rows["IM000004"]["error"].startswith("DICOM results not written")
    assert rows[pngs[1].name]["error"] == "" and Path(rows[pngs[1].name]["overlay_path"]).is_file()

    # resumed over other inputs: rows this run will not score again stay in the CSV as they are
    other = cli("batch", pngs[1], "-m", tiny_bundle, "-o", out, "--cam-dir", cams, "--dicom-out", results,
                "-j", "0", "--resume")
    assert other.returncode == 0 and "miss their" not in other.stderr, other.stderr
    assert len(read_results(out)) == 3

    for folder in blockers:  # the cause is fixed (space freed, folder repaired)
        folder.rmdir()
    again = cli("batch", inputs, "-m", tiny_bundle, "-o", out, "--cam-dir", cams, "--dicom-out", results,
                "-j", "0", "--resume")
    assert again.returncode == 0, again.stderr
    assert "2 rows already in" in again.stderr
    rows = read_results(out)
    assert sorted(Path(r["path"]).name for r in rows) == sorted([p.name for p in pngs] + ["IM000004"])
    for row in rows:
        assert row["status"] == "ok" and row["error"] == "", row
        assert Path(row["overlay_path"]).is_file()
    assert all(p.is_file() for p in result_paths(results, sop, ModelBundle.load(tiny_bundle).model_id))
    third = cli("batch", inputs, "-m", tiny_bundle, "-o", out, "--cam-dir", cams, "--dicom-out", results,
                "-j", "0", "--resume")
    assert third.returncode == 0 and "already in the CSV" in third.stderr and "miss their" not in third.stderr
    assert len(read_results(out)) == 3


def test_results_whose_writing_hangs_exit_4(tiny_bundle, tmp_path, cli):
    """A stalled share: a FIFO with no writer at the SR's name blocks the worker that checks what is
    there. The run gives up after --decode-timeout, the row says so, and the run exits 4 (before:
    exit 0, a scored DICOM with no SR and no SC passing for success)."""
    import os

    inputs = tmp_path / "in"
    inputs.mkdir()
    dicom = Path(shutil.copy(SAMPLES / "dicom" / "normal_jpeg_baseline.dcm", inputs / "cxr.dcm"))
    results, out = tmp_path / "dcm", tmp_path / "r.csv"
    results.mkdir()
    sop = str(pydicom.dcmread(dicom, stop_before_pixels=True).SOPInstanceUID)
    os.mkfifo(result_paths(results, sop, ModelBundle.load(tiny_bundle).model_id)[0])
    hung = cli("batch", inputs, "-m", tiny_bundle, "-o", out, "--dicom-out", results, "-j", "1",
               "--decode-timeout", "2")
    assert hung.returncode == 4, hung.stderr
    assert "OUTPUTS MISSING: 1 rows" in hung.stderr
    row = read_results(out)[0]
    assert row["status"] == "ok" and "not written" in row["error"] and "took over 2 s" in row["error"]
