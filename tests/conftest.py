"""Shared fixtures: a real Redis (REDIS_URL, or an embedded server), a real service.

* With ``REDIS_URL`` set, tests use that server, in its database (``/N`` in the
  URL, else 15), flushed between tests. Without it, a session-wide embedded
  server is started in a temporary directory, exactly as the service would.
* ``service_url`` is a real uvicorn server running ``create_app`` in a thread.
* ``spawn_service`` starts ``maskserve serve`` as a separate process, the same
  command the Dockerfile and docker-compose.yml run.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import httpx
import pytest
import redis
import uvicorn

from client import Client
from service.http.app import create_app
from service.core.config import Settings
from service.core.process import free_port, stop_process
from service.data.corpus import stdlib_docstrings
from service.store.embedded import EmbeddedRedis
from service.data.tokenization import train_tokenizer

ROOT = Path(__file__).resolve().parent.parent
TEST_DB = 15


def _with_db(url: str) -> str:
    parsed = urlparse(url)
    if parsed.path.strip("/"):
        return url
    return parsed._replace(path=f"/{TEST_DB}").geturl()


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    url = os.environ.get("REDIS_URL")
    if url:
        yield _with_db(url)
        return
    server = EmbeddedRedis(tmp_path_factory.mktemp("redis"), appendonly=False).start()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture
def rdb(redis_url: str) -> Iterator[redis.Redis]:
    """A sync client on the test database, flushed before each test."""
    r = redis.Redis.from_url(redis_url)
    r.flushdb()
    yield r
    r.close()


class ServerThread:
    """uvicorn running one app in a background thread (``wrap``: an ASGI wrapper put around it, e.g. to watch
    what it sends)."""

    def __init__(self, settings: Settings, wrap: Callable[[Any], Any] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        app = create_app(settings)
        config = uvicorn.Config(wrap(app) if wrap else app, host="127.0.0.1", port=self.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> "ServerThread":
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("test server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture(scope="session")
def settings(redis_url: str) -> Settings:
    return Settings(redis_url=redis_url, max_batch_size=1024, max_seq_len=4096, max_body_bytes=8 << 20,
                    chunk_bytes=64 << 10, chunk_max_sequences=256)  # fmt: skip


@pytest.fixture(scope="session")
def _server(settings: Settings) -> Iterator[ServerThread]:
    with ServerThread(settings) as s:
        yield s


@pytest.fixture
def service_url(_server: ServerThread, rdb: redis.Redis) -> str:
    """URL of the shared test service, over a freshly flushed database."""
    return _server.url


@pytest.fixture
def client(service_url: str) -> Iterator[Client]:
    with Client(service_url, retries=0) as c:
        yield c


@pytest.fixture(scope="session")
def corpus() -> list[str]:
    """About 300 kB of real English: the first stdlib docstrings."""
    return list(stdlib_docstrings(max_bytes=300_000))


@pytest.fixture(scope="session")
def bpe_tokenizer(corpus: list[str]) -> str:
    """A byte-level BPE tokenizer.json (RoBERTa's special tokens) trained on the corpus."""
    return train_tokenizer(corpus, "bpe", vocab_size=2000).to_str()


@pytest.fixture(scope="session")
def wordpiece_tokenizer(corpus: list[str]) -> str:
    return train_tokenizer(corpus, "wordpiece", vocab_size=2000).to_str()


def metric(url: str, series: str) -> float:
    """One unlabelled series (or one exactly as written with its labels) of the service's /metrics."""
    text = httpx.get(f"{url}/metrics", timeout=30).text
    match = re.search(rf"^{re.escape(series)} (\S+)$", text, re.M)
    assert match, f"{series} not in /metrics"
    return float(match.group(1))


def service_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MASKSERVE_") and k != "REDIS_URL"}
    env.update(extra)
    return env


class ServiceProcess:
    """``maskserve serve`` in its own process."""

    def __init__(self, env: dict[str, str], port: int | None = None, workers: int | None = 1) -> None:
        """``workers``: worker processes (None: as ``serve`` decides by itself, from the environment)."""
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "service", "serve", "--port", str(self.port),
             *(["--workers", str(workers)] if workers is not None else [])],
            env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )  # fmt: skip

    def wait_ready(self, timeout: float = 30) -> "ServiceProcess":
        with Client(self.url, retries=0) as c:
            deadline = time.monotonic() + timeout
            while not c.ready():
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    out = self.proc.stdout.read().decode() if self.proc.stdout else ""
                    raise RuntimeError(f"service did not become ready:\n{out}")
                time.sleep(0.05)
        return self

    def stop(self, sig: int = 2) -> int:
        return stop_process(self.proc, 20, sig)


@pytest.fixture
def spawn_service() -> Iterator:
    procs: list[ServiceProcess] = []

    def spawn(env: dict[str, str], port: int | None = None, workers: int = 1) -> ServiceProcess:
        p = ServiceProcess(env, port, workers)
        procs.append(p)
        return p.wait_ready()

    yield spawn
    for p in procs:
        p.stop(9)
