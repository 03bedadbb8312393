import subprocess
import sys
from pathlib import Path

import numpy as np
from click.testing import CliRunner
from PIL import Image

from cxr_deploy.cli import main

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
