"""Ingest over HTTP against the real service and Redis: what is stored, and how."""

from __future__ import annotations

import asyncio
import hashlib
import json
import struct
import threading
import time
import uuid

import httpx
import numpy as np
import pytest
import redis.asyncio as aioredis
from tokenizers import Tokenizer, models, pre_tokenizers

from service.data.packing import decode_records, record_length
from service.store.store import Keys, decode_meta

from .conftest import ServerThread
from .words import reference_word_starts, special_ids

NDJSON = {"Content-Type": "application/x-ndjson"}


# ---------------------------------------------------------------------------
# helpers


def uniq(base: str) -> str:
    """A fresh dataset name: the shared test service caches datasets by name across tests."""
    return f"{base}-{uuid.uuid4().hex[:8]}"


def ndjson(records) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in records)


def create(url: str, name: str, tokenizer: str, seq_len: int, packing: str = "complete") -> dict:
    r = httpx.post(f"{url}/v1/datasets", json={"name": name, "seq_len": seq_len, "packing": packing,
                                                "tokenizer": json.loads(tokenizer)}, timeout=60)  # fmt: skip
    assert r.status_code == 201, r.text
    return r.json()


def ingest(url: str, name: str, body, headers=None, params=None) -> dict:
    r = httpx.post(f"{url}/v1/datasets/{name}/documents", content=body, headers=headers or NDJSON,
                   params=params, timeout=120)  # fmt: skip
    assert r.status_code == 200, r.text
    return r.json()


def chunk_keys(rdb, prefix: str, name: str) -> list[bytes]:
    """The data chunk keys of the dataset's current generation (they carry its uid; see service/store/keys.py)."""
    uid = rdb.hget(Keys(prefix).ds(name, "meta"), "uid").decode()
    return sorted(k for k in rdb.scan_iter(match=f"{prefix}:c:*:{uid}:*") if b":sm:" not in k)


def stored(rdb, prefix: str, name: str) -> tuple[dict, list[tuple[list[int], list[bool]]]]:
    """Every stored sequence of a dataset, read straight from its chunk keys in Redis."""
    keys = Keys(prefix)
    meta = decode_meta(rdb.hgetall(keys.ds(name, "meta")))
    dtype = np.dtype(meta["id_dtype"])
    table = np.frombuffer(rdb.get(keys.ds(name, "chunks")) or b"", dtype="<u8")
    assert len(table) == meta["num_chunks"]
    ids_table = np.frombuffer(rdb.get(keys.ds(name, "chunk_ids")) or b"", dtype="<u8")
    assert len(ids_table) == meta["num_chunks"]
    out: list[tuple[list[int], list[bool]]] = []
    for k in range(meta["num_chunks"]):
        assert table[k] == len(out), "the chunk table gives each chunk's first sequence id"
        blob = rdb.get(keys.chunk(meta["uid"], meta["chunk_groups"], int(ids_table[k])))
        assert blob is not None, f"chunk {k} is missing"
        (count,) = struct.unpack_from("<I", blob)
        offsets = np.frombuffer(blob, dtype="<u4", count=2 * count, offset=4).reshape(count, 2)
        records = [(int(n), blob[off : off + record_length(int(n), dtype.itemsize)]) for off, n in offsets]
        ids, ws, lengths = decode_records(records, dtype, meta["seq_len"])
        out += [(ids[i, : lengths[i]].tolist(), ws[i, : lengths[i]].tolist()) for i in range(count)]
    assert len(out) == meta["num_sequences"]
    return meta, out


def _pairs(tok: Tokenizer, ids: list[int]) -> list[tuple[int, bool]]:
    starts = reference_word_starts(tok, ids, special_ids(tok))
    return [(t, bool(s)) for t, s in zip(ids, starts)]


def doc_tokens(tok: Tokenizer, text: str) -> list[tuple[int, bool]]:
    """(id, starts a word) per token: the tokenizer's own encoding, words by the documented rule."""
    return _pairs(tok, tok.encode(text, add_special_tokens=False).ids)


def docs_tokens(tok: Tokenizer, texts: list[str]) -> list[list[tuple[int, bool]]]:
    return [_pairs(tok, enc.ids) for enc in tok.encode_batch(texts, add_special_tokens=False)]


def _seq(body: list[tuple[int, bool]], cls: int | None, sep: int | None) -> tuple[list[int], list[bool]]:
    pairs = ([(cls, True)] if cls is not None else []) + body + ([(sep, True)] if sep is not None else [])
    ids = [p[0] for p in pairs]
    ws = [p[1] for p in pairs]
    if len(ws) > 1:
        ws[1] = True  # the first real token of a sequence starts a word
    return ids, ws


