"""Jobs across real processes: worker processes, service processes, Redis restarts.

Workers are small scripts (written below) that attach with
``Client(url).job(...)`` and append one JSON line per batch after its step:
the record of what was trained. In ``explicit`` mode a worker acks each batch
itself right after the step and records the service's verdict, so the logs
say exactly which worker's ack counted; in ``auto`` mode the stream acks a
batch when the next one is asked for. The client rides out transport errors
and 503s, failing over between the worker's URLs, so a service can be killed
under them. Leases are long (a minute): nothing here waits for one to expire;
a worker known dead is evicted, as an operator would, so the tests hold on a
loaded machine. Every check ends in the service's own progress counters and
in the workers' logs: each sequence acked exactly once per epoch.
"""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest

from client import Client, ServiceUnavailableError, TransportError, decode
from service.store.embedded import EmbeddedRedis
from service.store.jobkeys import JobKeys
from service.batches.permute import batch_ids

from .conftest import ROOT, ServiceProcess, free_port, service_env

SEQ_LEN = 64

WORKER = r'''
import hashlib, json, logging, sys, time
from pathlib import Path

import httpx

from client import Client

cfg = json.loads(Path(sys.argv[1]).read_text())
urls, job, name = cfg["urls"], cfg["job"], cfg["worker"]
mode, step_s, prefetch = cfg.get("mode", "auto"), cfg.get("step_s", 0.0), cfg.get("prefetch", 2)
stall_after, pause_at = cfg.get("stall_after"), cfg.get("pause_at")
deadline = time.monotonic() + cfg.get("timeout", 90)
log = open(cfg["log"], "a")
reconnects = 0  # failures ridden out: the client's own (it logs each outage) and this script's acks


class Outages(logging.Handler):
    def emit(self, record):
        global reconnects
        if "retrying" in record.getMessage():
            reconnects += 1
            write({"worker": name, "outage": record.getMessage()})


logging.getLogger("maskserve.client").addHandler(Outages())


def write(rec):
    log.write(json.dumps(rec) + "\n")
    log.flush()


def marker(path, rec):
    tmp = Path(path + ".tmp")
    tmp.write_text(json.dumps(rec))
    tmp.rename(path)


Path(cfg["ready"]).touch()
while not Path(cfg["go"]).exists():  # start together with the other workers
    if time.monotonic() > deadline:
        sys.exit("never told to start")
    time.sleep(0.01)

k = 0  # index of the URL this script's own acks use


def ack(lease):
    # Ack one lease; returns the service's verdict and whether the call had to be retried.
    global k, reconnects
    retried = False
    while time.monotonic() < deadline:
        url = urls[k % len(urls)]
        try:
            r = httpx.post(f"{url}/v1/jobs/{job}/ack", json={"worker": name, "leases": [lease]}, timeout=5)
            if r.status_code not in (502, 503, 504):
                r.raise_for_status()
                return r.json()["results"][0], retried
        except httpx.TransportError:
            k += 1
            reconnects += 1
        retried = True
        time.sleep(0.05)
    sys.exit("ack never got through")


steps = 0
with Client(urls, retries=2, backoff=0.05, timeout=10) as c:
    stream = c.job(job, worker=name, prefetch=prefetch, auto_ack=mode == "auto", create=cfg.get("create"),
                   max_outage=60)
    with stream:
        for batch in stream:
            if time.monotonic() > deadline:
                sys.exit("timed out")
            rec = {"worker": name, "epoch": batch.epoch, "index": batch.index, "lease": batch.metadata["lease"],
                   "ids": batch["sequence_ids"].tolist(), "sources": batch.sources,
                   "digest": hashlib.sha256(batch["input_ids"].tobytes() + batch["labels"].tobytes()).hexdigest()}
            if pause_at is not None and steps == pause_at:  # hold this batch until told to go on
                marker(cfg["marker"], {"epoch": batch.epoch, "index": batch.index})
                while not Path(cfg["resume"]).exists():
                    time.sleep(0.01)
            time.sleep(step_s)  # the training step
            if mode == "explicit":
                rec["result"], rec["retried"] = ack(rec["lease"])
            write(rec)
            steps += 1
            if stall_after and steps == stall_after:
                held = next(stream)  # leased, never acked: this worker is about to be killed
                marker(cfg["marker"], {"epoch": held.epoch, "index": held.index})
                time.sleep(600)
write({"worker": name, "done": True, "steps": steps, "reconnects": reconnects})
'''


class Worker:
    """One worker process with its config, log and output files under ``tmp``."""

    def __init__(self, tmp: Path, name: str, job: str, urls: list[str], **cfg: Any) -> None:
        self.name = name
        self.dir = tmp / name
        self.dir.mkdir()
        self.log = self.dir / "log.jsonl"
        self.marker = self.dir / "holding.json"
        self.resume = self.dir / "resume"
        self.ready = self.dir / "ready"
        script = tmp / "worker.py"
        if not script.exists():
            script.write_text(WORKER)
        conf = {"urls": urls, "job": job, "worker": name, "log": str(self.log), "marker": str(self.marker),
                "resume": str(self.resume), "ready": str(self.ready), "go": str(tmp / "go"), **cfg}  # fmt: skip
        (self.dir / "cfg.json").write_text(json.dumps(conf))
        self.out = open(self.dir / "output.txt", "wb")
        env = {**service_env(), "PYTHONPATH": str(ROOT)}
        self.proc = subprocess.Popen([sys.executable, str(script), str(self.dir / "cfg.json")], cwd=ROOT, env=env,
                                     stdout=self.out, stderr=subprocess.STDOUT)  # fmt: skip

    def records(self) -> list[dict[str, Any]]:
        if not self.log.exists():
            return []
        return [json.loads(line) for line in self.log.read_text().splitlines() if line.strip()]

    def batches(self) -> list[dict[str, Any]]:
        return [r for r in self.records() if "epoch" in r]

    def summary(self) -> dict[str, Any]:
        done = [r for r in self.records() if r.get("done")]
        assert done, f"worker {self.name} left no summary:\n{self.output()}"
        return done[-1]

    def output(self) -> str:
        self.out.flush()
        return (self.dir / "output.txt").read_text(errors="replace")

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"worker {self.name} did not finish:\n{self.output()}") from None

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.out.close()


