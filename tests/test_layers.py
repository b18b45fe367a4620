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
    """nrfx modules a file of the package imports (see ``imported_from``)."""
    return imported_from(path.read_text(), len(path.relative_to(PACKAGE).parts) - 1)


def imported_from(text: str, package_depth: int) -> set[str]:
    """nrfx modules a piece of source imports: relative imports and absolute ones (``from nrfx.x import``,
    ``from nrfx import x``, ``import nrfx.x``), at the top level or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.ImportFrom) and node.level:
            if node.level - 1 < package_depth:  # inside the same subpackage
                continue
            found.update([node.module.split(".")[0]] if node.module else [alias.name for alias in node.names])
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("nrfx."):
            found.add(node.module.split(".")[1])
        elif isinstance(node, ast.ImportFrom) and node.module == "nrfx":
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("nrfx."))
    return found


def _import_graph() -> dict[str, set[str]]:
    """Module -> the nrfx modules it imports (a subpackage's files as one module)."""
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        source = module_name(path)
        if source != "__init__":
            graph.setdefault(source, set()).update(imported(path) - {source})
    return graph


def test_no_import_circle():
    """No module reaches itself through imports (lazy ones included), but the one documented convenience."""
    graph = _import_graph()
    for start in graph:
        stack, seen = [t for t in graph[start] if (start, t) not in ALLOWED], set()
        while stack:
            module = stack.pop()
            assert module != start, f"import circle through {start}"
            if module not in seen:
                seen.add(module)
                stack += [t for t in graph.get(module, ()) if (module, t) not in ALLOWED]


def test_absolute_imports_are_seen():
    """The check reads ``from nrfx.x import``, ``from nrfx import x`` and ``import nrfx.x`` as relative imports."""
    text = "from nrfx.plan import Budget\nimport nrfx.report\nfrom nrfx import rewrite\nfrom .cost import by_kind\n"
    assert imported_from(text, 0) == {"plan", "report", "rewrite", "cost"}


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
