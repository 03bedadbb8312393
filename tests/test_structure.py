"""The code's shape stays as issue 10 left it: no import cycles, modules under 400 lines, functions
under 80 (static checks of the source; ``python tests/test_structure.py`` prints the figures)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = (("cxr_deploy", "cxr_deploy"), ("training", "cxr_deploy.training"), ("export", "cxr_deploy.export"))
MAX_MODULE_LINES, MAX_FUNCTION_LINES = 400, 80


def modules() -> dict[str, Path]:
    found = {}
    for folder, package in PACKAGES:
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            found[".".join((package,) + (parts[:-1] if parts[-1] == "__init__" else parts))] = path
    return found


def import_graph(mods: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> package modules it imports, at any depth (function-level imports included), and
    those it names in a string that is exactly a module's name (the command router's
    ``importlib.import_module("cxr_deploy.batch.cli")``: an import all the same)."""
    edges = {m: set() for m in mods}
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in mods:
                targets = [node.value]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [base] + [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            for target in targets:
                while target and target not in mods:
                    target = target.rsplit(".", 1)[0] if "." in target else ""
                # a parent package is always imported first: not an edge of its own
                if target and target != name and not name.startswith(target + "."):
                    edges[name].add(target)
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in edges:
        if v not in index:
            visit(v)
    return found


def sizes(mods: dict[str, Path]) -> tuple[list[tuple[int, str]], list[tuple[int, str]]]:
    module_lines, function_lines = [], []
    for name, path in mods.items():
        text = path.read_text()
        module_lines.append((text.count("\n"), name))
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                function_lines.append((node.end_lineno - node.lineno + 1, f"{name}.{node.name}"))
    return sorted(module_lines, reverse=True), sorted(function_lines, reverse=True)


def test_no_import_cycles():
    assert cycles(import_graph(modules())) == []


def test_only_the_entry_point_imports_the_command_router():
    """The sub-command CLIs import ``fail`` from :mod:`cxr_deploy.errors`, never their parent."""
    edges = import_graph(modules())
    assert sorted(m for m, targets in edges.items() if "cxr_deploy.cli" in targets) == ["cxr_deploy.__main__"]


def test_one_room_per_job():
    """batch/ is the runner and its engines: the serving runtime and the report live in their own
    packages, which never reach back into the runner (reporting's CLI reads its results CSV)."""
    batch = {p.stem for p in (ROOT / "cxr_deploy" / "batch").glob("*.py")}
    assert batch.isdisjoint({"backends", "report", "report_dir", "evaluate_cli", "evaluation_set", "labels"})
    mods = modules()
    assert {"cxr_deploy.serving.backends", "cxr_deploy.reporting.report", "cxr_deploy.reporting.label_match",
            "cxr_deploy.reporting.report_dir", "cxr_deploy.reporting.evaluation_set"} <= set(mods)
    edges = import_graph(mods)
    upward = {m: sorted(t for t in targets if t.startswith(("cxr_deploy.batch", "cxr_deploy.pacs")))
              for m, targets in edges.items()
              if m.startswith(("cxr_deploy.serving", "cxr_deploy.reporting")) and m != "cxr_deploy.reporting.cli"}
    assert {m: t for m, t in upward.items() if t} == {}
    # the labels reader and the matching of results rows to labels: two names, not two labels.py
    assert [m for m, path in mods.items() if path.name == "labels.py"] == ["cxr_deploy.labels"]


def test_each_package_docstring_names_its_public_modules():
    """A package's docstring is its table of contents: every public module and sub-package in it is
    named (``:mod:`.name``` or the bare name), so a newcomer reading ``__init__.py`` finds every room."""
    import re

    missing = {}
    for folder, package in PACKAGES:
        for init in sorted((ROOT / folder).rglob("__init__.py")):
            doc = ast.get_docstring(ast.parse(init.read_text())) or ""
            here = init.parent
            names = [p.stem for p in here.glob("*.py") if not p.stem.startswith("_")]
            names += [d.name for d in here.iterdir() if (d / "__init__.py").is_file()]
            if folder == "cxr_deploy" and here == ROOT / folder:
                names += ["training", "export"]  # installed inside cxr_deploy from the repository's top
            absent = sorted(n for n in names if not re.search(rf"(?<![\w.-]){re.escape(n)}(?![\w-])", doc)
                            and not re.search(rf":mod:`\.{re.escape(n)}`", doc))
            if not doc or absent:
                missing[str(init.relative_to(ROOT))] = absent or ["(no docstring)"]
    assert missing == {}


def test_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_modules_and_functions_stay_small():
    module_lines, function_lines = sizes(modules())
    assert [m for m in module_lines if m[0] > MAX_MODULE_LINES] == []
    assert [f for f in function_lines if f[0] > MAX_FUNCTION_LINES] == []


if __name__ == "__main__":
    mods = modules()
    module_lines, function_lines = sizes(mods)
    print(f"{len(mods)} modules; largest: " + ", ".join(f"{n} {m}" for n, m in module_lines[:5]))
    print("largest functions: " + ", ".join(f"{n} {f}" for n, f in function_lines[:5]))
    print(f"import cycles: {cycles(import_graph(mods)) or 'none'}")


def test_ece_bin_count_is_stated_as_the_code_defines_it():
    """One definition of the calibration bins (cxr_deploy/calibration.py): the docs state it once,
    with the code's number, and no other module writes its own number of bins."""
    import re

    from cxr_deploy.calibration import BINS

    readme = "".join(path.read_text() for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))])
    stated = [int(n) for n in re.findall(r"\b(\d+)(?: equal-width)? bins\b", readme)]
    assert stated == [BINS], stated
    elsewhere = [f"{path.relative_to(ROOT)}: {m.group(0)}" for path in modules().values()
                 if path.name != "calibration.py" for m in re.finditer(r"\b\d+ bins\b", path.read_text())]
    assert elsewhere == []


def test_test_modules_import_neither_each_other_nor_a_conftest():
    """Shared test helpers live in ``tests/support.py``; a conftest only makes fixtures, and a test
    module imported by another would run its tests twice or drag its fixtures along."""
    import ast
    from pathlib import Path

    tests = Path(__file__).resolve().parent
    offenders = []
    for path in sorted(tests.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [("." * node.level) + (node.module or "")]
            for name in names:
                last = name.rsplit(".", 1)[-1]
                if name.startswith((".", "tests")) and (last == "conftest" or last.startswith("test_")):
                    offenders.append(f"{path.relative_to(tests)}:{node.lineno}: {name}")
    assert offenders == []
