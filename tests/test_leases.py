"""Lease ownership and the job protocol's edges: who may ack, job instances, idempotent
lease requests, requests that fail, eviction, bounded per-worker state, durable acks.

Every test drives the real HTTP endpoints of a real service over a real Redis.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest
import redis

from client import Client
from maskserve.cli import main as cli
from service.store.durability import Durability, DurabilityError
from service.store.embedded import EmbeddedRedis
from service.jobs.jobs import lease_keys, lease_tag

from .conftest import ServerThread
from .test_jobs import PROBLEM, Leased, Raw, assert_problem, drain, job_body, make_dataset, uid
from .test_jobs import ds, raw  # noqa: F401 - fixtures


def _job(raw: Raw, name: str, **kw) -> str:
    job = uid("job")
    r = raw.create(job_body(job, name, **kw))
    assert r.status_code == 201, r.text
    return job


# ---- only the holder acks ---------------------------------------------------------------


def test_only_the_worker_a_lease_was_issued_to_can_ack_or_release_it(raw: Raw, ds):
    name, n = ds
    job = _job(raw, name, batch_size=64)
    a = raw.lease(job, "A")
    made_up = "0:1:1:00000000"  # the old id format, with a token anyone could guess
    forged = f"0:0:1:{a.lease.split(':')[3]}:{'0' * 32}"  # the right instance, a forged tag
    assert raw.ack(job, [made_up, forged], "thief") == ["invalid", "invalid"]
    assert raw.ack(job, [a.lease], "thief") == ["not-owner"]  # another worker's real lease id
    assert raw.release(job, [a.lease], "thief") == 0
    p = raw.progress(job)
    assert p["acked"] == 0 and p["late_acks"] == 0 and p["leased"] == 1
    assert "thief" not in p["workers"] or p["workers"]["thief"].get("acked", 0) == 0

    # A dies with the batch: it must be trained by someone else, not counted on the thief's word
    assert raw.http.post(f"/v1/jobs/{job}/workers/A/evict").json() == {"released": 1}
    got = drain(raw, job, "B")
    assert a.key in got and got[a.key].redelivered
    assert sorted(i for bt in got.values() for i in bt.ids) == list(range(n))
    p = raw.progress(job)
    assert p["status"] == "done" and p["acked"] == p["batches_per_epoch"] == p["workers"]["B"]["acked"]
    assert raw.ack(job, [a.lease], "A") == ["duplicate"]  # A's own id still verifies; the batch counted once


def test_lease_ids_name_their_worker_under_the_jobs_secret(raw: Raw, ds, rdb: redis.Redis):
    """The tag is HMAC-SHA1 under the job's secret: recomputed here from the keys in Redis."""
    name, _ = ds
    job = _job(raw, name)
    a = raw.lease(job, "worker-1")
    e, i, attempt, instance, tag = a.lease.split(":")
    key = f"ms:job:{{{job}}}"  # the job hash (service/store/jobkeys.py)
    inner, outer = rdb.hmget(key, "mac_in", "mac_out")
    secret = bytes(b ^ 0x36 for b in inner).rstrip(b"\0")
    assert lease_keys(secret) == {"mac_in": inner, "mac_out": outer}
    assert tag == lease_tag(secret, f"{e}:{i}:{attempt}:{instance}", "worker-1")
    assert tag[16:] != lease_tag(secret, f"{e}:{i}:{attempt}:{instance}", "worker-2")[16:]
    assert b"mac_in" not in raw.http.get(f"/v1/jobs/{job}").content  # the secret is never shown


def test_lease_ids_of_a_deleted_or_recreated_job_are_stale(raw: Raw, ds):
    name, n = ds
    job = _job(raw, name, batch_size=32)
    old = [raw.lease(job, "w") for _ in range(3)]
    assert raw.ack(job, [old[0].lease], "w") == ["acked"]
    assert raw.http.delete(f"/v1/jobs/{job}").status_code == 204
    assert raw.create(job_body(job, name, batch_size=32)).status_code == 201  # same name, same config
    assert raw.ack(job, [x.lease for x in old], "w") == ["stale"] * 3
    assert raw.release(job, [x.lease for x in old[1:]], "w") == 0
    fresh = raw.lease(job, "w", acks=[old[1].lease])
    assert fresh.acks == ["stale"] and fresh.key == (0, 0) and not fresh.redelivered
    p = raw.progress(job)
    assert p["acked"] == 0 and p["handed_out"] == 1 and p["late_acks"] == 0