@pytest.fixture
def workers(tmp_path: Path):
    started: list[Worker] = []

    def start(names: list[str], job: str, urls: list[str] | dict[str, list[str]], **cfg: Any) -> list[Worker]:
        new = []
        for name in names:
            u = urls[name] if isinstance(urls, dict) else urls
            extra = cfg.get("per_worker", {}).get(name, {})
            base = {k: v for k, v in cfg.items() if k != "per_worker"}
            new.append(Worker(tmp_path, name, job, u, **{**base, **extra}))
        started.extend(new)
        poll(lambda: all(w.ready.exists() or w.proc.poll() is not None for w in new), 30, "workers to start")
        for w in new:
            assert w.proc.poll() is None, f"worker {w.name} died at start:\n{w.output()}"
        (tmp_path / "go").touch()
        return new

    yield start
    for w in started:
        w.kill()


def poll(cond, timeout: float, what: str, interval: float = 0.02):
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(interval)


def waitaof_calls(redis_url: str) -> int:
    import redis

    r = redis.Redis.from_url(redis_url)
    try:
        return int(r.info("commandstats").get("cmdstat_waitaof", {}).get("calls", 0))
    finally:
        r.close()


def evict(url: str, job: str, worker: str) -> int:
    with Client(url) as c:
        return c.evict_worker(job, worker)


def uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def make_dataset(c: Client, tokenizer: str, corpus: list[str], docs: int = 100) -> tuple[str, int]:
    name = uid("ds")
    c.create_dataset(name, tokenizer=tokenizer, seq_len=SEQ_LEN, packing="doc")
    c.ingest(name, corpus[:docs])
    return name, c.dataset(name)["num_sequences"]


