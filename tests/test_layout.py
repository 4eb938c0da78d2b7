"""The package shows the architecture: nets <- config <- train <- runs <- report <- tools (the command line on top:
cli.py, commands.py, sweep.py, and api.py, its commands as functions).

No module imports (at its top or inside a function) a module of a layer above its own; so, transitively, no
layer ever loads one above it. Read from the source, so a lazy import cannot hide."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

LAYERS = ["nets", "config", "train", "runs", "report", "tools"]
TOP = ["api", "cli", "commands", "sweep"]  # the command line and its Python form, above every layer
PACKAGE = Path(__file__).resolve().parents[1] / "simpnet_cli"
MODULES = [(layer, p) for layer in LAYERS for p in sorted((PACKAGE / layer).glob("*.py"))]


def imported(path: Path) -> set[str]:
    """The simpnet_cli modules ``path`` imports, as dotted names."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return {n for n in names if n.startswith("simpnet_cli.")}


@pytest.mark.parametrize("layer,path", MODULES, ids=[f"{a}.{p.stem}" for a, p in MODULES])
def test_a_module_imports_nothing_from_a_layer_above_its_own(layer, path):
    above = set(LAYERS[LAYERS.index(layer) + 1:]) | set(TOP)
    bad = sorted(n for n in imported(path) if n.split(".")[1] in above)
    assert not bad, f"simpnet_cli/{layer}/{path.name} imports {bad}"


def test_the_check_sees_a_lazy_import(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from simpnet_cli.runs import runner\n")
    assert "simpnet_cli.runs" in imported(module)


def test_every_module_lives_in_a_layer():
    loose = sorted(p.stem for p in PACKAGE.glob("*.py"))
    assert loose == sorted(["__init__", "errors", "files", *TOP])  # (errors, files: below every layer)


REPORT_ORDER = ["claims", "data", "text", "plots", "write"]


@pytest.mark.parametrize("module", REPORT_ORDER)
def test_the_report_modules_import_one_way(module):
    """claims -> data -> text / plots -> write: no module of simpnet_cli.report imports one after it (text may
    draw with plots), so none loads a later one, even lazily."""
    allowed = set(REPORT_ORDER[:REPORT_ORDER.index(module)]) | ({"plots"} if module == "text" else set())
    names = {n.split(".")[2] for n in imported(PACKAGE / "report" / f"{module}.py") if n.count(".") >= 2
             and n.split(".")[1] == "report" and n.split(".")[2] in REPORT_ORDER}
    assert names <= allowed, f"simpnet_cli.report.{module} imports {sorted(names - allowed)}"
