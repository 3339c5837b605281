"""Unit tests of service/data/packing.py and service/data/tokenization.py (pure functions, no I/O)."""

from __future__ import annotations

import re
import struct

import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from service.core.errors import InvalidTokenizer
from service.data.packing import ChunkBuilder, Packer, decode_records, record_length
from service.data.tokenization import describe, encode_texts, load_tokenizer, prepare, train_tokenizer

from .words import reference_word_starts

CLS, SEP = 1, 2


# ---------------------------------------------------------------------------
# helpers


def make_docs(lengths: list[int]) -> list[np.ndarray]:
    """Document k holds ids 1000*(k+1) + j: every token says which document it came from."""
    return [np.arange(n, dtype=np.int64) + 1000 * (k + 1) for k, n in enumerate(lengths)]


def every_third(n: int) -> np.ndarray:
    ws = np.zeros(n, dtype=bool)
    ws[::3] = True
    return ws


def feed_all(packer: Packer, docs: list[np.ndarray], ws: list[np.ndarray] | None = None) -> list:
    ws = ws if ws is not None else [np.ones(len(d), bool) for d in docs]
    ids = np.concatenate(docs) if docs else np.empty(0, np.int64)
    starts = np.concatenate(ws) if ws else np.empty(0, bool)
    out = packer.feed(ids, starts, np.array([len(d) for d in docs], dtype=np.int64))
    return out + packer.flush()


def doc_of(token: int) -> int:
    return token // 1000


# ---------------------------------------------------------------------------
# Packer: complete


LENGTHS = [5, 0, 37, 1, 64, 12, 0, 100, 3]


@pytest.mark.parametrize("seq_len", [8, 16, 63])
def test_complete_blocks_have_cls_first_and_respect_length(seq_len):
    seqs = feed_all(Packer("complete", seq_len, CLS, SEP), make_docs(LENGTHS))
    assert seqs, "documents produced no sequence"
    for ids, ws in seqs[:-1]:
        assert len(ids) == seq_len  # every block but the tail is full
    assert 1 < len(seqs[-1][0]) <= seq_len
    for ids, ws in seqs:
        assert ids[0] == CLS
        assert CLS not in ids[1:].tolist()
        assert len(ws) == len(ids)


@pytest.mark.parametrize("seq_len", [8, 16, 63])
def test_complete_stream_reproduces_documents_joined_by_sep(seq_len):
    docs = make_docs(LENGTHS)
    seqs = feed_all(Packer("complete", seq_len, CLS, SEP), docs)
    stream = [t for ids, _ in seqs for t in ids[1:].tolist()]
    expected = [t for d in docs if len(d) for t in [*d.tolist(), SEP]]  # an empty document adds nothing
    assert stream == expected


def test_complete_carries_the_stream_across_feed_calls():
    docs = make_docs(LENGTHS)
    ws = [every_third(len(d)) for d in docs]
    at_once = feed_all(Packer("complete", 16, CLS, SEP), docs, ws)
    packer = Packer("complete", 16, CLS, SEP)
    piecewise = []
    for d, w in zip(docs, ws):
        piecewise += packer.feed(d, w, np.array([len(d)], dtype=np.int64))
    piecewise += packer.flush()
    assert len(at_once) == len(piecewise)
    for (a_ids, a_ws), (b_ids, b_ws) in zip(at_once, piecewise):
        assert a_ids.tolist() == b_ids.tolist()
        assert a_ws.tolist() == b_ws.tolist()


def test_complete_flush_returns_the_tail_once():
    seq_len = 10
    packer = Packer("complete", seq_len, CLS, SEP)
    docs = make_docs([20, 5])  # stream: 20 + sep + 5 + sep = 27 tokens, blocks of 9
    full = packer.feed(np.concatenate(docs), np.ones(25, bool), np.array([20, 5]))
    assert [len(ids) for ids, _ in full] == [10, 10, 10]  # 27 = 3 * 9 exactly
    assert packer.flush() == []

    packer = Packer("complete", seq_len, CLS, SEP)
    full = packer.feed(np.concatenate(make_docs([20, 7])), np.ones(27, bool), np.array([20, 7]))
    assert len(full) == 3  # 29 tokens: 3 full blocks, 2 left over
    tail = packer.flush()
    assert len(tail) == 1
    ids, ws = tail[0]
    assert ids.tolist() == [CLS, 2006, SEP]
    assert packer.flush() == []  # the tail is handed out once


