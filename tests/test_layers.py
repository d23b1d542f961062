"""The house's floors: no module of `zaya_lib` imports one on a higher floor, and no modules import each other.

Floors, bottom up (README, "Layout"): config / utils / counting -> data -> model -> ttc -> train -> rl -> pipeline and
the package's entry points (`zaya_lib/__init__.py`, `__main__.py`); modules on one floor may import each other as long
as no circle forms. Every import counts, function-level (lazy) ones included: the source is read with `ast`, nothing is
imported. The Triton kernels (`kernels/`, imported as `zaya_kernels`) sit beside the house and import none of it.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FLOORS = {"config": 0, "utils": 0, "counting": 0, "data": 1, "model": 2, "ttc": 3, "train": 4, "rl": 5,
          "pipeline": 6, "__init__": 6, "__main__": 6}


def module_files(root: Path, package: str) -> dict[str, Path]:
    """Dotted module name -> file, for every .py under `root` (a package folder named `package`)."""
    out = {}
    for f in sorted(root.rglob("*.py")):
        parts = [package, *f.relative_to(root).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = f
    return out


def import_edges(root: Path, package: str) -> list[tuple[str, str, int]]:
    """(importer, imported, line) for every import inside the package, at any depth of the code, each resolved to the
    deepest module of the package it names (`from .x import y` is `x.y` when y is a module, else `x`)."""
    mods = module_files(root, package)
    edges = []
    for mod, f in mods.items():
        is_pkg = f.name == "__init__.py"
        for node in ast.walk(ast.parse(f.read_text(), filename=str(f))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = mod.split(".")[:len(mod.split(".")) - node.level + is_pkg]
                    base_name = ".".join(base + ([node.module] if node.module else []))
                else:
                    base_name = node.module or ""
                targets = [f"{base_name}.{a.name}" if f"{base_name}.{a.name}" in mods else base_name
                           for a in node.names]
            else:
                continue
            for t in targets:
                while t and t not in mods:
                    t = t.rpartition(".")[0]
                if t and t != mod and (mod, t, node.lineno) not in edges:
                    edges.append((mod, t, node.lineno))
    return edges


def floor_of(mod: str) -> tuple[str, int]:
    room = mod.split(".")[1] if "." in mod else "__init__"
    if room not in FLOORS:
        raise KeyError(f"{mod}: {room!r} has no floor; place it in FLOORS here and in the README's layout picture")
    return room, FLOORS[room]


def upward_imports(edges) -> list[str]:
    out = []
    for a, b, line in edges:
        (ra, fa), (rb, fb) = floor_of(a), floor_of(b)
        if fb > fa:
            out.append(f"{a} ({ra}, floor {fa}) imports {b} ({rb}, floor {fb}) at line {line}: an upward import")
    return out


def import_cycles(edges) -> list[str]:
    """Every circle of modules (strongly connected components of more than one module, Tarjan), with its arrows."""
    graph: dict[str, set[str]] = {}
    where = {}
    for a, b, line in edges:
        graph.setdefault(a, set()).add(b)
        graph.setdefault(b, set())
        where.setdefault((a, b), line)
    index, low, stack, on, comps = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                comps.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    out = []
    for comp in comps:
        arrows = [f"{a} -> {b} (line {where[a, b]})" for a in comp for b in sorted(graph[a]) if b in comp]
        names = " and ".join(comp) if len(comp) == 2 else ", ".join(comp)
        out.append(f"{names} import each other: " + "; ".join(arrows))
    return out


@pytest.fixture(scope="module")
def edges():
    return import_edges(REPO / "zaya_lib", "zaya_lib")


def test_every_module_has_a_floor(edges):
    for mod in module_files(REPO / "zaya_lib", "zaya_lib"):
        floor_of(mod)


def test_no_upward_imports(edges):
    bad = upward_imports(edges)
    assert not bad, "\n".join(bad)


def test_no_import_cycles(edges):
    bad = import_cycles(edges)
    assert not bad, "\n".join(bad)


def test_lazy_imports_are_seen(edges):
    # function-level imports are real arrows too: the engine's decode step reaches the model lazily
    assert any(a == "zaya_lib.ttc.decode" and b == "zaya_lib.model.modeling" for a, b, _ in edges)


def test_the_walk_catches_upward_lazy_imports_and_circles(tmp_path):
    pkg = tmp_path / "zaya_lib"
    for folder in ("data", "rl"):
        (pkg / folder).mkdir(parents=True)
        (pkg / folder / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "data" / "a.py").write_text("def f():\n    from ..rl.b import g\n    return g\n")
    (pkg / "rl" / "b.py").write_text("from zaya_lib.rl import c\n\ndef g():\n    pass\n")
    (pkg / "rl" / "c.py").write_text("def h():\n    from . import b\n")
    e = import_edges(pkg, "zaya_lib")
    assert upward_imports(e) == ["zaya_lib.data.a (data, floor 1) imports zaya_lib.rl.b (rl, floor 5) at line 2: "
                                 "an upward import"]
    assert import_cycles(e) == ["zaya_lib.rl.b and zaya_lib.rl.c import each other: "
                                "zaya_lib.rl.b -> zaya_lib.rl.c (line 1); zaya_lib.rl.c -> zaya_lib.rl.b (line 2)"]


def test_kernels_import_nothing_of_the_house():
    for f in sorted((REPO / "kernels").rglob("*.py")):
        for node in ast.walk(ast.parse(f.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not any(n.split(".")[0] == "zaya_lib" for n in names), f"{f.relative_to(REPO)} imports zaya_lib"
