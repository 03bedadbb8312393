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
