"""``maskserve batch``: a masked batch printed token by token, each selected position marked by what the model
sees, checked against the batch's own arrays."""

from __future__ import annotations

import re
import uuid

import httpx
import numpy as np
import pytest

from maskserve.cli import main as maskserve
from maskserve.showbatch import Inspector

MARK = re.compile(r"\[(=[^\]]*|[^\]>]*>[^\]]*)\]")


@pytest.fixture
def dataset(client, wordpiece_tokenizer, corpus) -> str:
    name = f"show-{uuid.uuid4().hex[:8]}"
    client.create_dataset(name, tokenizer=wordpiece_tokenizer, seq_len=64)
    client.ingest(name, corpus[:30])
    return name


def test_each_selected_position_is_marked_by_what_the_model_sees(client, dataset, service_url, capsys):
    rc = maskserve(["batch", dataset, "--url", service_url, "--size", "3", "--seed", "4", "--show", "3",
                    "--width", "0", "--mlm-probability", "0.4", "--color", "never"])  # fmt: skip
    assert rc == 0
    lines = capsys.readouterr().out.splitlines()
    rows = [line for line in lines if line.startswith("seq ")]
    assert len(rows) == 3 and "[orig>MASK] masked" in lines[1]
    b = client.batch(dataset, 3, seed=4, mlm_probability=0.4)  # the same batch: (seed, index) fix it
    mask_id = client.dataset(dataset)["special_tokens"]["mask"]
    for r, line in enumerate(rows):
        assert line.startswith(f"seq {int(b['sequence_ids'][r])}: ")
        n = int(b["attention_mask"][r].sum())
        ids, labels = b["input_ids"][r, :n], b["labels"][r, :n]
        selected = labels != -100
        marks = MARK.findall(line)
        kinds = ["kept" if m.startswith("=") else "masked" if m.endswith(">MASK") else "replaced" for m in marks]
        want = ["masked" if i == mask_id else "kept" if i == lab else "replaced" for i, lab in
                zip(ids[selected], labels[selected])]  # fmt: skip
        assert kinds == want and len(marks) == int(selected.sum()) > 0


def test_colour_goes_where_asked_and_the_row_width_is_kept(client, dataset, service_url, capsys):
    maskserve(["batch", dataset, "--url", service_url, "--size", "2", "--show", "1", "--width", "8",
               "--mlm-probability", "0.5", "--color", "always"])  # fmt: skip
    out = capsys.readouterr().out
    assert "\x1b[" in out and "(+" in out  # coloured, and the row was cut at 8 tokens
    maskserve(["batch", dataset, "--url", service_url, "--size", "2", "--show", "1", "--color", "auto"])
    assert "\x1b[" not in capsys.readouterr().out  # not a terminal: plain markers


def test_the_inspector_reads_tokens_as_the_tokenizer_decodes_them(client, dataset):
    tok = client.tokenizer(dataset)
    view = Inspector(tok, mask_id=7)
    served = np.array([5, 7, 9, 11])
    labels = np.array([-100, 12, 13, 11])
    row = view.row(served, labels)
    assert row.startswith(view.text(5)) and f"[{view.text(12).strip()}>MASK]" in row
    assert f"[{view.text(13).strip()}>{view.text(9).strip()}]" in row and f"[={view.text(11).strip()}]" in row


# ---- maskserve top ----------------------------------------------------------------------------


def _lease_and_ack(url: str, job: str, worker: str, *, leases: int, acks: int) -> None:
    """Lease ``leases`` batches of ``job`` and ack the first ``acks``: a job standing still, as a frame sees it."""
    got = []
    for _ in range(leases):
        r = httpx.post(f"{url}/v1/jobs/{job}/next", params={"worker": worker})
        assert r.status_code == 200, r.text
        got.append(r.headers["maskserve-lease"])
    r = httpx.post(f"{url}/v1/jobs/{job}/ack", json={"worker": worker, "leases": got[:acks]})
    assert r.json()["results"] == ["acked"] * acks


def test_top_shows_each_job_and_worker_with_the_services_counts(client, dataset, service_url, capsys):
    job = f"top-{uuid.uuid4().hex[:8]}"
    client.create_job(job, dataset, batch_size=4, epochs=1, lease_timeout_s=60)
    _lease_and_ack(service_url, job, "w-a", leases=3, acks=2)
    assert maskserve(["top", "--url", service_url, "--once", "--job", job]) == 0
    p = client.job_progress(job)
    out = capsys.readouterr().out.splitlines()
    row = next(line for line in out if line.startswith(job))
    assert row.split()[2] == "active" and f"{p['acked']}" in row.split() and p["acked"] >= 2
    worker = next(line for line in out if line.strip().startswith("worker w-a"))
    assert f"acked {p['workers']['w-a']['acked']:>7}" in worker
    assert maskserve(["top", "--url", service_url, "--once", "--job", "nope"]) == 0
    assert "(no job named 'nope')" in capsys.readouterr().out


def test_top_rates_are_over_the_last_interval(client, dataset, service_url):
    from maskserve.top import frame

    job = f"top-{uuid.uuid4().hex[:8]}"
    client.create_job(job, dataset, batch_size=4, epochs=1, lease_timeout_s=60)
    _lease_and_ack(service_url, job, "w-b", leases=2, acks=1)
    progress = client.job_progress(job)
    seqs = progress["workers"]["w-b"]["acked_sequences"]
    _, counts = frame([progress], None, 0.0)
    assert counts == {(job, ""): seqs, (job, "w-b"): seqs}
    text, _ = frame([progress], {(job, ""): seqs - 4, (job, "w-b"): seqs - 2}, 2.0)
    job_line, worker_line = [line for line in text.splitlines() if job in line or "w-b" in line]
    assert job_line.split()[-1] == "2" and worker_line.split()[-2] == "1"  # 4 and 2 sequences over 2 s


def test_top_shows_what_workers_said_of_their_consumers(client, dataset, service_url, capsys):
    job = f"top-{uuid.uuid4().hex[:8]}"
    client.create_job(job, dataset, batch_size=4, epochs=1, lease_timeout_s=60)
    for worker, wait in (("fed", 0.1), ("hungry", 3.0)):
        r = httpx.post(f"{service_url}/v1/jobs/{job}/next", params={"worker": worker},
                       json={"stats": {"batches": 10, "wait_s": wait, "step_s": 2.0}})  # fmt: skip
        assert r.status_code == 200
    maskserve(["top", "--url", service_url, "--once", "--job", job])
    out = capsys.readouterr().out
    hungry = next(line for line in out.splitlines() if "worker hungry" in line)
    fed = next(line for line in out.splitlines() if "worker fed" in line)
    assert "data wait  60%" in hungry and "step 200 ms" in hungry and "INPUT-BOUND" in hungry
    assert "data wait   5%" in fed and "INPUT-BOUND" not in fed