def expected_packing(docs: list[list[tuple[int, bool]]], mode: str, seq_len: int, cls: int, sep: int):
    """Packing as docs/datasets.md describes it, written out independently of service/data/packing.py."""
    if mode == "complete":
        stream = [p for d in docs if d for p in [*d, (sep, True)]]
        room = seq_len - 1
        return [_seq(stream[a : a + room], cls, None) for a in range(0, len(stream), room)]
    room = seq_len - 2
    if mode == "doc":
        return [_seq(d[a : a + room], cls, sep) for d in docs for a in range(0, len(d), room)]
    return [_seq(d[:room], cls, sep) for d in docs if d]


@pytest.fixture(scope="module")
def tok(bpe_tokenizer) -> Tokenizer:
    return Tokenizer.from_str(bpe_tokenizer)


def specials(tok: Tokenizer) -> tuple[int, int]:
    return tok.token_to_id("<s>"), tok.token_to_id("</s>")


# ---------------------------------------------------------------------------
# round trips


@pytest.mark.parametrize("packing", ["complete", "doc", "none"])
def test_ingest_round_trip_matches_tokenizer(packing, service_url, rdb, settings, tok, bpe_tokenizer, corpus):
    name = uniq("rt")
    seq_len = 64
    texts = corpus[:60]
    texts.insert(5, "")  # an empty document
    create(service_url, name, bpe_tokenizer, seq_len, packing)
    res = ingest(service_url, name, ndjson({"text": t} for t in texts))
    docs = docs_tokens(tok, texts)
    want = expected_packing(docs, packing, seq_len, *specials(tok))
    meta, got = stored(rdb, settings.key_prefix, name)
    assert [ids for ids, _ in got] == [ids for ids, _ in want]
    assert [ws for _, ws in got] == [ws for _, ws in want]
    assert res["documents"] == len(texts)
    assert res["sequences"] == len(want) == meta["num_sequences"]
    assert res["tokens"] == sum(len(ids) for ids, _ in want) == meta["num_tokens"]
    assert res["first_sequence_id"] == 0 and res["duplicate"] is False
    assert all(len(ids) <= seq_len for ids, _ in got)


def test_doc_and_none_never_mix_documents(service_url, rdb, settings, tok, bpe_tokenizer):
    # every document uses its own word, so each stored sequence shows where it came from
    words = ["alpha", "beta", "gamma", "delta", "epsilon"]
    texts = [" ".join([w] * n) for w, n in zip(words, [3, 70, 1, 150, 20])]
    word_ids = [set(tok.encode(t, add_special_tokens=False).ids) for t in texts]
    cls, sep = specials(tok)
    for packing in ("doc", "none"):
        name = uniq(packing)
        create(service_url, name, bpe_tokenizer, 16, packing)
        ingest(service_url, name, ndjson({"text": t} for t in texts))
        _, got = stored(rdb, settings.key_prefix, name)
        owners = []
        for ids, _ in got:
            assert ids[0] == cls and ids[-1] == sep and len(ids) <= 16
            body = set(ids[1:-1])
            owner = [k for k, w in enumerate(word_ids) if body <= w]
            assert len(owner) == 1, f"{packing}: a sequence mixes documents"
            owners.append(owner[0])
        if packing == "none":
            assert owners == [0, 1, 2, 3, 4]  # one per document, in order, truncated
            assert all(len(ids) == min(16, len(tok.encode(t, add_special_tokens=False).ids) + 2)
                       for (ids, _), t in zip(got, texts))  # fmt: skip
        else:
            assert owners == sorted(owners) and set(owners) == {0, 1, 2, 3, 4}


def test_batches_return_the_stored_sequences_unmasked(client, rdb, settings, bpe_tokenizer, corpus, tok):
    name = uniq("b")
    client.create_dataset(name, tokenizer=bpe_tokenizer, seq_len=48, packing="doc")
    client.ingest(name, corpus[:40])
    _, got = stored(rdb, settings.key_prefix, name)
    pad = tok.token_to_id("<pad>")
    seen = set()
    for index in range(3):
        batch = client.batch(name, 64, seed=11, index=index, mlm_probability=0.0)
        ids, attn, labels, seq_ids = batch["input_ids"], batch["attention_mask"], batch["labels"], batch["sequence_ids"]
        assert ids.shape == (64, 48)
        assert (labels == -100).all()
        for row, sid in enumerate(seq_ids.tolist()):
            want = got[sid][0]
            n = int(attn[row].sum())
            assert n == len(want)
            assert ids[row, :n].tolist() == want
            assert (ids[row, n:] == pad).all()
            seen.add(sid)
    assert len(seen) > 20


