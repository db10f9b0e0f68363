"""The import graph of cops_hf, drawn by parsing every import (function-local ones included): a layered DAG.

The layer map below is the one place that says where a module lives (see docs/architecture in the README): a
module may import modules of its own layer or below, and the core imports nothing but layer-1 helpers.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE_ROOT = Path(__file__).resolve().parents[1] / "cops_hf"

HELPERS = 1
CORE = 2
WORKFLOWS = 3
APPS = 4

# Module (dotted, below cops_hf; a package stands for all its modules) -> layer.
LAYERS: dict[str, int] = {
    "__init__": APPS,  # the package entry registers everything with transformers
    "schema": HELPERS,
    "image_utils": HELPERS,
    "file_utils": HELPERS,
    "devices": HELPERS,
    "hub_errors": HELPERS,
    "random_towers": HELPERS,
    "clip_loading": HELPERS,
    "lazy_exports": HELPERS,
    "assets": HELPERS,  # packaged files; assets/endpoint_handler.py (a detector's handler.py) imports no cops_hf
    "configuration_cops": CORE,
    "modeling_cops": CORE,
    "processing_cops": CORE,
    "pipeline_anomaly_detection": CORE,
    "losses": CORE,
    "data": WORKFLOWS,
    "training": WORKFLOWS,
    "evaluation": WORKFLOWS,
    "official": WORKFLOWS,
    "conversion": WORKFLOWS,
    "hub": WORKFLOWS,
    "export": WORKFLOWS,
    "quantization": WORKFLOWS,
    "visualization": WORKFLOWS,
    "testing_utils": WORKFLOWS,  # test helpers: built on the core, imported by no production module
    "cli": APPS,
    "app": APPS,
    "demo": APPS,
    "predict": APPS,
    "serve": APPS,
    "distributed": APPS,
}
CORE_MODULES = {name for name, layer in LAYERS.items() if layer == CORE}


def module_name(path: Path) -> str:
    """The dotted name of a source file below cops_hf ("data.builders", "__init__", "data" for data/__init__)."""
    parts = list(path.relative_to(PACKAGE_ROOT).with_suffix("").parts)
    if len(parts) > 1 and parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def package_of(name: str, path: Path) -> list[str]:
    """The package a module's relative imports start from, as parts."""
    parts = name.split(".") if name != "__init__" else []
    return parts if path.name == "__init__.py" else parts[:-1]


def imported_modules(path: Path) -> set[str]:
    """The cops_hf modules a source file imports anywhere in it (module level, functions, TYPE_CHECKING blocks)."""
    name = module_name(path)
    known = {module_name(source) for source in PACKAGE_ROOT.rglob("*.py")}
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package_of(name, path)[: len(package_of(name, path)) - node.level + 1]
                stem = ".".join([*base, *(node.module.split(".") if node.module else [])])
            else:
                stem = node.module or ""
                if stem != "cops_hf" and not stem.startswith("cops_hf."):
                    continue
                stem = stem.removeprefix("cops_hf").removeprefix(".")
            targets = [f"{stem}.{alias.name}".strip(".") for alias in node.names] + [stem]
        for target in targets:
            target = target.removeprefix("cops_hf.") if target.startswith("cops_hf.") else target
            if target in known and target != name:
                found.add(target)
    # "from . import x" names x; "from .a import b" names a (and a.b when b is a module): keep the longest known.
    return {target for target in found if target}


def layer_of(name: str) -> int:
    top = name.split(".")[0] if name else "__init__"
    if top not in LAYERS:
        raise AssertionError(f"cops_hf.{name} is not in the layer map of tests/test_architecture.py: add it")
    return LAYERS[top]


@pytest.fixture(scope="module")
def import_graph() -> dict[str, set[str]]:
    return {module_name(path): imported_modules(path) for path in sorted(PACKAGE_ROOT.rglob("*.py"))}


def test_every_module_has_a_layer(import_graph: dict[str, set[str]]) -> None:
    for name in import_graph:
        layer_of(name)


def test_the_import_graph_has_no_cycle(import_graph: dict[str, set[str]]) -> None:
    # A package's __init__ importing its own modules is how a package exposes them; a module importing its parent
    # package for a name is the same edge reversed, so edges into a package are resolved to the package only.
    done: set[str] = set()

    def visit(name: str, stack: list[str]) -> None:
        if name in stack:
            raise AssertionError("import cycle: " + " -> ".join([*stack[stack.index(name) :], name]))
        if name in done:
            return
        for target in sorted(import_graph.get(name, ())):
            visit(target, [*stack, name])
        done.add(name)

    for name in import_graph:
        if name != "__init__":
            visit(name, [])


def test_imports_point_down_the_layers(import_graph: dict[str, set[str]]) -> None:
    upward = [
        f"cops_hf.{name} (layer {layer_of(name)}) imports cops_hf.{target} (layer {layer_of(target)})"
        for name, targets in import_graph.items()
        for target in sorted(targets)
        if layer_of(target) > layer_of(name)
    ]
    assert upward == []


def test_the_core_imports_only_helpers_and_itself(import_graph: dict[str, set[str]]) -> None:
    for name in CORE_MODULES:
        assert {target for target in import_graph[name] if layer_of(target) > HELPERS} <= CORE_MODULES, name


def test_no_production_module_imports_the_test_helpers(import_graph: dict[str, set[str]]) -> None:
    assert [name for name, targets in import_graph.items() if "testing_utils" in targets] == []


def test_the_graph_sees_function_local_imports() -> None:
    """The parser finds an import written inside a function: the checks above cover those too."""
    found = imported_modules(PACKAGE_ROOT / "__init__.py")
    assert {"configuration_cops", "modeling_cops", "processing_cops", "pipeline_anomaly_detection"} <= found