def counted(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The batch records whose ack counted (auto mode: every trained batch)."""
    return [r for r in records if "epoch" in r and r.get("result", "acked") in ("acked", "late")]


def check_exactly_once(all_records: list[dict[str, Any]], *, n: int, b: int, epochs: int, seed: int,
                       shuffle: bool = True) -> dict[tuple[int, int], dict[str, Any]]:  # fmt: skip
    """Every batch of every epoch acked by exactly one worker, and each epoch a permutation of [0, n)."""
    bpe = -(-n // b)
    trained = [r for r in all_records if "epoch" in r]
    ok = counted(all_records)
    per_key = Counter((r["epoch"], r["index"]) for r in ok)
    twice = [k for k, c in per_key.items() if c > 1]
    assert not twice, f"acked twice: {twice}"
    missing = {(e, i) for e in range(epochs) for i in range(bpe)} - set(per_key)
    for key in missing:  # only possible when an ack's response was lost and its retry said 'duplicate'
        retried = [r for r in trained if (r["epoch"], r["index"]) == key and r.get("retried")]
        assert retried, f"batch {key} was never acked by any worker"
    assert not set(per_key) - {(e, i) for e in range(epochs) for i in range(bpe)}
    by_key = {(r["epoch"], r["index"]): r for r in trained}
    for (e, i), r in by_key.items():
        assert r["ids"] == batch_ids(seed, e, n, b, i, shuffle).tolist(), (e, i)
    for e in range(epochs):
        ids = [x for i in range(bpe) for x in by_key[(e, i)]["ids"]]
        assert sorted(ids) == list(range(n)), f"epoch {e} does not cover every sequence exactly once"
    return by_key


def check_progress(c: Client, job: str, *, bpe: int, epochs: int) -> dict[str, Any]:
    p = c.job_progress(job)
    assert p["status"] == "done", p
    assert p["acked"] == epochs * bpe, p
    assert p["acked_per_epoch"] == {str(e): bpe for e in range(epochs)}
    assert p["leased"] == 0 and p["epoch"] == epochs - 1
    return p


@pytest.fixture
def service(spawn_service, redis_url: str, rdb):
    """A ``maskserve serve`` process on the test Redis (flushed)."""
    return spawn_service(service_env(REDIS_URL=redis_url))


# ---- many workers, one job ------------------------------------------------------------


@pytest.mark.slow
def test_four_workers_share_two_epochs(service: ServiceProcess, workers, bpe_tokenizer, corpus):
    with Client(service.url) as c:
        name, n = make_dataset(c, bpe_tokenizer, corpus)
        job, b, seed, epochs = uid("job"), 16, 7, 2
        bpe = -(-n // b)
        assert n % b  # a short last batch, served since drop_last is off
        create = {"dataset": name, "batch_size": b, "seed": seed, "epochs": epochs, "shuffle": True}
        # prefetch 1: "trained exactly once" is checked here; prefetch > 1 at the end of a job is
        # test_jobs.py::test_job_stream_prefetch_does_not_wait_for_its_own_leases
        ws = workers([f"w{i}" for i in range(4)], job, [service.url], create=create, step_s=0.1, prefetch=1)
        for w in ws:
            assert w.wait(60) == 0, w.output()
        records = [r for w in ws for r in w.batches()]
        by_key = check_exactly_once(records, n=n, b=b, epochs=epochs, seed=seed)
        assert len(records) == epochs * bpe  # every trained batch was acked: nobody trained a batch twice
        assert len(by_key[(0, bpe - 1)]["ids"]) == n % b and len(by_key[(1, bpe - 1)]["ids"]) == n % b
        p = check_progress(c, job, bpe=bpe, epochs=epochs)
        assert p["handed_out"] == epochs * bpe and p["redelivered"] == 0 and p["late_acks"] == 0
        for w in ws:  # the service's per-worker counts agree with the workers' own records
            mine = w.batches()
            assert mine, f"worker {w.name} got nothing"
            assert p["workers"][w.name]["acked"] == len(mine)
            assert p["workers"][w.name]["acked_sequences"] == sum(len(r["ids"]) for r in mine)

        order = [[x for i in range(bpe) for x in by_key[(e, i)]["ids"]] for e in range(epochs)]
        assert order[0] != order[1], "both epochs in the same order"
        assert order[0] != list(range(n)), "shuffled epoch in dataset order"

        def single(seed_: int) -> dict[tuple[int, int], list[int]]:
            other = uid("job")
            with c.job(other, create={**create, "seed": seed_}, prefetch=1) as stream:
                return {(bt.epoch, bt.index): bt["sequence_ids"].tolist() for bt in stream}

        same = single(seed)  # one worker, a second job with the same seed: the very same batches
        assert same == {k: r["ids"] for k, r in by_key.items()}
        other = single(seed + 1)
        assert set(other) == set(same) and other != same


@pytest.mark.slow
def test_killed_worker_batches_go_to_others(service: ServiceProcess, workers, bpe_tokenizer, corpus):
    with Client(service.url) as c:
        name, n = make_dataset(c, bpe_tokenizer, corpus)
        job, b, seed, epochs = uid("job"), 16, 3, 2
        bpe = -(-n // b)
        c.create_job(job, name, batch_size=b, seed=seed, epochs=epochs, lease_timeout_s=60)
        victim, *others = workers(
            ["victim", "w1", "w2"], job, [service.url], mode="explicit", step_s=0.05,
            per_worker={"victim": {"prefetch": 3, "stall_after": 3}, "w1": {"prefetch": 2}, "w2": {"prefetch": 2}},
        )  # fmt: skip
        held = json.loads(poll(lambda: victim.marker.exists() and victim.marker.read_text(), 30, "the victim to stall"))
        poll(lambda: all(c.job_progress(job)["workers"].get(w.name, {}).get("acked", 0) for w in others), 30,
             "the other workers to ack")  # fmt: skip
        p = c.job_progress(job)["workers"]["victim"]
        assert p["acked"] == 3 and p["handed"] - p["acked"] >= 2, p  # the held batch and at least one prefetched
        victim.proc.send_signal(signal.SIGKILL)
        victim.proc.wait()
        assert evict(service.url, job, "victim") >= 2  # its leases go to the others now, not in a minute

        for w in others:
            assert w.wait(60) == 0, w.output()
        mine = victim.batches()
        assert len(mine) == 3 and all(r["result"] == "acked" for r in mine)
        records = [r for w in (victim, *others) for r in w.batches()]
        by_key = check_exactly_once(records, n=n, b=b, epochs=epochs, seed=seed)
        p = check_progress(c, job, bpe=bpe, epochs=epochs)
        assert p["redelivered"] >= 2 and p["workers"]["victim"]["acked"] == 3
        assert p["handed_out"] == epochs * bpe + p["redelivered"]
        held_key = (held["epoch"], held["index"])
        assert by_key[held_key]["worker"] != "victim"  # the batch it held was trained and acked by another
        for r in mine:  # what it acked before dying counts once: nobody else acked those
            assert [x["worker"] for x in counted(records) if (x["epoch"], x["index"]) == (r["epoch"], r["index"])] \
                == ["victim"]  # fmt: skip


# ---- services die under the workers ---------------------------------------------------------


def _run_with_service_failure(c: Client, workers, urls: dict[str, list[str]], kill, *, name: str, n: int):
    job, b, seed, epochs = uid("job"), 16, 5, 2
    bpe = -(-n // b)
    c.create_job(job, name, batch_size=b, seed=seed, epochs=epochs, lease_timeout_s=60)
    ws = workers(list(urls), job, urls, mode="explicit", step_s=0.05, prefetch=2)
    poll(lambda: c.job_progress(job)["acked"] >= 10, 30, "the workers to get going")
    before = c.job_progress(job)
    assert before["status"] == "active" and before["acked"] < epochs * bpe
    kill()
    for w in ws:
        assert w.wait(90) == 0, w.output()
    records = [r for w in ws for r in w.batches()]
    check_exactly_once(records, n=n, b=b, epochs=epochs, seed=seed)
    p = check_progress(c, job, bpe=bpe, epochs=epochs)
    assert sum(w.summary()["reconnects"] for w in ws) >= 1, "no worker noticed the failure"
    assert p["acked"] >= before["acked"]
    return p


@pytest.mark.slow
def test_service_killed_and_restarted_mid_job(spawn_service, redis_url, rdb, workers, bpe_tokenizer, corpus):
    env = service_env(REDIS_URL=redis_url)
    port = free_port()
    first = spawn_service(env, port=port)
    with Client(first.url) as c:
        name, n = make_dataset(c, bpe_tokenizer, corpus)

        def kill() -> None:
            first.stop(signal.SIGKILL)
            spawn_service(env, port=port)  # the same address, the same Redis

        _run_with_service_failure(c, workers, {f"w{i}": [first.url] for i in range(3)}, kill, name=name, n=n)


@pytest.mark.slow
def test_one_of_two_replicas_killed_mid_job(spawn_service, redis_url, rdb, workers, bpe_tokenizer, corpus):
    env = service_env(REDIS_URL=redis_url)
    a, b = spawn_service(env), spawn_service(env)
    with Client(b.url) as c:
        name, n = make_dataset(c, bpe_tokenizer, corpus)
        urls = {"w0": [a.url, b.url], "w1": [a.url, b.url], "w2": [b.url, a.url]}
        p = _run_with_service_failure(c, workers, urls, lambda: a.stop(signal.SIGKILL), name=name, n=n)
        assert {"w0", "w1", "w2"} <= set(p["workers"])


# ---- Redis restarts from its append-only file -----------------------------------------------


def test_job_resumes_after_redis_restarts_from_aof(spawn_service, tmp_path: Path, bpe_tokenizer, corpus):
    data = tmp_path / "redis"
    server = EmbeddedRedis(data, appendonly=True).start()
    try:
        svc = spawn_service(service_env(REDIS_URL=server.url))
        job, b, seed, epochs = "resumed", 32, 8, 2
        with Client(svc.url, retries=5, backoff=0.1) as c, httpx.Client(base_url=svc.url, timeout=10) as http:
            name, n = make_dataset(c, bpe_tokenizer, corpus, docs=60)
            bpe = -(-n // b)
            c.create_job(job, name, batch_size=b, seed=seed, epochs=epochs)
            got: list[tuple[int, int, list[int], str]] = []
            for _ in range(bpe + 2):  # into the second epoch
                r = http.post(f"/v1/jobs/{job}/next", params={"worker": "before"})
                assert r.status_code == 200, r.text
                h = r.headers
                arrays, _ = decode(r.content)
                got.append((int(h["maskserve-epoch"]), int(h["maskserve-batch-index"]),
                            arrays["sequence_ids"].tolist(), h["maskserve-lease"]))  # fmt: skip
            acked, held = got[:-3], got[-3:]
            assert http.get("/readyz").json()["durable_acks"] is True  # Valkey 9 with its AOF: WAITAOF
            waits = waitaof_calls(server.url)
            r = http.post(f"/v1/jobs/{job}/ack", json={"worker": "before", "leases": [g[3] for g in acked]})
            assert r.json()["results"] == ["acked"] * len(acked)
            assert waitaof_calls(server.url) == waits + 1  # confirmed only once fsynced
            before = c.job_progress(job)
            assert before["acked"] == len(acked) and before["leased"] == 3 and before["epoch"] == 1

            port = server.port
            server.stop()  # SIGTERM: the server writes out its AOF
            poll(lambda: not c.ready(), 10, "the service to notice Redis is gone")
            server = EmbeddedRedis(data, port=port, appendonly=True).start()
            assert server.port == port
            poll(c.ready, 30, "the service to reach Redis again")

            after = c.job_progress(job)
            for k in ("status", "epoch", "next_batch", "handed_out", "acked", "leased", "acked_per_epoch"):
                assert after[k] == before[k], k
            r = http.post(f"/v1/jobs/{job}/ack", json={"worker": "before", "leases": [g[3] for g in held]})
            assert r.status_code == 200, r.text
            assert r.json()["results"] == ["acked"] * 3  # leases granted before the restart are still good

            rest: list[tuple[int, int, list[int]]] = []
            deadline = time.monotonic() + 60
            while True:  # finish the job; a stream is re-created if the service still reports Redis errors
                assert time.monotonic() < deadline
                try:
                    with c.job(job, worker="after", prefetch=1) as stream:
                        for bt in stream:
                            rest.append((bt.epoch, bt.index, bt["sequence_ids"].tolist()))
                    break
                except (TransportError, ServiceUnavailableError):
                    time.sleep(0.1)
            p = c.job_progress(job)
            assert p["status"] == "done" and p["acked"] == epochs * bpe
            assert p["acked_per_epoch"] == {str(e): bpe for e in range(epochs)}
            keys = Counter([(e, i) for e, i, _, _ in got] + [(e, i) for e, i, _ in rest])
            assert set(keys.values()) == {1} and len(keys) == epochs * bpe
            for e in range(epochs):
                ids = [x for ee, _, s, _ in got if ee == e for x in s] + [x for ee, _, s in rest if ee == e for x in s]
                assert sorted(ids) == list(range(n))
    finally:
        server.stop()


# ---- the trainer ----------------------------------------------------------------------------


@pytest.mark.slow
def test_two_trainers_share_a_job(service: ServiceProcess, tmp_path: Path, bpe_tokenizer, corpus):
    """Two ``python -m trainer --job`` processes attach to one job by name and share its epoch.

    So that neither can finish the epoch before the other has started, the test first creates the
    job (with the trainers' own config, so they attach) and leases every batch itself; once both
    trainers are in their training loops it gives all of them back at once.
    """
    with Client(service.url) as c, httpx.Client(base_url=service.url, timeout=30) as http:
        name, n = make_dataset(c, bpe_tokenizer, corpus, docs=300)
        job, b = uid("train"), 4
        bpe = -(-n // b)
        assert bpe >= 200
        c.create_job(job, name, batch_size=b, seed=0, epochs=1, masking={"mlm_probability": 0.15})
        gate = []
        for _ in range(bpe):
            r = http.post(f"/v1/jobs/{job}/next", params={"worker": "gate"})
            assert r.status_code == 200, r.text
            gate.append(r.headers["maskserve-lease"])
        assert c.job_progress(job)["leased"] == bpe

        env = {**service_env(), "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
        args = ["--url", service.url, "--dataset", name, "--job", job, "--batch-size", str(b), "--epochs", "1",
                "--d-model", "32", "--layers", "1", "--heads", "2", "--d-ff", "64", "--steps", "100000",
                "--device", "cpu", "--threads", "1", "--log-every", "1000", "--prefetch", "1"]  # fmt: skip
        procs = {}
        for w in ("tA", "tB"):
            out = open(tmp_path / f"{w}.txt", "wb")
            procs[w] = (out, subprocess.Popen([sys.executable, "-m", "trainer", *args, "--worker", w],
                                              cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT))
        logs = {w: tmp_path / f"{w}.txt" for w in procs}
        try:
            poll(lambda: all("| steps 0 -> 100000" in logs[w].read_text() or procs[w][1].poll() is not None
                             for w in procs), 90, "both trainers to start training")  # fmt: skip
            for w, (_, proc) in procs.items():
                assert proc.poll() is None, logs[w].read_text()
            r = http.post(f"/v1/jobs/{job}/release", json={"worker": "gate", "leases": gate})
            assert r.json()["released"] == bpe
            for w, (_, proc) in procs.items():
                assert proc.wait(120) == 0, logs[w].read_text()
        finally:
            for out, proc in procs.values():
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
                out.close()
        p = c.job_progress(job)
        assert p["status"] == "done"
        assert p["acked"] == bpe and p["acked_per_epoch"] == {"0": bpe}
        assert p["handed_out"] == 2 * bpe and p["redelivered"] == bpe  # the gate's leases, handed out again once
        acked = {w: p["workers"].get(w, {}).get("acked", 0) for w in procs}
        assert all(acked.values()) and sum(acked.values()) == bpe, acked
        assert sum(p["workers"][w]["acked_sequences"] for w in procs) == n
        steps = {}
        for w in procs:
            text = logs[w].read_text()
            assert "done: loss" in text, text
            steps[w] = int(text.split("steps (now at ")[1].split(")")[0])
        assert steps == acked  # each trained exactly the batches it acked: no batch trained twice


# ---- everything at once: a fleet under faults ------------------------------------------------


def _fleet_under_faults(c: Client, job: str, a: ServiceProcess, b: ServiceProcess, env: dict[str, str],
                        spawn_service, workers) -> tuple[dict[str, Worker], dict[str, Any]]:  # fmt: skip
    """Run ``job`` on four explicit-ack workers over replicas ``a`` and ``b`` through the fleet's faults (see
    ``test_fleet_trains_each_sequence_once_through_kills_restarts_and_pauses``) until every worker but the
    killed one has finished; returns the workers by name and the batch the sleeper held."""
    urls = {"w0": [a.url, b.url], "w1": [a.url, b.url], "sleeper": [a.url, b.url], "victim": [b.url, a.url]}
    ws = {w.name: w for w in workers(
        list(urls), job, urls, mode="explicit", step_s=0.02, prefetch=2,
        per_worker={"victim": {"stall_after": 3}, "sleeper": {"pause_at": 4}},
    )}  # fmt: skip

    # a worker dies holding leases
    poll(lambda: ws["victim"].marker.exists(), 60, "the victim to hold a batch")
    ws["victim"].proc.send_signal(signal.SIGKILL)
    ws["victim"].proc.wait()
    assert evict(b.url, job, "victim") >= 1

    # a worker stops mid-step, holding its batch
    sleeper = ws["sleeper"]
    held = json.loads(poll(lambda: sleeper.marker.exists() and sleeper.marker.read_text(), 60, "the sleeper"))
    sleeper.proc.send_signal(signal.SIGSTOP)

    # a replica dies and comes back on its port, while the job cannot finish (the sleeper holds a batch)
    a.stop(signal.SIGKILL)
    poll(lambda: any("outage" in r for w in ("w0", "w1") for r in ws[w].records()), 60,
         "a worker to run into the dead replica")  # fmt: skip
    assert c.job_progress(job)["status"] == "active"
    spawn_service(env, port=a.port)

    assert evict(b.url, job, "sleeper") >= 1  # known gone: its batches go to the others
    poll(lambda: c.job_progress(job)["status"] == "done", 90, "the others to finish the job")
    sleeper.resume.touch()
    sleeper.proc.send_signal(signal.SIGCONT)  # it wakes up, trains what it held, acks it: too late to count

    for w in ws.values():
        if w.name != "victim":
            assert w.wait(90) == 0, w.output()
    return ws, held


@pytest.mark.slow
def test_fleet_trains_each_sequence_once_through_kills_restarts_and_pauses(
    spawn_service, redis_url, rdb, workers, bpe_tokenizer, corpus
):
    """Four workers on two replicas. One worker is SIGKILLed holding leases; another is SIGSTOPped mid-step
    (both evicted, as an operator would once they are known gone); a replica is SIGKILLed and restarted on its
    port while the paused worker holds a batch, so the job cannot finish around the faults. Then the paused
    worker wakes up, trains what it held and acks it. Per epoch, what was trained and counted (received and
    acked with 'acked' or 'late') is the dataset exactly once, and the service counted no ack of a batch a
    worker did not train."""
    env = service_env(REDIS_URL=redis_url)
    a, b = spawn_service(env), spawn_service(env)
    with Client(b.url) as c:
        name, n = make_dataset(c, bpe_tokenizer, corpus)
        job, size, seed, epochs = uid("job"), 16, 11, 2
        bpe = -(-n // size)
        c.create_job(job, name, batch_size=size, seed=seed, epochs=epochs, lease_timeout_s=60)
        ws, held = _fleet_under_faults(c, job, a, b, env, spawn_service, workers)
        sleeper = ws["sleeper"]
        records = [r for w in ws.values() for r in w.batches()]
        check_exactly_once(records, n=n, b=size, epochs=epochs, seed=seed)
        p = check_progress(c, job, bpe=bpe, epochs=epochs)
        woke = [r for r in sleeper.batches() if (r["epoch"], r["index"]) == (held["epoch"], held["index"])]
        assert [r["result"] for r in woke] == ["duplicate"]  # trained twice in fact, counted once
        for w in ws.values():  # the service counted only acks of batches each worker trained
            mine = w.batches()
            counted_here = counted(mine)
            # an ack whose answer died with the replica counted there, and its retry then said 'duplicate'
            lost_answers = [r for r in mine if r.get("result") == "duplicate" and r.get("retried")]
            acked = p["workers"].get(w.name, {}).get("acked", 0)
            assert len(counted_here) <= acked <= len(counted_here) + len(lost_answers), w.name
        assert sum(ws[w].summary()["reconnects"] for w in ("w0", "w1")) >= 1
        assert p["redelivered"] >= 2


# ---- a mixture under the same faults ----------------------------------------------------------


def _uninterrupted(c: Client, create: dict[str, Any]) -> dict[int, dict[str, Any]]:
    """One worker's run of a fresh job of config ``create``, with no faults: each batch's sources, ids and bytes."""
    got = {}
    with c.job(uid("ref"), create=create, prefetch=1) as stream:
        for bt in stream:
            digest = hashlib.sha256(bt["input_ids"].tobytes() + bt["labels"].tobytes()).hexdigest()
            got[bt.index] = {"sources": bt.sources, "ids": bt["sequence_ids"].tolist(), "digest": digest}
    return got


@pytest.mark.slow
def test_a_mixture_fleet_trains_each_source_epoch_once_through_kills_and_a_replica_restart(
    spawn_service, redis_url, rdb, workers, bpe_tokenizer, corpus
):
    """The fleet's faults on a two-source mixture (3:1, the second source repeating, until the first has run two
    epochs): four workers on two replicas, one SIGKILLed holding leases, one SIGSTOPped holding a batch while a
    replica is SIGKILLed and restarted on its port. Every position of the job's stream is acked once; each
    completed epoch of each source is that source exactly once; and every batch any worker trained is
    byte-identical (sources, ids, input ids, labels) to a single worker's uninterrupted run of the same config."""
    env = service_env(REDIS_URL=redis_url)
    a, b = spawn_service(env), spawn_service(env)
    with Client(b.url) as c:
        wiki, nw = make_dataset(c, bpe_tokenizer, corpus)
        books, nb = make_dataset(c, bpe_tokenizer, corpus[100:], docs=40)
        create = {"sources": [{"dataset": wiki, "weight": 3}, {"dataset": books, "weight": 1, "repeat": True}],
                  "until": wiki, "epochs": 2, "batch_size": 16, "seed": 11, "lease_timeout_s": 60}  # fmt: skip
        ref = _uninterrupted(c, create)
        assert list(ref) == list(range(len(ref)))
        job = uid("mix")
        c.create_job(job, **create)
        ws, held = _fleet_under_faults(c, job, a, b, env, spawn_service, workers)
        sleeper = ws["sleeper"]

        records = [r for w in ws.values() for r in w.batches()]
        for r in records:  # whoever trained it, whenever, on either replica: the very batch of the quiet run
            assert {k: r[k] for k in ("sources", "ids", "digest")} == ref[r["index"]], r["index"]
        per_index = Counter(r["index"] for r in counted(records))
        assert max(per_index.values()) == 1
        for k in set(ref) - set(per_index):  # an ack whose answer was lost: its retry said 'duplicate'
            assert any(r["index"] == k and r.get("retried") for r in records), f"batch {k} never acked"
        p = check_progress(c, job, bpe=len(ref), epochs=1)
        woke = [r for r in sleeper.batches() if r["index"] == held["index"]]
        assert [r["result"] for r in woke] == ["duplicate"]
        assert p["redelivered"] >= 2

        rows = [(s, i) for k in sorted(ref) for s, i in zip(ref[k]["sources"], ref[k]["ids"])]
        for src, n in ((wiki, nw), (books, nb)):
            ids = [i for s, i in rows if s == src]
            full, rest = divmod(len(ids), n)
            for e in range(full):  # each completed epoch of a source: that source exactly once
                assert sorted(ids[e * n : (e + 1) * n]) == list(range(n)), (src, e)
            assert len(set(ids[full * n :])) == rest  # the epoch under way: no sequence twice
            mine = next(x for x in p["sources"] if x["dataset"] == src)
            assert (mine["served"], mine["epoch"]) == (len(ids), full)
        assert len([i for s, i in rows if s == wiki]) == 2 * nw
        assert abs(sum(s == books for s, _ in rows) / len(rows) - 0.25) < 0.02