def test_pre_tokenized_documents(service_url, rdb, settings, tok, bpe_tokenizer):
    name = uniq("pre")
    vocab = tok.get_vocab_size(with_added_tokens=True)
    rng = np.random.default_rng(3)
    id_docs = [rng.integers(5, vocab, n).tolist() for n in (10, 1, 45, 0, 30)]
    id_docs[0][0] = vocab - 1  # the largest id is accepted
    records = [{"ids": id_docs[0]}, {"text": "Plain text between id documents."}, *({"ids": d} for d in id_docs[1:])]
    create(service_url, name, bpe_tokenizer, 24, "doc")
    res = ingest(service_url, name, ndjson(records))
    assert res["documents"] == 6

    def as_pairs(ids: list[int]) -> list[tuple[int, bool]]:
        # pre-tokenized ids get their words by the same rule as text
        return _pairs(tok, ids)

    docs = [as_pairs(id_docs[0]), doc_tokens(tok, records[1]["text"]), *(as_pairs(d) for d in id_docs[1:])]
    want = expected_packing(docs, "doc", 24, *specials(tok))
    _, got = stored(rdb, settings.key_prefix, name)
    assert got == want


@pytest.mark.parametrize("tokenizer", ["bpe_tokenizer", "wordpiece_tokenizer"])
def test_text_and_ids_ingest_give_the_same_words_and_masks(request, client, tokenizer, corpus):
    """The same documents ingested as text and as their ids get the same word-start bits, so
    whole-word and span masks are identical. Byte-level BPE is the case that differed: its
    pre-tokenizer makes punctuation a word of its own, its vocabulary joins it to the word before."""
    tok_json = request.getfixturevalue(tokenizer)
    tok = Tokenizer.from_str(tok_json)
    reserved = {tok.token_to_id(t) for t in ("<s>", "</s>", "<pad>", "<mask>", "[CLS]", "[SEP]", "[PAD]", "[MASK]")}
    docs = [d for d in corpus[:120] if not reserved & set(tok.encode(d, add_special_tokens=False).ids)]
    encodings = tok.encode_batch(docs, add_special_tokens=False)
    as_text, as_ids = uniq("words-text"), uniq("words-ids")
    for name in (as_text, as_ids):
        client.create_dataset(name, tokenizer=tok_json, seq_len=96, packing="complete")
    client.ingest(as_text, docs)
    client.ingest(as_ids, [{"ids": e.ids} for e in encodings])
    n = client.dataset(as_text)["num_sequences"]
    assert client.dataset(as_ids)["num_sequences"] == n > 100
    masked = 0
    for params in (dict(unit="whole_word", mlm_probability=0.3), dict(unit="whole_word", count="exact"),
                   dict(unit="span", mlm_probability=0.3), dict(unit="span", count="exact")):  # fmt: skip
        for index in range(3):
            a = client.batch(as_text, 64, seed=5, index=index, **params)
            b = client.batch(as_ids, 64, seed=5, index=index, **params)
            for key in ("sequence_ids", "input_ids", "labels", "attention_mask"):
                np.testing.assert_array_equal(a[key], b[key], err_msg=f"{key} differs for {params}")
            masked += int((a["labels"] != -100).sum())
    assert masked > 1000
    if tokenizer == "bpe_tokenizer":  # not vacuous: the pre-tokenizer's words differ from the rule's here
        differ = total = 0
        for e in encodings:
            pre = np.array([k == 0 or e.word_ids[k] != e.word_ids[k - 1] for k in range(len(e.ids))])
            differ += int((pre != reference_word_starts(tok, e.ids, special_ids(tok))).sum())
            total += len(e.ids)
        assert differ > 0.05 * total, (differ, total)


def test_large_vocabulary_stores_uint32(service_url, rdb, settings):
    name = uniq("big")
    n = 70_000
    wl = Tokenizer(models.WordLevel({"[UNK]": 0, **{f"w{i}": i for i in range(1, n)}}, unk_token="[UNK]"))
    wl.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    info = create(service_url, name, wl.to_str(), 16, "doc")
    assert info["id_dtype"] == "<u4" and info["vocab_size"] == n + 4  # cls, sep, pad, mask added
    cls, sep = info["special_tokens"]["cls"], info["special_tokens"]["sep"]
    ingest(service_url, name, ndjson([{"ids": [69_999, 65_536, 5, 65_535]}, {"text": "w69998 w70 nosuchword w66000"}]))
    _, got = stored(rdb, settings.key_prefix, name)
    assert [ids for ids, _ in got] == [[cls, 69_999, 65_536, 5, 65_535, sep], [cls, 69_998, 70, 0, 66_000, sep]]
    with httpx.Client(base_url=service_url) as h:
        r = h.get(f"/v1/datasets/{name}/batch", params={"size": 8, "seed": 1, "mlm_probability": 0, "format": "json"})
    assert r.status_code == 200
    batch = r.json()
    for row, sid in zip(batch["input_ids"], batch["sequence_ids"]):
        assert row[:6] == got[sid][0]


