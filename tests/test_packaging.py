"""Packaging contracts: training/export install inside cxr_deploy, and the runtime stays lean."""

import os
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
        import pkgutil, cxr_deploy
        runtime = [m.name for m in pkgutil.walk_packages(cxr_deploy.__path__, "cxr_deploy.")
                   if not m.name.startswith(("cxr_deploy.training", "cxr_deploy.export", "cxr_deploy.demo"))]
        for name in runtime:
            importlib.import_module(name)
        print(sorted(m for m in sys.modules if m.startswith(("cxr_deploy.training", "cxr_deploy.export"))))
    """)
    assert out.strip() == "[]"


def _runtime_modules():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "cxr_deploy"  # training/ and export/ live outside it
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        yield ".".join(parts[:-1] if parts[-1] == "__init__" else parts), path


def _imported_names(module: str, path) -> list[tuple[int, str]]:
    """Every module name an import statement (at any depth, in functions too) or a string mentions."""
    import ast

    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            found += [(node.lineno, f"{base}.{alias.name}" if base else alias.name) for alias in node.names]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            found.append((node.lineno, node.value))  # importlib.import_module("cxr_deploy.training...")
    return found


def test_runtime_source_never_imports_training_or_export():
    """Static: catches function-level imports and importlib strings, not only what one run imports."""
    import re

    forbidden = re.compile(r"^cxr_deploy\.(training|export)\b")
    offenders = []
    for module, path in _runtime_modules():
        if module in ("cxr_deploy.cli", "cxr_deploy.demo"):
            # the command router (names sub-commands by string, imports them only when run) and the
            # demo, an orchestrator over training, export and batch: neither is imported by inference
            continue
        offenders += [f"{module}:{line}: {name}" for line, name in _imported_names(module, path)
                      if forbidden.match(name)]
    assert offenders == []


def test_every_error_class_derives_from_cxr_deploy_error():
    import importlib
    import inspect
    import pkgutil

    import cxr_deploy
    import cxr_deploy.export
    import cxr_deploy.training
    from cxr_deploy.errors import CxrDeployError

    names = [m.name for package in (cxr_deploy, cxr_deploy.training, cxr_deploy.export)
             for m in pkgutil.walk_packages(package.__path__, package.__name__ + ".")]
    strays = []
    for name in names:
        module = importlib.import_module(name)
        for _, cls in inspect.getmembers(module, inspect.isclass):
            # an interrupt is not an error: it must stay a KeyboardInterrupt for every handler of one
            if cls.__module__ == name and issubclass(cls, BaseException) and \
                    not issubclass(cls, (CxrDeployError, KeyboardInterrupt)):
                strays.append(f"{name}.{cls.__name__}")
    assert "cxr_deploy.export.quantize" in names and "cxr_deploy.training.engine" in names
    assert strays == []


def test_cli_help_is_fast_and_lists_commands():
    result = subprocess.run([sys.executable, "-m", "cxr_deploy.cli", "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    for command in ("inspect", "batch", "train", "export", "evaluate", "lr-find", "sweep"):
        assert command in result.stdout


# -- serving through ONNX Runtime needs nothing from the torch side of the install -------------------
def _train_extra_modules() -> set[str]:
    """Top-level import names of the installed packages that pyproject's ``train`` extra brings."""
    import importlib.metadata
    import re
    import tomllib
    from pathlib import Path

    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    wanted = {re.match(r"[A-Za-z0-9_.-]+", req).group(0).lower().replace("_", "-")
              for req in pyproject["project"]["optional-dependencies"]["train"]}
    return {name for name, dists in importlib.metadata.packages_distributions().items()
            if any(d.lower().replace("_", "-") in wanted for d in dists)}


def _imported_extra(modules: list[str]) -> list[str]:
    extra = _train_extra_modules()
    assert {"torch", "torchvision"} <= extra, extra  # the extra is what holds torch
    return sorted({m.partition(".")[0] for m in modules} & extra)


def test_onnx_load_and_predict_import_nothing_from_the_torch_extra(tiny_bundle):
    from tests.support import SAMPLES

    inputs = [SAMPLES / "images" / "NORMAL" / "IM-0147-0001.jpeg", *sorted((SAMPLES / "dicom").iterdir())]
    out = _run(f"""
        import json, sys
        import cxr_deploy
        model = cxr_deploy.load({str(tiny_bundle)!r}, backend="onnx")
        records = model.predict({[str(p) for p in inputs]!r}, return_cam=True)
        print(json.dumps({{"status": [r["status"] for r in records], "backend": model.backend.name,
                          "modules": sorted(sys.modules)}}))
    """)
    import json

    result = json.loads(out.splitlines()[-1])
    assert result["status"] == ["ok"] * len(inputs) and result["backend"].startswith("onnx:")
    assert _imported_extra(result["modules"]) == []


