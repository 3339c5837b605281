"""A held-out split by document, decided at ingest: no document lands in both datasets.

Each document goes to the held-out side when a hash of its content falls
under the held-out fraction. The rule looks at nothing but the document, so
the split is the same on every run and for any file order, and two copies of
one document always land on the same side (a duplicate can never leak from
training into evaluation). Files are read the way the service reads them
(``.jsonl``/``.ndjson``: one record per line; plain text: ``split`` none, line
or paragraph), streamed twice, once per side: nothing is held in memory.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from .ingest import Paragraphs

Record = dict[str, Any]
_SCALE = 1 << 64


def held_out(record: Record, fraction: float) -> bool:
    """Whether ``record`` ({"text": ...} or {"ids": [...]}) belongs to the held-out side."""
    if fraction <= 0:
        return False
    canonical = json.dumps(record, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode()
    h = int.from_bytes(hashlib.blake2b(canonical, digest_size=8).digest(), "little")
    return h < fraction * _SCALE


def read_documents(path: Path, split: str = "none") -> Iterator[Record]:
    """The documents of one file, as the service would read them."""
    if path.suffix in (".jsonl", ".ndjson"):
        with path.open(encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    yield json.loads(line)
        return
    if split == "none":
        text = path.read_text(encoding="utf-8")
        if text.strip():
            yield {"text": text}
        return
    paragraphs = Paragraphs()
    with path.open(encoding="utf-8") as f:
        for raw in f:
            line = raw.rstrip("\n").rstrip("\r")
            if split == "line":
                if line.strip():
                    yield {"text": line}
                continue
            para = paragraphs.add(line)
            if para is not None:
                yield {"text": para}
    para = paragraphs.end()
    if para is not None:
        yield {"text": para}


class Side:
    """One side of the split over some files: iterable again and again (so an upload can be retried)."""

    def __init__(self, paths: Iterable[Path], split: str, fraction: float, heldout: bool) -> None:
        self.paths = list(paths)
        self.split = split
        self.fraction = fraction
        self.heldout = heldout

    def __iter__(self) -> Iterator[Record]:
        for path in self.paths:
            for record in read_documents(path, self.split):
                if held_out(record, self.fraction) == self.heldout:
                    yield record
