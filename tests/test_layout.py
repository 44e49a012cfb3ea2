"""The package's layout: folders by concern, imports flow one way (docs/architecture.md), and
the light modules stay light.

The import graph is read with `ast` from hydrabench/**/*.py, module-level and function-level
imports alike: an import moved into a function to dodge a circle is still a circle.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from graphlib import CycleError, TopologicalSorter
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "hydrabench"

def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Module → the package's modules it imports (`from a import b` names module a.b where b is
    a submodule, else a)."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                targets |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules
                            else node.module for a in node.names}
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def test_no_import_circle() -> None:
    graph = import_graph()
    try:
        order = list(TopologicalSorter(graph).static_order())
    except CycleError as err:
        raise AssertionError(f"import circle: {' → '.join(err.args[1])}") from None
    assert len(order) == len(graph)


# The layers, lowest first: a module imports only from its own folder (or, at the top, itself)
# and the layers before it. The leaves import nothing of the package.
LAYERS = ["errors", "paths", "atomic", "progress", "data", "config", "models", "records",
          "training", "methods", "evaluation", "code_eval", "serving", "pipeline", "reports",
          "doctor", "cli"]
LEAVES = {"errors", "paths", "atomic", "progress"}
# At the package's top: the entry points, the leaves, and code_eval (tasks/**/utils.py import it
# by this path, and task fingerprints cover those files).
TOP_LEVEL = LEAVES | {"cli", "doctor", "code_eval"}


def layer(module: str) -> str:
    """hydrabench.config.spec → config; hydrabench.cli → cli."""
    return module.split(".")[1]


def test_folders_import_only_themselves_and_the_layers_before_them() -> None:
    graph = {m: targets for m, targets in import_graph().items() if m != "hydrabench"}
    unknown = sorted({layer(m) for m in graph} - set(LAYERS))
    assert not unknown, f"folders or modules with no place in LAYERS: {unknown}"
    rank = {name: i for i, name in enumerate(LAYERS)}
    upward = sorted(f"{m} → {t}" for m, targets in graph.items() for t in targets
                    if layer(t) != layer(m) and rank[layer(t)] > rank[layer(m)])
    assert not upward, f"imports against the layer order: {upward}"
    leaves = sorted(f"{m} → {t}" for m, targets in graph.items() for t in targets
                    if layer(m) in LEAVES)
    assert not leaves, f"leaves import the package: {leaves}"


def test_no_top_level_module_but_the_entry_points_and_leaves() -> None:
    top = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__"}
    assert top == TOP_LEVEL
    folders = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}
    assert folders == set(LAYERS) - TOP_LEVEL


def _is_method_name(node: ast.expr) -> bool:
    return ((isinstance(node, ast.Attribute) and node.attr == "method")
            or (isinstance(node, ast.Name) and node.id == "method"))


def _is_string(node: ast.expr) -> bool:
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return any(_is_string(e) for e in node.elts)
    return isinstance(node, ast.Constant) and isinstance(node.value, str)


def test_no_method_is_known_by_its_name_outside_methods() -> None:
    """What a method does is asked of the method (`Method.trains`, `.mergeable`, ...), never
    read off its name, so a new method needs no edit outside methods/."""
    compared = []
    for path in PACKAGE.rglob("*.py"):
        if path.parent.name == "methods":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            sides = [node.left, *node.comparators] if isinstance(node, ast.Compare) else []
            if any(map(_is_method_name, sides)) and any(map(_is_string, sides)):
                compared.append(f"{path.relative_to(PACKAGE)}:{node.lineno}")
    assert not compared, f"a method compared by name: {compared}"


def test_execute_fits_one_screen() -> None:
    """A run is its phases (plan, train, score, record): `execute` reads as their list, in at
    most 45 lines, with no flag that exists for one caller."""
    tree = ast.parse((PACKAGE / "pipeline" / "run.py").read_text(encoding="utf-8"))
    (execute,) = [node for node in tree.body
                  if isinstance(node, ast.FunctionDef) and node.name == "execute"]
    assert execute.end_lineno - execute.lineno + 1 <= 45
    flags = [a.arg for a in execute.args.kwonlyargs if a.arg in ("dry_run", "train_only",
                                                                   "servers")]
    assert not flags, f"execute has flags for one caller: {flags}"


def test_light_modules_load_neither_torch_nor_peft() -> None:
    code = ("import sys, hydrabench.config.spec, hydrabench.errors, hydrabench.config.tables\n"
            "print(sorted(m for m in ('torch', 'peft') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"
