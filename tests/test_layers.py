"""The tree shows the pipeline: one package per stage, and the module map of docs/concepts.md holds.

No nrfx module imports one from a later stage (absolute, relative and lazy imports alike), no module reaches
itself through imports, every module is on the map, and every module of a stage folder sits in that stage.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "src" / "nrfx"
CONCEPTS = ROOT / "docs" / "concepts.md"
UNITS = ("analysis/rules", "integrations")  # packages read as one module (their files are one rule table / one API)
ALLOWED = {("analysis/whole", "report")}  # Analysis.report(): a lazy convenience import, documented


def documented_layers() -> dict[str, int]:
    """Module -> layer number, read from the module map table (``analysis/rules/*`` stands for the package)."""
    layers, current = {}, None
    for layer, module in re.findall(r"^\| (\d*)[^|]*\| `([\w/*]+)` \|", CONCEPTS.read_text(), re.M):
        current = int(layer) if layer else current
        layers[module.replace("/*", "")] = current
    return layers


def unit_of(dotted: str) -> str:
    """The map's name for a module path (``capture.trace`` -> ``capture/trace``; a file of a unit package -> it)."""
    name = dotted.replace(".", "/").removesuffix("/__init__")
    return next((unit for unit in UNITS if name == unit or name.startswith(unit + "/")), name)


def module_name(path: Path) -> str:
    """The unit a file of the package belongs to (``__init__`` for a stage folder's docstring-only init)."""
    relative = path.relative_to(PACKAGE).with_suffix("")
    if relative.name == "__init__" and unit_of(".".join(relative.parts)) not in UNITS:
        return "__init__"
    return unit_of(".".join(relative.parts))


def _resolve(dotted: str, names: list[str], known: set[str]) -> set[str]:
    """Units ``from nrfx.<dotted> import names`` reaches: a name that is a module is that module."""
    found = set()
    for name in names:
        candidate = unit_of(f"{dotted}.{name}" if dotted else name)
        found.add(candidate if candidate in known else unit_of(dotted))
    return found - {""}


def imported_from(text: str, package: str, known: set[str]) -> set[str]:
    """Units a piece of source of the package ``package`` (dotted, relative to nrfx) imports: relative imports
    and absolute ones (``from nrfx.x.y import``, ``from nrfx import x``, ``import nrfx.x.y``), at the top level
    or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(text)):
        names = [alias.name for alias in getattr(node, "names", [])]
        if isinstance(node, ast.ImportFrom) and node.level:
            parts = package.split(".") if package else []
            base = parts[: len(parts) - (node.level - 1)]
            found |= _resolve(".".join(base + ([node.module] if node.module else [])), names, known)
        elif isinstance(node, ast.ImportFrom) and node.module and (node.module + ".").startswith("nrfx."):
            found |= _resolve(node.module.removeprefix("nrfx").removeprefix("."), names, known)
        elif isinstance(node, ast.Import):
            found |= {unit_of(n.removeprefix("nrfx.")) for n in names if n.startswith("nrfx.")}
    return found


def _known() -> set[str]:
    return {module_name(p) for p in PACKAGE.rglob("*.py")} - {"__init__"}


def imported(path: Path, known: set[str]) -> set[str]:
    """nrfx units a file of the package imports."""
    package = ".".join(path.relative_to(PACKAGE).parent.parts)
    return imported_from(path.read_text(), package, known)


def _import_graph() -> dict[str, set[str]]:
    """Unit -> the nrfx units it imports."""
    known, graph = _known(), {}
    for path in PACKAGE.rglob("*.py"):
        source = module_name(path)
        if source != "__init__":
            graph.setdefault(source, set()).update(imported(path, known) - {source})
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


def test_absolute_and_relative_imports_are_seen():
    """``from nrfx.x.y import``, ``from nrfx.x import y`` (y a module), ``import nrfx.x.y`` and relative forms."""
    known = {"plan/planner", "report", "rewrite/tensors", "analysis/cost", "analysis/rules", "capture/trace"}
    text = ("from nrfx.plan.planner import Budget\nimport nrfx.report\nfrom nrfx.rewrite import tensors\n"
            "from .cost import by_kind\nfrom nrfx.analysis.rules.registry import lookup\n"
            "def f():\n    from ..capture.trace import trace\n")
    assert imported_from(text, "analysis", known) == {
        "plan/planner", "report", "rewrite/tensors", "analysis/cost", "analysis/rules", "capture/trace"}


def test_stage_inits_import_nothing():
    """A stage folder's ``__init__`` is a docstring: importing a stage runs no other stage's code."""
    for path in PACKAGE.glob("*/__init__.py"):
        if module_name(path) == "__init__":
            assert not imported(path, _known()), path


def test_every_module_is_on_the_map():
    layers = documented_layers()
    assert _known() == set(layers), f"docs/concepts.md module map differs: {_known() ^ set(layers)}"


def test_a_stage_folder_is_one_layer():
    """Every module of a folder sits in the same layer of the map: the tree is the pipeline."""
    by_folder: dict[str, set[int]] = {}
    for module, layer in documented_layers().items():
        if "/" in module:
            by_folder.setdefault(module.split("/")[0], set()).add(layer)
    assert by_folder and all(len(layers) == 1 for layers in by_folder.values()), by_folder


def test_no_module_imports_a_later_layer():
    layers, known = documented_layers(), _known()
    wrong = []
    for path in PACKAGE.rglob("*.py"):
        source = module_name(path)
        if source == "__init__":
            continue
        for target in imported(path, known) - {source}:
            if target in layers and layers[target] > layers[source] and (source, target) not in ALLOWED:
                wrong.append(f"{source} (layer {layers[source]}) imports {target} (layer {layers[target]})")
    assert not wrong, wrong