@pytest.mark.slow
def test_trainer_rides_out_its_only_replica_killed_and_restarted(spawn_service, redis_url, rdb, tmp_path: Path,
                                                                 bpe_tokenizer, corpus):  # fmt: skip
    """``python -m trainer --job`` keeps training through a SIGKILL of its only service and a restart, and
    finishes the epoch: every batch trained and acked once, by it."""
    env = service_env(REDIS_URL=redis_url)
    svc = spawn_service(env)
    with Client(svc.url, retries=5, backoff=0.2) as c, httpx.Client(base_url=svc.url, timeout=30) as http:
        name, n = make_dataset(c, bpe_tokenizer, corpus, docs=150)
        job, size = uid("train"), 4
        bpe = -(-n // size)
        c.create_job(job, name, batch_size=size, seed=0, epochs=1, lease_timeout_s=60,
                     masking={"mlm_probability": 0.15})  # the trainer's own config: it attaches
        gate = []  # hold every batch until the trainer is running, so it cannot finish before the fault
        for _ in range(bpe):
            r = http.post(f"/v1/jobs/{job}/next", params={"worker": "gate"})
            assert r.status_code == 200, r.text
            gate.append(r.headers["maskserve-lease"])

        log = tmp_path / "trainer.txt"
        args = ["--url", svc.url, "--dataset", name, "--job", job, "--batch-size", str(size), "--epochs", "1",
                "--d-model", "32", "--layers", "1", "--heads", "2", "--d-ff", "64", "--steps", "100000",
                "--device", "cpu", "--threads", "1", "--log-every", "1000", "--prefetch", "2",
                "--max-outage", "120", "--worker", "trainer"]  # fmt: skip
        with open(log, "wb") as out:
            proc = subprocess.Popen([sys.executable, "-m", "trainer", *args], cwd=ROOT, stdout=out,
                                    stderr=subprocess.STDOUT,
                                    env={**env, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"})  # fmt: skip
            try:
                poll(lambda: "| steps 0 -> 100000" in log.read_text() or proc.poll() is not None, 90,
                     "the trainer to start training")  # fmt: skip
                assert proc.poll() is None, log.read_text()
                half = bpe // 2
                assert http.post(f"/v1/jobs/{job}/release", json={"worker": "gate", "leases": gate[:half]}).json() \
                    == {"released": half}  # fmt: skip
                poll(lambda: c.job_progress(job)["acked"] >= 5, 60, "the trainer to train a few batches")

                svc.stop(signal.SIGKILL)
                poll(lambda: "retrying for up to 120s" in log.read_text(), 60, "the trainer to notice the outage")
                assert proc.poll() is None, log.read_text()
                svc = spawn_service(env, port=svc.port)  # the same address, the same Redis
                r = http.post(f"/v1/jobs/{job}/release", json={"worker": "gate", "leases": gate[half:]})
                assert r.json() == {"released": bpe - half}
                assert proc.wait(180) == 0, log.read_text()
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        text = log.read_text()
        assert "the service answers again" in text and "is finished" in text, text
        p = c.job_progress(job)
        assert p["status"] == "done" and p["acked"] == bpe and p["workers"]["trainer"]["acked"] == bpe
        assert int(text.split("steps (now at ")[1].split(")")[0]) == bpe  # each batch trained once
        assert p["handed_out"] == 2 * bpe  # the gate's, then the trainer's: no lease lost in the restart


@pytest.mark.slow
def test_trainer_says_a_cancelled_job_was_cancelled(service: ServiceProcess, tmp_path: Path, bpe_tokenizer, corpus):
    """A job cancelled under a trainer ends it with its own status and message, not as if it had finished."""
    with Client(service.url) as c, httpx.Client(base_url=service.url, timeout=30) as http:
        name, n = make_dataset(c, bpe_tokenizer, corpus, docs=40)
        job = uid("cancel")
        c.create_job(job, name, batch_size=8, seed=0, epochs=1, lease_timeout_s=60, masking={"mlm_probability": 0.15})
        r = http.post(f"/v1/jobs/{job}/next", params={"worker": "gate"})  # one batch held, so the job cannot end
        assert r.status_code == 200
        log = tmp_path / "trainer.txt"
        args = ["--url", service.url, "--dataset", name, "--job", job, "--batch-size", "8", "--epochs", "1",
                "--lease-timeout", "60", "--d-model", "32", "--layers", "1", "--heads", "2", "--d-ff", "64",
                "--steps", "100000", "--device", "cpu", "--threads", "1", "--log-every", "1000", "--prefetch", "1"]
        with open(log, "wb") as out:
            proc = subprocess.Popen([sys.executable, "-m", "trainer", *args], cwd=ROOT, stdout=out,
                                    stderr=subprocess.STDOUT,
                                    env={**service_env(), "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"})  # fmt: skip
            try:
                bpe = -(-n // 8)
                poll(lambda: c.job_progress(job)["acked"] == bpe - 1 or proc.poll() is not None, 90,
                     "the trainer to train every batch but the held one")  # fmt: skip
                assert c.cancel_job(job)["status"] == "cancelled"
                assert proc.wait(60) == 3, log.read_text()
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        text = log.read_text()
        assert "was cancelled" in text and "is finished" not in text, text
        assert c.job_progress(job)["workers"].get("gate", {}).get("acked", 0) == 0


@pytest.mark.slow
def test_a_job_never_serves_a_re_created_generation_of_its_dataset(spawn_service, redis_url, rdb, bpe_tokenizer,
                                                                     corpus):  # fmt: skip
    """A job that outlives a delete of its dataset (the delete unlinks the old generation's chunks before its
    jobs, and a create of the name may run meanwhile) answers a clear 409 from every process, whatever each
    cached, and never a batch of the new generation."""
    svc = spawn_service(service_env(REDIS_URL=redis_url), workers=2)
    with Client(svc.url) as c:
        name, _ = make_dataset(c, bpe_tokenizer, corpus, docs=60)
        job = uid("job")
        c.create_job(job, name, batch_size=8, epochs=1, lease_timeout_s=60)

        def ask(worker: str) -> httpx.Response:  # a new connection each time: spread over both processes
            with httpx.Client(base_url=svc.url, timeout=30) as http:
                return http.post(f"/v1/jobs/{job}/next", params={"worker": worker, "format": "json"})

        served = [ask(f"warm{k}") for k in range(8)]  # the processes that answer cache the dataset as it is now
        assert all(r.status_code == 200 for r in served)
        job_keys = JobKeys("ms").all_keys(job, 1)
        kept = {key: rdb.dump(key) for key in job_keys}
        c.delete_dataset(name)
        c.create_dataset(name, tokenizer=bpe_tokenizer, seq_len=SEQ_LEN, packing="doc")
        c.ingest(name, corpus[200:400])  # other documents, as many chunks or more
        for key, value in kept.items():  # the job as the delete's race window leaves it
            if value is not None:
                rdb.restore(key, 0, value, replace=True)
        answers = [ask(f"late{k}") for k in range(8)]
        assert [r.status_code for r in answers if r.status_code == 200] == []  # no batch of the new generation
        for r in answers:
            problem = r.json()
            assert (r.status_code, problem["type"]) == (409, "urn:maskserve:problem:job-dataset-gone"), problem
            assert name in problem["detail"] and job in problem["detail"]
        assert c.job_progress(job)["handed_out"] == len(served)  # each refused grant was taken back


# ---- the README's walk-through ---------------------------------------------------------------


@pytest.mark.slow
def test_the_readme_jobs_walkthrough_runs_as_written(service: ServiceProcess, tmp_path: Path, bpe_tokenizer, corpus):
    """README, "Jobs": a job made with the CLI, then the trainer command as written on two workers at once.
    Both take the job's config (no flags of their own), both exit 0 when the job ends, and the job is done
    with every batch acked exactly once."""
    create = "maskserve jobs create pretrain --dataset wiki --batch-size 16 --epochs 2 --lease-timeout 60"
    attach = "python -m trainer --dataset wiki --job pretrain --d-model 64 --layers 2 --heads 2"
    readme = (ROOT / "README.md").read_text()
    assert create in readme and attach in readme  # what runs below is what the README shows
    with Client(service.url) as c:
        c.create_dataset("wiki", tokenizer=bpe_tokenizer, seq_len=32)
        c.ingest("wiki", corpus[:20])
        n = c.dataset("wiki")["num_sequences"]
    assert 16 < n <= 192  # a few batches an epoch: a short run of a small model on the CPU
    env = {**service_env(), "MASKSERVE_URL": service.url, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1",
           "OMP_NUM_THREADS": "1"}  # fmt: skip
    cli = Path(sys.executable).with_name("maskserve")  # the console script, as the README runs it
    argv = [str(cli)] if cli.exists() else [sys.executable, "-m", "maskserve"]
    made = subprocess.run([*argv, *create.split()[1:]], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert made.returncode == 0, made.stdout + made.stderr
    procs = {}
    for w in ("a", "b"):
        out = open(tmp_path / f"{w}.txt", "wb")
        procs[w] = (out, subprocess.Popen([sys.executable, *attach.split()[1:]], cwd=ROOT, env=env, stdout=out,
                                          stderr=subprocess.STDOUT))  # fmt: skip
    try:
        for w, (_, proc) in procs.items():
            assert proc.wait(300) == 0, (tmp_path / f"{w}.txt").read_text()
    finally:
        for out, proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            out.close()
    with Client(service.url) as c:
        p = c.job_progress("pretrain")
    bpe = -(-n // 16)
    assert p["status"] == "done" and p["config"]["batch_size"] == 16 and p["epochs"] == 2
    assert p["acked"] == 2 * bpe and p["acked_per_epoch"] == {str(e): bpe for e in range(2)}
    assert p["redelivered"] == 0 and p["late_acks"] == 0
    for w in procs:
        text = (tmp_path / f"{w}.txt").read_text()
        assert "batch 16" in text and "job 'pretrain': its config, 2 epochs" in text, text
        # a worker that attached after the other had taken every batch trains none, and says so
        assert "job 'pretrain' is finished" in text or "job 'pretrain' has no batches left" in text, text