def test_onnx_batch_and_its_decode_workers_import_nothing_from_the_torch_extra(tiny_bundle, tmp_path):
    """The CLI's batch in-process (overlays, DICOM results, report), then the real decode pool:
    a worker that decoded a DICOM and rendered and wrote its overlay says what it has imported."""
    from tests.support import SAMPLES

    dicom = SAMPLES / "dicom" / "IM000004"
    out = _run(f"""
        import json, sys
        from cxr_deploy.cli import main
        try:
            main(["batch", {str(SAMPLES)!r}, "-m", {str(tiny_bundle)!r}, "-o", {str(tmp_path / "r.csv")!r},
                  "--backend", "onnx", "-j", "2", "--cam-dir", {str(tmp_path / "cam")!r}, "--create-dirs",
                  "--dicom-out", {str(tmp_path / "dcm")!r}, "--labels-from-folders"], standalone_mode=False)
            code = 0
        except SystemExit as exc:
            code = exc.code
        main_modules = sorted(sys.modules)

        from cxr_deploy.batch.decode import DecodeConfig, decode_file, results_task
        from cxr_deploy.bundle import ModelBundle
        from cxr_deploy.batch.pool import DecodePool
        import numpy as np
        pool = DecodePool(1, DecodeConfig(spec=ModelBundle.load({str(tiny_bundle)!r}).spec, view_size=512))
        d = pool.submit(decode_file, {str(dicom)!r}).result()
        written = pool.submit(results_task, [{str(tmp_path / "o.png")!r}], "id", d.view, np.ones((2, 2), np.float32),
                              d.original_hw, "caption", "footer").result()
        worker_modules = pool.submit(eval, "sorted(__import__('sys').modules)").result()
        pool.close()
        print(json.dumps({{"code": code, "main": main_modules, "worker": worker_modules,
                          "decoded": d.status, "overlay": written["overlay"]}}))
    """)
    import json

    result = json.loads(out.splitlines()[-1])
    assert result["code"] == 0, out
    import csv

    with open(tmp_path / "r.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    scored = [r for r in rows if r["status"] == "ok"]
    assert len(scored) >= 10 and all(os.path.isfile(r["overlay_path"]) for r in scored)
    assert list((tmp_path / "dcm").rglob("*.dcm"))
    assert (tmp_path / "r_report" / "report.json").is_file()
    assert result["decoded"] == "ok" and result["overlay"] == str(tmp_path / "o.png")
    assert "cxr_deploy.batch.overlay" in result["worker"]  # the worker did the real work
    assert _imported_extra(result["main"]) == []
    assert _imported_extra(result["worker"]) == []


# An inference-only install (`pip install cxr-deploy`, no `train` extra): torch and torchvision are made
# unimportable in the child, as on a machine without them.
_NO_TORCH = "import sys; sys.modules['torch'] = sys.modules['torchvision'] = None\n"


def _cli_without_torch(*args) -> subprocess.CompletedProcess:
    code = _NO_TORCH + "from cxr_deploy.cli import main; main()"
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))


def test_without_torch_onnx_serves_and_the_torch_side_says_what_to_install(tiny_bundle, tmp_path):
    from tests.support import SAMPLES

    ok = _cli_without_torch("batch", SAMPLES / "images", "-m", tiny_bundle, "-o", tmp_path / "r.csv",
                            "--backend", "onnx", "-j", "1", "--cam-dir", tmp_path / "cam", "--create-dirs")
    assert ok.returncode == 0, ok.stderr
    assert len(list((tmp_path / "cam").iterdir())) == len(list((SAMPLES / "images").rglob("*.jpeg")))
    for args in (("batch", SAMPLES / "images", "-m", tiny_bundle, "-o", tmp_path / "t.csv", "--backend", "torch"),
                 ("batch", SAMPLES / "images", "-m", tiny_bundle, "-o", tmp_path / "t.csv", "--backend", "torchscript"),
                 ("export", tiny_bundle)):
        refused = _cli_without_torch(*args)
        assert refused.returncode == 2, refused.stderr
        assert refused.stderr.count("\n") == 1 and refused.stderr.startswith("cxr-deploy: error: "), refused.stderr
        assert "install cxr-deploy[train]" in refused.stderr
    assert not (tmp_path / "t.csv").exists()


def test_every_third_party_import_is_declared_in_pyproject():
    """A package the code imports must be a declared dependency (core or an extra), not something
    that only arrives because another package happens to require it today."""
    import ast
    import importlib.metadata
    import re
    import tomllib
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    requirements = list(project["dependencies"]) + [r for extra in project["optional-dependencies"].values()
                                                    for r in extra]
    declared = {re.match(r"[A-Za-z0-9_.-]+", r).group(0).lower().replace("_", "-") for r in requirements}
    declared |= {d.split("[")[0] for d in declared}
    owners = importlib.metadata.packages_distributions()
    stdlib = sys.stdlib_module_names
    missing = set()
    for folder in ("cxr_deploy", "training", "export"):
        for path in (root / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):  # imports at any depth, not strings
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and not node.level:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    top = name.partition(".")[0]
                    if top in stdlib or top in ("cxr_deploy", "training", "export"):
                        continue
                    # not installed: a back-port for older Pythons (tomli), declared with a marker
                    dists = {d.lower().replace("_", "-") for d in owners.get(top, [top])}
                    if not dists & declared:
                        missing.add(f"{top} ({', '.join(sorted(dists))}) in {path.relative_to(root)}")
    assert sorted(missing) == []


def test_every_package_folder_is_listed_in_pyproject():
    """setuptools installs only the packages pyproject lists: a new package folder (serving/,
    reporting/) missing there works from a checkout and is absent from the wheel."""
    from pathlib import Path

    import pytest

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    root = Path(__file__).resolve().parents[1]
    tool = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
    found = {".".join((package, *init.parent.relative_to(root / folder).parts))
             for package, folder in tool["package-dir"].items() for init in (root / folder).rglob("__init__.py")}
    assert sorted(found) == sorted(tool["packages"])