# ---- idempotent lease requests, failed requests ----------------------------------------------


def test_a_retried_lease_request_gets_the_same_lease(raw: Raw, ds):
    name, _ = ds
    job = _job(raw, name, batch_size=32)

    def next_with(request: str, acks: tuple[str, ...] = ()) -> Leased:
        r = raw.http.post(f"/v1/jobs/{job}/next", params={"worker": "w", "request": request, "ack": list(acks)})
        assert r.status_code == 200, r.text
        return Leased(int(r.headers["maskserve-epoch"]), int(r.headers["maskserve-batch-index"]),
                      r.headers["maskserve-lease"], int(r.headers["maskserve-lease-expires-ms"]),
                      r.headers["maskserve-redelivered"] == "1", {}, {},
                      (r.headers.get("maskserve-acks") or "").split(","))  # fmt: skip

    first = next_with("r1")
    again = next_with("r1")  # the answer was lost; the client asks again with the same id
    assert (again.key, again.lease, again.expires_ms) == (first.key, first.lease, first.expires_ms)
    second = next_with("r2", acks=(first.lease,))
    assert second.key == (0, 1) and second.acks == ["acked"]
    retried = next_with("r2", acks=(first.lease,))  # acks ride again on the retry: counted once
    assert retried.lease == second.lease and retried.acks == ["duplicate"]
    other = raw.lease(job, "v")  # another worker is not affected by w's request ids
    assert other.key == (0, 2)
    third, fourth = next_with("r3"), next_with("r4")  # two requests in flight at once (prefetch)
    assert next_with("r3").lease == third.lease and next_with("r4").lease == fourth.lease
    assert raw.ack(job, [third.lease], "w") == ["acked"]
    assert next_with("r3").key == (0, 5)  # once acked, the id is spent: a new request
    p = raw.progress(job)
    assert p["handed_out"] == 6 and p["acked"] == 2 and p["workers"]["w"]["handed"] == 5
    assert_problem(raw.http.post(f"/v1/jobs/{job}/next", params={"request": "not ok!"}), 422, "validation-failed")


def test_acks_ride_in_a_lease_requests_body_and_their_number_and_bytes_are_bounded(raw: Raw, ds, settings):
    """A lease request carries its acks in a JSON body (the query's `ack` still counts, for older clients):
    both together at most MASKSERVE_MAX_ACKS, the body at most MASKSERVE_MAX_JSON_BYTES; a refused request
    acks nothing and leases nothing."""
    name, _ = ds
    job = _job(raw, name, batch_size=32)
    a, b = raw.lease(job), raw.lease(job)
    r = raw.http.post(f"/v1/jobs/{job}/next", params={"worker": "w", "ack": a.lease}, json={"acks": [b.lease]})
    assert r.status_code == 200 and r.headers["maskserve-acks"] == "acked,acked", r.text
    c = r.headers["maskserve-lease"]
    limit = settings.max_acks
    too_many = [c] + [f"0:{i}:0:x:y" for i in range(limit)]
    refusals = [
        (raw.http.post(f"/v1/jobs/{job}/next", params={"worker": "w"}, json={"acks": too_many}), 422,
         "limit-exceeded"),
        (raw.http.post(f"/v1/jobs/{job}/next", params={"worker": "w", "ack": c}, json={"acks": too_many[1:]}), 422,
         "limit-exceeded"),
        (raw.http.post(f"/v1/jobs/{job}/ack", json={"worker": "w", "leases": too_many}), 422, "limit-exceeded"),
        (raw.http.post(f"/v1/jobs/{job}/next", params={"worker": "w"}, content=b'{"acks": ['), 400, "invalid-request"),
        (raw.http.post(f"/v1/jobs/{job}/next", params={"worker": "w"}, json={"acks": c}), 422, "validation-failed"),
        (raw.http.post(f"/v1/jobs/{job}/next", params={"worker": "w"},
                       json={"acks": [c, "x" * settings.max_json_bytes]}), 413, "payload-too-large"),
    ]  # fmt: skip
    for resp, status, kind in refusals:
        assert_problem(resp, status, kind)
    assert refusals[0][0].json()["limit"] == limit
    p = raw.progress(job)
    assert p["handed_out"] == 3 and p["acked"] == 2 and p["leased"] == 1  # c: neither acked nor a new lease
    assert raw.lease(job, acks=[c]).acks == ["acked"]


