"""An English corpus that every Python install carries: the stdlib's docstrings.

Docstrings are read with ``ast`` from the source files, never by importing the
modules (no side effects, no slow imports). Each module, class or function
docstring of at least ``min_chars`` characters is one document.
"""

from __future__ import annotations

import ast
import sysconfig
from collections.abc import Iterator
from pathlib import Path

_SKIP_DIRS = {"test", "tests", "idlelib", "lib2to3", "site-packages", "dist-packages", "__pycache__", "turtledemo"}


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _sources(root: Path) -> Iterator[Path]:
    for path in sorted(root.rglob("*.py")):
        if not _SKIP_DIRS.intersection(path.relative_to(root).parts[:-1]):
            yield path


def stdlib_docstrings(min_chars: int = 200, max_bytes: int | None = None, root: Path | None = None) -> Iterator[str]:
    """Yield docstrings in a stable order, stopping after ``max_bytes`` of text."""
    total = 0
    for path in _sources(root or stdlib_root()):
        try:
            tree = ast.parse(path.read_bytes(), filename=str(path))
        except (SyntaxError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node, clean=True)
                if doc and len(doc) >= min_chars:
                    yield doc
                    total += len(doc.encode())
                    if max_bytes is not None and total >= max_bytes:
                        return