@pytest.mark.parametrize(
    ("split", "expected_docs"),
    [
        ("none", None),
        ("line", ["First paragraph, line one.", "Line two of the first.", "Second paragraph café.",
                  "Third one here", "and more"]),
        ("paragraph", ["First paragraph, line one.\nLine two of the first.", "Second paragraph café.",
                       "Third one here\nand more"]),
    ],
)  # fmt: skip
def test_text_plain_splits(split, expected_docs, service_url, rdb, settings, tok, bpe_tokenizer):
    name = uniq("txt")
    text = "First paragraph, line one.\nLine two of the first.\n\nSecond paragraph café.\r\n\n  \nThird one here\nand more\n"
    docs = [text] if expected_docs is None else expected_docs
    create(service_url, name, bpe_tokenizer, 128, "doc")
    res = ingest(service_url, name, text.encode(), headers={"Content-Type": "text/plain; charset=utf-8"},
                 params={"split": split})  # fmt: skip
    assert res["documents"] == len(docs)
    _, got = stored(rdb, settings.key_prefix, name)
    assert [ids for ids, _ in got] == [ids for ids, _ in expected_packing(
        [doc_tokens(tok, d) for d in docs], "doc", 128, *specials(tok))]  # fmt: skip


def test_text_plain_lines_split_across_network_pieces(service_url, rdb, settings, tok, bpe_tokenizer):
    name = uniq("pieces")
    lines = [f"Línea número {i}: naïve café — 日本語 text {i * 7}" for i in range(300)]
    raw = "\n".join(lines).encode()

    def pieces():  # 7-byte pieces cut lines and multi-byte characters in half
        for a in range(0, len(raw), 7):
            yield raw[a : a + 7]

    create(service_url, name, bpe_tokenizer, 64, "none")
    res = ingest(service_url, name, pieces(), headers={"Content-Type": "text/plain"}, params={"split": "line"})
    assert res["documents"] == 300
    _, got = stored(rdb, settings.key_prefix, name)
    want = expected_packing([doc_tokens(tok, s) for s in lines], "none", 64, *specials(tok))
    assert [ids for ids, _ in got] == [ids for ids, _ in want]


# ---------------------------------------------------------------------------
# large bodies, memory


@pytest.fixture(scope="module")
def big_texts(corpus) -> list[str]:
    """About 900 kB of text: several times the chunk size once tokenized."""
    return [f"{k}: {t}" for k in range(3) for t in corpus]


@pytest.fixture(scope="module")
def many_texts(corpus) -> list[str]:
    """About 1.5 MB of text: more than one tokenizer batch (1 MiB), so chunks are staged while the body flows."""
    return [f"{k}: {t}" for k in range(5) for t in corpus]


@pytest.fixture(scope="module")
def over_one_batch(many_texts) -> bytes:
    return ndjson({"text": t} for t in many_texts)


def test_large_body_is_streamed_into_many_chunks(service_url, rdb, settings, tok, bpe_tokenizer, many_texts,
                                                 over_one_batch):  # fmt: skip
    name = uniq("large")
    create(service_url, name, bpe_tokenizer, 512, "complete")
    body = over_one_batch
    assert len(body) < settings.max_body_bytes

    def pieces():
        for a in range(0, len(body), 100_000):
            yield body[a : a + 100_000]

    res = ingest(service_url, name, pieces())
    meta, got = stored(rdb, settings.key_prefix, name)
    assert meta["num_chunks"] >= 10
    assert res["documents"] == len(many_texts)
    assert len(chunk_keys(rdb, settings.key_prefix, name)) == meta["num_chunks"]
    docs = docs_tokens(tok, many_texts)
    want = expected_packing(docs, "complete", 512, *specials(tok))
    assert [ids for ids, _ in got] == [ids for ids, _ in want]
    assert res["tokens"] == meta["num_tokens"] == sum(len(d) + 1 for d in docs) + len(want)
    assert not [k for k in rdb.scan_iter() if b"stage" in k]  # nothing staged is left behind


def test_redis_memory_per_token(service_url, rdb, settings, bpe_tokenizer, big_texts):
    name = uniq("mem")
    create(service_url, name, bpe_tokenizer, 512, "complete")
    res = ingest(service_url, name, ndjson({"text": t} for t in big_texts))
    assert res["tokens"] >= 200_000
    keys = chunk_keys(rdb, settings.key_prefix, name)
    assert len(keys) >= 5
    used = sum(rdb.memory_usage(k, samples=0) for k in keys)
    raw = res["tokens"] * 2  # uint16 ids
    assert used <= 1.25 * raw, f"{used} bytes of Redis memory for {raw} bytes of ids ({used / raw:.3f}x)"


# ---------------------------------------------------------------------------
# idempotency, counters, delete


