"""Tokenizers: loading, special tokens, bulk encoding with word starts, training.

Everything here is synchronous CPU work; the routes run it in a worker thread
so the event loop keeps serving batches while a corpus is tokenized.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import chain
from typing import Literal, get_args

import numpy as np
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from ..core.errors import InvalidTokenizer, TokenizerFailed

#: the special tokens a dataset knows by role
SpecialRole = Literal["cls", "sep", "pad", "mask", "unk"]
ROLES: tuple[SpecialRole, ...] = get_args(SpecialRole)
# Looked up in this order when the caller names no token for a role.
_CANDIDATES: dict[str, tuple[str, ...]] = {
    "cls": ("[CLS]", "<s>", "<cls>"),
    "sep": ("[SEP]", "</s>", "<sep>"),
    "pad": ("[PAD]", "<pad>"),
    "mask": ("[MASK]", "<mask>"),
    "unk": ("[UNK]", "<unk>"),
}
# Added to the vocabulary (RoBERTa-style) when a required role has no token.
_ADDED_DEFAULT = {"cls": "<s>", "sep": "</s>", "pad": "<pad>", "mask": "<mask>"}


@dataclass(frozen=True)
class TokenizerInfo:
    """What the service needs to know about a dataset's tokenizer."""

    tokenizer: Tokenizer
    special_ids: dict[str, int | None]  # role -> id
    all_special_ids: tuple[int, ...]  # every id never to be masked or drawn
    vocab_size: int
    word_start: np.ndarray  # bool per id: does this token begin a word (marker, leading space, special)?
    word_end: np.ndarray  # bool per id: does the token after this one begin a word (trailing space, special)?

    @property
    def id_dtype(self) -> np.dtype:
        return np.dtype("<u2") if self.vocab_size <= 1 << 16 else np.dtype("<u4")


@contextmanager
def tokenizer_guard(what: str) -> Iterator[None]:
    """Turn the library's failures inside the block, panics included (``PanicException`` is a
    ``BaseException``, not an ``Exception``), into :class:`TokenizerFailed`."""
    try:
        yield
    except (InvalidTokenizer, TokenizerFailed, KeyboardInterrupt, SystemExit, GeneratorExit):
        raise
    except BaseException as exc:
        if not isinstance(exc, Exception) and type(exc).__name__ != "PanicException":
            raise
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TokenizerFailed(f"the dataset's tokenizer failed while {what}: {reason}") from None


def load_tokenizer(data: str | bytes) -> Tokenizer:
    """Parse a tokenizer.json; raise :class:`InvalidTokenizer` with the reason."""
    if isinstance(data, bytes):
        try:
            data = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidTokenizer(f"tokenizer.json is not UTF-8: {exc}") from None
    try:
        tok = Tokenizer.from_str(data)
    except BaseException as exc:  # noqa: BLE001 - plain Exception subclasses, or a panic
        if not isinstance(exc, Exception) and type(exc).__name__ != "PanicException":
            raise
        raise InvalidTokenizer(f"not a valid tokenizer.json for the 'tokenizers' library: {exc}") from None
    tok.no_truncation()
    tok.no_padding()
    return tok


def prepare(tok: Tokenizer, overrides: Mapping[str, str] | None = None) -> TokenizerInfo:
    """Resolve the special-token roles, adding missing ones as special tokens."""
    overrides = dict(overrides or {})
    unknown = set(overrides) - set(ROLES)
    if unknown:
        raise InvalidTokenizer(f"unknown special-token roles {sorted(unknown)}; known: {list(ROLES)}")
    special_ids: dict[str, int | None] = {}
    for role in ROLES:
        wanted = overrides.get(role)
        names = (wanted,) if wanted else _CANDIDATES[role]
        found = next((tok.token_to_id(n) for n in names if tok.token_to_id(n) is not None), None)
        if found is None and (wanted or role in _ADDED_DEFAULT):
            tok.add_special_tokens([wanted or _ADDED_DEFAULT[role]])
            found = tok.token_to_id(wanted or _ADDED_DEFAULT[role])
        special_ids[role] = found
    return describe(tok, special_ids)


