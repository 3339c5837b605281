"""Tokenizers: loading, special tokens, bulk encoding with word starts, training.

Everything here is synchronous CPU work; the routes run it in a worker thread
so the event loop keeps serving batches while a corpus is tokenized.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from .errors import InvalidTokenizer, TokenizerFailed

ROLES = ("cls", "sep", "pad", "mask", "unk")
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
    word_start: np.ndarray  # bool per id: does this token begin a word?

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
        word_start=_word_start_table(tok, vocab, vocab_size, all_special),
    )


def _word_start_table(tok: Tokenizer, vocab: Mapping[str, int], vocab_size: int, special: Iterable[int]) -> np.ndarray:
    """Per id: does the token begin a word? Used for pre-tokenized input.

    WordPiece marks continuations (``##``); byte-level BPE marks starts (``Ġ``);
    SentencePiece-style tokenizers mark starts (``▁``).
    """
    spec = json.loads(tok.to_str())
    model = spec.get("model") or {}
    table = np.ones(vocab_size, dtype=bool)
    if model.get("type") == "WordPiece":
        prefix = model.get("continuing_subword_prefix") or "##"
        for piece, i in vocab.items():
            table[i] = not piece.startswith(prefix)
    else:
        marker = next((m for m in ("Ġ", "▁") if sum(p.startswith(m) for p in vocab) > len(vocab) // 10), None)
        if marker is not None:
            for piece, i in vocab.items():
                table[i] = piece.startswith(marker)
    table[list(special)] = True
    return table


def encode_texts(info: TokenizerInfo, texts: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Tokenize documents in one bulk call.

    Returns ``(ids, word_start, doc_lengths)``: all documents' ids concatenated
    (int64), a bool per token, and each document's token count.
    """
    with tokenizer_guard("encoding documents"):
        encodings = info.tokenizer.encode_batch(texts, add_special_tokens=False)
    ids: list[int] = []
    words: list[int | None] = []
    lengths = np.empty(len(encodings), dtype=np.int64)
    for k, enc in enumerate(encodings):
        ids.extend(enc.ids)
        words.extend(enc.word_ids)
        lengths[k] = len(enc.ids)
    ids_arr = np.array(ids, dtype=np.int64)
    w = np.array(words, dtype=np.float64)  # None -> nan, and nan != nan marks a start
    starts = np.ones(len(ids_arr), dtype=bool)
    if len(w) > 1:
        np.not_equal(w[1:], w[:-1], out=starts[1:])
    doc_begin = np.cumsum(lengths) - lengths
    starts[doc_begin[lengths > 0]] = True
    return ids_arr, starts, lengths


TOKENIZER_KINDS = ("bpe", "wordpiece", "unigram")


def train_tokenizer(
    texts: Iterable[str], kind: str = "bpe", vocab_size: int = 8000, min_frequency: int = 2
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
