"""Ingests in progress: any process lists the ingests running on every process (GET /v1/ingests), with what
arrived of each body so far; a record goes when its ingest ends, however it ends, and a dead process's record
is dropped once it is no longer refreshed."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator

import httpx
import pytest

from client import BadRequestError, Client

from .conftest import ROOT, metric, service_env
from .test_jobs_processes import poll


def _cli(*args: str) -> str:
    out = subprocess.run([sys.executable, "-m", "maskserve", *args], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr
    return out.stdout


class HeldBody:
    """An NDJSON body sent in two parts: the first at once, the rest once ``release`` is set."""

    def __init__(self, docs: list[str]) -> None:
        half = len(docs) // 2
        self.parts = [self._lines(docs[:half]), self._lines(docs[half:])]
        self.release = threading.Event()

    @staticmethod
    def _lines(docs: list[str]) -> bytes:
        return "".join(json.dumps({"text": d}) + "\n" for d in docs).encode()

    def __iter__(self) -> Iterator[bytes]:
        yield self.parts[0]
        assert self.release.wait(120), "the test never released the body"
        yield self.parts[1]


def _running(url: str, dataset: str) -> list[dict]:
    ingests = httpx.get(f"{url}/v1/ingests", timeout=30).json()["ingests"]
    return [g for g in ingests if g["dataset"] == dataset]


def test_a_running_ingest_is_listed_until_it_ends(spawn_service, redis_url, rdb, bpe_tokenizer, corpus):
    """Two processes: an ingest held half-sent on one is listed by the other, with the bytes it received;
    once it is committed, it is gone."""
    env = service_env(REDIS_URL=redis_url, MASKSERVE_INGEST_PROGRESS_INTERVAL_S="0.1")
    a, b = spawn_service(env), spawn_service(env)
    name = f"prog-{uuid.uuid4().hex[:8]}"
    with Client(a.url) as c:
        c.create_dataset(name, tokenizer=bpe_tokenizer, seq_len=64)
    body = HeldBody(corpus[:200])
    result: dict = {}

    def upload() -> None:
        with httpx.Client(timeout=120) as h:
            r = h.post(f"{a.url}/v1/datasets/{name}/documents", content=iter(body),
                       headers={"Content-Type": "application/x-ndjson", "Idempotency-Key": "held-1"})  # fmt: skip
            result.update(status=r.status_code, body=r.json())

    thread = threading.Thread(target=upload)
    thread.start()
    try:
        seen = poll(lambda: [g for g in _running(b.url, name) if g["bytes_received"] >= len(body.parts[0])],
                    60, "the other process to list the held ingest with its first part received")  # fmt: skip
        with Client(b.url) as c:
            assert [i["id"] for i in c.running_ingests() if i["dataset"] == name] == [seen[0]["id"]]
        assert metric(a.url, f'maskserve_ingests_running{{dataset="{name}"}}') == 1
        shown = _cli("dataset", "ingests", "--url", b.url)  # the command line's view of the same
        assert f"{name} " in shown and "bytes received" in shown and "key held-1" in shown
    finally:
        body.release.set()
        thread.join(120)
    (g,) = seen
    assert g["key"] == "held-1" and g["media_type"] == "application/x-ndjson" and g["content_length"] is None
    assert g["bytes_received"] <= sum(map(len, body.parts)) and g["updated"] >= g["started"]
    assert result["status"] == 200 and result["body"]["documents"] == 200
    assert _running(a.url, name) == [] and _running(b.url, name) == []  # removed before the answer went out
    with Client(b.url) as c:
        assert [i for i in c.running_ingests() if i["dataset"] == name] == []
    assert metric(a.url, f'maskserve_ingests_running{{dataset="{name}"}}') == 0
    assert _cli("dataset", "ingests", "--url", b.url).strip() == "no ingest running"
    assert metric(a.url, f'maskserve_ingest_bytes_received_total{{dataset="{name}"}}') == sum(map(len, body.parts))


def test_a_failed_ingest_leaves_no_record(client: Client, service_url: str, bpe_tokenizer):
    name = f"prog-{uuid.uuid4().hex[:8]}"
    client.create_dataset(name, tokenizer=bpe_tokenizer, seq_len=64)
    with pytest.raises(BadRequestError):
        client.ingest(name, [{"text": "fine"}, {"nope": 1}])
    assert _running(service_url, name) == []


def test_a_dead_process_record_is_dropped(client: Client, service_url: str, rdb, settings):
    """A record that is no longer refreshed (its process died) is not listed, and is removed."""
    key = f"{settings.key_prefix}:ingests:running"
    now = time.time()
    record = {"id": "dead", "dataset": "gone", "key": None, "media_type": "text/plain", "content_length": 10,
              "content_encoding": "identity", "started": now - 120, "updated": now - 60, "bytes_received": 5,
              "documents": 0, "sequences": 0, "tokens": 0, "bytes_staged": 0, "chunks": 0}  # fmt: skip
    rdb.hset(key, "dead", json.dumps(record))
    rdb.hset(key, "alive", json.dumps({**record, "id": "alive", "dataset": "here", "updated": now}))
    listed = {g["id"] for g in httpx.get(f"{service_url}/v1/ingests", timeout=30).json()["ingests"]}
    assert "alive" in listed and "dead" not in listed
    assert rdb.hexists(key, "alive") and not rdb.hexists(key, "dead")
    rdb.hdel(key, "alive")
