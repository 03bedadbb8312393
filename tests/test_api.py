"""The Python API (cxr_deploy.load / predict / run_batch) as a PACS script uses it."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from tests.support import SAMPLES


@pytest.fixture(scope="module")
def bundle(tiny_bundle):
    """The shared tiny bundle (exported once for the session): the API only reads it."""
    return tiny_bundle


def test_a_script_without_a_main_guard_runs_once(bundle, tmp_path):
    """Spawned workers must not re-run the caller's script (it printed every prediction 3x)."""
    script = tmp_path / "nightly.py"
    script.write_text(textwrap.dedent(f"""
        import cxr_deploy
        model = cxr_deploy.load({str(bundle)!r})
        for r in model.predict([{str(SAMPLES / 'images' / 'NORMAL' / 'IM-0147-0001.jpeg')!r}]):
            print("PREDICTED", r["status"])
        summary = cxr_deploy.run_batch([{str(SAMPLES / 'images')!r}], model={str(bundle)!r},
                                       out={str(tmp_path / 'r.csv')!r}, workers=2)
        print("SUMMARY", summary.exit_code, summary.counts["ok"])
    """))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("PREDICTED ok") == 1, proc.stdout
    assert proc.stdout.count("SUMMARY 0 8") == 1, proc.stdout


def test_predict_paths_arrays_and_skips(bundle):
    import cxr_deploy
    from cxr_deploy.decision import decide

    model = cxr_deploy.load(bundle)
    gray = np.linspace(0, 1, 80 * 60, dtype=np.float32).reshape(80, 60)
    records = model.predict([SAMPLES / "dicom" / "IM000004", gray, (gray * 255).astype(np.uint8),
                             SAMPLES / "README.md"], return_cam=True)
    dicom, as_float, as_uint8, readme = records
    assert dicom["status"] == "ok" and (dicom["modality"], dicom["body_part"], dicom["view_position"]) == \
        ("DX", "CHEST", "PA")
    assert as_float["status"] == as_uint8["status"] == "ok"
    assert as_float["probability"] == pytest.approx(as_uint8["probability"], abs=1e-2)
    assert readme["status"] == "skipped" and readme["probability"] is None
    for r in (dicom, as_float):
        probs = np.array([1 - r["probability"], r["probability"]])
        assert r["predicted_label"] == decide(probs, 1, model.threshold, model.class_names)
        assert r["cam"].shape == (2, 2)
    # a threshold outside [0, 1] is refused with one line, not silently used
    with pytest.raises(ValueError, match=r"within \[0, 1\]"):
        model.predict([gray], threshold=1.5)


def test_predict_skips_what_the_model_was_not_made_for(bundle, tmp_path):
    import pydicom

    import cxr_deploy
    from cxr_deploy.eligibility import ChestFilter

    lateral = tmp_path / "lateral.dcm"
    ds = pydicom.dcmread(SAMPLES / "dicom" / "IM000004")
    ds.ViewPosition = "LL"
    ds.save_as(lateral)
    (record,) = cxr_deploy.load(bundle).predict([lateral])
    assert record["status"] == "skipped" and "lateral view" in record["error"] and record["probability"] is None
    (record,) = cxr_deploy.load(bundle, eligibility=ChestFilter.build(any_view=True)).predict([lateral])
    assert record["status"] == "ok" and record["view_position"] == "LL"


def test_docs_python_example_does_its_work_under_the_main_guard():
    import ast

    page = (Path(__file__).resolve().parents[1] / "docs" / "api.md").read_text()
    example = page.split("# Python API for PACS scripts", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    tree = ast.parse(example)
    for node in tree.body:  # module level: only imports, definitions and the guard
        assert isinstance(node, (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.If)), ast.dump(node)[:80]
        if isinstance(node, ast.If):
            assert "__name__" in ast.unparse(node.test) and "__main__" in ast.unparse(node.test)
    assert "run_batch(" in example and ".predict(" in example