def test_idempotency_key_makes_a_repeat_a_no_op(service_url, rdb, settings, bpe_tokenizer, corpus):
    name = uniq("idem")
    create(service_url, name, bpe_tokenizer, 64)
    body = ndjson({"text": t} for t in corpus[:300])
    headers = {**NDJSON, "Idempotency-Key": "upload-1"}
    first = ingest(service_url, name, body, headers)
    meta1, seqs1 = stored(rdb, settings.key_prefix, name)
    assert meta1["num_chunks"] >= 3  # the repeat stages several chunks that must all be dropped
    keys1 = set(rdb.keys("*"))
    again = ingest(service_url, name, body, headers)
    assert again["duplicate"] is True
    assert {k: v for k, v in again.items() if k != "duplicate"} == {k: v for k, v in first.items() if k != "duplicate"}
    meta2, seqs2 = stored(rdb, settings.key_prefix, name)
    assert meta2 == meta1 and seqs2 == seqs1
    assert set(rdb.keys("*")) == keys1
    # a new key stores the same documents again, after the first ones
    third = ingest(service_url, name, body, {**NDJSON, "Idempotency-Key": "upload-2"})
    assert third["duplicate"] is False and third["first_sequence_id"] == first["sequences"]
    meta3, seqs3 = stored(rdb, settings.key_prefix, name)
    assert meta3["num_sequences"] == 2 * meta1["num_sequences"]
    assert [s for s, _ in seqs3[len(seqs1):]] == [s for s, _ in seqs1]


def test_client_ingest_with_idempotency_key(client, bpe_tokenizer, corpus):
    name = uniq("cidem")
    client.create_dataset(name, tokenizer=bpe_tokenizer, seq_len=32)
    a = client.ingest(name, corpus[:10], idempotency_key="k")
    b = client.ingest(name, corpus[:10], idempotency_key="k")
    assert not a["duplicate"] and b["duplicate"]
    assert client.dataset(name)["num_sequences"] == a["sequences"]


def test_list_and_inspect_counters(client, service_url, rdb, settings, tok, bpe_tokenizer, wordpiece_tokenizer, corpus):
    zeta_name, alpha_name = uniq("zeta"), uniq("alpha")
    client.create_dataset(zeta_name, tokenizer=bpe_tokenizer, seq_len=100, packing="doc")
    client.create_dataset(alpha_name, tokenizer=wordpiece_tokenizer, seq_len=40, packing="none")
    results = [client.ingest(zeta_name, corpus[:25]), client.ingest(zeta_name, corpus[25:40]), client.ingest(alpha_name, corpus[:7])]
    listed = client.datasets()
    assert [d["name"] for d in listed] == [alpha_name, zeta_name]
    for d in listed:
        assert client.dataset(d["name"]) == d
    zeta = client.dataset(zeta_name)
    meta, got = stored(rdb, settings.key_prefix, zeta_name)
    assert zeta["num_sequences"] == len(got) == results[0]["sequences"] + results[1]["sequences"]
    assert zeta["num_tokens"] == sum(len(ids) for ids, _ in got) == results[0]["tokens"] + results[1]["tokens"]
    assert zeta["num_documents"] == 40
    keys = chunk_keys(rdb, settings.key_prefix, zeta_name)
    assert zeta["num_chunks"] == len(keys)
    assert zeta["bytes"] == sum(rdb.strlen(k) for k in keys) == results[0]["bytes"] + results[1]["bytes"]
    assert zeta["seq_len"] == 100 and zeta["packing"] == "doc"
    assert zeta["vocab_size"] == tok.get_vocab_size(with_added_tokens=True)
    assert zeta["id_dtype"] == "<u2"
    assert zeta["special_tokens"]["mask"] == tok.token_to_id("<mask>")
    assert zeta["generation"] == 2
    tok_text = httpx.get(f"{service_url}/v1/datasets/{zeta_name}/tokenizer").text
    assert zeta["tokenizer_sha256"] == hashlib.sha256(tok_text.encode()).hexdigest()
    assert Tokenizer.from_str(tok_text).encode("some text").ids == tok.encode("some text").ids
    alpha = client.dataset(alpha_name)
    assert alpha["num_documents"] == 7 and alpha["num_sequences"] == 7  # `none`: one per document
    assert alpha["special_tokens"]["cls"] == Tokenizer.from_str(wordpiece_tokenizer).token_to_id("[CLS]")


def test_delete_leaves_no_keys(client, rdb, bpe_tokenizer, corpus):
    name = uniq("gone")
    client.create_dataset(name, tokenizer=bpe_tokenizer, seq_len=64)
    client.ingest(name, corpus[:200], idempotency_key="x")
    client.ingest(name, corpus[200:260])
    client.batch(name, 8, seed=1)
    assert len(rdb.keys("*")) > 5
    client.delete_dataset(name)
    assert rdb.keys("*") == []
    assert [d["name"] for d in client.datasets()] == []
    r = httpx.get(f"{client.base_url}/v1/datasets/{name}")
    assert r.status_code == 404



class PausedIngest:
    """An ingest whose body stops half-way until released: the first part stages chunks, then it waits."""

    def __init__(self, url: str, name: str, first: bytes, rest: bytes) -> None:
        self.gate = threading.Event()
        self.response: httpx.Response | None = None

        def body():
            yield first
            self.gate.wait(60)
            yield rest

        def run() -> None:
            self.response = httpx.post(f"{url}/v1/datasets/{name}/documents", content=body(), headers=NDJSON,
                                       timeout=120)  # fmt: skip

        self.thread = threading.Thread(target=run, daemon=True)

    def __enter__(self) -> "PausedIngest":
        self.thread.start()
        return self

    def wait_staged(self, rdb) -> None:
        deadline = time.monotonic() + 60
        while not any(True for _ in rdb.scan_iter(match="*:staging")):
            assert self.thread.is_alive() and time.monotonic() < deadline, "the ingest never staged a chunk"
            time.sleep(0.01)

    def finish(self) -> httpx.Response:
        self.gate.set()
        self.thread.join(120)
        assert self.response is not None
        return self.response

    def __exit__(self, *exc: object) -> None:
        self.gate.set()
        self.thread.join(120)


