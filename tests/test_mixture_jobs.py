"""Mixture jobs over a live service: sources by weight, per-source epochs, masks as each source alone,
deterministic streams, progress per source, and refusals."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import uuid
from collections import Counter

import httpx
import numpy as np
import pytest

from client import BadRequestError, Client

SEQ_LEN = 64


def uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def make_source(client: Client, tokenizer: str, docs: list[str], seq_len: int = SEQ_LEN) -> tuple[str, int]:
    name = uid("src")
    client.create_dataset(name, tokenizer=tokenizer, seq_len=seq_len, packing="doc")
    client.ingest(name, docs)
    return name, client.dataset(name)["num_sequences"]


@pytest.fixture
def two(client, bpe_tokenizer, corpus) -> tuple[tuple[str, int], tuple[str, int]]:
    """Two datasets of one tokenizer and L: about 300 and 100 sequences."""
    return make_source(client, bpe_tokenizer, corpus[:300]), make_source(client, bpe_tokenizer, corpus[300:400])


def run(client: Client, job: str, workers: int = 1) -> dict[int, dict]:
    """Every batch of a job, by index: its rows' sources, sequence ids, input ids and labels."""
    got: dict[int, dict] = {}
    lock = threading.Lock()

    def work(w: int) -> None:
        with client.job(job, worker=f"w{w}", prefetch=1) as stream:
            for b in stream:
                row = {"sources": b.sources, "ids": b["sequence_ids"].tolist(),
                       "input_ids": b["input_ids"].copy(), "labels": b["labels"].copy()}  # fmt: skip
                with lock:
                    assert b.index not in got, "a batch handed out twice"
                    got[b.index] = row

    threads = [threading.Thread(target=work, args=(w,)) for w in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return dict(sorted(got.items()))


def test_a_mixture_serves_each_source_once_per_epoch_in_its_share(client, two):
    (a, na), (b, nb) = two
    job = uid("mix")
    client.create_job(job, sources=[{"dataset": a, "weight": 3}, {"dataset": b, "weight": 1, "repeat": True}],
                      until=a, epochs=1, batch_size=16, seed=5)  # fmt: skip
    batches = run(client, job)
    rows = [(s, i) for bt in batches.values() for s, i in zip(bt["sources"], bt["ids"])]
    per = Counter(s for s, _ in rows)
    assert sorted(i for s, i in rows if s == a) == list(range(na))  # a's epoch, each sequence exactly once
    assert abs(per[b] / len(rows) - 0.25) < 0.01  # b's share (it repeats: upsampled past its size)
    seen_b = [i for s, i in rows if s == b]
    for start in range(0, len(seen_b) - nb + 1, nb):  # each full epoch of b is b exactly once
        assert sorted(seen_b[start : start + nb]) == list(range(nb))
    progress = client.job_progress(job)
    assert progress["status"] == "done"
    src = {s["dataset"]: s for s in progress["sources"]}
    assert src[a]["served"] == na and src[a]["epoch"] == 1
    assert src[b]["served"] == per[b] and src[b]["epoch"] == per[b] // nb


def test_masks_are_each_sources_own(client, two):
    (a, _), (b, nb) = two
    job = uid("mix")
    client.create_job(job, sources={a: 1, b: 1}, num_samples=3 * nb, batch_size=32, seed=9,
                      masking={"mlm_probability": 0.3})  # fmt: skip
    batches = run(client, job)
    draws: Counter = Counter()
    for bt in batches.values():
        for r, (s, i) in enumerate(zip(bt["sources"], bt["ids"])):
            epoch = draws[(s, i)]
            draws[(s, i)] += 1
            alone = client.sequences(s, [i], seed=9, epoch=epoch, mlm_probability=0.3)
            assert np.array_equal(alone["input_ids"][0], bt["input_ids"][r]), (s, i, epoch)
            assert np.array_equal(alone["labels"][0], bt["labels"][r])


def test_the_stream_is_the_same_for_one_worker_or_three(client, two):
    (a, _), (b, _) = two
    cfg = {"sources": {a: 2, b: 1}, "num_samples": 600, "batch_size": 8, "seed": 1}
    one, three = uid("one"), uid("three")
    client.create_job(one, **cfg)
    client.create_job(three, **cfg)
    x, y = run(client, one), run(client, three, workers=3)
    assert list(x) == list(y) == list(range(75))
    for k in x:
        assert x[k]["sources"] == y[k]["sources"] and x[k]["ids"] == y[k]["ids"]
        assert np.array_equal(x[k]["input_ids"], y[k]["input_ids"]) and np.array_equal(x[k]["labels"], y[k]["labels"])


def test_a_curriculum_moves_the_shares(client, two):
    (a, _), (b, _) = two
    job = uid("cur")
    client.create_job(job, sources=[{"dataset": a, "repeat": True}, {"dataset": b, "repeat": True}], num_samples=4096,
                      batch_size=64, mixture_block=64,
                      curriculum=[{"step": 0, "weights": {a: 9, b: 1}}, {"step": 63, "weights": {a: 1, b: 9}}])  # fmt: skip
    batches = run(client, job)
    share = [bt["sources"].count(a) / len(bt["sources"]) for bt in batches.values()]
    assert abs(share[0] - 0.9) <= 1 / 64 and abs(share[-1] - 0.1) <= 1 / 64
    assert abs(share[32] - 0.5) < 0.03  # half way: linear
    assert all(x >= y - 1 / 64 for x, y in zip(share, share[1:]))  # a's share only falls


def test_sources_that_disagree_are_refused_naming_each_field(client, bpe_tokenizer, wordpiece_tokenizer, corpus):
    a, _ = make_source(client, bpe_tokenizer, corpus[:50])
    b, _ = make_source(client, bpe_tokenizer, corpus[50:100], seq_len=128)
    c, _ = make_source(client, wordpiece_tokenizer, corpus[100:150])
    with pytest.raises(BadRequestError) as err:
        client.create_job(uid("bad"), sources={a: 1, b: 1, c: 1}, num_samples=100)
    assert err.value.status == 422 and err.value.type.endswith("sources-mismatch")
    fields = {(m["source"], m["field"]) for m in err.value.extra["mismatches"]}
    assert (b, "seq_len") in fields and (c, "special_tokens") in fields and not any(s == a for s, _ in fields)


def test_mixture_configs_that_cannot_run_are_refused(client, service_url, two):
    (a, _), (b, _) = two
    cases = {
        "never ends": ({"sources": [{"dataset": a, "repeat": True}]}, 400),
        "until names no source": ({"sources": [{"dataset": a}], "until": "elsewhere"}, 422),
        "a source twice": ({"sources": [{"dataset": a}, {"dataset": a}], "num_samples": 10}, 422),
        "a weight of 0": ({"sources": [{"dataset": a, "weight": 0}], "num_samples": 10}, 422),
        "curriculum of another dataset": (
            {"sources": [{"dataset": a}], "num_samples": 10, "curriculum": [{"step": 0, "weights": {b: 1}}]}, 422),
        "curriculum leaving a source out": ({"sources": [{"dataset": a}, {"dataset": b}], "num_samples": 10,
                                             "curriculum": [{"step": 0, "weights": {a: 1}}]}, 422),
        "curriculum steps falling": ({"sources": [{"dataset": a}, {"dataset": b}], "num_samples": 10, "curriculum": [
            {"step": 5, "weights": {a: 1, b: 1}}, {"step": 2, "weights": {a: 1, b: 2}}]}, 422),
        "num_samples without sources": ({"dataset": a, "num_samples": 10}, 422),
        "no dataset at all": ({"batch_size": 4}, 422),
    }  # fmt: skip
    for what, (body, status) in cases.items():
        r = httpx.post(f"{service_url}/v1/jobs", json={"name": uid("bad"), **body})
        assert r.status_code == status, (what, r.text)
        assert r.headers["content-type"] == "application/problem+json"


def test_a_one_dataset_job_is_what_it_was(client, two):
    (a, na), _ = two
    job = uid("one")
    created = client.create_job(job, a, batch_size=16)
    assert "sources" not in created and created["config"]["sources"] is None
    batch = next(iter(client.job(job, prefetch=1)))
    assert "source_ids" not in batch.arrays and "sources" not in batch.metadata and batch.sources is None


def test_cli_creates_a_mixture_job(client, service_url, two, tmp_path):
    (a, _), (b, _) = two
    curriculum = tmp_path / "curriculum.json"
    curriculum.write_text(json.dumps([{"step": 0, "weights": {a: 1, b: 1}}, {"step": 10, "weights": {a: 3, b: 1}}]))
    job = uid("cli")
    out = subprocess.run([sys.executable, "-m", "maskserve", "jobs", "create", job, "--url", service_url,
                          "--source", f"{a}=3", "--source", f"{b}=1:repeat", "--until", a, "--curriculum",
                          str(curriculum), "--batch-size", "8"], capture_output=True, text=True, timeout=60)  # fmt: skip
    assert out.returncode == 0, out.stderr
    cfg = json.loads(out.stdout)["config"]
    assert [s["dataset"] for s in cfg["sources"]] == [a, b] and cfg["sources"][1]["repeat"] is True
    assert cfg["until"] == a and len(cfg["curriculum"]) == 2
    bad = subprocess.run([sys.executable, "-m", "maskserve", "jobs", "create", uid("cli"), "--url", service_url,
                          "--source", f"{a}=x"], capture_output=True, text=True, timeout=60)  # fmt: skip
    assert bad.returncode != 0 and "NAME=WEIGHT" in bad.stderr


def test_a_static_mixture_serves_each_sources_own_cache(client, service_url, two):
    (a, _), (b, nb) = two
    job = uid("static")
    masking = {"mode": "static", "copies": 3}
    with pytest.raises(Exception) as missing:  # b's cache is not built: refused, naming b
        client.build_static_masks(a, seed=4, copies=3)
        client.create_job(job, sources={a: 1, b: 1}, num_samples=2 * nb, batch_size=16, seed=4, masking=masking)
    assert getattr(missing.value, "type", "").endswith("static-masks-missing") and b in str(missing.value)
    client.build_static_masks(b, seed=4, copies=3)
    client.create_job(job, sources={a: 1, b: 1}, num_samples=2 * nb, batch_size=16, seed=4, masking=masking)
    draws: Counter = Counter()
    for bt in run(client, job).values():
        for r, (s, i) in enumerate(zip(bt["sources"], bt["ids"])):
            epoch = draws[(s, i)]
            draws[(s, i)] += 1
            alone = client.sequences(s, [i], seed=4, epoch=epoch, mode="static", copies=3)  # copy epoch mod 3
            assert np.array_equal(alone["input_ids"][0], bt["input_ids"][r]), (s, i, epoch)
            assert np.array_equal(alone["labels"][0], bt["labels"][r])
    assert max(draws[(s, i)] for s, i in draws if s == b) == 1  # b served once per epoch: 2*nb positions, half b

    again = uid("static")  # one source's cache dropped under a running job: refused, naming that source
    client.create_job(again, sources={a: 1, b: 1}, num_samples=2 * nb, batch_size=16, seed=4, masking=masking)
    ask = lambda: httpx.post(f"{service_url}/v1/jobs/{again}/next", params={"worker": "w"})  # noqa: E731
    assert ask().status_code == 200  # both sources' mask tables are now known to this process
    for cache in client.static_masks(b):
        client.drop_static_masks(b, cache["cache"])
    dropped = ask()
    problem = dropped.json()
    assert dropped.status_code == 409 and problem["type"].endswith("static-masks-missing"), problem
    assert b in problem["detail"] and a not in problem["detail"]
    assert client.job_progress(again)["handed_out"] == 1  # the refused grant was taken back
