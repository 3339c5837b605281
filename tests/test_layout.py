"""The code's layering (the layer table, ALLOWED, is in bench/importgraph.py), read with ``ast`` (nothing
imported): which package may import which, no import circles, no reaching into another package's private
modules, and a service that stands without the client, the trainer and the command line.

Every import counts, wherever it is written: at module level, inside a function, under TYPE_CHECKING.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from bench.importgraph import ALLOWED, PACKAGES, SERVICE, cycles, imports, modules, owner

ROOT = Path(__file__).resolve().parent.parent
MODULES = modules(ROOT)
IMPORTS = {name: imports(name, path, MODULES) for name, path in MODULES.items()}


def _unit(module: str) -> str:
    parts = module.split(".")
    return parts[0] if parts[0] != "service" or len(parts) == 1 else ".".join(parts[:2])


EDGES = {name: {t for t in (owner(i, MODULES) for i, _ in found) if t and t != name} for name, found in IMPORTS.items()}


def test_the_tree_is_read() -> None:
    """The checks below see the packages they speak of (an empty tree would pass them all)."""
    assert {_unit(m) for m in MODULES} >= set(SERVICE) | {"wire", "client", "trainer", "maskserve"}
    assert "service.store.keys" in EDGES["service.store.store"]
    assert "wire" in EDGES["service.batches.bodies"]


def test_every_unit_has_a_row_in_the_table() -> None:
    assert not sorted({_unit(m) for m in MODULES} - set(ALLOWED))


def test_imports_follow_the_layer_table() -> None:
    bad = []
    for src, targets in sorted(EDGES.items()):
        u = _unit(src)
        for t in sorted(targets):
            v = _unit(t)
            if v != u and v not in ALLOWED[u] and not (v == "service" and u.startswith("service")):
                bad.append(f"{src} -> {t}")
    assert not bad, "imports the layer table does not allow:\n" + "\n".join(bad)


@pytest.mark.parametrize("level", ["module", "package"])
def test_no_importcycles(level: str) -> None:
    if level == "module":
        edges = EDGES
    else:
        edges = {}
        for src, targets in EDGES.items():
            edges.setdefault(_unit(src), set()).update(_unit(t) for t in targets if _unit(t) != _unit(src))
    assert cycles(edges) == []


def test_the_circle_finder_findscycles() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_module_imports_another_packages_private_module() -> None:
    """``_name`` modules are their package's own: ``client._wire`` from the service is what this forbids."""
    bad = []
    for src, found in sorted(IMPORTS.items()):
        for target, line in found:
            mod = owner(target, MODULES)
            if mod is None:
                continue
            private = [i for i, part in enumerate(mod.split(".")) if part.startswith("_") and not part.startswith("__")]
            if private and mod.split(".")[: private[0]] != src.split(".")[: private[0]]:
                bad.append(f"{src}:{line} imports {mod}")
    assert not bad, "\n".join(bad)


def test_the_service_needs_no_client_trainer_cli_or_httpx() -> None:
    bad = [f"{src}:{line} imports {target}" for src, found in sorted(IMPORTS.items()) if _unit(src).startswith("service")
           for target, line in found if target.split(".")[0] in ("client", "trainer", "maskserve", "httpx")]  # fmt: skip
    assert not bad, "\n".join(bad)


def test_wire_imports_nothing_of_ours_and_no_http_library() -> None:
    found = [t for m in MODULES if _unit(m) == "wire" for t, _ in IMPORTS[m]]
    assert not [t for t in found if t.split(".")[0] in (*PACKAGES, "httpx")], found


@pytest.mark.parametrize("package", [*SERVICE, "wire", "maskserve"])
def test_every_package_says_what_it_owns(package: str) -> None:
    doc = ast.get_docstring(ast.parse(MODULES[package].read_text(encoding="utf-8")))
    assert doc and len(doc.split()) >= 5, package