def test_delete_during_an_ingest_leaves_no_keys(service_url, rdb, bpe_tokenizer, over_one_batch, corpus):
    name = uniq("inflight")
    create(service_url, name, bpe_tokenizer, 512)
    first = over_one_batch
    rest = ndjson({"text": t} for t in corpus[:100])
    with PausedIngest(service_url, name, first, rest) as job:
        job.wait_staged(rdb)
        assert httpx.delete(f"{service_url}/v1/datasets/{name}").status_code == 204
        resp = job.finish()
    assert resp.status_code == 404, resp.text
    assert resp.json()["type"] == "urn:maskserve:problem:dataset-not-found"
    assert rdb.keys("*") == [], "the failed ingest left keys behind"


def test_recreate_during_an_ingest_keeps_the_new_dataset_clean(service_url, rdb, bpe_tokenizer, over_one_batch, corpus):
    name = uniq("inflight")
    create(service_url, name, bpe_tokenizer, 512)
    with PausedIngest(service_url, name, over_one_batch, ndjson({"text": t} for t in corpus[:100])) as job:
        job.wait_staged(rdb)
        assert httpx.delete(f"{service_url}/v1/datasets/{name}").status_code == 204
        uid = create(service_url, name, bpe_tokenizer, 256, "doc")["uid"]
        resp = job.finish()
    assert resp.status_code == 404, resp.text  # the ingest was for the dataset that is gone
    info = httpx.get(f"{service_url}/v1/datasets/{name}").json()
    assert info["uid"] == uid and info["num_sequences"] == 0 and info["num_chunks"] == 0
    assert [k for k in rdb.scan_iter(match="*:c:*")] == []


def test_delete_keeps_other_datasets(client, rdb, settings, bpe_tokenizer, corpus):
    keep_name, drop_name = uniq("keep"), uniq("drop")
    client.create_dataset(keep_name, tokenizer=bpe_tokenizer, seq_len=64)
    client.create_dataset(drop_name, tokenizer=bpe_tokenizer, seq_len=64)
    client.ingest(keep_name, corpus[:20])
    client.ingest(drop_name, corpus[:20])
    before = stored(rdb, settings.key_prefix, keep_name)
    client.delete_dataset(drop_name)
    assert [d["name"] for d in client.datasets()] == [keep_name]
    assert stored(rdb, settings.key_prefix, keep_name) == before
    assert all(drop_name.encode() not in k for k in rdb.keys("*"))


def test_recreated_dataset_does_not_see_old_data(client, rdb, settings, bpe_tokenizer, tok, corpus):
    name = uniq("again")
    client.create_dataset(name, tokenizer=bpe_tokenizer, seq_len=64)
    client.ingest(name, corpus[:50])
    old_uid = client.dataset(name)["uid"]
    client.batch(name, 16, seed=2)  # warm the service's caches
    client.delete_dataset(name)
    client.create_dataset(name, tokenizer=bpe_tokenizer, seq_len=32, packing="none")
    texts = ["only new data here", "and a second new document"]
    client.ingest(name, texts)
    info = client.dataset(name)
    assert info["uid"] != old_uid
    assert info["num_sequences"] == 2 and info["num_documents"] == 2 and info["seq_len"] == 32
    want = [ids for ids, _ in expected_packing([doc_tokens(tok, t) for t in texts], "none", 32, *specials(tok))]
    batch = client.batch(name, 32, seed=5, mlm_probability=0.0)
    assert batch["input_ids"].shape == (32, 32)
    for row, n in zip(batch["input_ids"], batch["attention_mask"].sum(axis=1)):
        assert row[:n].tolist() in want


def test_recreated_dataset_seen_by_another_replica(settings, rdb, bpe_tokenizer, tok, corpus):
    """Two stateless replicas: one deletes and re-creates a dataset the other has served."""
    name = uniq("shared")
    with ServerThread(settings) as a, ServerThread(settings) as b:
        create(a.url, name, bpe_tokenizer, 64, "complete")
        ingest(a.url, name, ndjson({"text": t} for t in corpus[:20]))
        r = httpx.delete(f"{b.url}/v1/datasets/{name}")
        assert r.status_code == 204
        create(b.url, name, bpe_tokenizer, 32, "none")
        texts = ["fresh document one", "fresh document two"]
        res = ingest(a.url, name, ndjson({"text": t} for t in texts))  # replica a served the old dataset
        assert res["sequences"] == 2
        _, got = stored(rdb, settings.key_prefix, name)
        want = expected_packing([doc_tokens(tok, t) for t in texts], "none", 32, *specials(tok))
        assert [ids for ids, _ in got] == [ids for ids, _ in want]


