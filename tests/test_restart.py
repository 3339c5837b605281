"""Persistence: the embedded server's data directory survives service restarts,
however the service stops, and the embedded server never outlives it."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from client import Client

from .conftest import service_env


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and ") Z " in stat.read_text())


@pytest.mark.parametrize("how", [signal.SIGINT, signal.SIGKILL], ids=["graceful", "sigkill"])
def test_restart_keeps_datasets(spawn_service, tmp_path: Path, bpe_tokenizer: str, corpus: list[str], how):
    env = service_env(MASKSERVE_DATA_DIR=str(tmp_path / "data"))
    first = spawn_service(env)
    with Client(first.url) as c:
        c.create_dataset("kept", tokenizer=bpe_tokenizer, seq_len=64, packing="doc")
        c.ingest("kept", corpus[:200])
        before = c.dataset("kept")
        batch = c.batch("kept", 32, seed=7, index=3)
    server_pid = int((tmp_path / "data" / "server.pid").read_text())

    first.stop(how)
    deadline = time.monotonic() + 10
    while _pid_alive(server_pid):  # the embedded server follows its service out
        assert time.monotonic() < deadline, "embedded server outlived its service"
        time.sleep(0.05)

    second = spawn_service(env)
    with Client(second.url) as c:
        after = c.dataset("kept")
        again = c.batch("kept", 32, seed=7, index=3)
    assert after == before
    for name in ("input_ids", "labels", "attention_mask", "sequence_ids"):
        assert (again[name] == batch[name]).all()