def describe(tok: Tokenizer, special_ids: Mapping[str, int | None]) -> TokenizerInfo:
    """Build the info for a tokenizer whose roles are already resolved."""
    vocab_size = tok.get_vocab_size(with_added_tokens=True)
    vocab = tok.get_vocab(with_added_tokens=True)
    if vocab and (max(vocab.values()) >= vocab_size or min(vocab.values()) < 0):
        # ids index per-token tables and are stored as uint16/uint32: they must be 0 .. size-1
        raise InvalidTokenizer(
            f"token ids must be dense, 0 to {vocab_size - 1} for a vocabulary of {vocab_size}; "
            f"this one uses ids up to {max(vocab.values())}"
        )
    added = [int(i) for i, t in tok.get_added_tokens_decoder().items() if t.special]
    all_special = sorted({*added, *(i for i in special_ids.values() if i is not None)})
    if any(i >= vocab_size for i in all_special):
        raise InvalidTokenizer("a special token id lies outside the vocabulary")
    return TokenizerInfo(
        tokenizer=tok,
        special_ids=dict(special_ids),
        all_special_ids=tuple(all_special),
        vocab_size=vocab_size,
        **_word_tables(tok, vocab, vocab_size, all_special, special_ids.get("unk")),
    )


# Byte-level BPE spells the ASCII whitespace bytes as these characters (its byte alphabet maps
# bytes 0..32, which are not printable, to U+0100..U+0120 in order).
_BYTE_LEVEL_SPACE = {chr(256 + b): chr(b) for b in (9, 10, 11, 12, 13, 32)}


