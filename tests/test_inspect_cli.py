import subprocess
import sys
from pathlib import Path

import numpy as np
from click.testing import CliRunner
from PIL import Image

from cxr_deploy.cli import main
from cxr_deploy.decision import number_text

SAMPLES = Path(__file__).resolve().parents[1] / "samples"


def test_inspect_samples_one_line_per_file_and_png_export(tmp_path):
    result = CliRunner().invoke(main, ["inspect", str(SAMPLES), "--png", str(tmp_path / "seen")])
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if line.startswith(str(SAMPLES))]
    dicom_lines = [line for line in lines if "\tdicom\t" in line]
    assert len(dicom_lines) == 4 and any("MONOCHROME1" in line for line in dicom_lines)
    assert any("IM000004" in line and "\tdicom\t" in line for line in lines)  # detected without extension
    pngs = sorted((tmp_path / "seen").rglob("*.png"))
    assert len(pngs) == 12
    seen = np.asarray(Image.open(pngs[0]))
    assert seen.shape == (224, 224)


def test_inspect_real_dicom_folder_has_no_traceback(shared_data):
    proc = subprocess.run([sys.executable, "-m", "cxr_deploy.cli", "inspect", str(shared_data / "dicom")],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0
    assert "Traceback" not in proc.stderr + proc.stdout
    lines = proc.stdout.splitlines()
    files = [p for p in (shared_data / "dicom").rglob("*") if p.is_file() and not p.name.startswith("DICOMDIR")]
    assert len(lines) == len(files)


def test_inspect_bundle_prints_manifest(tmp_path):
    from cxr_deploy.bundle import save_bundle
    from cxr_deploy.model import build_model
    from cxr_deploy.preprocessing import PreprocessSpec

    save_bundle(tmp_path / "b", build_model(None), spec=PreprocessSpec(input_size=64))
    result = CliRunner().invoke(main, ["inspect", str(tmp_path / "b")])
    assert result.exit_code == 0 and "verified" in result.output and '"input_size": 64' in result.output


def test_inspect_shows_each_operating_point_against_the_default(tmp_path):
    """Points chosen on validation scores where Youden's J (the default) already reaches a validation
    sensitivity above 0.95: the sens95 point (the highest threshold reaching 0.95) is then *less*
    sensitive than the default, and inspect must say so rather than let the name suggest the opposite."""
    from cxr_deploy.bundle import save_bundle
    from cxr_deploy.model import build_model
    from cxr_deploy.preprocessing import PreprocessSpec
    from cxr_deploy.training.threshold import choose_threshold, operating_points

    rng = np.random.default_rng(0)
    labels = np.r_[np.zeros(204), np.ones(100)]
    scores = np.r_[rng.uniform(0, 0.15, 200), rng.uniform(0.2, 0.3, 4), rng.uniform(0.5, 1, 94),
                   rng.uniform(0.2, 0.3, 6)]
    points, default = operating_points(labels, scores), choose_threshold(labels, scores)
    assert points["youden"]["sensitivity"] > points["sens95"]["sensitivity"]  # the case in question
    save_bundle(tmp_path / "b", build_model(None), spec=PreprocessSpec(input_size=64), threshold=default["threshold"],
                training={"operating_points": points, "threshold_rule": default})
    result = CliRunner().invoke(main, ["inspect", str(tmp_path / "b")])
    assert result.exit_code == 0, result.output
    lines = {line.split()[1]: line for line in result.output.splitlines() if line.startswith("#   ")}
    assert set(lines) == set(points)
    for name, point in points.items():
        assert f"threshold {number_text(point['threshold'])}" in lines[name]
        assert f"sensitivity {point['sensitivity']:.3f}, specificity {point['specificity']:.3f}" in lines[name]
    assert "default" in lines["youden"] and all("default" not in lines[n] for n in points if n != "youden")
    notes = [line for line in result.output.splitlines() if line.startswith("# note: sens")]
    weaker = sorted(n for n, p in points.items() if n != "youden" and p["sensitivity"] < points["youden"]["sensitivity"])
    assert weaker and [n.split()[2] for n in notes] == weaker, result.output
    assert "less sensitive than the default" in notes[0]