async def _split(pieces: list[bytes]) -> list[tuple[int, bytes]]:
    from service.data.ingest import lines

    async def stream():
        for p in pieces:
            yield p

    return [x async for x in lines(stream())]


def test_line_splitting_matches_split_for_any_chunking():
    import asyncio
    import random

    rng = random.Random(7)
    for _ in range(200):
        body = b"".join(rng.choice([b"\n", b"ab", b"c", b"\n\n", b"xyz" * rng.randint(0, 20)]) for _ in range(30))
        cuts = sorted(rng.sample(range(len(body) + 1), min(len(body) + 1, rng.randint(0, 12))))
        pieces = [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)])]
        want = body.split(b"\n")
        if want and want[-1] == b"":
            want.pop()
        assert asyncio.run(_split(pieces)) == list(enumerate(want, 1))


@pytest.mark.timeout(120)
def test_a_long_line_in_small_pieces_is_split_in_linear_time():
    """32 MB without a newline, in 4 KiB pieces: joined once (re-splitting the growing buffer per piece, as
    before, copies ~130 GB here and does not finish)."""
    import asyncio

    piece = b"x" * 4096
    out = asyncio.run(_split([piece] * 8192 + [b"\ntail"]))
    assert [(n, len(line)) for n, line in out] == [(1, 8192 * 4096), (2, 4)]


def test_ingest_batches_are_bounded_in_documents_too():
    """Many tiny documents: each tokenizer call gets at most batch_docs of them, however little text they hold."""
    import asyncio

    from service.data.ingest import IngestStats, run_pipeline

    fed: list[int] = []

    class Recorder:  # stands in for the tokenizing pipeline: records each batch it is handed
        stats = IngestStats()

        def feed(self, docs):
            fed.append(len(docs))
            return []

        def finish(self):
            return []

    async def docs():
        for _ in range(2500):
            yield "abc"

    async def stage(blob):
        raise AssertionError("nothing to stage")

    asyncio.run(run_pipeline(Recorder(), docs(), 1 << 20, stage, batch_docs=1000))
    assert fed == [1000, 1000, 500]


def test_a_dataset_of_the_earlier_key_layout_is_refused_with_a_clear_conflict(client, rdb, settings, bpe_tokenizer,
                                                                              corpus):
    """Metadata written before chunks were spread over chunk groups (no ``chunk_groups``): batches and
    ingests answer 409 saying to re-ingest, rather than failing inside."""
    name = f"old-{uuid.uuid4().hex[:8]}"
    client.create_dataset(name, tokenizer=bpe_tokenizer, seq_len=64)
    client.ingest(name, corpus[:20])
    meta_key = Keys(settings.key_prefix).ds(name, "meta")
    rdb.hdel(meta_key, "chunk_groups")
    fresh = ServerThread(settings)  # a process that has not cached the dataset
    with fresh:
        batch = httpx.get(f"{fresh.url}/v1/datasets/{name}/batch", params={"size": 2}, timeout=30)
        ingest = httpx.post(f"{fresh.url}/v1/datasets/{name}/documents", content=b'{"text": "more"}\n',
                            headers={"Content-Type": "application/x-ndjson"}, timeout=30)  # fmt: skip
    for r in (batch, ingest):
        assert r.status_code == 409, r.text
        assert r.json()["type"] == "urn:maskserve:problem:conflict" and "ingest it again" in r.json()["detail"]


def test_a_create_racing_a_delete_of_the_same_name_stays_listed(redis_url, settings):
    """The index of names is not in the dataset's slot (on a cluster no script can write both): whatever way a
    create of a name interleaves with a delete of its previous generation, the new dataset stays listed."""
    from service.store.store import Store

    def meta(name: str) -> dict:
        return {"name": name, "uid": uuid.uuid4().hex, "seq_len": 64, "packing": "none", "vocab_size": 10,
                "id_dtype": "<u2", "special_tokens": {}, "all_special_ids": [], "num_sequences": 0, "num_tokens": 0,
                "num_documents": 0, "num_chunks": 0, "bytes": 0, "generation": 0, "created_at": 0.0,
                "tokenizer_sha256": ""}  # fmt: skip

    async def main() -> None:
        r = aioredis.Redis.from_url(redis_url)
        store = Store(r, uniq("race"))

        # 1. The create runs whole between the delete's retirement and its removal from the index.
        name = "between-retire-and-unlist"
        assert await store.create_dataset(name, meta(name), b"")
        emptied = store.empty_trash
        racing: list[bool] = []

        async def create_then_empty(n: str) -> int:
            if not racing:
                store.empty_trash = emptied  # type: ignore[method-assign]
                racing.append(await store.create_dataset(n, meta(n), b""))
            return await emptied(n)

        store.empty_trash = create_then_empty  # type: ignore[method-assign]
        assert await store.delete_dataset(name) > 0
        assert racing == [True] and await store.meta(name) is not None
        assert name in await store.list_names()

        # 2. The delete runs whole between the create's first listing and its meta being written.
        name = "between-list-and-create"
        assert await store.create_dataset(name, meta(name), b"")
        create_script = store._create

        async def delete_then_create(**kw: object) -> object:
            assert await store.delete_dataset(name) > 0
            return await create_script(**kw)

        store._create = delete_then_create  # type: ignore[assignment]
        assert await store.create_dataset(name, meta(name), b"")
        store._create = create_script
        assert await store.meta(name) is not None
        assert name in await store.list_names()

        for n in await store.list_names():
            await store.delete_dataset(n)
        assert await store.list_names() == []
        await r.aclose()

    asyncio.run(main())


