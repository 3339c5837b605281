"""Real corpora in: Parquet, Arrow and saved Hugging Face datasets by column, staged ingests committed by
key, and the CLI's parallel, ordered, resumable ingest."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import anyio
import datasets
import httpx
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from client import BadRequestError, Client, CorpusError, NotFoundError
from client.corpora import arrow_body
from maskserve.ingest import Work

from .conftest import service_env

ARROW = "application/vnd.apache.arrow.stream"
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _dataset(client: Client, name: str, tokenizer: str, seq_len: int = 64, packing: str = "complete") -> None:
    client.delete_dataset(name, missing_ok=True)
    client.create_dataset(name, tokenizer=json.loads(tokenizer), seq_len=seq_len, packing=packing)


def served(client: Client, name: str) -> np.ndarray:
    """Every sequence of a dataset as served (same seed for all: equal datasets give equal arrays)."""
    n = client.dataset(name)["num_sequences"]
    rows = [client.sequences(name, range(a, min(n, a + 512)), seed=7)["input_ids"] for a in range(0, n, 512)]
    return np.concatenate(rows) if rows else np.zeros((0, 0), np.int64)


def arrow_post(url: str, name: str, table: pa.Table, **params: str) -> httpx.Response:
    body = b"".join(arrow_body(table.to_batches(max_chunksize=64)))
    return httpx.post(f"{url}/v1/datasets/{name}/documents", params=params, content=body,
                      headers={"content-type": ARROW})  # fmt: skip


def unchanged(client: Client, name: str, before: dict) -> None:
    after = client.dataset(name)
    assert (after["num_sequences"], after["generation"]) == (before["num_sequences"], before["generation"])


@pytest.fixture
def texts(corpus: list[str]) -> list[str]:
    return corpus[:300]


def test_parquet_arrow_and_hf_datasets_store_what_ndjson_stores(client, bpe_tokenizer, texts, tmp_path):
    _dataset(client, "ref", bpe_tokenizer)
    client.ingest("ref", texts)
    want = served(client, "ref")
    table = pa.table({"id": np.arange(len(texts)), "text": texts, "meta": ["x"] * len(texts)})
    pq.write_table(table, tmp_path / "c.parquet", row_group_size=70)
    with pa.OSFile(str(tmp_path / "c.arrow"), "wb") as f, pa.ipc.new_file(f, table.schema) as w:
        w.write_table(table, max_chunksize=50)
    with pa.OSFile(str(tmp_path / "s.arrow"), "wb") as f, pa.ipc.new_stream(f, table.schema) as w:
        w.write_table(table, max_chunksize=50)
    hf = datasets.Dataset.from_dict({"text": texts, "n": list(range(len(texts)))})
    hf.save_to_disk(str(tmp_path / "hf"))
    datasets.DatasetDict({"train": hf.select(range(5)), "test": hf}).save_to_disk(str(tmp_path / "hfd"))
    ingests = {
        "parquet": lambda n: client.ingest_file(n, tmp_path / "c.parquet"),
        "arrow-file": lambda n: client.ingest_file(n, tmp_path / "c.arrow"),
        "arrow-stream": lambda n: client.ingest_file(n, tmp_path / "s.arrow"),
        "hf-dir": lambda n: client.ingest_file(n, tmp_path / "hf"),
        "hf-dict-split": lambda n: client.ingest_file(n, tmp_path / "hfd", split="test"),
        "hf-object": lambda n: client.ingest_dataset(n, hf),
        "hf-iterable": lambda n: client.ingest_dataset(n, hf.to_iterable_dataset()),
    }
    for how, ingest in ingests.items():
        _dataset(client, how, bpe_tokenizer)
        res = ingest(how)
        assert res["documents"] == len(texts), how
        assert np.array_equal(served(client, how), want), how


def test_an_ids_column_stores_what_ndjson_ids_store(client, bpe_tokenizer, tmp_path):
    rng = np.random.default_rng(0)
    docs = [rng.integers(10, 2000, rng.integers(1, 150)).tolist() for _ in range(400)]
    _dataset(client, "ids-ref", bpe_tokenizer)
    client.ingest("ids-ref", docs)
    for typ in (pa.list_(pa.int32()), pa.large_list(pa.uint16()), pa.list_(pa.int64())):
        pq.write_table(pa.table({"input_ids": pa.array(docs, typ)}), tmp_path / "ids.parquet", row_group_size=90)
        _dataset(client, "ids", bpe_tokenizer)
        client.ingest_file("ids", tmp_path / "ids.parquet", ids_column="input_ids")
        assert np.array_equal(served(client, "ids"), served(client, "ids-ref")), typ
    _dataset(client, "ids-hf", bpe_tokenizer)
    client.ingest_dataset("ids-hf", datasets.Dataset.from_dict({"input_ids": docs}), ids_column="input_ids")
    assert np.array_equal(served(client, "ids-hf"), served(client, "ids-ref"))


def test_bad_columnar_bodies_are_refused_and_store_nothing(client, service_url, bpe_tokenizer):
    _dataset(client, "bad", bpe_tokenizer)
    client.ingest("bad", ["some text to begin with"])
    before = client.dataset("bad")
    ids = pa.table({"input_ids": pa.array([[11, 12], [13]], pa.list_(pa.int32()))})
    cases = {
        "no such column": (pa.table({"body": ["a"]}), {}, 400, "no column 'text'"),
        "ints for text": (pa.table({"text": [1, 2]}), {}, 400, "not strings"),
        "strings for ids": (pa.table({"text": ["a"]}), {"ids_column": "text"}, 400, "not lists of integers"),
        "null text": (pa.table({"text": ["a", None, "b"]}), {}, 400, "row 1: null"),
        "null id": (pa.table({"input_ids": pa.array([[11], [12, None]])}), {"ids_column": "input_ids"}, 400,
                    "row 1: a null id"),
        "beyond the vocabulary": (pa.table({"input_ids": [[11], [5, 2000]]}), {"ids_column": "input_ids"}, 400,
                                  "row 1: id 2000 is outside"),
        "negative id": (pa.table({"input_ids": [[-1]]}), {"ids_column": "input_ids"}, 400, "row 0: id -1"),
        "a special id": (pa.table({"input_ids": [[11], [12], [0]]}), {"ids_column": "input_ids"}, 400,
                         "row 2: id 0 is a special token"),
        "both columns": (ids, {"ids_column": "input_ids", "text_column": "text"}, 400, "not both"),
    }  # fmt: skip
    for what, (table, params, status, detail) in cases.items():
        r = arrow_post(service_url, "bad", table, **params)
        assert r.status_code == status, (what, r.text)
        assert r.headers["content-type"] == "application/problem+json"
        assert detail in r.json()["detail"], (what, r.json())
    whole = b"".join(arrow_body(ids.to_batches()))
    for what, body in {"truncated": whole[: len(whole) - 20], "garbage": b"\x00" * 64 + whole}.items():
        r = httpx.post(f"{service_url}/v1/datasets/bad/documents", content=body, headers={"content-type": ARROW},
                       params={"ids_column": "input_ids"})  # fmt: skip
        assert r.status_code == 400 and "Arrow" in r.json()["detail"], (what, r.text)
    r = httpx.post(f"{service_url}/v1/datasets/bad/documents", params={"text_column": "text"},
                   content=b'{"text": "x"}\n', headers={"content-type": "application/x-ndjson"})  # fmt: skip
    assert r.status_code == 400 and "name a column of an" in r.json()["detail"]
    unchanged(client, "bad", before)


def test_a_parquet_body_is_read_as_the_client_reads_the_file(client, service_url, bpe_tokenizer, texts, tmp_path):
    path = tmp_path / "c.parquet"
    pq.write_table(pa.table({"n": np.arange(len(texts)), "text": texts}), path, row_group_size=40)
    _dataset(client, "pq-client", bpe_tokenizer)
    client.ingest_file("pq-client", path)
    _dataset(client, "pq-http", bpe_tokenizer)
    r = httpx.post(f"{service_url}/v1/datasets/pq-http/documents", content=path.read_bytes(),
                   headers={"content-type": "application/vnd.apache.parquet"})  # fmt: skip
    assert r.status_code == 200 and r.json()["documents"] == len(texts), r.text
    assert np.array_equal(served(client, "pq-http"), served(client, "pq-client"))
    before = client.dataset("pq-http")
    for what, body, params, detail in [
        ("cut short", path.read_bytes()[:-100], {}, "not a readable Parquet file"),
        ("no such column", path.read_bytes(), {"text_column": "body"}, "no column 'body'"),
        ("ints for text", path.read_bytes(), {"text_column": "n"}, "not strings"),
    ]:
        r = httpx.post(f"{service_url}/v1/datasets/pq-http/documents", content=body, params=params,
                       headers={"content-type": "application/vnd.apache.parquet"})  # fmt: skip
        assert r.status_code == 400 and detail in r.json()["detail"], (what, r.text)
    unchanged(client, "pq-http", before)


def test_a_local_corpus_the_client_cannot_read_is_refused_before_sending(client, bpe_tokenizer, tmp_path):
    _dataset(client, "local", bpe_tokenizer)
    before = client.dataset("local")
    pq.write_table(pa.table({"body": ["a", "b"], "n": [1, 2]}), tmp_path / "t.parquet")
    with pytest.raises(CorpusError, match=r"no column 'text' \(its columns: body: string, n: int64\)"):
        client.ingest_file("local", tmp_path / "t.parquet")
    with pytest.raises(CorpusError, match="'n' holds int64, not strings"):
        client.ingest_file("local", tmp_path / "t.parquet", text_column="n")
    with pytest.raises(CorpusError, match="not lists of integers"):
        client.ingest_file("local", tmp_path / "t.parquet", ids_column="body")
    (tmp_path / "broken.parquet").write_bytes((tmp_path / "t.parquet").read_bytes()[:-30])
    with pytest.raises(CorpusError, match="not a readable Parquet file"):
        client.ingest_file("local", tmp_path / "broken.parquet")
    with pytest.raises(CorpusError, match="no column 'words'"):
        client.ingest_dataset("local", datasets.Dataset.from_dict({"text": ["a"]}), text_column="words")
    unchanged(client, "local", before)


def test_record_batches_over_the_limit_are_413(spawn_service, redis_url, bpe_tokenizer):
    svc = spawn_service(service_env(REDIS_URL=redis_url, MASKSERVE_INGEST_MAX_RECORD_BATCH_BYTES="4096"))
    with Client(svc.url) as c:
        _dataset(c, "big", bpe_tokenizer)
        before = c.dataset("big")
        r = arrow_post(svc.url, "big", pa.table({"text": ["word " * 2000]}))
        assert r.status_code == 413 and r.json()["limit"] == 4096, r.text
        unchanged(c, "big", before)


def test_staged_ingests_take_ids_in_commit_order(client, service_url, bpe_tokenizer, texts):
    _dataset(client, "staged", bpe_tokenizer)
    r = httpx.post(f"{service_url}/v1/datasets/staged/documents", params={"commit": "false"},
                   content=b'{"text": "a"}\n', headers={"content-type": "application/x-ndjson"})  # fmt: skip
    assert r.status_code == 400 and "Idempotency-Key" in r.json()["detail"]
    a = client.ingest_table("staged", lambda: [pa.record_batch([pa.array(texts[:50])], ["text"])],
                            idempotency_key="A", commit=False)  # fmt: skip
    b = client.ingest_table("staged", lambda: [pa.record_batch([pa.array(texts[50:80])], ["text"])],
                            idempotency_key="B", commit=False)  # fmt: skip
    assert (a["committed"], a["first_sequence_id"], b["committed"]) == (False, None, False)
    assert client.dataset("staged")["num_sequences"] == 0  # staged is not visible
    assert client.ingest_state("staged", "A")["state"] == "staged"
    assert client.ingest_state("staged", "nothing") is None
    cb = client.commit_ingest("staged", "B")
    ca = client.commit_ingest("staged", "A")
    assert (cb["first_sequence_id"], ca["first_sequence_id"]) == (0, cb["sequences"])
    again = client.commit_ingest("staged", "A")
    assert again["duplicate"] and again["first_sequence_id"] == ca["first_sequence_id"]
    assert client.ingest_state("staged", "A") == {"dataset": "staged", "key": "A", "state": "committed",
                                                  "result": {**ca, "duplicate": False}}  # fmt: skip
    # staging a committed key again stores nothing and answers the committed result
    before = client.dataset("staged")
    dup = client.ingest_table("staged", lambda: [pa.record_batch([pa.array(["other"])], ["text"])],
                              idempotency_key="A", commit=False)  # fmt: skip
    assert dup["duplicate"] and dup["committed"] and dup["first_sequence_id"] == ca["first_sequence_id"]
    unchanged(client, "staged", before)
    with pytest.raises(NotFoundError) as nf:
        client.commit_ingest("staged", "never")
    assert nf.value.type.endswith("ingest-not-found")
    # a dataset re-created under the same name never commits the old one's staged ingest
    client.ingest_table("staged", lambda: [pa.record_batch([pa.array(["late"])], ["text"])],
                        idempotency_key="C", commit=False)  # fmt: skip
    _dataset(client, "staged", bpe_tokenizer)
    with pytest.raises(NotFoundError):
        client.commit_ingest("staged", "C")
    assert client.dataset("staged")["num_sequences"] == 0


def _cli(url: str, *args: str, **kw) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "maskserve", "dataset", "ingest", "--url", url, *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=240, **kw)


@pytest.fixture
def corpus_files(corpus: list[str], tmp_path: Path) -> list[Path]:
    """Eight files of four formats, 40 documents each."""
    files = []
    for i in range(8):
        part = corpus[i * 40 : (i + 1) * 40]
        if i % 4 == 0:
            pq.write_table(pa.table({"text": part}), f := tmp_path / f"p{i}.parquet", row_group_size=20)
        elif i % 4 == 1:
            (f := tmp_path / f"j{i}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in part))
        elif i % 4 == 2:
            (f := tmp_path / f"t{i}.txt").write_text("\n\n".join(t.replace("\n\n", "\n") for t in part))
        else:
            datasets.Dataset.from_dict({"text": part}).save_to_disk(str(f := tmp_path / f"hf{i}"))
            f = next(f.glob("*.arrow"))
        files.append(f)
    return files


def one_by_one(client: Client, tokenizer: str, files: list[Path]) -> np.ndarray:
    """The files ingested one request after another, in order, into dataset ``one-by-one``: what the CLI must
    build from them, however it uploads them."""
    _dataset(client, "one-by-one", tokenizer)
    for f in files:
        client.ingest_file("one-by-one", f, split="paragraph")
    return served(client, "one-by-one")


def test_parallel_ingest_keeps_the_order_given(client, service_url, bpe_tokenizer, corpus_files):
    want = one_by_one(client, bpe_tokenizer, corpus_files)
    _dataset(client, "par", bpe_tokenizer)
    out = _cli(service_url, "par", *map(str, corpus_files), "--split", "paragraph", "--jobs", "4")
    assert out.returncode == 0, out.stderr
    assert f"{client.dataset('one-by-one')['num_documents']} documents" in out.stdout.splitlines()[-1]
    assert np.array_equal(served(client, "par"), want)
    # the same command again: everything was committed, nothing is stored twice
    again = _cli(service_url, "par", *map(str, corpus_files), "--split", "paragraph", "--jobs", "2")
    assert again.returncode == 0 and "8 of 8 units committed before" in again.stdout, again.stdout
    assert np.array_equal(served(client, "par"), want)


def test_a_rerun_commits_what_was_staged_and_ingests_the_rest(client, service_url, bpe_tokenizer, corpus_files):
    want = one_by_one(client, bpe_tokenizer, corpus_files)
    _dataset(client, "resume", bpe_tokenizer)
    # as a run that died: the first two files committed, the third staged (uploaded, never committed)
    assert _cli(service_url, "resume", *map(str, corpus_files[:2]), "--split", "paragraph").returncode == 0
    third = Work(corpus_files[2], None, False, 0, {"split": "paragraph"})
    client.ingest_file("resume", corpus_files[2], split="paragraph", idempotency_key=third.key(), commit=False)
    out = _cli(service_url, "resume", *map(str, corpus_files), "--split", "paragraph", "--jobs", "3")
    assert out.returncode == 0, out.stderr
    assert "3 of 8 units committed before" not in out.stdout  # the staged one was committed now
    assert "2 of 8 units committed before" in out.stdout, out.stdout
    assert np.array_equal(served(client, "resume"), want)


def test_a_killed_ingest_resumes_without_loss_or_repeats(client, service_url, bpe_tokenizer, corpus_files):
    want = one_by_one(client, bpe_tokenizer, corpus_files)
    _dataset(client, "killed", bpe_tokenizer)
    cmd = [sys.executable, "-m", "maskserve", "dataset", "ingest", "--url", service_url, "killed",
           *map(str, corpus_files), "--split", "paragraph", "--jobs", "2"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        first = proc.stdout.readline()  # the CLI reports each unit as it commits: kill it after the first
        assert "sequences from 0" in first, first
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert 0 < client.dataset("killed")["num_sequences"]
    out = _cli(service_url, "killed", *map(str, corpus_files), "--split", "paragraph", "--jobs", "2")
    assert out.returncode == 0, out.stderr
    assert np.array_equal(served(client, "killed"), want)


def test_cli_refuses_what_it_cannot_read(service_url, client, bpe_tokenizer, tmp_path):
    _dataset(client, "clibad", bpe_tokenizer)
    pq.write_table(pa.table({"body": ["a"]}), tmp_path / "t.parquet")
    out = _cli(service_url, "clibad", str(tmp_path / "t.parquet"))
    assert out.returncode != 0 and "no column 'text'" in out.stderr, out.stderr
    out = _cli(service_url, "clibad", str(tmp_path / "t.parquet"), "--split", "train")
    assert out.returncode != 0 and "--split 'train'" in out.stderr
    out = _cli(service_url, "clibad")
    assert out.returncode != 0 and "give one or more files" in out.stderr
    assert client.dataset("clibad")["num_sequences"] == 0


def test_a_blocking_body_reads_exactly_and_refuses_reads_over_its_bound():
    from service.core.errors import PayloadTooLarge
    from service.data.streams import BlockingBody

    async def pieces():
        for p in (b"abc", b"", b"defgh", b"ij"):
            yield p

    async def main() -> None:
        body = BlockingBody(pieces(), max_read=6)
        assert await anyio.to_thread.run_sync(body.read, 5) == b"abcde"  # across pieces, exactly
        with pytest.raises(PayloadTooLarge):  # asked for more than one read may take: nothing is allocated
            await anyio.to_thread.run_sync(body.read, 7)
        assert await anyio.to_thread.run_sync(body.read, 6) == b"fghij"  # short only at the end
        assert await anyio.to_thread.run_sync(body.read, 6) == b""
        assert body.consumed == 10

    anyio.run(main)


def _documents_posts(url: str) -> float:
    """Ingest requests a replica answered 202 (staged), from its Prometheus text."""
    text = httpx.get(f"{url}/metrics").text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("maskserve_requests_total{") and "/documents" in line and 'status="202"' in line)


def test_parallel_uploads_spread_over_the_replicas(client, service_url, redis_url, spawn_service, bpe_tokenizer,
                                                   corpus_files):  # fmt: skip
    other = spawn_service(service_env(REDIS_URL=redis_url))
    want = one_by_one(client, bpe_tokenizer, corpus_files)
    _dataset(client, "spread", bpe_tokenizer)
    before = [_documents_posts(u) for u in (service_url, other.url)]
    out = _cli(f"{service_url},{other.url}", "spread", *map(str, corpus_files), "--split", "paragraph", "--jobs", "2")
    assert out.returncode == 0, out.stderr
    after = [_documents_posts(u) for u in (service_url, other.url)]
    assert [a - b for a, b in zip(after, before)] == [4, 4]  # units take the replicas in turn
    assert np.array_equal(served(client, "spread"), want)
