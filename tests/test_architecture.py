"""The package's layout, checked: floors imported only downwards, no import circle, no private names across modules.

Floors (DESIGN.md, "Architecture"): the mathematics of states (state, numerics, geometry, finite
networks' helpers) -> layers -> evaluation -> GPyTorch kernels -> front ends (conversion,
dynamics, recipes).  A module may import its own floor and those below it, never one above.
"""

from __future__ import annotations

import ast
import pathlib

import gpytorch_tp

PACKAGE = pathlib.Path(gpytorch_tp.__file__).parent

# Longest matching prefix wins; what no prefix names is a front end (the top floor).
FLOORS = {
    "gpytorch_tp.errors": 0,
    "gpytorch_tp.state": 0,
    "gpytorch_tp.numerics": 0,
    "gpytorch_tp.quadrature": 0,
    "gpytorch_tp.tanh_moments": 0,
    "gpytorch_tp.geometry": 0,
    "gpytorch_tp.fusion": 0,
    "gpytorch_tp.finite": 0,
    "gpytorch_tp.batchnorm": 0,
    "gpytorch_tp.dense_update": 0,
    "gpytorch_tp.layers": 1,
    "gpytorch_tp.programs": 1,
    "gpytorch_tp.evaluation": 2,
    "gpytorch_tp.empirical": 2,
    "gpytorch_tp.kernels": 3,
}
FRONT_END = 4


def floor(module: str) -> int:
    matches = [prefix for prefix in FLOORS if module == prefix or module.startswith(prefix + ".")]
    return FLOORS[max(matches, key=len)] if matches else FRONT_END


def _modules() -> dict[str, pathlib.Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


MODULES = _modules()


def _imports(name: str, path: pathlib.Path):
    """(imported module, imported names) for each ``from ... import`` / ``import`` of this package."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "gpytorch_tp":
                continue
            for alias in node.names:
                submodule = f"{target}.{alias.name}"
                yield (submodule, []) if submodule in MODULES else (target, [alias.name])
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "gpytorch_tp":
                    yield alias.name, []


def _graph() -> dict[str, set[str]]:
    return {
        name: {target for target, _ in _imports(name, path) if target in MODULES and target != name}
        for name, path in MODULES.items()
    }


def test_every_import_goes_to_the_same_floor_or_below():
    upward = [
        f"{name} (floor {floor(name)}) imports {target} (floor {floor(target)})"
        for name, targets in _graph().items()
        for target in targets
        if floor(target) > floor(name)
    ]
    assert not upward, "imports up the floors:\n" + "\n".join(upward)


def test_there_is_no_import_circle():
    graph = _graph()
    # A package's __init__ importing its own modules, which import their siblings, is no circle;
    # an edge into a package (its __init__) from inside it would be.
    index, low, stack, on_stack, circles = {}, {}, [], set(), []

    def visit(node: str) -> None:  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    assert not circles, f"import circles: {circles}"


def test_no_module_imports_another_modules_private_names():
    private = [
        f"{name} imports {imported} from {target}"
        for name, path in MODULES.items()
        for target, names in _imports(name, path)
        for imported in names
        if imported.startswith("_") and not imported.startswith("__")
    ]
    assert not private, "private names imported across modules:\n" + "\n".join(private)


def test_the_checks_see_the_whole_package():
    # A check that found no modules or no imports would pass vacuously.
    graph = _graph()
    assert len(MODULES) > 30 and sum(len(t) for t in graph.values()) > 60
    assert "gpytorch_tp.layers.base" in graph["gpytorch_tp.evaluation.run"]
    assert floor("gpytorch_tp.layers.dense") == 1 and floor("gpytorch_tp.conversion") == FRONT_END