def _meta(name: str) -> dict:
    """The meta of a small dataset created straight through the store."""
    return {"name": name, "uid": uuid.uuid4().hex, "seq_len": 64, "packing": "none", "vocab_size": 10,
            "id_dtype": "<u2", "special_tokens": {}, "all_special_ids": [], "num_sequences": 0, "num_tokens": 0,
            "num_documents": 0, "num_chunks": 0, "bytes": 0, "generation": 0, "created_at": 0.0,
            "tokenizer_sha256": ""}  # fmt: skip


def test_a_nonce_collision_leaves_the_other_ingest_whole(redis_url):
    """Two ingests that draw the same nonce: the second one's chunk gets a fresh id, and the first one's staged
    chunk stays staged and commits; so does a chunk whose id a committed chunk holds."""
    from service.store.store import Store

    async def main() -> None:
        r = aioredis.Redis.from_url(redis_url)
        store = Store(r, uniq("nonce"))
        m = _meta("collide")
        assert await store.create_dataset("collide", m, b"")
        uid, nonce = m["uid"], store.new_ingest_id()

        async def commit(staged) -> int:  # noqa: ANN001
            status, _ = await store.commit_ingest("collide", uid, "", [staged], [1], 1, 1, 1, 1, {},
                                                  np.zeros(10, dtype=np.int64))  # fmt: skip
            return status

        first = await store.stage_chunk("collide", uid, nonce, 0, b"first", 60)
        second = await store.stage_chunk("collide", uid, nonce, 0, b"second", 60)  # the same nonce, the same j
        assert second.id != first.id and second.key != first.key
        assert await r.get(first.key) == b"first" and await r.get(second.key) == b"second"
        assert await commit(first) == 0  # its staging entry survived the collision
        assert await commit(second) == 0
        third = await store.stage_chunk("collide", uid, nonce, 0, b"third", 60)  # the id of a committed chunk
        assert third.id not in (first.id, second.id) and await r.get(first.key) == b"first"
        assert await commit(third) == 0
        assert (await store.meta("collide"))["num_chunks"] == 3
        await store.delete_dataset("collide")
        await r.aclose()

    asyncio.run(main())


def test_idempotency_records_expire_after_their_ttl(settings, rdb, bpe_tokenizer, corpus):
    """Every ingest with a key adds a record: they expire after MASKSERVE_INGEST_IDEMPOTENCY_TTL_S (a TTL on the
    Redis key that holds them, and a deadline per record), so a dataset's records stay bounded."""
    short = settings.model_copy(update={"ingest_idempotency_ttl_s": 1})
    name = uniq("ttl")
    with ServerThread(short) as server:
        create(server.url, name, bpe_tokenizer, 64)
        body = ndjson({"text": t} for t in corpus[:5])

        def send(key: str) -> dict:
            return ingest(server.url, name, body, {**NDJSON, "Idempotency-Key": key})

        def holders(key: str) -> list[bytes]:  # the dataset's keys that hold the record of ``key``
            return [k for k in rdb.scan_iter(match=Keys(short.key_prefix).ds(name, "*"))
                    if rdb.type(k) == b"hash" and rdb.hexists(k, key)]  # fmt: skip

        def redis_ms() -> int:
            sec, usec = rdb.time()
            return sec * 1000 + usec // 1000

        assert send("a")["duplicate"] is False
        committed = redis_ms()
        assert send("a")["duplicate"] is True  # a retry within the TTL
        [records] = holders("a")
        assert 0 < rdb.pttl(records) <= 1000
        assert send("b")["duplicate"] is False
        while redis_ms() <= committed + 1000:  # the record of "a" is past its TTL
            time.sleep(0.01)
        assert send("c")["duplicate"] is False
        assert holders("a") == [] and rdb.hlen(holders("c")[0]) <= 2  # "a" pruned (or its key expired)
        assert send("a")["duplicate"] is False  # forgotten: committed again
        assert decode_meta(rdb.hgetall(Keys(short.key_prefix).ds(name, "meta")))["num_documents"] == 4 * 5