def test_complete_word_start_bits():
    docs = make_docs([7, 11, 4])
    ws = [every_third(len(d)) for d in docs]
    for w in ws:
        w[0] = True  # a document's first token starts a word (encode_texts guarantees it)
    seq_len = 9
    seqs = feed_all(Packer("complete", seq_len, CLS, SEP), docs, ws)
    stream_ws = [b for d, w in zip(docs, ws) for b in [*w.tolist(), True]]  # sep starts a "word"
    pos = 0
    for ids, out_ws in seqs:
        n = len(ids) - 1
        expected = [True, *stream_ws[pos : pos + n]]
        expected[1] = True  # a sequence's first real token starts a word
        assert out_ws.tolist() == expected
        pos += n
    assert pos == len(stream_ws)


def test_complete_without_special_tokens():
    docs = make_docs([13, 6])
    seqs = feed_all(Packer("complete", 8, None, None), docs)
    assert [len(ids) for ids, _ in seqs] == [8, 8, 3]
    assert [t for ids, _ in seqs for t in ids.tolist()] == [t for d in docs for t in d.tolist()]


# ---------------------------------------------------------------------------
# Packer: doc and none


@pytest.mark.parametrize("seq_len", [8, 16, 40])
def test_doc_mode_never_crosses_a_document(seq_len):
    docs = make_docs(LENGTHS)
    packer = Packer("doc", seq_len, CLS, SEP)
    seqs = packer.feed(np.concatenate(docs), np.ones(sum(LENGTHS), bool), np.array(LENGTHS))
    assert packer.flush() == []
    room = seq_len - 2
    assert len(seqs) == sum(-(-n // room) for n in LENGTHS)
    rebuilt: dict[int, list[int]] = {}
    for ids, ws in seqs:
        assert 3 <= len(ids) <= seq_len
        assert ids[0] == CLS and ids[-1] == SEP
        body = ids[1:-1].tolist()
        owners = {doc_of(t) for t in body}
        assert len(owners) == 1, f"a sequence mixes documents {owners}"
        rebuilt.setdefault(owners.pop(), []).extend(body)
    for k, d in enumerate(docs):
        if len(d):
            assert rebuilt[k + 1] == d.tolist()
        else:
            assert k + 1 not in rebuilt


def test_doc_mode_word_start_bits():
    docs = make_docs([10, 4])
    ws = [every_third(len(d)) for d in docs]
    seqs = feed_all(Packer("doc", 6, CLS, SEP), docs, ws)  # room 4: pieces 4, 4, 2 | 4
    got = [w.tolist() for _, w in seqs]
    pieces = [ws[0][0:4], ws[0][4:8], ws[0][8:10], ws[1][0:4]]
    expected = []
    for p in pieces:
        e = [True, *p.tolist(), True]
        e[1] = True  # the first token of every piece starts a word
        expected.append(e)
    assert got == expected


@pytest.mark.parametrize("seq_len", [8, 50])
def test_none_mode_one_truncated_sequence_per_document(seq_len):
    docs = make_docs(LENGTHS)
    packer = Packer("none", seq_len, CLS, SEP)
    seqs = feed_all(packer, docs)
    nonempty = [d for d in docs if len(d)]
    assert len(seqs) == len(nonempty)
    for (ids, ws), d in zip(seqs, nonempty):
        assert ids.tolist() == [CLS, *d[: seq_len - 2].tolist(), SEP]
        assert len(ids) <= seq_len


def test_packer_rejects_bad_configuration():
    with pytest.raises(ValueError, match="packing"):
        Packer("sentences", 16, CLS, SEP)
    with pytest.raises(ValueError):
        Packer("doc", 2, CLS, SEP)  # cls + sep leave no room
    with pytest.raises(ValueError):
        Packer("complete", 1, CLS, SEP)
    assert Packer("complete", 2, CLS, SEP).seq_len == 2  # cls + one token fits


# ---------------------------------------------------------------------------
# ChunkBuilder + decode_records


def parse_chunk(blob: bytes, itemsize: int) -> list[tuple[int, bytes]]:
    """Read a chunk per the layout in packing.py's docstring, checking the offsets."""
    (count,) = struct.unpack_from("<I", blob)
    table = np.frombuffer(blob, dtype="<u4", count=2 * count, offset=4).reshape(count, 2)
    pos = 4 + 8 * count
    records = []
    for off, n in table.tolist():
        assert off == pos, "records are laid out back to back after the table"
        size = record_length(n, itemsize)
        records.append((n, blob[off : off + size]))
        pos += size
    assert pos == len(blob)
    return records


@pytest.mark.parametrize(("dtype", "high"), [(np.dtype("<u2"), 1 << 16), (np.dtype("<u4"), 1 << 24)])
def test_chunk_round_trip(dtype, high):
    rng = np.random.default_rng(7)
    lengths = [1, 7, 8, 9, 16, 17, 64, 3]
    seqs = [(rng.integers(0, high, n), rng.random(n) < 0.4) for n in lengths]
    seqs[0] = (np.array([high - 1]), np.array([True]))  # the largest id fits
    builder = ChunkBuilder(dtype, max_bytes=1 << 20, max_sequences=100)
    for ids, ws in seqs:
        builder.add(ids, ws)
    assert builder.count == len(seqs)
    assert builder.tokens == sum(lengths)
    blob = builder.build()
    assert builder.count == 0 and builder.tokens == 0  # build resets
    records = parse_chunk(blob, dtype.itemsize)
    seq_len = 80
    ids, ws, got_lengths = decode_records(records, dtype, seq_len)
    assert ids.shape == (len(seqs), seq_len) and ws.shape == (len(seqs), seq_len)
    assert got_lengths.tolist() == lengths
    for k, (want_ids, want_ws) in enumerate(seqs):
        n = lengths[k]
        assert ids[k, :n].tolist() == want_ids.tolist()
        assert ws[k, :n].tolist() == want_ws.tolist()
        assert not ids[k, n:].any() and not ws[k, n:].any()


def test_chunk_stores_ids_compactly():
    ids = np.arange(100, 200)
    for dtype in (np.dtype("<u2"), np.dtype("<u4")):
        b = ChunkBuilder(dtype, max_bytes=1 << 20, max_sequences=10)
        b.add(ids, np.ones(100, bool))
        blob = b.build()
        assert len(blob) == 4 + 8 + 100 * dtype.itemsize + 13  # header, table, ids, ceil(100/8) bit bytes


def test_chunk_builder_closes_before_the_limits():
    b = ChunkBuilder(np.dtype("<u2"), max_bytes=1 << 20, max_sequences=3)
    for _ in range(3):
        assert b.fits(5)
        b.add(np.arange(5), np.ones(5, bool))
    assert not b.fits(5)  # by sequence count
    b.build()
    assert b.fits(5)
    # by bytes: a blob never grows past max_bytes minus the allocator slack
    small = ChunkBuilder(np.dtype("<u2"), max_bytes=300, max_sequences=1000)
    sizes = []
    for _ in range(10):
        if not small.fits(30):
            sizes.append(len(small.build()))
        small.add(np.arange(30), np.ones(30, bool))
    assert sizes and all(size <= 300 - 64 for size in sizes)
    # a record larger than the target still gets a chunk of its own
    lone = ChunkBuilder(np.dtype("<u2"), max_bytes=100, max_sequences=1000)
    assert lone.fits(500)


# ---------------------------------------------------------------------------
# tokenization


@pytest.fixture(scope="module")
def small_corpus(corpus):
    return corpus[:110]


@pytest.fixture(scope="module")
def tokenizers_by_kind(bpe_tokenizer, wordpiece_tokenizer, small_corpus):
    return {
        "bpe": Tokenizer.from_str(bpe_tokenizer),
        "wordpiece": Tokenizer.from_str(wordpiece_tokenizer),
        "unigram": train_tokenizer(small_corpus, "unigram", vocab_size=800),
    }


@pytest.mark.parametrize("kind", ["bpe", "wordpiece", "unigram"])
def test_encode_texts_word_starts_follow_the_documented_rule(kind, tokenizers_by_kind, corpus):
    tok = tokenizers_by_kind[kind]
    info = prepare(Tokenizer.from_str(tok.to_str()))
    texts = [corpus[3], "", corpus[10][:300], "one", corpus[20][:500]]
    ids, ws, lengths = encode_texts(info, texts)
    want_ids, want_ws, want_len = [], [], []
    for t in texts:
        enc = tok.encode(t, add_special_tokens=False)
        want_ids += enc.ids
        want_ws += reference_word_starts(info.tokenizer, enc.ids, set(info.all_special_ids)).tolist()
        want_len.append(len(enc.ids))
    assert lengths.tolist() == want_len
    assert lengths[1] == 0
    assert ids.tolist() == want_ids
    assert ws.tolist() == want_ws
    assert not all(want_ws), "the texts should contain words of several pieces"


@pytest.mark.parametrize("kind", ["bpe", "wordpiece", "unigram"])
def test_word_rule_is_the_tokenizers_words_on_plain_prose(kind, tokenizers_by_kind, corpus):
    """On letters and single spaces every tokenizer's own words (its word ids) are the rule's words;
    the rule differs only around punctuation (byte-level BPE) and line breaks."""
    info = prepare(Tokenizer.from_str(tokenizers_by_kind[kind].to_str()))
    texts = [" ".join(re.findall("[A-Za-z]+", t)) for t in corpus[40:80]]
    ids, ws, _ = encode_texts(info, texts)
    words = [w for enc in info.tokenizer.encode_batch(texts, add_special_tokens=False)
             for w in [k == 0 or enc.word_ids[k] != enc.word_ids[k - 1] for k in range(len(enc.ids))]]  # fmt: skip
    assert ws.tolist() == words
    assert not ws.all()


def test_word_rule_for_byte_level_punctuation_and_line_breaks(bpe_tokenizer):
    """Byte-level BPE: punctuation joins the word it touches, a line break ends a word."""
    info = prepare(Tokenizer.from_str(bpe_tokenizer))
    ids, ws, _ = encode_texts(info, ["Return the value, or None.\nThe next line"])
    pieces = [info.tokenizer.id_to_token(int(i)) for i in ids]
    words: list[str] = []
    for piece, start in zip(pieces, ws):
        if start:
            words.append(piece)
        else:
            words[-1] += piece
    text = [w.replace("\u0120", " ").replace("\u010a", "\n") for w in words]
    assert text == [" Return", " the", " value,", " or", " None.", "\n", "The", " next", " line"], text


def _gpt2_style(texts: list[str]) -> Tokenizer:
    from tokenizers import decoders, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )  # fmt: skip
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def test_prepare_adds_missing_special_tokens(small_corpus):
    tok = _gpt2_style(small_corpus)
    before = tok.get_vocab_size(with_added_tokens=True)
    eot = tok.token_to_id("<|endoftext|>")
    assert tok.token_to_id("<mask>") is None
    info = prepare(tok)
    for role, token in {"cls": "<s>", "sep": "</s>", "pad": "<pad>", "mask": "<mask>"}.items():
        i = info.special_ids[role]
        assert i is not None and i >= before, f"{role} should be a newly added token"
        assert info.tokenizer.token_to_id(token) == i
        assert i in info.all_special_ids
    assert info.special_ids["unk"] is None  # byte-level BPE has no unknown token and none is invented
    assert info.vocab_size == before + 4
    assert eot in info.all_special_ids
    assert len(set(info.special_ids[r] for r in ("cls", "sep", "pad", "mask"))) == 4
    # the new mask token is one token in text, and a word start
    enc = info.tokenizer.encode("hello <mask> world", add_special_tokens=False)
    assert info.special_ids["mask"] in enc.ids
    assert info.word_start[info.special_ids["mask"]]
    assert info.id_dtype == np.dtype("<u2")


def test_prepare_overrides_and_unknown_roles(small_corpus):
    tok = _gpt2_style(small_corpus)
    before = tok.get_vocab_size(with_added_tokens=True)
    eot = tok.token_to_id("<|endoftext|>")
    info = prepare(tok, {"cls": "<|endoftext|>", "sep": "<|endoftext|>"})
    assert info.special_ids["cls"] == info.special_ids["sep"] == eot
    assert info.vocab_size == before + 2  # only pad and mask were missing
    with pytest.raises(InvalidTokenizer, match="roles"):
        prepare(_gpt2_style(small_corpus[:20]), {"bos": "<|endoftext|>"})


def test_prepare_keeps_a_complete_tokenizer_as_is(bpe_tokenizer):
    tok = Tokenizer.from_str(bpe_tokenizer)
    size = tok.get_vocab_size(with_added_tokens=True)
    info = prepare(tok)
    assert info.vocab_size == size
    assert info.special_ids == {
        "cls": tok.token_to_id("<s>"), "sep": tok.token_to_id("</s>"), "pad": tok.token_to_id("<pad>"),
        "mask": tok.token_to_id("<mask>"), "unk": tok.token_to_id("<unk>"),
    }  # fmt: skip


@pytest.mark.parametrize(
    ("kind", "rule"),
    [
        ("wordpiece", lambda piece: not piece.startswith("##")),
        ("bpe", lambda piece: piece[:1] in ("\u0120", "\u010a", "\u0109", "\u010d", "\u010b", "\u010c")),
        ("unigram", lambda piece: piece.startswith("\u2581") or piece[:1].isspace()),
    ],
)
def test_word_start_table(kind, rule, tokenizers_by_kind):
    """Per id: marked as a word's first piece, or beginning with whitespace (byte-level: Ġ Ċ ĉ ...)."""
    info = prepare(Tokenizer.from_str(tokenizers_by_kind[kind].to_str()))
    vocab = info.tokenizer.get_vocab(with_added_tokens=True)
    special = set(info.all_special_ids)
    unk = info.special_ids["unk"]
    starts = conts = 0
    for piece, i in vocab.items():
        if i in special:
            # an unknown piece of a marked vocabulary stands for characters inside a word
            assert info.word_start[i] == (kind == "wordpiece" or i != unk), piece
            continue
        assert bool(info.word_start[i]) == rule(piece), piece
        starts += rule(piece)
        conts += not rule(piece)
    assert starts > 100 and conts > 100


def test_id_dtype_follows_vocabulary_size():
    def word_level(n: int) -> Tokenizer:
        tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(n)}, unk_token="w0"))
        tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        return tok

    small = prepare(word_level(65532))  # + 4 added specials = 65536 ids, all fit in 16 bits
    assert small.vocab_size == 1 << 16
    assert small.id_dtype == np.dtype("<u2")
    big = prepare(word_level(65533))
    assert big.vocab_size == (1 << 16) + 1
    assert big.id_dtype == np.dtype("<u4")
    assert big.word_start.all()  # no marker convention: every token is a word


