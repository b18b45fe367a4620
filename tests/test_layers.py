"""The module map of docs/concepts.md holds: no nrfx module imports one from a later pipeline layer."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "nrfx"
CONCEPTS = ROOT / "docs" / "concepts.md"
ALLOWED = {("analysis", "report")}  # Analysis.report(): a lazy convenience import, documented


def documented_layers() -> dict[str, int]:
    """Module -> layer number, read from the module map table (``rules/*`` stands for the package)."""
    layers, current = {}, None
    for layer, module in re.findall(r"^\| (\d*)[^|]*\| `([\w/*]+)` \|", CONCEPTS.read_text(), re.M):
        current = int(layer) if layer else current
        layers[module.replace("/*", "")] = current
    return layers


def module_name(path: Path) -> str:
    """``rules`` for every file of the rules package, else the file's stem."""
    relative = path.relative_to(PACKAGE)
    return relative.parts[0] if len(relative.parts) > 1 else relative.stem


def imported(path: Path) -> set[str]:
    """nrfx modules a file imports (relative imports, top level or inside functions)."""
    found = set()
    package_depth = len(path.relative_to(PACKAGE).parts) - 1
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            parts = (node.module or "").split(".")
            if node.level - 1 < package_depth:  # inside the same subpackage
                continue
            if node.module:
                found.add(parts[0])
            else:
                found.update(alias.name for alias in node.names)
    return found


def test_every_module_is_on_the_map():
    layers = documented_layers()
    modules = {module_name(p) for p in PACKAGE.rglob("*.py")} - {"__init__"}
    assert modules == set(layers), f"docs/concepts.md module map differs: {modules ^ set(layers)}"


def test_no_module_imports_a_later_layer():
    layers = documented_layers()
    wrong = []
    for path in PACKAGE.rglob("*.py"):
        source = module_name(path)
        if source == "__init__":
            continue
        for target in imported(path) - {source}:
            if target in layers and layers[target] > layers[source] and (source, target) not in ALLOWED:
                wrong.append(f"{source} (layer {layers[source]}) imports {target} (layer {layers[target]})")
    assert not wrong, wrong
