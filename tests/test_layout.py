"""The package's layout: the import graph (module- and function-level imports) has no circle and
no upward import (docs/architecture.md, "layers"). Reads the source only; imports nothing."""
from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1] / "psla_tf"

# low → high; a module belongs to the longest prefix that names it
LAYERS = (
    ("psla_tf.params", "psla_tf.errors", "psla_tf.config", "psla_tf.atomic",
     "psla_tf.run_folder", "psla_tf.ontology", "psla_tf._keras_objects", "psla_tf.compat"),
    ("psla_tf.features", "psla_tf.augment", "psla_tf.metrics", "psla_tf.label_propagation"),
    ("psla_tf.data", "psla_tf.demo"),
    ("psla_tf.models",),
    ("psla_tf.training", "psla_tf.provenance"),
    ("psla_tf",),                      # applications: the other top-level modules
    ("psla_tf.cli",),
)


def _modules() -> dict[str, pathlib.Path]:
    out = {}
    for p in ROOT.rglob("*.py"):
        name = ".".join(p.relative_to(ROOT.parent).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = p
    return out


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    edges = {}
    for m, p in mods.items():
        deps = set()
        for n in ast.walk(ast.parse(p.read_text(encoding="utf-8"))):
            if isinstance(n, ast.ImportFrom) and n.level == 0 and (n.module or "").startswith(
                    "psla_tf"):
                for a in n.names:
                    full = f"{n.module}.{a.name}"
                    deps.add(full if full in mods else n.module)
            elif isinstance(n, ast.Import):
                deps.update(a.name for a in n.names if a.name.startswith("psla_tf."))
        edges[m] = {d for d in deps if d in mods and d != m and d != "psla_tf"}
    return edges


def _layer(module: str) -> int:
    best = max(((len(p), i) for i, ps in enumerate(LAYERS) for p in ps
                if module == p or module.startswith(p + ".")), default=None)
    assert best is not None, f"{module} is in no layer"
    return best[1]


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index, low, on, stack, out, counter = {}, {}, set(), [], [], [0]
    for root in sorted(edges):
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = counter[0]; counter[0] += 1
        stack.append(root); on.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = counter[0]; counter[0] += 1
                    stack.append(w); on.add(w)
                    work.append((w, iter(sorted(edges[w]))))
                elif w in on:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    x = stack.pop(); on.discard(x); comp.append(x)
                    if x == v:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def test_cycle_finder_finds_a_planted_circle():
    g = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(g) == [["a", "b", "c"]]


def test_no_import_circles():
    assert _cycles(_graph()) == []


def test_imports_point_down_the_layers():
    edges = _graph()
    assert len(edges) > 50 and edges["psla_tf.training.trainer"]   # the graph was read
    up = sorted(f"{m} → {d}" for m, ds in edges.items() for d in ds if _layer(d) > _layer(m))
    assert up == []


def test_every_module_has_a_layer():
    for m in _modules():
        if m != "psla_tf":
            _layer(m)