def test_describe_rejects_special_ids_outside_vocabulary(bpe_tokenizer):
    tok = Tokenizer.from_str(bpe_tokenizer)
    with pytest.raises(InvalidTokenizer):
        describe(tok, {"cls": 0, "sep": 2, "pad": 1, "mask": 10**6, "unk": 3})


@pytest.mark.parametrize("data", ["garbage", '{"not": "a tokenizer"}', "[]", b"\xff\xfe{}"])
def test_load_tokenizer_rejects_invalid_files(data):
    with pytest.raises(InvalidTokenizer) as err:
        load_tokenizer(data)
    assert err.value.status == 400 and err.value.detail


def test_load_tokenizer_disables_truncation_and_padding(bpe_tokenizer):
    tok = Tokenizer.from_str(bpe_tokenizer)
    tok.enable_truncation(8)
    tok.enable_padding(length=32)
    loaded = load_tokenizer(tok.to_str())
    assert loaded.truncation is None and loaded.padding is None
    assert len(loaded.encode("word " * 50, add_special_tokens=False).ids) > 8


@pytest.mark.parametrize("convention", [{"continuing_subword_prefix": "##"}, {"end_of_word_suffix": "</w>"}, {}])
def test_word_rule_for_bpe_with_a_prefix_or_suffix_or_no_marker(convention, small_corpus):
    """A BPE marking continuations (``##``) or word ends (``</w>``) gives its words from the ids alone;
    one with no marker at all cannot, and makes every token a word."""
    from tokenizers import trainers

    tok = Tokenizer(models.BPE(unk_token="[UNK]", **convention))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["[UNK]", "[CLS]", "[SEP]", "[PAD]", "[MASK]"],
                                  show_progress=False, **convention)  # fmt: skip
    texts = [" ".join(re.findall("[A-Za-z]+", t)) for t in small_corpus]
    tok.train_from_iterator(texts, trainer=trainer)  # every character (and word end) is seen: no unknown pieces
    info = prepare(tok)
    ids, ws, _ = encode_texts(info, texts[:30])
    assert tok.token_to_id("[UNK]") not in ids
    texts = texts[:30]
    if not convention:
        assert ws.all()
        return
    words = [w for enc in tok.encode_batch(texts, add_special_tokens=False)
             for w in [k == 0 or enc.word_ids[k] != enc.word_ids[k - 1] for k in range(len(enc.ids))]]  # fmt: skip
    assert ws.tolist() == words
    assert not ws.all()
