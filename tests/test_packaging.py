"""Packaging contracts: training/export install inside cxr_deploy, and the runtime stays lean."""

import subprocess
import sys
import textwrap


def _run(code: str) -> str:
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                            cwd="/", timeout=300)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_training_and_export_are_subpackages_not_top_level():
    out = _run("""
        import importlib.util
        print(importlib.util.find_spec("training") is None, importlib.util.find_spec("export") is None)
        import cxr_deploy.training, cxr_deploy.export
        print("ok")
    """)
    assert out.split() == ["True", "True", "ok"]


def test_runtime_never_imports_training():
    out = _run("""
        import sys, importlib
        modules = ["cxr_deploy", "cxr_deploy.imaging", "cxr_deploy.preprocessing", "cxr_deploy.bundle",
                   "cxr_deploy.model", "cxr_deploy.cam", "cxr_deploy.cli", "cxr_deploy.inspect"]
        for extra in ["cxr_deploy.api", "cxr_deploy.batch.cli"]:
            if importlib.util.find_spec(extra) is not None:
                modules.append(extra)
        for name in modules:
            importlib.import_module(name)
        print(sorted(m for m in sys.modules if m.startswith("cxr_deploy.training")))
    """)
    assert out.strip() == "[]"


def test_cli_help_is_fast_and_lists_commands():
    result = subprocess.run([sys.executable, "-m", "cxr_deploy.cli", "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    for command in ("inspect", "batch", "train", "export", "evaluate", "lr-find", "sweep"):
        assert command in result.stdout
