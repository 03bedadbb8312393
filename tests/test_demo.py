"""The README's first command, end to end (smaller input size so it fits the test budget)."""

import csv

from click.testing import CliRunner

from cxr_deploy.cli import main


def test_demo_runs_whole_pipeline_on_samples(tmp_path):
    out = tmp_path / "demo"
    result = CliRunner().invoke(main, ["demo", "--out", str(out), "--input-size", "64", "--epochs", "1"])
    assert result.exit_code == 0, result.output
    bundle = out / "train" / "best"
    for artifact in ("manifest.json", "weights.pt", "model.ts", "model.onnx", "parity.json"):
        assert (bundle / artifact).is_file(), artifact
    with open(out / "results.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    ok = [r for r in rows if r["status"] == "ok"]
    assert len(ok) == 12  # 8 JPEGs + 4 DICOMs in samples/
    assert all(0.0 <= float(r["probability"]) <= 1.0 for r in ok)
    assert len(list((out / "overlays").glob("*.png"))) == 12
    assert (out / "report" / "report.html").is_file()
    assert "Outputs:" in result.output and "(missing!)" not in result.output


def test_demo_never_deletes_a_folder_it_did_not_make(tmp_path, monkeypatch):
    victim = tmp_path / "victim"
    (victim / "chapter1").mkdir(parents=True)
    (victim / "thesis.docx").write_text("three years of work")
    (victim / "chapter1" / "draft.txt").write_text("more work")
    result = CliRunner().invoke(main, ["demo", "--out", str(victim)])
    assert result.exit_code == 2
    assert result.output.strip().splitlines()[-1].startswith("cxr-deploy: error: --out")
    assert "not made by 'cxr-deploy demo'" in result.output
    assert (victim / "thesis.docx").read_text() == "three years of work"
    assert (victim / "chapter1" / "draft.txt").read_text() == "more work"
    monkeypatch.chdir(victim)  # --out . in a working directory full of files
    assert CliRunner().invoke(main, ["demo", "--out", "."]).exit_code == 2
    assert sorted(p.name for p in victim.iterdir()) == ["chapter1", "thesis.docx"]


def test_demo_rerun_replaces_only_its_own_outputs(tmp_path):
    from cxr_deploy.demo import MARKER, prepare_out_dir

    out = tmp_path / "demo"
    prepare_out_dir(out)
    assert (out / MARKER).is_file()
    (out / "overlays").mkdir()
    (out / "overlays" / "old.png").write_bytes(b"x")
    (out / "results.csv").write_text("old")
    (out / "my_notes.txt").write_text("keep")
    prepare_out_dir(out)
    assert sorted(p.name for p in out.iterdir()) == sorted([MARKER, "my_notes.txt"])


def test_bundle_save_never_replaces_a_folder_that_is_not_a_bundle(tmp_path):
    import pytest
    import torch

    from cxr_deploy.bundle import save_bundle
    from cxr_deploy.errors import BundleError
    from cxr_deploy.preprocessing import PreprocessSpec

    target = tmp_path / "best"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    state = {"w": torch.zeros(1)}
    with pytest.raises(BundleError, match="not a cxr-deploy bundle"):
        save_bundle(target, state, spec=PreprocessSpec())
    assert (target / "notes.txt").read_text() == "mine"
