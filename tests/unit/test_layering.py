"""The import graph of asprof/ is the picture of its layers (issue #10, DESIGN.md).

Every module under asprof/ is parsed with ``ast``: module-level, lazy (inside functions) and
type-only (``if TYPE_CHECKING:``) imports all count. The graph must have no cycle, and no
module may import one in a layer above its own. On failure the test prints the graph.
"""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Optional, Set, Tuple

PACKAGE = Path(__file__).resolve().parents[2] / "asprof"

#: Layers, lowest first. A module belongs to the longest prefix listed; it may import modules
#: of its own layer (no cycle) or of a lower one. ``asprof.jfr`` (offline) is apart: see OFFLINE.
LAYERS: List[Tuple[str, ...]] = [
    ("asprof.errors", "asprof.osthreads"),
    ("asprof.autostart.values", "asprof.jfrio"),
    ("asprof.autostart.config",),
    ("asprof.options",),
    ("asprof.engines", "asprof.reporter", "asprof.metadata", "asprof.pyframes", "asprof.context"),
    ("asprof.agent",),
    ("asprof.profiler",),
    ("asprof", "asprof.__main__", "asprof.auto", "asprof.autostart", "asprof.cli"),
]
#: The offline reader: it may import only itself and these; only these import it.
OFFLINE = "asprof.jfr"
OFFLINE_MAY_IMPORT = ("asprof.jfr", "asprof.jfrio", "asprof.errors", "asprof.options")
OFFLINE_IMPORTED_BY = ("asprof.jfr", "asprof.cli")
#: Compiled extensions (no Python source to parse), at the layer of the module named.
EXTENSIONS: Dict[str, str] = {"asprof._native": "asprof.engines", "asprof._pyframes": "asprof.engines",
                              "asprof.context._ctx": "asprof.engines",
                              "asprof.jfr._parser": OFFLINE}
MAX_TOP_LEVEL_MODULES = 6


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def module_names() -> Dict[str, Path]:
    out: Dict[str, Path] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        parts = list(rel.parts)
        if "bootstrap" in parts:  # sitecustomize: run by site, not imported as part of asprof
            continue
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def imports_of(name: str, path: Path, known: Set[str]) -> Set[str]:
    """asprof modules that ``name`` imports, anywhere in its source."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: Set[str] = set()

    def resolve(target: str) -> Optional[str]:
        while target and target not in known and target not in EXTENSIONS:
            target = target.rpartition(".")[0]
        return target or None

    for node in ast.walk(tree):
        targets: List[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            # "from a.b import c": the module a.b.c when c is one, else a.b
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                targets.append(sub if sub in known or sub in EXTENSIONS else base)
        for t in targets:
            if _within(t, "asprof"):
                r = resolve(t)
                if r is not None and r != name:
                    found.add(r)
    return found


def layer_of(name: str) -> Optional[int]:
    """The layer of a module of the agent side (None for the offline reader)."""
    name = EXTENSIONS.get(name, name)
    if _within(name, OFFLINE):
        return None
    best = (-1, -1)
    for i, prefixes in enumerate(LAYERS):
        for p in prefixes:
            if _within(name, p) and len(p) > best[0]:
                best = (len(p), i)
    return best[1] if best[0] >= 0 else None


def build_graph() -> Dict[str, Set[str]]:
    names = module_names()
    known = set(names)
    return {n: imports_of(n, p, known) for n, p in names.items()}


def cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on: Set[str] = set()
    out: List[List[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in graph:
                continue
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

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def upward_edges(graph: Dict[str, Set[str]]) -> List[str]:
    bad = []
    for src, targets in sorted(graph.items()):
        for dst in sorted(targets):
            if _within(dst, OFFLINE):
                if not any(_within(src, p) for p in OFFLINE_IMPORTED_BY):
                    bad.append(f"{src} -> {dst}: the offline reader is never imported by the agent side")
                continue
            if _within(src, OFFLINE):
                if not any(_within(dst, p) for p in OFFLINE_MAY_IMPORT):
                    bad.append(f"{src} -> {dst}: the offline reader imports only {', '.join(OFFLINE_MAY_IMPORT)}")
                continue
            ls, ld = layer_of(src), layer_of(dst)
            if ls is not None and ld is not None and ld > ls:
                bad.append(f"{src} (layer {ls}) -> {dst} (layer {ld}): upward")
    return bad


def render(graph: Dict[str, Set[str]]) -> str:
    return "\n".join(f"  {src} -> {', '.join(sorted(dst)) or '-'}" for src, dst in sorted(graph.items()))


def test_every_module_has_a_layer() -> None:
    graph = build_graph()
    missing = [n for n in graph if layer_of(n) is None and not _within(n, OFFLINE)]
    assert not missing, f"modules in no layer (add them to LAYERS): {missing}"


def test_no_import_cycle() -> None:
    graph = build_graph()
    found = cycles(graph)
    assert not found, "import cycles:\n" + "\n".join("  " + " <-> ".join(c) for c in found) + \
        "\nimport graph:\n" + render(graph)


def test_no_import_from_a_layer_above() -> None:
    graph = build_graph()
    bad = upward_edges(graph)
    assert not bad, "imports against the layer order:\n" + "\n".join("  " + b for b in bad) + \
        "\nimport graph:\n" + render(graph)


def test_the_checker_sees_lazy_and_type_only_imports(tmp_path: Path) -> None:
    src = tmp_path / "mod.py"
    src.write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from asprof.profiler import Profiler\n"
        "def f():\n    from asprof.agent import loop\n    import asprof.jfr.reader\n"
    )
    known = {"asprof.profiler", "asprof.agent", "asprof.agent.loop", "asprof.jfr", "asprof.jfr.reader"}
    got = imports_of("asprof.engines.fake", src, known)
    assert got == {"asprof.profiler", "asprof.agent.loop", "asprof.jfr.reader"}
    e, a, p = layer_of("asprof.engines"), layer_of("asprof.agent"), layer_of("asprof.profiler")
    assert upward_edges({"asprof.engines.fake": got}) == [
        f"asprof.engines.fake (layer {e}) -> asprof.agent.loop (layer {a}): upward",
        "asprof.engines.fake -> asprof.jfr.reader: the offline reader is never imported by the agent side",
        f"asprof.engines.fake (layer {e}) -> asprof.profiler (layer {p}): upward",
    ]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_at_most_six_plain_modules_at_the_top_level() -> None:
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(top) <= MAX_TOP_LEVEL_MODULES, f"asprof/ has {len(top)} top-level modules: {top}"
