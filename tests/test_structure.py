"""The package's shape: no import cycles, and no module using another module's private names.

Read from the source with ``ast`` (imports inside functions count too), so a cycle
hidden in a function-level import is found as well as a top-level one.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "dask_annot"


def _modules() -> dict[str, ast.Module]:
    out = {}
    for f in sorted(PKG.rglob("*.py")):
        rel = f.relative_to(PKG).with_suffix("")
        parts = [p for p in rel.parts if p != "__init__"]
        name = ".".join(parts) if parts else "__init__"
        out[name] = ast.parse(f.read_text(), filename=str(f))
    return out


def _package_of(mod: str) -> list[str]:
    return mod.split(".")[:-1] if mod != "__init__" else []


def _resolve(mod: str, node: ast.ImportFrom) -> str | None:
    """The dask_annot module an ``import from`` names (relative or absolute), or None."""
    if node.level:
        base = _package_of(mod)
        if node.level > 1:
            base = base[: len(base) - (node.level - 1)]
        target = ".".join(base + ([node.module] if node.module else []))
        return target or "__init__"
    if node.module and (node.module == "dask_annot" or node.module.startswith("dask_annot.")):
        return node.module.removeprefix("dask_annot").lstrip(".") or "__init__"
    return None


def _edges(mods: dict[str, ast.Module]) -> dict[str, set[str]]:
    """module -> the package modules it imports (``from . import x`` counts as importing x)."""
    edges: dict[str, set[str]] = {m: set() for m in mods}
    for mod, tree in mods.items():
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                target = _resolve(mod, node)
                if target is None:
                    continue
                if target == "__init__":
                    for alias in node.names:
                        if alias.name in mods:
                            edges[mod].add(alias.name)
                elif target in mods:
                    edges[mod].add(target)
                    for alias in node.names:
                        sub = f"{target}.{alias.name}"
                        if sub in mods:
                            edges[mod].add(sub)
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.startswith("dask_annot."):
                        target = alias.name.removeprefix("dask_annot.")
                        if target in mods:
                            edges[mod].add(target)
    for mod in edges:
        edges[mod].discard(mod)
    return edges


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(edges[v]):
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
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    mods = _modules()
    # __init__ hands names on lazily; its imports are not a dependency of the modules
    edges = {m: {t for t in e if t != "__init__"} for m, e in _edges(mods).items()}
    edges["__init__"] = set()
    assert _cycles(edges) == []


def _private_uses(mods: dict[str, ast.Module]) -> list[str]:
    found = []
    for mod, tree in mods.items():
        aliases: dict[str, str] = {}  # local name -> package module
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                target = _resolve(mod, node)
                if target is None:
                    continue
                for alias in node.names:
                    sub = f"{target}.{alias.name}" if target != "__init__" else alias.name
                    if sub in mods:
                        aliases[alias.asname or alias.name] = sub
                    elif alias.name.startswith("_") and not alias.name.startswith("__") and target != mod:
                        found.append(f"{mod}: from {target} import {alias.name}")
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
                target = aliases.get(node.value.id)
                if target and target != mod and node.attr.startswith("_") and not node.attr.startswith("__"):
                    found.append(f"{mod}: {node.value.id}.{node.attr}")
    return sorted(set(found))


def test_no_module_uses_another_modules_private_names():
    assert _private_uses(_modules()) == []


def test_the_checks_can_fail():
    """The walkers see a cycle and a private use when there is one."""
    a = ast.parse("from . import b\nfrom .b import thing\nx = b._hidden()\n")
    b = ast.parse("from .a import y\n")
    mods = {"a": a, "b": b}
    assert _cycles(_edges(mods)) == [["a", "b"]]
    assert _private_uses(mods) == ["a: b._hidden"]


@pytest.mark.parametrize("name", ["pipeline"])
def test_only_the_pipeline_calls_compute(name):
    """STYLE: the pipeline is the only module that calls ``compute`` (``dask.compute`` or ``.compute()``)."""
    offenders = []
    for mod, tree in _modules().items():
        if mod == name:
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in ("compute", "persist"):
                offenders.append(f"{mod}:{node.lineno}")
    assert offenders == []
