"""Imports go one way: orchestrator -> launch -> workers -> errors, and inside workers the build and
the runtime do not import each other (both may use the shared layout modules at workers' top)."""
from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import ROOT

LAYERS = {"meshserve.orchestrator": 3, "meshserve.launch": 2, "meshserve.workers": 1, "meshserve.errors": 0}
FOLDERS = {"orchestrator": "meshserve.orchestrator", "launch": "meshserve.launch", "workers": "meshserve.workers",
           "meshserve": "meshserve"}


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = [FOLDERS[rel.parts[0]], *rel.parts[1:]]
    name = ".".join(parts)
    return name.removesuffix(".__init__")


def layer(name: str) -> int | None:
    for prefix, level in LAYERS.items():
        if name == prefix or name.startswith(prefix + "."):
            return level
    return None


def imported(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
    return names


def project_files() -> list[Path]:
    return sorted(p for folder in FOLDERS for p in (ROOT / folder).rglob("*.py"))


def test_no_import_points_upwards():
    wrong = []
    for path in project_files():
        me = module_name(path)
        for name in imported(path):
            if name.split(".")[0] in ("orchestrator", "launch", "workers"):
                wrong.append(f"{me} imports {name}: write meshserve.{name}")
                continue
            mine, theirs = layer(me), layer(name)
            if mine is not None and theirs is not None and theirs > mine:
                wrong.append(f"{me} (layer {mine}) imports {name} (layer {theirs})")
            for a, b in (("build", "runtime"), ("runtime", "build")):
                if me.startswith(f"meshserve.workers.{a}") and name.startswith(f"meshserve.workers.{b}"):
                    wrong.append(f"{me} imports {name}: the build and the runtime stay apart")
    assert not wrong, "\n".join(wrong)


def test_errors_import_nothing_of_the_project():
    assert not [n for n in imported(ROOT / "meshserve" / "errors.py") if n.startswith("meshserve")]


def test_the_check_sees_every_layer():
    """Guard: the walk finds files of every layer, so an empty walk cannot pass."""
    found = {layer(module_name(p)) for p in project_files()}
    assert {0, 1, 2, 3} <= found