def test_grants_say_whether_they_came_in_the_order_of_the_requests(raw: Raw, ds):
    """A worker numbers its requests; a grant is 'in order' when no higher-numbered request of that worker got
    a batch first, which lets a client yield it without waiting for its later requests."""
    name, _ = ds
    job = _job(raw, name, batch_size=16)

    def grant(seq: int, worker: str = "w") -> tuple[tuple[int, int], str]:
        r = raw.http.post(f"/v1/jobs/{job}/next", params={"worker": worker, "seq": seq})
        assert r.status_code == 200, r.text
        return (int(r.headers["maskserve-epoch"]), int(r.headers["maskserve-batch-index"])), \
            r.headers["maskserve-in-order"]  # fmt: skip

    assert grant(10) == ((0, 0), "1")
    assert grant(20) == ((0, 1), "1")
    assert grant(15) == ((0, 2), "0")  # sent before the one numbered 20, granted after it: a later batch
    assert grant(30) == ((0, 3), "1")
    assert grant(5, "v") == ((0, 4), "1")  # numbers are per worker
    assert grant(0) == ((0, 5), "0")  # unnumbered: no promise


def test_a_failing_request_hands_out_nothing(raw: Raw, client: Client, ds):
    """A static job whose cache was dropped: /next fails, and its batch is the next one handed out,
    not one that comes back only when a lease times out."""
    name, n = ds
    static = {"mode": "static", "copies": 2}
    job = uid("job")
    r = raw.create(job_body(job, name, batch_size=32, masking=static))
    body = assert_problem(r, 409, "static-masks-missing")  # creating it checks the cache exists
    assert "build" in body["detail"] and raw.http.get(f"/v1/jobs/{job}").status_code == 404

    built = client.build_static_masks(name, seed=3, copies=2)
    assert built["complete"]
    assert raw.create(job_body(job, name, batch_size=32, masking=static)).status_code == 201
    client.drop_static_masks(name, built["cache"])
    for _ in range(2):
        assert_problem(raw.http.post(f"/v1/jobs/{job}/next", params={"worker": "w"}), 409, "static-masks-missing")
    p = raw.progress(job)
    assert p["handed_out"] == 0 and p["workers"]["w"]["handed"] == 0
    client.build_static_masks(name, seed=3, copies=2)
    first = raw.lease(job, "w")
    assert first.key == (0, 0) and not first.redelivered  # resumes at batch 0, at once
    assert raw.lease(job, "w").key == (0, 1)
    p = raw.progress(job)
    assert p["handed_out"] == 2 and p["redelivered"] == 0


# ---- eviction, bounded per-worker state ---------------------------------------------------------


def test_evicting_a_worker_hands_its_leases_out_again_at_once(raw: Raw, ds, service_url: str, capsys):
    name, _ = ds
    job = _job(raw, name, batch_size=16, lease_timeout_s=3600)
    held = [raw.lease(job, "gone") for _ in range(3)]
    kept = raw.lease(job, "alive")
    assert cli(["jobs", "evict", job, "gone", "--url", service_url]) == 0  # maskserve jobs evict JOB WORKER
    assert f"job {job}: 3 batches of worker gone are handed out again" in capsys.readouterr().out
    again = [raw.lease(job, "alive") for _ in range(3)]
    assert sorted(x.key for x in again) == sorted(x.key for x in held) and all(x.redelivered for x in again)
    assert raw.ack(job, [held[0].lease], "gone") == ["late"]  # it did train it: counts if nobody acked yet
    assert raw.ack(job, [again[0].lease, kept.lease], "alive") == ["duplicate", "acked"]
    assert raw.http.post(f"/v1/jobs/{job}/workers/nobody/evict").json() == {"released": 0}
    assert_problem(raw.http.post("/v1/jobs/nojob/workers/w/evict"), 404, "job-not-found")


def test_per_worker_stats_are_bounded(settings, rdb, client: Client, bpe_tokenizer, corpus):
    """Distinct worker names beyond the limit fold into the job's totals instead of growing without bound."""
    limited = settings.model_copy(update={"job_max_workers": 3})
    with ServerThread(limited) as server, Client(server.url) as c:
        raw = Raw(server.url)
        try:
            name, _ = make_dataset(c, bpe_tokenizer, corpus, docs=40)
            job = _job(raw, name, batch_size=4)
            leases = [raw.lease(job, f"w{k}") for k in range(10)]
            p = raw.progress(job)
            assert len(p["workers"]) <= 3 + 1  # the limit, plus the one asking
            retired = p["retired_workers"]
            assert retired["workers"] >= 6
            assert retired["handed"] + sum(w["handed"] for w in p["workers"].values()) == 10
            # folding a worker does not take its lease away: its acks still count
            assert raw.ack(job, [leases[0].lease], "w0") == ["acked"]
            keys = rdb.hlen(next(k for k in rdb.keys("*:workers")))
            assert keys <= 6 * 4  # at most a handful of workers' counters, not ten
        finally:
            raw.close()


