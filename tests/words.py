"""The documented word rule, recomputed in the tests from token strings (never from the service's tables).

A token begins a word when it is its document's first; when its piece is marked as a word's first
(WordPiece: no ``##``; byte-level BPE: ``Ġ``; SentencePiece-style: ``▁``) or begins with whitespace;
when it is special (except the unknown piece of a marked vocabulary); or when the piece before it
ends with whitespace (a lone space piece excepted).
"""

from __future__ import annotations

import json

import numpy as np
from tokenizers import Tokenizer

SPACES = {"\u0120": " ", "\u010a": "\n", "\u0109": "\t", "\u010d": "\r", "\u010b": "\x0b", "\u010c": "\x0c"}


def _family(tok: Tokenizer) -> str:
    model = json.loads(tok.to_str())["model"]
    if model["type"] == "WordPiece":
        return "wordpiece"
    vocab = tok.get_vocab(with_added_tokens=True)
    for marker, family in (("\u0120", "bytelevel"), ("\u2581", "metaspace")):
        if sum(p.startswith(marker) for p in vocab) > len(vocab) // 10:
            return family
    return "none"


def reference_word_starts(tok: Tokenizer, ids: list[int] | np.ndarray, special: set[int]) -> np.ndarray:
    """Word-start bits of one document's ids under the documented rule."""
    family = _family(tok)
    pieces = [tok.id_to_token(int(i)) for i in ids]
    # the unknown-token role, as the service resolves it for these vocabularies
    unk = next((tok.token_to_id(t) for t in ("[UNK]", "<unk>") if tok.token_to_id(t) is not None), None)
    if family in ("wordpiece", "none"):
        unk = None

    def text(piece: str) -> str:
        return "".join(SPACES.get(c, c) for c in piece) if family == "bytelevel" else piece

    out = np.zeros(len(pieces), dtype=bool)
    for k, (i, piece) in enumerate(zip(ids, pieces)):
        if family == "wordpiece":
            marked = not piece.startswith("##")
        elif family == "bytelevel":
            marked = piece.startswith("\u0120")
        elif family == "metaspace":
            marked = piece.startswith("\u2581")
        else:
            marked = True
        start = marked or text(piece)[:1].isspace() or (int(i) in special and int(i) != unk)
        if k == 0:
            start = True
        elif text(pieces[k - 1])[-1:].isspace() and pieces[k - 1] not in ("\u0120", "\u2581"):
            start = True
        out[k] = start
    return out


def special_ids(tok: Tokenizer) -> set[int]:
    """The tokenizer's special (added) token ids."""
    return {int(i) for i, t in tok.get_added_tokens_decoder().items() if t.special}


def word_numbers(tok: Tokenizer, ids: list[int] | np.ndarray) -> np.ndarray:
    """Each token's word number (0-based) under the documented rule."""
    return np.cumsum(reference_word_starts(tok, ids, special_ids(tok))) - 1
