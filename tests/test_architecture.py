"""The shape of the package (../shared/ARCHITECTURE.md), checked from the source: layers import only downwards (lazy
imports included), there is no import cycle, the lower layers import no Flax / Optax / Orbax, kernels know no
algorithms, recipes or models, no module is over 400 lines, and `jq/__init__.py` only re-exports."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

JQ = Path(__file__).resolve().parents[1] / "jq"

# package prefix -> layer; a module may import its own layer (without cycles) and the layers below it
LAYERS = {
    "jq._version": 0, "jq.types": 0,
    "jq.numbers": 1,
    "jq.algorithms": 2,
    "jq.tree": 3,
    "jq.ops": 4, "jq.pallas_kernels": 4,
    "jq.interop": 5, "jq.calibration": 5, "jq.qat": 5, "jq.adapters": 5, "jq.checkpoint": 5,
    "jq.models": 6,
    "jq.apps": 7, "jq.__main__": 7,
}


def _modules() -> dict[str, Path]:
    out = {}
    for f in JQ.rglob("*.py"):
        rel = f.relative_to(JQ.parent).with_suffix("")
        out[".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)] = f
    return out


MODULES = _modules()


def _imports(name: str, f: Path) -> set[str]:
    """Every module of jq (and every top-level third-party package) `name` imports, at any depth of its code."""
    out = set()
    for node in ast.walk(ast.parse(f.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = name.split(".")[: None if f.name == "__init__.py" else -1]
                base = ".".join(pkg[: len(pkg) - node.level + 1] + ([base] if base else []))
            subs = [f"{base}.{a.name}" for a in node.names]
            out |= {s for s in subs if s in MODULES} or {base}
    resolved = set()
    for d in out:
        if d.startswith("jq"):
            while d and d not in MODULES:
                d = d.rpartition(".")[0]
        resolved.add(d if d.startswith("jq") else d.split(".")[0])
    return resolved - {name, ""}


GRAPH = {m: _imports(m, f) for m, f in MODULES.items()}


def _layer(module: str) -> int | None:
    """The layer of the longest package prefix of `module` in LAYERS."""
    matches = [p for p in LAYERS if module == p or module.startswith(p + ".")]
    return LAYERS[max(matches, key=len)] if matches else None


def test_every_module_has_a_layer():
    assert [m for m in MODULES if m != "jq" and _layer(m) is None] == []


def test_layers_import_only_downwards():
    bad = [f"{m} (layer {_layer(m)}) imports {d} (layer {_layer(d)})" for m, deps in GRAPH.items() if m != "jq"
           for d in deps if d.startswith("jq") and d != "jq" and _layer(d) > _layer(m)]
    assert bad == []
    # only the applications use the top-level re-exports (`import jq`); the library imports what it needs
    assert [m for m, deps in GRAPH.items() if m != "jq" and "jq" in deps and _layer(m) < 7] == []


def test_no_import_cycle():
    index, low, stack, on, cycles = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in (d for d in GRAPH[v] if d in GRAPH):
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
                cycles.append(sorted(comp))

    for v in GRAPH:
        if v not in index:
            visit(v)
    assert cycles == []


@pytest.mark.parametrize("prefix", ["jq.numbers", "jq.algorithms", "jq.tree", "jq.ops", "jq.pallas_kernels"])
def test_the_array_layers_import_no_flax_optax_or_orbax(prefix):
    bad = [(m, d) for m, deps in GRAPH.items() if m.startswith(prefix) for d in deps if d in ("flax", "optax", "orbax")]
    assert bad == []


def test_kernels_know_tiles_dtypes_and_scales_only():
    allowed = ("jq.pallas_kernels", "jq.numbers", "jq.ops.registry", "jq.ops.activations")
    bad = [(m, d) for m, deps in GRAPH.items() if m.startswith("jq.pallas_kernels") for d in deps
           if d.startswith("jq") and not d.startswith(allowed)]
    assert bad == []


def test_no_module_is_over_400_lines():
    assert {m: n for m, f in MODULES.items() if (n := len(f.read_text().splitlines())) > 400} == {}


def test_the_package_init_only_re_exports():
    tree = ast.parse((JQ / "__init__.py").read_text())
    defs = [n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))]
    assert defs == ["__getattr__"]  # the lazy re-export of jq.interop (it imports Flax)
