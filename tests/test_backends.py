"""The service works on both kinds of Redis: a given server and its own embedded one.

The rest of the suite runs on one of them (``REDIS_URL`` when set, else
embedded); this module runs the core path on the other kind as well.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import redis

from client import Client

from .conftest import service_env

SYSTEM_REDIS = "redis://127.0.0.1:6379/15"


def _core_path(url: str, tokenizer: str, corpus: list[str]) -> None:
    with Client(url) as c:
        c.create_dataset("backend", tokenizer=tokenizer, seq_len=64)
        res = c.ingest("backend", corpus[:100])
        assert c.dataset("backend")["num_sequences"] == res["sequences"] > 0
        b = c.batch("backend", 8, seed=1)
        assert b["input_ids"].shape == (8, 64) and (b["labels"] != -100).any()
        c.delete_dataset("backend")
        assert c.datasets() == []


def test_embedded_server(spawn_service, tmp_path: Path, bpe_tokenizer: str, corpus: list[str]):
    svc = spawn_service(service_env(MASKSERVE_DATA_DIR=str(tmp_path / "d")))
    _core_path(svc.url, bpe_tokenizer, corpus)
    assert (tmp_path / "d" / "appendonlydir").is_dir()


def test_given_server(spawn_service, bpe_tokenizer: str, corpus: list[str]):
    url = os.environ.get("REDIS_URL") or SYSTEM_REDIS
    try:
        r = redis.Redis.from_url(url, socket_connect_timeout=1)
        r.ping()
    except redis.exceptions.ConnectionError:
        pytest.skip(f"no Redis server reachable at {url}")
    r.flushdb()
    try:
        svc = spawn_service(service_env(REDIS_URL=url, MASKSERVE_KEY_PREFIX="backendtest"))
        _core_path(svc.url, bpe_tokenizer, corpus)
        assert r.keys("backendtest:*") == []
    finally:
        r.flushdb()
        r.close()
