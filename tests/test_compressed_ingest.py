"""Compressed corpora: gzip and zstd bodies decoded by the service as they arrive, bz2 and xz files by the
client as it sends them; decompression bombs, damaged streams and unknown encodings refused, nothing stored."""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
from collections.abc import AsyncIterator, Callable

import anyio
import httpx
import pytest
import zstandard

from client import Client
from service.core.errors import CorruptBody, PayloadTooLarge
from service.data.encodings import ENCODINGS, PIECE, ZstdFraming, decoded
from service.data.ingest import limited

from .test_client import Recorder, mock_client  # noqa: F401 - mock_client is a fixture (either client)
from .test_errors import check_problem, ndjson, snapshot, uniq
from .test_ingest import stored

NDJSON = "application/x-ndjson"


# ---------------------------------------------------------------------------
# helpers


def gz_members(data: bytes, parts: int) -> bytes:
    """``data`` as a multi-member gzip file (as ``cat a.gz b.gz`` makes), cut at arbitrary bytes."""
    step = -(-len(data) // parts)
    return b"".join(gzip.compress(data[i : i + step]) for i in range(0, len(data), step))


def skippable_frame(payload: bytes) -> bytes:
    return (0x184D2A53).to_bytes(4, "little") + len(payload).to_bytes(4, "little") + payload


def zst_frames(data: bytes, parts: int) -> bytes:
    """``data`` as several zstd frames (checksummed, some without a content size), with a skippable frame
    between two of them, cut at arbitrary bytes."""
    step = -(-len(data) // parts)
    frames = []
    for k, i in enumerate(range(0, len(data), step)):
        cctx = zstandard.ZstdCompressor(write_checksum=True, write_content_size=k % 2 == 0)
        frames.append(cctx.compress(data[i : i + step]))
    frames.insert(1, skippable_frame(b"metadata the decoder skips"))
    return b"".join(frames)


#: file suffix -> how the plain bytes become that file
WRITERS: dict[str, Callable[[bytes], bytes]] = {
    ".gz": gzip.compress,
    ".gz (multi-member)": lambda data: gz_members(data, 5),
    ".zst": lambda data: zstandard.ZstdCompressor().compress(data),
    ".zst (multi-frame)": lambda data: zst_frames(data, 4),
    ".bz2": bz2.compress,
    ".xz": lzma.compress,
}


@pytest.fixture(scope="module")
def jsonl(corpus: list[str]) -> bytes:
    """About 1.3 MB of NDJSON: more than one decoded piece (PIECE) and several ingest batches."""
    body = ndjson({"text": t} for t in corpus * 4)
    assert len(body) > PIECE
    return body


@pytest.fixture(scope="module")
def text(corpus: list[str]) -> bytes:
    return "\n".join(t.replace("\n", " ") for t in corpus).encode()


def make_dataset(client: Client, tokenizer: str) -> str:
    name = uniq("gz")
    client.create_dataset(name, tokenizer=tokenizer, seq_len=64)
    return name


def post(service_url: str, name: str, body: bytes, encoding: str | list[str] | None, ctype: str = NDJSON):
    headers = [("Content-Type", ctype)]
    for value in [encoding] if isinstance(encoding, str) else encoding or []:
        headers.append(("Content-Encoding", value))
    return httpx.post(f"{service_url}/v1/datasets/{name}/documents", content=body, headers=headers, timeout=120)


# ---------------------------------------------------------------------------
# the same sequences as the plain file


@pytest.mark.parametrize("inner, kind", [*((".jsonl", kind) for kind in WRITERS),
                                         (".txt", ".gz"), (".txt", ".zst (multi-frame)"), (".txt", ".xz")])  # fmt: skip
def test_a_compressed_file_stores_the_sequences_of_the_plain_one(
    inner, kind, client, rdb, settings, bpe_tokenizer, jsonl, text, tmp_path
):
    data = jsonl if inner == ".jsonl" else text
    plain = tmp_path / f"docs{inner}"
    plain.write_bytes(data)
    packed = tmp_path / f"docs{inner}{kind.split()[0]}"
    packed.write_bytes(WRITERS[kind](data))
    results, sequences = [], []
    for path in (plain, packed):
        name = make_dataset(client, bpe_tokenizer)
        read: list[int] = []
        results.append(client.ingest_file(name, path, split="line", on_bytes=read.append))
        assert sum(read) == path.stat().st_size, "on_bytes counts the file's bytes, as its progress bar expects"
        sequences.append(stored(rdb, settings.key_prefix, name)[1])
    assert sequences[1] == sequences[0] and len(sequences[0]) > 100
    assert {k: results[1][k] for k in ("documents", "sequences", "tokens", "bytes")} == {
        k: results[0][k] for k in ("documents", "sequences", "tokens", "bytes")
    }


def test_json_gz_is_ndjson_as_c4_ships_it(client, rdb, settings, bpe_tokenizer, jsonl, tmp_path):
    path = tmp_path / "c4-train.00000-of-01024.json.gz"
    path.write_bytes(gzip.compress(jsonl))
    name = make_dataset(client, bpe_tokenizer)
    res = client.ingest_file(name, path)
    assert res["documents"] == jsonl.count(b"\n")


@pytest.mark.parametrize("encoding", ["identity", "GZIP", "x-gzip", "Zstd"])
def test_encoding_names_as_http_allows_them(encoding, service_url, client, bpe_tokenizer):
    body = ndjson({"text": f"document number {k}"} for k in range(10))
    plain = encoding.lower()
    wire = zstandard.ZstdCompressor().compress(body) if plain == "zstd" else body
    wire = gzip.compress(body) if "gzip" in plain else wire
    name = make_dataset(client, bpe_tokenizer)
    resp = post(service_url, name, wire, encoding)
    assert resp.status_code == 200, resp.text
    assert resp.json()["documents"] == 10


# ---------------------------------------------------------------------------
# bombs: the decoded bytes count against MASKSERVE_MAX_BODY_BYTES


def bomb(encoding: str, decoded_size: int) -> bytes:
    """Valid NDJSON that decodes to ``decoded_size`` bytes from a small body: one compressed block of
    documents, repeated as members or frames (so it builds fast whatever the size). Pre-tokenized documents,
    so that what it stores before the limit is hit comes quickly."""
    line = json.dumps({"ids": list(range(100, 164)) * 8}).encode() + b"\n"
    block = line * ((1 << 20) // len(line))
    unit = gzip.compress(block, 9) if encoding == "gzip" else zstandard.ZstdCompressor(level=19).compress(block)
    return unit * (decoded_size // len(block))


@pytest.mark.parametrize("encoding, decoded_size", [("gzip", 64 << 20), ("zstd", 1 << 30)])
def test_a_decompression_bomb_is_413_and_stores_nothing(
    encoding, decoded_size, service_url, client, rdb, settings, bpe_tokenizer, corpus
):
    name = make_dataset(client, bpe_tokenizer)
    client.ingest(name, corpus[:30])
    before, keys = client.dataset(name), snapshot(rdb)
    body = bomb(encoding, decoded_size)
    assert len(body) < settings.max_body_bytes // 8, "small on the wire: only its decoded size is over the limit"
    problem = check_problem(post(service_url, name, body, encoding), 413, "payload-too-large", "decoded",
                            str(settings.max_body_bytes))  # fmt: skip
    assert problem["limit"] == settings.max_body_bytes
    assert client.dataset(name) == before
    assert snapshot(rdb) == keys, "the chunks staged before the limit was hit are gone"


def test_a_compressed_body_over_the_limit_on_the_wire_is_413(service_url, client, settings, bpe_tokenizer):
    name = make_dataset(client, bpe_tokenizer)
    before = client.dataset(name)
    line = json.dumps({"ids": list(range(100, 164))}).encode() + b"\n"
    wire = gzip.compress(line * (settings.max_body_bytes // len(line) + 1), 0)  # stored blocks: a little larger
    assert len(wire) > settings.max_body_bytes
    problem = check_problem(post(service_url, name, wire, "gzip"), 413, "payload-too-large",
                            str(settings.max_body_bytes))  # fmt: skip
    assert "decoded" not in problem["detail"], "the bytes on the wire reach the limit first"
    assert client.dataset(name) == before


def test_the_decoder_returns_bounded_pieces_and_stops_at_the_limit():
    """A zstd frame of 1 GiB of zeros (a few kB) is decoded a piece at a time and dropped one piece past the
    limit: never whole."""
    bomb_frame = zstandard.ZstdCompressor().compress(bytes(1 << 30))
    limit = 8 << 20
    pieces: list[int] = []

    async def body() -> AsyncIterator[bytes]:
        for i in range(0, len(bomb_frame), 4096):
            yield bomb_frame[i : i + 4096]

    async def main() -> None:
        async for piece in limited(decoded(body(), "zstd"), limit, "decoded request body"):
            pieces.append(len(piece))

    with pytest.raises(PayloadTooLarge):
        anyio.run(main)
    assert max(pieces) <= PIECE
    assert limit - PIECE < sum(pieces) <= limit


# ---------------------------------------------------------------------------
# damaged streams: 400 corrupt-body


def flipped(data: bytes, at: int) -> bytes:
    out = bytearray(data)
    out[at] ^= 0x5A
    return bytes(out)


#: (encoding, what is wrong with the body)
DAMAGE = [
    ("gzip", "cut in half"), ("gzip", "without its trailer"), ("gzip", "a byte changed in the data"),
    ("gzip", "a byte changed in the CRC"), ("gzip", "trailing garbage"), ("gzip", "not gzip at all"),
    ("gzip", "a second member cut short"),
    ("zstd", "cut in half"), ("zstd", "without its checksum"), ("zstd", "a multi-frame stream cut in its last frame"),
    ("zstd", "a byte changed in the data"), ("zstd", "a byte changed in the magic number"),
    ("zstd", "trailing garbage"), ("zstd", "not zstd at all"),
]  # fmt: skip


def damaged(jsonl: bytes) -> dict[tuple[str, str], bytes]:
    """The body of each case of :data:`DAMAGE`."""
    gz = gzip.compress(jsonl)
    zs = zstandard.ZstdCompressor(write_checksum=True).compress(jsonl)
    out = {
        ("gzip", "cut in half"): gz[: len(gz) // 2],
        ("gzip", "without its trailer"): gz[:-8],
        ("gzip", "a byte changed in the data"): flipped(gz, len(gz) // 2),
        ("gzip", "a byte changed in the CRC"): flipped(gz, len(gz) - 6),
        ("gzip", "trailing garbage"): gz + b"not gzip",
        ("gzip", "not gzip at all"): jsonl,
        ("gzip", "a second member cut short"): gz + gzip.compress(b'{"text": "more"}\n')[:-3],
        ("zstd", "cut in half"): zs[: len(zs) // 2],
        ("zstd", "without its checksum"): zs[:-4],
        ("zstd", "a multi-frame stream cut in its last frame"): zst_frames(jsonl, 3)[:-100],
        ("zstd", "a byte changed in the data"): flipped(zs, len(zs) // 2),
        ("zstd", "a byte changed in the magic number"): flipped(zs, 0),
        ("zstd", "trailing garbage"): zs + b"not zstd",
        ("zstd", "not zstd at all"): jsonl,
    }
    assert list(out) == DAMAGE
    return out


@pytest.mark.parametrize("encoding, what", DAMAGE)
def test_a_damaged_stream_is_400_corrupt_body_and_stores_nothing(
    encoding, what, service_url, client, rdb, bpe_tokenizer, corpus, jsonl
):
    name = make_dataset(client, bpe_tokenizer)
    client.ingest(name, corpus[:30])
    before, keys = client.dataset(name), snapshot(rdb)
    resp = post(service_url, name, damaged(jsonl)[encoding, what], encoding)
    check_problem(resp, 400, CorruptBody.type, encoding)
    assert client.dataset(name) == before
    assert snapshot(rdb) == keys


def test_zstd_framing_tells_a_whole_stream_from_one_cut_anywhere():
    data = b"".join(json.dumps({"text": f"doc {k} " * 20}).encode() + b"\n" for k in range(400))
    frames = [zstandard.ZstdCompressor(write_checksum=k == 1).compress(data[k * 9000 : (k + 1) * 9000])
              for k in range(-(-len(data) // 9000))]  # fmt: skip
    frames.insert(2, skippable_frame(b"x" * 10))
    stream = b"".join(frames)
    ends = {0}
    for f in frames:
        ends.add(max(ends) + len(f))
    for cut in range(len(stream) + 1):
        framing = ZstdFraming()
        framing.feed(stream[: cut // 2])
        framing.feed(stream[cut // 2 : cut])
        assert framing.between_frames == (cut in ends), cut


# ---------------------------------------------------------------------------
# unknown encodings: 415


@pytest.mark.parametrize("encoding", ["br", "deflate", "x-foo", "compress", "gzip, zstd", "gzip, gzip",
                                      ["gzip", "zstd"]])  # fmt: skip
def test_an_unknown_encoding_is_415_naming_the_supported_ones(encoding, service_url, client, rdb, bpe_tokenizer):
    name = make_dataset(client, bpe_tokenizer)
    before, keys = client.dataset(name), snapshot(rdb)
    resp = post(service_url, name, gzip.compress(b'{"text": "hello"}\n'), encoding)
    check_problem(resp, 415, "unsupported-media-type", *ENCODINGS)
    assert client.dataset(name) == before
    assert snapshot(rdb) == keys


def test_the_api_document_declares_the_header_and_the_error(service_url):
    doc = httpx.get(f"{service_url}/openapi.json").json()
    op = doc["paths"]["/v1/datasets/{name}/documents"]["post"]
    header = next(p for p in op["parameters"] if p["name"] == "Content-Encoding")
    assert header["in"] == "header" and header["schema"]["enum"] == list(ENCODINGS)
    bad_request = json.dumps(op["responses"]["400"])
    assert "corrupt-body" in bad_request
    assert "415" in op["responses"] and "413" in op["responses"]


def test_the_client_sends_gz_and_zst_as_they_are_and_decodes_bz2_and_xz(mock_client, tmp_path):
    """What goes on the wire: the file's own bytes with its Content-Encoding, or a bz2/xz file decoded."""
    done = httpx.Response(200, json={"dataset": "d", "documents": 1, "sequences": 1, "tokens": 1, "bytes": 1,
                                     "first_sequence_id": 0})  # fmt: skip
    rec = Recorder(done)
    data = b'{"text": "hello"}\n' * 1000
    cases = {"a.jsonl.gz": gzip.compress(data), "b.ndjson.zst": zstandard.ZstdCompressor().compress(data),
             "c.txt.bz2": bz2.compress(data), "d.jsonl.xz": lzma.compress(data), "e.TXT.GZ": gzip.compress(data),
             "f.json": data}  # fmt: skip
    with mock_client(rec, retries=0) as c:
        for file_name, content in cases.items():
            (tmp_path / file_name).write_bytes(content)
            c.ingest_file("d", tmp_path / file_name)
    wire = [(r.headers.get("content-encoding"), r.headers["content-type"], r.content) for r in rec.requests]
    assert wire == [
        ("gzip", NDJSON, cases["a.jsonl.gz"]),
        ("zstd", NDJSON, cases["b.ndjson.zst"]),
        (None, "text/plain", data),
        (None, NDJSON, data),
        ("gzip", "text/plain", cases["e.TXT.GZ"]),
        (None, NDJSON, data),
    ]
