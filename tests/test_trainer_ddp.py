"""``torchrun -m trainer --job``: two ranks on the CPU (gloo), each a worker of one job, in lockstep."""

from __future__ import annotations

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