def _word_tables(
    tok: Tokenizer, vocab: Mapping[str, int], vocab_size: int, special: Iterable[int], unk: int | None
) -> dict[str, np.ndarray]:
    """The per-id tables of the word rule (see ``word_starts``).

    ``word_start``: the vocabulary marks the token as a word's first piece (WordPiece, or a BPE with a
    continuing-subword prefix: no ``##``; byte-level BPE: ``Ġ``; SentencePiece-style: ``▁``), or it
    begins with whitespace, or it is special
    (except the unknown piece of a marked vocabulary other than WordPiece's, which stands for characters
    inside a word; WordPiece's replaces a whole word).
    ``word_end``: the token ends with whitespace (a lone space piece excepted: byte-level BPE leaves
    it when it cannot merge it with the word it prefixes), or with a BPE's end-of-word suffix
    (``</w>``), so the next token begins a word.
    A vocabulary with no marker convention (e.g. word-level) makes every token a word.
    """
    spec = json.loads(tok.to_str())
    model = spec.get("model") or {}
    starts = np.ones(vocab_size, dtype=bool)
    ends = np.zeros(vocab_size, dtype=bool)
    marker = None
    if model.get("type") == "WordPiece" or model.get("continuing_subword_prefix"):
        prefix = model.get("continuing_subword_prefix") or "##"
        for piece, i in vocab.items():
            starts[i] = not piece.startswith(prefix)
    elif model.get("end_of_word_suffix"):  # BPE marking a word's last piece ("</w>"): the next one starts a word
        suffix = model["end_of_word_suffix"]
        for piece, i in vocab.items():
            starts[i] = False
            ends[i] = piece.endswith(suffix)
    else:
        marker = next((m for m in ("Ġ", "▁") if sum(p.startswith(m) for p in vocab) > len(vocab) // 10), None)
        if marker is not None:
            for piece, i in vocab.items():
                starts[i] = piece.startswith(marker)
    for piece, i in vocab.items():
        text = "".join(_BYTE_LEVEL_SPACE.get(c, c) for c in piece) if marker == "Ġ" else piece
        if text[:1].isspace():
            starts[i] = True
        if text[-1:].isspace() and piece != marker:  # a lone "Ġ" is the space of the word after it
            ends[i] = True
    starts[list(special)] = True
    marked = marker is not None or (model.get("type") != "WordPiece" and not starts.all())
    if marked and unk is not None:
        starts[unk] = False  # an unknown piece stands for characters inside a word ("▁", unk, "class")
    return {"word_start": starts, "word_end": ends}


def word_starts(info: TokenizerInfo, ids: np.ndarray, doc_lengths: np.ndarray) -> np.ndarray:
    """Word-start bits of documents' ids, concatenated: one rule for text and pre-tokenized ids.

    A token begins a word when it is its document's first, when the vocabulary marks it so or it
    begins with whitespace (``word_start``), or when the token before it ends with whitespace
    (``word_end``). The bits are a function of the ids alone, so the same token sequence
    gets the same words (and the same whole-word and span masks) however it was ingested.
    Punctuation joins the word it touches ("world," is one word), as in fairseq's whole-word
    masking for byte-level BPE.
    """
    if len(ids) == 0:
        return np.zeros(0, dtype=bool)
    starts = np.take(info.word_start, ids)
    starts[1:] |= np.take(info.word_end, ids[:-1])
    doc_begin = np.cumsum(doc_lengths) - doc_lengths
    starts[doc_begin[doc_lengths > 0]] = True
    return starts


def encode_texts(info: TokenizerInfo, texts: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Tokenize documents in one bulk call.

    Returns ``(ids, word_start, doc_lengths)``: all documents' ids concatenated
    (int64), a bool per token (``word_starts``), and each document's token count.
    """
    with tokenizer_guard("encoding documents"):
        encodings = info.tokenizer.encode_batch(texts, add_special_tokens=False)
    lengths = np.fromiter(map(len, encodings), dtype=np.int64, count=len(encodings))
    # Straight into the array: no list of every id as Python ints on the way (twice the time, and about
    # 40 bytes per token held at once).
    ids = np.fromiter(chain.from_iterable(enc.ids for enc in encodings), dtype=np.int64, count=int(lengths.sum()))
    return ids, word_starts(info, ids, lengths), lengths


#: the tokenizer families the service trains
TokenizerKind = Literal["bpe", "wordpiece", "unigram"]
TOKENIZER_KINDS: tuple[TokenizerKind, ...] = get_args(TokenizerKind)


def train_tokenizer(
    texts: Iterable[str], kind: TokenizerKind = "bpe", vocab_size: int = 8000, min_frequency: int = 2
) -> Tokenizer:
    """Train a fresh tokenizer of one of three families on ``texts``.

    ``bpe`` is byte-level BPE with RoBERTa's special tokens, ``wordpiece`` is
    BERT's uncased WordPiece, ``unigram`` is SentencePiece-style (``▁``).
    """
    if kind == "bpe":
        specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
        tok = Tokenizer(models.BPE(unk_token=None))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=specials,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
        )  # fmt: skip
        cls, sep = "<s>", "</s>"
    elif kind == "wordpiece":
        specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tok.normalizer = normalizers.BertNormalizer(lowercase=True)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece()
        trainer = trainers.WordPieceTrainer(
            vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=specials, show_progress=False
        )
        cls, sep = "[CLS]", "[SEP]"
    elif kind == "unigram":
        specials = ["<pad>", "<unk>", "<s>", "</s>", "<mask>"]
        tok = Tokenizer(models.Unigram())
        tok.normalizer = normalizers.NFKC()
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        trainer = trainers.UnigramTrainer(
            vocab_size=vocab_size, special_tokens=specials, unk_token="<unk>", show_progress=False
        )
        cls, sep = "<s>", "</s>"
    else:
        raise ValueError(f"unknown tokenizer kind {kind!r}; choose one of {TOKENIZER_KINDS}")
    with tokenizer_guard("training"):
        tok.train_from_iterator(texts, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{cls} $A {sep}",
        pair=f"{cls} $A {sep} {sep} $B {sep}",
        special_tokens=[(cls, tok.token_to_id(cls)), (sep, tok.token_to_id(sep))],
    )
    return tok
