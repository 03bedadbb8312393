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
