"""Imports point down the layers: scheduler → jobs → middleware → resources. A layer above plugs into
one below through entry points (jobs/plugins.py), never through an import from below."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from jobs.plugins import load_actor_modules, scheduler_status_provider

ROOT = Path(__file__).resolve().parents[2]
LAYERS = ["resources", "middleware", "jobs", "scheduler"]  # each may import only those before it


def _imports(path: Path) -> set[str]:
    """The top-level packages a module imports, wherever in the module (lazy imports count too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found


@pytest.mark.parametrize("layer", LAYERS)
def test_no_module_imports_a_layer_above_its_own(layer):
    above = set(LAYERS[LAYERS.index(layer) + 1 :])
    wrong = {
        str(path.relative_to(ROOT)): sorted(_imports(path) & above)
        for path in sorted((ROOT / layer).rglob("*.py"))
        if _imports(path) & above
    }
    assert wrong == {}


def test_the_scheduler_plugs_in_its_actors_and_its_status_section():
    assert "scheduler.app" in load_actor_modules()
    provider = scheduler_status_provider()
    assert provider is not None and provider.__module__ == "scheduler.status"
