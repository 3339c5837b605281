"""A masked batch as text: each row decoded token by token, each selected position marked by what the model sees.

A position the batch selected (its label is the original id) is one of:

* masked: the model sees the mask token — ``[orig>MASK]``;
* replaced: the model sees a random token — ``[orig>new]``;
* kept: the model sees the original — ``[=orig]`` (a random draw that happens to be the original
  looks the same to the model, so it shows as kept).

With colour on (a terminal), the markers are also red, yellow and green.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

IGNORE = -100
_COLOURS = {"masked": "\x1b[1;97;41m", "replaced": "\x1b[30;43m", "kept": "\x1b[30;42m"}
_RESET = "\x1b[0m"


class Inspector:
    """Render rows of a batch with the dataset's tokenizer (``tokenizer.json`` as a dict)."""

    def __init__(self, tokenizer: dict[str, Any], mask_id: int | None, *, colour: bool = False) -> None:
        self.mask_id = mask_id
        self.colour = colour
        try:
            from tokenizers import Tokenizer
        except ImportError:  # the client without its corpora extra: ids instead of text
            self._tok = None
        else:
            self._tok = Tokenizer.from_str(json.dumps(tokenizer))
        self._text: dict[int, str] = {}
        decoder = tokenizer.get("decoder") or {}
        # WordPiece decodes a lone token without its word boundary: a piece that does not continue a word
        # (no "##") starts one
        self._continues = decoder.get("prefix", "##") if decoder.get("type") == "WordPiece" else None

    def text(self, token_id: int) -> str:
        """How one token reads: its decoded text (a leading space kept), else its vocabulary entry."""
        got = self._text.get(token_id)
        if got is None:
            if self._tok is None:
                got = f" {token_id}"
            elif self._continues is not None:
                piece = self._tok.id_to_token(token_id) or "?"
                got = piece[len(self._continues):] if piece.startswith(self._continues) else f" {piece}"
            else:
                got = self._tok.decode([token_id], skip_special_tokens=False) or self._tok.id_to_token(token_id) or "?"
            got = got.replace("\n", "\u23ce").replace("\t", "\u21e5")
            self._text[token_id] = got
        return got

    def kind(self, served: int, label: int) -> str | None:
        """None (not selected), or 'masked', 'replaced', 'kept'."""
        if label == IGNORE:
            return None
        if served == self.mask_id:
            return "masked"
        return "kept" if served == label else "replaced"

    def row(self, input_ids: np.ndarray, labels: np.ndarray) -> str:
        """One row: plain text where nothing was selected, a marker at each selected position."""
        out = []
        for served, label in zip(input_ids.tolist(), labels.tolist()):
            kind = self.kind(served, label)
            if kind is None:
                out.append(self.text(served))
                continue
            orig = self.text(label)
            lead, word = orig[: len(orig) - len(orig.lstrip())], orig.strip() or orig
            inner = {"masked": f"{word}>MASK", "replaced": f"{word}>{self.text(served).strip()}", "kept": f"={word}"}
            out.append(lead + self._paint(kind, f"[{inner[kind]}]"))
        return "".join(out)

    def legend(self) -> str:
        return "  ".join(self._paint(k, m) + f" {k}" for k, m in
                         (("masked", "[orig>MASK]"), ("replaced", "[orig>new]"), ("kept", "[=orig]")))  # fmt: skip

    def _paint(self, kind: str, text: str) -> str:
        return f"{_COLOURS[kind]}{text}{_RESET}" if self.colour else text


__all__ = ["Inspector"]
