"""The project's layer table and import graph, read with ``ast`` (nothing is imported): which unit may import
which, the modules, every import each one writes (at module level, in a function, under ``TYPE_CHECKING``),
and the circles in a graph.

Shared by ``bench/layout.py`` (run as a script: this directory is on ``sys.path``) and
``tests/test_layout.py`` (which imports it as ``bench.importgraph`` from the checkout's root).
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGES = ("service", "client", "trainer", "wire", "maskserve")
SERVICE = ("service.core", "service.store", "service.masking", "service.data", "service.batches", "service.jobs",
           "service.http")  # fmt: skip

# Each unit (service's sub-packages, service's root modules, each top-level package) and the units it may
# import besides itself. Every part of service may import service's root package (its version).
ALLOWED: dict[str, set[str]] = {
    "service.core": set(),
    "service.store": {"service.core"},
    "service.masking": {"service.core"},
    "service.data": {"service.core", "service.store", "service.masking"},
    "service.batches": {"service.core", "service.store", "service.masking", "service.data", "wire"},
    "service.jobs": {"service.core", "service.store", "service.masking", "service.data", "service.batches"},
    "service.http": {*SERVICE, "wire"},
    "service": set(),
    "service.app": {"service.http"},
    "service.__main__": {"service.http"},
    "wire": set(),
    "client": {"wire"},
    "trainer": {"client", "wire"},
    "maskserve": {*SERVICE, "service", "client", "trainer", "wire"},
}


def modules(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every module of PACKAGES under ``root``."""
    out = {}
    for pkg in PACKAGES:
        for path in sorted((root / pkg).rglob("*.py")) if (root / pkg).is_dir() else []:
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def imports(name: str, path: Path, known: dict[str, Path]) -> list[tuple[str, int]]:
    """(imported name, line) for every import in the file, relative ones made absolute; for
    ``from X import y`` the module ``X.y`` when it is one of ``known``, else ``X``. External names are kept
    as written."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            subs = [f"{mod}.{a.name}" for a in node.names if f"{mod}.{a.name}" in known]
            out += [(s, node.lineno) for s in subs]
            if len(subs) < len(node.names):
                out.append((mod, node.lineno))
    return out


def owner(target: str, known: dict[str, Path]) -> str | None:
    """The module of ``known`` an imported name lies in (``service.store.keys.Keys`` -> ``service.store.keys``)."""
    while target and target not in known:
        target = target.rpartition(".")[0]
    return target or None


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one node, each sorted (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on, stack, out = set(), [], []
    counter = 0
    for start in sorted(edges):
        if start in index:
            continue
        work = [(start, iter(sorted(edges[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on.add(start)
        while work:
            node, it = work[-1]
            for nxt in it:
                if nxt not in index:
                    index[nxt] = low[nxt] = counter
                    counter += 1
                    stack.append(nxt)
                    on.add(nxt)
                    work.append((nxt, iter(sorted(edges.get(nxt, ())))))
                    break
                if nxt in on:
                    low[node] = min(low[node], index[nxt])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    comp = []
                    while True:
                        m = stack.pop()
                        on.discard(m)
                        comp.append(m)
                        if m == node:
                            break
                    if len(comp) > 1:
                        out.append(sorted(comp))
    return out
