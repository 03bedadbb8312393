"""--shard i/n splits deterministically; bad files each get an error row and exit code 3."""

from __future__ import annotations

import os
import shutil

from click.testing import CliRunner

from cxr_deploy.api import run_batch
from cxr_deploy.batch.cli import batch_command
from cxr_deploy.batch.csv_writer import read_results
from cxr_deploy.batch.pipeline import parse_shard


def test_shards_are_disjoint_and_cover_everything(tiny_bundle, tmp_path, make_pngs):
    make_pngs(tmp_path / "share" / "x", 9)
    make_pngs(tmp_path / "share" / "y", 8, start=9)
    everything = {r["path"] for r in read_results(_run(tiny_bundle, tmp_path / "share", tmp_path / "all.csv"))}
    assert len(everything) == 17

    parts = []
    for i in (1, 2, 3):
        out = _run(tiny_bundle, tmp_path / "share", tmp_path / f"shard{i}.csv", shard=parse_shard(f"{i}/3"))
        parts.append({r["path"] for r in read_results(out)})
    assert set().union(*parts) == everything
    assert sum(len(p) for p in parts) == len(everything), "a file landed in two shards"
    assert all(parts), "a shard got nothing: the split is not spreading files"

    # Another machine mounting the same share elsewhere assigns the same files to the same shard.
    mount = tmp_path / "elsewhere"
    os.symlink(tmp_path / "share", mount)
    other = {r["path"] for r in read_results(_run(tiny_bundle, mount, tmp_path / "m2.csv", shard=(1, 3)))}
    assert {p.replace(str(mount), str(tmp_path / "share")) for p in other} == parts[1]


def _run(bundle, folder, out, **options):
    summary = run_batch([folder], model=bundle, out=out, workers=0, batch_size=8, **options)
    assert summary.exit_code == 0
    return out


def test_bad_files_get_error_rows_and_exit_3(tiny_bundle, tmp_path, make_pngs, shared_data):
    folder = tmp_path / "export"
    good = make_pngs(folder, 3)
    (folder / "empty.png").write_bytes(b"")
    data = good[0].read_bytes()
    (folder / "truncated.png").write_bytes(data[: len(data) // 2])
    (folder / "noise.png").write_bytes(os.urandom(5000))
    shutil.copy(shared_data / "dicom" / "pydicom_test_files" / "rtplan.dcm", folder / "rtplan.dcm")
    (folder / "notes.txt").write_text("export manifest, not an image\n")
    out = tmp_path / "results.csv"

    result = CliRunner().invoke(batch_command, [str(folder), "--model", str(tiny_bundle), "--out", str(out),
                                                "-b", "2", "-j", "2"])
    assert result.exit_code == 3, result.output
    rows = {os.path.basename(r["path"]): r for r in read_results(out)}
    assert len(rows) == 8
    for name in ("empty.png", "truncated.png", "noise.png", "rtplan.dcm"):
        assert rows[name]["status"] == "error", name
        reason = rows[name]["error"]
        assert reason and "\n" not in reason and "Traceback" not in reason
        assert rows[name]["probability"] == ""
    assert "empty" in rows["empty.png"]["error"]
    assert "pixel data" in rows["rtplan.dcm"]["error"]
    assert rows["notes.txt"]["status"] == "skipped"
    for path in good:
        assert rows[path.name]["status"] == "ok"
    assert "3 ok, 4 error, 1 skipped" in result.output

    # Skipped non-image files alone do not fail a run.
    clean = tmp_path / "clean"
    make_pngs(clean, 2)
    (clean / "README.txt").write_text("hello")
    result = CliRunner().invoke(batch_command, [str(clean), "--model", str(tiny_bundle), "--out",
                                                str(tmp_path / "clean.csv"), "-j", "0"])
    assert result.exit_code == 0, result.output

    # A bundle that is not there: exit 2, no CSV.
    result = CliRunner().invoke(batch_command, [str(clean), "--model", str(tmp_path / "nope"), "--out",
                                                str(tmp_path / "x.csv")])
    assert result.exit_code == 2 and not (tmp_path / "x.csv").exists()
