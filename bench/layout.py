"""The shape of the code: import cycles, imports that run back up the layer table, the largest module and function.

    python bench/layout.py [ROOT]      # ROOT: a checkout (default: this one)

Reads the source with ``ast`` (nothing is imported). Modules are those of the packages service, client,
trainer, wire and maskserve under ROOT; an import counts wherever it is written (module level, in a
function, under ``TYPE_CHECKING``). Prints:

- import cycles: strongly connected components of more than one module, between modules and between
  units (service's sub-packages, each top-level package; see ``unit``);
- back-running imports: imports from one unit into another that the layer table (``ALLOWED``) does not
  allow. A tree from before service's sub-packages is read with each flat module placed where it
  belongs now (``FORMERLY``), so that the table applies to it too;
- the largest module and the largest function, in lines.
"""

from __future__ import annotations

import ast
import sys
from collections import defaultdict
from pathlib import Path

from importgraph import ALLOWED, cycles, imports, modules, owner

# Where the modules of the flat service/ (and client/_wire.py, service/cli.py) belong in the layered one.
FORMERLY = {
    **{m: "service.core" for m in ("config", "errors", "work", "tuning")},
    **{m: "service.store" for m in ("keys", "store", "jobstore", "durability", "embedded")},
    **{m: "service.masking" for m in ("masking", "units", "rng", "static", "schedule", "schemas")},
    **{m: "service.data" for m in ("ingest", "tokenization", "packing", "holdout", "corpus", "catalog")},
    **{m: "service.batches" for m in ("batching", "bodies", "permute")},
    "jobs": "service.jobs",
    **{m: "service.http" for m in ("app", "serving", "deps", "openapi", "metrics", "routes")},
    "cli": "maskserve",
}


def unit(module: str) -> str:
    """The layer a module belongs to: service's sub-package (or root module), else its top-level package."""
    if module == "client._wire":
        return "wire"
    parts = module.split(".")
    if parts[0] == "service" and len(parts) > 1 and parts[1] in FORMERLY:
        return FORMERLY[parts[1]]
    if parts[0] != "service":
        return parts[0]
    if len(parts) == 1:
        return "service"
    return ".".join(parts[:2])


def graph(root: Path) -> tuple[dict[str, Path], dict[str, set[str]], list[tuple[str, str, int]]]:
    """(modules, module -> project modules it imports, every import as (importer, imported, line))."""
    known = modules(root)
    edges: dict[str, set[str]] = {m: set() for m in known}
    raw = []
    for name, path in known.items():
        for target, line in imports(name, path, known):
            raw.append((name, target, line))
            t = owner(target, known)
            if t and t != name:
                edges[name].add(t)
    return known, edges, raw


def unit_edges(edges: dict[str, set[str]]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = defaultdict(set)
    for src, targets in edges.items():
        out[unit(src)] |= {unit(t) for t in targets if unit(t) != unit(src)}
    return dict(out)


def back_imports(edges: dict[str, set[str]]) -> tuple[list[str], list[str]]:
    """(imports the table does not allow, modules of units the table has no row for)."""
    bad, unplaced = [], set()
    for src, targets in sorted(edges.items()):
        u = unit(src)
        if u not in ALLOWED:
            unplaced.add(src)
            continue
        for t in sorted(targets):
            v = unit(t)
            if v != u and v not in ALLOWED[u] and not (v == "service" and u.startswith("service")):
                bad.append(f"{src} -> {t}")
    return bad, sorted(unplaced)


def largest(known: dict[str, Path]) -> tuple[tuple[int, str], tuple[int, str]]:
    """((lines, module) of the longest module, (lines, module:function) of the longest function)."""
    biggest_mod, biggest_fn = (0, ""), (0, "")
    for name, path in known.items():
        text = path.read_text(encoding="utf-8")
        biggest_mod = max(biggest_mod, (len(text.splitlines()), name))
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                biggest_fn = max(biggest_fn, (node.end_lineno - node.lineno + 1, f"{name}:{node.name}"))
    return biggest_mod, biggest_fn


def main(argv: list[str]) -> int:
    root = Path(argv[1] if len(argv) > 1 else Path(__file__).resolve().parent.parent).resolve()
    known, edges, _ = graph(root)
    module_cycles = cycles(edges)
    package_cycles = cycles(unit_edges(edges))
    bad, unplaced = back_imports(edges)
    (mod_lines, mod), (fn_lines, fn) = largest(known)
    print(f"tree: {root} ({len(known)} modules)")
    print(f"import cycles between modules: {len(module_cycles)}")
    for c in module_cycles:
        print("   ", " <-> ".join(c))
    print(f"import cycles between packages: {len(package_cycles)}")
    for c in package_cycles:
        print("   ", " <-> ".join(c))
    print(f"imports against the layer table: {len(bad)}")
    for b in bad:
        print("   ", b)
    if unplaced:
        print(f"modules outside the table's packages: {len(unplaced)} ({', '.join(unplaced)})")
    print(f"largest module: {mod} ({mod_lines} lines)")
    print(f"largest function: {fn} ({fn_lines} lines)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
