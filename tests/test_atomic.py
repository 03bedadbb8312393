"""Crash-safe writes: the atomic module leaves the old file or the new one, never a temp file; every
writer uses it; ``save_bundle`` swaps bundles in one step and replaces only a bundle that verifies."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cxr_deploy import atomic
from cxr_deploy.bundle import ModelBundle, save_bundle
from cxr_deploy.errors import BundleError
from cxr_deploy.preprocessing import PreprocessSpec

REPO = Path(__file__).resolve().parents[1]


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if atomic.TEMP_MARK in p.name)


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp_file(tmp_path):
    target = tmp_path / "report.json"
    atomic.write_text(target, "old\n")
    with pytest.raises(RuntimeError):
        with atomic.open_atomic(target, "w") as fh:
            fh.write("half of the new")
            raise RuntimeError("disk full, say")
    assert target.read_text() == "old\n" and _leftovers(tmp_path) == []
    (tmp_path / "dir.png").mkdir()  # the rename itself fails: the target is a folder
    with pytest.raises(OSError):
        atomic.write_bytes(tmp_path / "dir.png", b"\x89PNG")
    with pytest.raises(TypeError):  # json cannot encode it: fails mid-stream
        atomic.write_json(target, {"x": object()})
    assert target.read_text() == "old\n" and _leftovers(tmp_path) == []
    atomic.copy(target, tmp_path / "copy.json")
    atomic.write_json(target, {"new": 1})
    assert json.loads(target.read_text()) == {"new": 1} and (tmp_path / "copy.json").read_text() == "old\n"
    assert _leftovers(tmp_path) == []


def test_a_process_killed_mid_write_leaves_the_old_file_whole(tmp_path):
    """A real kill -9 while the new content streams: the target still holds the whole old file."""
    target = tmp_path / "results.csv"
    atomic.write_text(target, "old content\n")
    code = ("import os, sys, signal; from cxr_deploy import atomic\n"
            "with atomic.open_atomic(sys.argv[1], 'w') as fh:\n"
            "    fh.write('new ' * 100000); fh.flush(); os.kill(os.getpid(), signal.SIGKILL)\n")
    proc = subprocess.run([sys.executable, "-c", code, str(target)], timeout=60)
    assert proc.returncode == -9
    assert target.read_text() == "old content\n"


def test_check_writable_fails_where_even_root_cannot_create_a_file(tmp_path):
    atomic.check_writable(tmp_path)
    assert _leftovers(tmp_path) == [] and list(tmp_path.iterdir()) == []
    with pytest.raises(OSError):
        atomic.check_writable(tmp_path / "missing")
    (tmp_path / "file").write_text("x")
    with pytest.raises(OSError):
        atomic.check_writable(tmp_path / "file")


def test_no_hand_written_write_then_rename_is_left():
    """Every writer goes through cxr_deploy.atomic: no os.replace/rename/fsync of its own elsewhere
    (the ones left are appends, not whole-file writes, or moves of finished files)."""
    allowed = {"cxr_deploy/atomic.py", "cxr_deploy/bundle.py", "cxr_deploy/batch/overlay.py",
               "cxr_deploy/batch/results_file.py", "cxr_deploy/batch/parts.py", "cxr_deploy/pacs/transfer.py",
               "export/exporter.py", "cxr_deploy/review/store.py"}  # store.py: appended verdict lines
    found = []
    for folder in ("cxr_deploy", "training", "export"):
        for path in sorted((REPO / folder).rglob("*.py")):
            rel = path.relative_to(REPO).as_posix()
            for number, line in enumerate(path.read_text().splitlines(), 1):
                if re.search(r"os\.replace\(|\.rename\(|os\.fsync\(|\.tmp\b", line.split("#")[0]) and rel not in allowed:
                    found.append(f"{rel}:{number}: {line.strip()}")
    assert found == []


@pytest.fixture(scope="module")
def state():
    torch.manual_seed(0)
    from cxr_deploy.model import build_model

    return build_model(weights=None).state_dict()


def test_save_bundle_never_deletes_a_folder_that_merely_holds_a_manifest(tmp_path, state):
    target = tmp_path / "results"
    target.mkdir()
    (target / "manifest.json").write_text('{"study": "mine"}\n')
    (target / "notes.txt").write_text("keep")
    with pytest.raises(BundleError, match="not a cxr-deploy bundle"):
        save_bundle(target, state, spec=PreprocessSpec(input_size=64))
    assert (target / "notes.txt").read_text() == "keep" and (target / "manifest.json").exists()


def test_a_failure_between_the_steps_of_a_replace_leaves_a_valid_bundle(tmp_path, state, monkeypatch):
    target = tmp_path / "best"
    first = save_bundle(target, state, spec=PreprocessSpec(input_size=64), threshold=0.3)
    import cxr_deploy.bundle as bundle_module

    real_replace, calls = bundle_module.os.replace, []

    def replace_then_fail(src, dst):  # writing the manifest is call 1; the swap's renames follow
        calls.append((src, dst))
        if len(calls) == 3:
            raise KeyboardInterrupt("killed between the two renames of a swap")
        return real_replace(src, dst)

    monkeypatch.setattr(bundle_module.os, "replace", replace_then_fail)
    monkeypatch.setattr(bundle_module.shutil, "rmtree", lambda *a, **k: None)  # and nothing cleaned up
    try:
        save_bundle(target, state, spec=PreprocessSpec(input_size=64), threshold=0.7)
    except KeyboardInterrupt:
        pass
    monkeypatch.undo()
    loaded = ModelBundle.load(target)  # a whole bundle is at the path: the old one or the new one
    assert loaded.threshold in (0.3, 0.7)
    if _exchange_works(tmp_path):  # one atomic step: the new bundle is in place
        assert loaded.threshold == 0.7 and len(calls) == 1


def test_bundle_swap_uses_one_exchange_and_keeps_no_old_copy(tmp_path, state):
    target = tmp_path / "best"
    save_bundle(target, state, spec=PreprocessSpec(input_size=64), threshold=0.3)
    save_bundle(target, state, spec=PreprocessSpec(input_size=64), threshold=0.6)
    assert ModelBundle.load(target).threshold == 0.6
    assert [p.name for p in tmp_path.iterdir()] == ["best"]  # no temp or old folder left


def _exchange_works(folder: Path) -> bool:
    a, b = folder / "xa", folder / "xb"
    a.mkdir()
    b.mkdir()
    (a / "f").write_text("a")
    try:
        return atomic.exchange(a, b) and (b / "f").read_text() == "a"
    finally:
        import shutil

        shutil.rmtree(a)
        shutil.rmtree(b)
