"""The code's shape, checked: dependencies in ``bench/`` point one way, and each method file is its
recipe (it declares its own ``Config`` and names every hyperparameter a user can set)."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest

from bench.compression.methods import METHODS
from bench.registry import REPO_ROOT, defining_file, load_plugins

load_plugins()
BENCH = REPO_ROOT / "bench"


def import_graph(root: Path) -> dict[str, set[str]]:
    """Module -> the modules of the same package it imports (top-level or inside functions)."""
    mods = {".".join(p.relative_to(root.parent).with_suffix("").parts).removesuffix(".__init__"): p
            for p in root.rglob("*.py")}
    graph = {m: set() for m in mods}
    for m, p in mods.items():
        pkg = m if p.name == "__init__.py" else m.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = pkg.split(".")[: len(pkg.split(".")) - (node.level - 1)]
                    base = ".".join(parts + ([base] if base else []))
                targets = [base] + [f"{base}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            graph[m] |= {t for t in targets if t in mods and t != m}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(u):
        state[u] = 1
        stack.append(u)
        for v in sorted(graph[u]):
            if state.get(v) == 1:
                return stack[stack.index(v):] + [v]
            if not state.get(v) and (found := visit(v)):
                return found
        stack.pop()
        state[u] = 2
        return None

    for m in sorted(graph):
        if not state.get(m) and (found := visit(m)):
            return found
    return None


def test_find_cycle_finds_a_cycle():  # the checker itself can fail
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_bench_has_no_import_cycle():
    cycle = find_cycle(import_graph(BENCH))
    assert cycle is None, "import cycle in bench/: " + " -> ".join(cycle)


# The layers, lowest first: a module may import its own layer (within its package) and the layers below.
LAYERS = [{"bench.errors", "bench.registry", "bench.config", "bench.metrics", "bench.provenance", "bench.malloc"},
          {"bench.model", "bench.data"}, {"bench.compression"}, {"bench.interop", "bench.deploy"}, {"bench.run"},
          {"bench.report"},
          {"bench.cli", "bench.__main__", "bench.api", "bench"}]


def layer_of(module: str) -> int:
    for level, names in enumerate(LAYERS):
        if any(module == n or module.startswith(n + ".") for n in names if n != "bench") or module in names:
            return level
    raise AssertionError(f"{module} belongs to no layer: add it to LAYERS")


def test_dependencies_point_down_the_layers():
    def wrong(a: str, b: str) -> bool:
        if b == "bench":  # ``from bench import metrics`` also names the package's face
            return False
        if layer_of(b) != layer_of(a):
            return layer_of(b) > layer_of(a)
        return layer_of(a) not in (0, len(LAYERS) - 1) and a.split(".")[:2] != b.split(".")[:2]  # model !-> data

    up = sorted(f"{a} -> {b}" for a, deps in import_graph(BENCH).items() for b in deps if wrong(a, b))
    assert not up, "imports that run up or across the layers: " + ", ".join(up)


def test_bench_keeps_few_top_level_modules():
    top = sorted(p.name for p in BENCH.glob("*.py"))
    assert len(top) <= 10, top
    assert all(layer_of(f"bench.{p.removesuffix('.py')}") in (0, len(LAYERS) - 1) for p in top if p != "__init__.py")


def test_module_paths_from_before_the_split_are_the_same_modules():
    import importlib

    import bench

    for old, new in bench.MOVED.items():
        assert importlib.import_module(old) is importlib.import_module(new), old
        assert importlib.import_module(new).__spec__.name == new
    from bench.kan import KAN  # the public names the docs and plugins use
    from bench.methods import Method
    from bench.storage import load_model

    assert KAN.__module__ == "bench.model.kan" and Method.__module__ == "bench.compression.methods"
    assert load_model.__module__ == "bench.compression.storage"


def test_only_the_entry_point_imports_the_cli():
    importers = sorted(m for m, deps in import_graph(BENCH).items() if "bench.cli" in deps)
    assert importers == ["bench.__main__"], importers


@pytest.mark.parametrize("name", sorted(n for n, c in METHODS.items() if not getattr(c, "test_only", False)))
def test_method_file_declares_its_config_and_names_every_hyperparameter(name):
    cls = METHODS[name]
    path = Path(defining_file(cls))
    assert path.parent == REPO_ROOT / "methods", path
    tree = ast.parse(path.read_text())
    (body,) = [n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == cls.__name__]
    assert any(isinstance(n, ast.ClassDef) and n.name == "Config" for n in body.body), \
        f"{path.name}: {cls.__name__} must declare its own Config"
    text = path.read_text()
    missing = [f.name for f in dataclasses.fields(cls.Config) if f.name not in text]
    assert not missing, f"{path.name} never names the hyperparameters {missing}"
