import os

from PIL import Image
import numpy as np

from cxr_deploy.imaging import scan_paths


def _png(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(path, format="PNG")


def test_recursive_deterministic_skips_hidden_dicomdir_and_survives_loops(tmp_path):
    _png(tmp_path / "b" / "2.png")
    _png(tmp_path / "b" / "1")  # no extension
    _png(tmp_path / "a.png")
    _png(tmp_path / ".hidden" / "x.png")
    _png(tmp_path / ".dotfile.png")
    (tmp_path / "DICOMDIR").write_bytes(b"\0" * 200)
    (tmp_path / "notes.txt").write_text("hello")
    os.symlink(tmp_path, tmp_path / "b" / "loop")  # a link back to the root

    entries = list(scan_paths([tmp_path]))
    images = [os.path.relpath(e.path, tmp_path) for e in entries if not e.skipped]
    skipped = [os.path.relpath(e.path, tmp_path) for e in entries if e.skipped]
    assert images == ["a.png", "b/1", "b/2.png"]
    assert skipped == ["notes.txt"]
    assert [e.path for e in scan_paths([tmp_path])] == [e.path for e in entries]  # same order again


def test_explicit_files_pass_through(tmp_path):
    _png(tmp_path / "x.png")
    entries = list(scan_paths([tmp_path / "x.png", tmp_path / "missing.png"]))
    assert [e.format for e in entries] == ["png", "unknown"]
