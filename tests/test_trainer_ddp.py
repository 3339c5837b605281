"""``torchrun -m trainer --job``: two ranks on the CPU (gloo), each a worker of one job, in lockstep."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from tests.conftest import ROOT
from trainer.loop import load_checkpoint

TORCHRUN = Path(sys.executable).with_name("torchrun")


@pytest.mark.slow
def test_two_ranks_share_a_job_and_stay_in_sync(client, service_url, bpe_tokenizer, corpus, tmp_path):
    if not TORCHRUN.exists() and shutil.which("torchrun") is None:
        pytest.skip("torchrun is not installed next to this Python")
    name = f"ddp-{uuid.uuid4().hex[:8]}"
    client.create_dataset(name, tokenizer=bpe_tokenizer, seq_len=32)
    client.ingest(name, corpus[:40])
    n = client.dataset(name)["num_sequences"]
    # an odd number of batches in all: one rank runs dry a step before the other
    size = next(b for b in range(8, 16) if -(-n // b) % 2 == 1)
    ckpt = tmp_path / "ddp.pt"
    cmd = [str(TORCHRUN if TORCHRUN.exists() else shutil.which("torchrun")), "--standalone", "--nproc-per-node", "2",
           "-m", "trainer", "--url", service_url, "--dataset", name, "--job", "ddp", "--epochs", "3",
           "--batch-size", str(size), "--steps", "1000", "--d-model", "16", "--layers", "1", "--heads", "2",
           "--d-ff", "32", "--device", "cpu", "--threads", "1", "--prefetch", "1", "--log-every", "5",
           "--checkpoint", str(ckpt)]  # fmt: skip
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "2 ranks trained in lockstep; weights identical on every rank: yes" in out.stdout

    job = client.job_progress("ddp")
    assert job["status"] == "done"
    assert job["acked"] == 3 * job["batches_per_epoch"]  # every batch trained once, by one rank or the other
    workers = job["workers"]
    names = list(workers) if isinstance(workers, dict) else [w["worker"] for w in workers]
    assert sorted(w.rsplit(":", 1)[-1] for w in names) == ["rank0", "rank1"]
    saved = load_checkpoint(ckpt)  # rank 0 checkpoints; the other rank writes nothing
    # the ranks stepped together as long as either had a batch (the job hands batches to whoever asks
    # first, so one rank may get more; the other joins those steps with an empty batch)
    total = 3 * job["batches_per_epoch"]
    assert saved["data"]["job"] == "ddp" and (total + 1) // 2 <= saved["step"] < total
    assert not list(tmp_path.glob("*.tmp"))
    assert n > 16


def _torchrun() -> str:
    if TORCHRUN.exists():
        return str(TORCHRUN)
    found = shutil.which("torchrun")
    if found is None:
        pytest.skip("torchrun is not installed next to this Python")
    return found


@pytest.mark.slow
def test_ranks_never_wait_for_a_lease_to_expire(client, service_url, bpe_tokenizer, corpus):
    """At the end of an epoch a rank that gets no batch from the service (the rest are leased to the other
    rank, prefetched) must not sit in its lease request while the other waits for it in the step's
    all-reduce: nothing may be redelivered, and the ranks' data wait stays far below the lease timeout."""
    lease_timeout = 60.0
    name = f"ddp-{uuid.uuid4().hex[:8]}"
    client.create_dataset(name, tokenizer=bpe_tokenizer, seq_len=32)
    client.ingest(name, corpus[:200])
    n = client.dataset(name)["num_sequences"]
    # about 35 batches, an odd number: one rank trains the last batch while the other has none (the
    # trainer's default prefetch)
    size = next(b for b in range(max(4, n // 35), n) if -(-n // b) % 2 == 1)
    client.create_job("tail", name, batch_size=size, epochs=1, lease_timeout_s=lease_timeout)
    cmd = [_torchrun(), "--standalone", "--nproc-per-node", "2", "-m", "trainer", "--url", service_url,
           "--dataset", name, "--job", "tail", "--batch-size", str(size), "--epochs", "1", "--d-model", "16",
           "--layers", "1", "--heads", "2", "--d-ff", "32", "--device", "cpu", "--threads", "1",
           "--log-every", "5"]  # fmt: skip
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    log = out.stdout[-4000:] + out.stderr[-4000:]
    assert out.returncode == 0, log
    job = client.job_progress("tail")
    assert job["status"] == "done", log
    assert job["acked"] == job["batches_per_epoch"] and job["redelivered"] == 0, (job, log)
    assert "weights identical on every rank: yes" in out.stdout
    waits = [float(w) for w in re.findall(r"^done: .* data wait ([0-9.]+)s", out.stdout, re.MULTILINE)]
    assert len(waits) == 2, log  # each rank's total time waiting for data (its own, and the other's in lockstep)
    assert max(waits) < lease_timeout / 4, log
    # the learning rate follows the job: its batches divided among the ranks, not the default --steps 200
    bpe = job["batches_per_epoch"]
    assert f"steps 0 -> {-(-bpe // 2)}" in out.stdout, log