# ---- durable acks -------------------------------------------------------------------------


def test_durability_is_probed_and_required_where_asked(tmp_path: Path, redis_url: str):
    async def probe(url: str, mode: str) -> Durability:
        r = redis.asyncio.Redis.from_url(url)
        try:
            return await Durability(r, mode).probe()
        finally:
            await r.aclose()

    with EmbeddedRedis(tmp_path / "aof", appendonly=True) as aof, EmbeddedRedis(tmp_path / "no-aof", appendonly=False) as no_aof:
        assert asyncio.run(probe(aof.url, "auto")).enabled
        assert not asyncio.run(probe(aof.url, "off")).enabled
        off = asyncio.run(probe(no_aof.url, "auto"))
        assert not off.enabled and "append-only" in off.reason
        with pytest.raises(DurabilityError):
            asyncio.run(probe(no_aof.url, "require"))


def test_required_durability_missing_later_refuses_every_durable_write(tmp_path: Path, settings, bpe_tokenizer, corpus):
    """Redis down when the service starts (so the start-up probe cannot refuse), then up without an
    append-only file: readiness says 503 with the reason (not a 500), and a job transition, which must
    be fsynced, is refused with 503 before anything is written, not applied without the fsync."""
    from .conftest import free_port

    port = free_port()
    late = settings.model_copy(update={"redis_url": f"redis://127.0.0.1:{port}/0", "durable_acks": "require"})
    with ServerThread(late) as s, Client(s.url, retries=0) as c:
        with EmbeddedRedis(tmp_path / "late", port=port, appendonly=False):
            r = httpx.get(f"{s.url}/readyz", timeout=30)
            name, _ = make_dataset(c, bpe_tokenizer, corpus)
            created = httpx.post(f"{s.url}/v1/jobs", json=job_body(uid("job"), name), timeout=30)
            jobs = c.jobs()
    assert r.status_code == 503, r.text
    assert r.json()["type"] == "urn:maskserve:problem:store-unavailable" and "append-only" in r.json()["detail"]
    assert created.status_code == 503 and "MASKSERVE_DURABLE_ACKS=require" in created.json()["detail"]
    assert jobs == []


def test_acks_wait_for_the_append_only_file(tmp_path: Path, settings, bpe_tokenizer, corpus):
    """Against a server with its AOF on, every call that acks issues WAITAOF before it answers;
    lease requests without acks do not wait."""
    with EmbeddedRedis(tmp_path / "redis", appendonly=True) as server:
        r = redis.Redis.from_url(server.url)

        def waits() -> int:
            return int(r.info("commandstats").get("cmdstat_waitaof", {}).get("calls", 0))

        with ServerThread(settings.model_copy(update={"redis_url": server.url})) as svc, Client(svc.url) as c:
            raw = Raw(svc.url)
            try:
                assert raw.http.get("/readyz").json()["durable_acks"] is True
                name, _ = make_dataset(c, bpe_tokenizer, corpus, docs=40)
                job = _job(raw, name, batch_size=16)
                before = waits()
                a = raw.lease(job, "w")
                assert waits() == before  # nothing to confirm
                b = raw.lease(job, "w", acks=[a.lease])
                assert b.acks == ["acked"] and waits() == before + 1
                assert raw.ack(job, [b.lease], "w") == ["acked"] and waits() == before + 2
                assert raw.progress(job)["durable_acks"] is True
            finally:
                raw.close()
        r.close()


def test_problem_of_a_finished_job_keeps_its_http_status(raw: Raw, ds):
    name, _ = ds
    job = _job(raw, name, batch_size=1024)
    drain(raw, job)
    r = raw.http.post(f"/v1/jobs/{job}/next")
    body = assert_problem(r, 410, "job-finished")
    assert body["status"] == 410 and body["job_status"] == "done" and body["type"] == PROBLEM + "job-finished"
