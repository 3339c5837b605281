"""Jobs against the in-process service: leases, acks, epochs, cancel, delete.

Every test drives the real HTTP endpoints of a real service over a real Redis;
names carry a random suffix because the shared service caches datasets and
job configs by name while the database is flushed between tests.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np
import pytest

from client import Client, ConflictError, JobCancelled, JobConflict, NotFoundError, decode
from service.masking.masking import Vocab, mask_batch
from service.batches.permute import batch_ids
from service.masking.params import MaskingParams
from service.data.tokenization import load_tokenizer, prepare

from .conftest import ServerThread

CT = "application/vnd.safetensors"
PROBLEM = "urn:maskserve:problem:"
SEQ_LEN = 64


def uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def make_dataset(client: Client, tokenizer: str, corpus: list[str], docs: int = 100) -> tuple[str, int]:
    name = uid("ds")
    client.create_dataset(name, tokenizer=tokenizer, seq_len=SEQ_LEN, packing="doc")
    client.ingest(name, corpus[:docs])
    n = client.dataset(name)["num_sequences"]
    assert n > 100
    return name, n


def job_body(name: str, dataset: str, **kw: Any) -> dict[str, Any]:
    body = {"name": name, "dataset": dataset, "batch_size": 16, "seed": 3, "shuffle": True, "epochs": 1,
            "drop_last": False, "lease_timeout_s": 60.0, "epoch_boundary": "handout", "masking": {}}  # fmt: skip
    body.update(kw)
    return body


@dataclass
class Leased:
    epoch: int
    index: int
    lease: str
    expires_ms: int
    redelivered: bool
    arrays: dict[str, np.ndarray]
    metadata: dict[str, str]
    acks: list[str] = field(default_factory=list)

    @property
    def key(self) -> tuple[int, int]:
        return self.epoch, self.index

    @property
    def ids(self) -> list[int]:
        return self.arrays["sequence_ids"].tolist()


class Raw:
    """The job endpoints, called directly (no JobStream in between)."""

    def __init__(self, url: str) -> None:
        self.http = httpx.Client(base_url=url, timeout=30)

    def close(self) -> None:
        self.http.close()

    def create(self, body: dict[str, Any]) -> httpx.Response:
        return self.http.post("/v1/jobs", json=body)

    def next(self, job: str, worker: str = "w", acks: list[str] | tuple[str, ...] = ()) -> Leased | httpx.Response:
        """A lease, or the response itself when it is not a 200 (204, 410, 404...)."""
        r = self.http.post(f"/v1/jobs/{job}/next", params={"worker": worker}, headers={"Accept": CT},
                           json={"acks": list(acks)} if acks else None)  # fmt: skip
        if r.status_code != 200:
            return r
        arrays, meta = decode(r.content)
        h = r.headers
        assert meta["lease"] == h["maskserve-lease"] and meta["job"] == h["maskserve-job"] == job
        assert int(meta["epoch"]) == int(h["maskserve-epoch"]) and int(meta["index"]) == int(h["maskserve-batch-index"])
        acks_hdr = h.get("maskserve-acks", "")
        return Leased(int(h["maskserve-epoch"]), int(h["maskserve-batch-index"]), h["maskserve-lease"],
                      int(h["maskserve-lease-expires-ms"]), h["maskserve-redelivered"] == "1", arrays, meta,
                      acks_hdr.split(",") if acks_hdr else [])  # fmt: skip

    def lease(self, job: str, worker: str = "w", acks: list[str] | tuple[str, ...] = ()) -> Leased:
        out = self.next(job, worker, acks)
        assert isinstance(out, Leased), f"expected a batch, got {out.status_code}: {out.text}"
        return out

    def lease_when_ready(self, job: str, worker: str = "w", timeout: float = 30) -> Leased:
        """Lease, waiting out 204s as the service advises."""
        deadline = time.monotonic() + timeout
        while True:
            out = self.next(job, worker)
            if isinstance(out, Leased):
                return out
            assert out.status_code == 204, out.text
            assert time.monotonic() < deadline, "no batch became available"
            time.sleep(int(out.headers["maskserve-retry-after-ms"]) / 1000)

    def ack(self, job: str, leases: list[str], worker: str = "w") -> list[str]:
        r = self.http.post(f"/v1/jobs/{job}/ack", json={"worker": worker, "leases": leases})
        assert r.status_code == 200, r.text
        return r.json()["results"]

    def release(self, job: str, leases: list[str], worker: str = "w") -> int:
        r = self.http.post(f"/v1/jobs/{job}/release", json={"worker": worker, "leases": leases})
        assert r.status_code == 200, r.text
        return r.json()["released"]

    def progress(self, job: str) -> dict[str, Any]:
        r = self.http.get(f"/v1/jobs/{job}")
        assert r.status_code == 200, r.text
        return r.json()


@pytest.fixture
def raw(service_url: str):
    r = Raw(service_url)
    yield r
    r.close()


@pytest.fixture
def ds(client: Client, bpe_tokenizer: str, corpus: list[str]) -> tuple[str, int]:
    return make_dataset(client, bpe_tokenizer, corpus)


def drain(raw: Raw, job: str, worker: str = "w") -> dict[tuple[int, int], Leased]:
    """Lease and ack every batch of a finite job with one worker; (epoch, index) -> batch."""
    got: dict[tuple[int, int], Leased] = {}
    acks: list[str] = []
    deadline = time.monotonic() + 60
    while True:
        assert time.monotonic() < deadline, "job did not finish"
        out = raw.next(job, worker, acks)
        if isinstance(out, Leased):
            assert out.key not in got, f"batch {out.key} handed out twice"
            got[out.key] = out
            acks = [out.lease]
            continue
        if out.status_code == 410:
            assert out.json()["type"] == PROBLEM + "job-finished"
            return got
        assert out.status_code == 204, out.text
        acks = []
        time.sleep(int(out.headers["maskserve-retry-after-ms"]) / 1000)


def assert_problem(r: httpx.Response, status: int, kind: str) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    body = r.json()
    assert body["type"] == PROBLEM + kind
    return body


# ---- create / attach / errors ----------------------------------------------------


def test_create_is_idempotent_and_other_configs_conflict(raw: Raw, client: Client, ds):
    name, n = ds
    job = uid("job")
    r = raw.create(job_body(job, name))
    assert r.status_code == 201, r.text
    first = r.json()
    assert first["status"] == "active" and first["epoch"] == 0 and first["acked"] == 0
    assert first["batches_per_epoch"] == -(-n // 16) and first["sequences_per_epoch"] == n

    again = raw.create(job_body(job, name))
    assert again.status_code == 200, again.text
    assert again.json()["config"] == first["config"]
    assert client.create_job(job, name, batch_size=16, seed=3)["name"] == job  # the client attaches too

    for other in ({"batch_size": 8}, {"seed": 4}, {"shuffle": False}, {"epochs": 2}, {"masking": {"mlm_probability": 0.3}},
                  {"lease_timeout_s": 5.0}, {"epoch_boundary": "ack"}, {"drop_last": True}):  # fmt: skip
        body = assert_problem(raw.create(job_body(job, name, **other)), 409, "job-conflict")
        assert body["job"] == job
    with pytest.raises(ConflictError) as err:
        client.create_job(job, name, batch_size=8, seed=3)
    assert err.value.type == PROBLEM + "job-conflict"

    assert raw.progress(job)["acked"] == 0  # the conflicting creates changed nothing


def test_a_conflict_names_each_differing_field_with_both_values(raw: Raw, client: Client, ds):
    name, _ = ds
    job = uid("job")
    assert raw.create(job_body(job, name, batch_size=64, epochs=10)).status_code == 201
    other = job_body(job, name, batch_size=32, epochs=1, masking={"mlm_probability": 0.3, "unit": "token"})
    body = assert_problem(raw.create(other), 409, "job-conflict")
    expected = [{"field": "batch_size", "job": 64, "requested": 32}, {"field": "epochs", "job": 10, "requested": 1},
                {"field": "masking.mlm_probability", "job": 0.15, "requested": 0.3}]  # fmt: skip
    assert body["conflicts"] == expected  # a masking option given at its default value is no difference
    assert "batch_size 64 (requested 32)" in body["detail"] and "epochs 10 (requested 1)" in body["detail"]
    with pytest.raises(JobConflict) as err:
        client.create_job(job, name, batch_size=32, seed=3, epochs=1, masking={"mlm_probability": 0.3})
    assert isinstance(err.value, ConflictError)
    assert err.value.conflicts == expected
    assert "batch_size: job 64, requested 32" in str(err.value)
    assert raw.progress(job)["config"]["batch_size"] == 64  # nothing changed


def test_same_name_on_another_dataset_conflicts(raw: Raw, client: Client, bpe_tokenizer, corpus):
    a, _ = make_dataset(client, bpe_tokenizer, corpus, docs=60)
    b, _ = make_dataset(client, bpe_tokenizer, corpus, docs=60)
    job = uid("job")
    assert raw.create(job_body(job, a)).status_code == 201
    body = assert_problem(raw.create(job_body(job, b)), 409, "job-conflict")
    assert body["conflicts"] == [{"field": "dataset", "job": a, "requested": b}]
    assert raw.progress(job)["dataset"] == a


def test_create_rejects_bad_input(raw: Raw, ds):
    name, n = ds
    assert raw.create(job_body(uid("job"), "no-such-dataset")).status_code == 404
    for bad in ({"batch_size": 0}, {"epochs": 0}, {"lease_timeout_s": 0}, {"epoch_boundary": "never"},
                {"name": "bad name!"}, {"masking": {"mlm_probability": 2}},
                {"lease_timeout_s": 1e-12}, {"epochs": 10**30}, {"masking": {"max_predictions": 2**63}},
                {"masking": {"max_predictions": 2**70, "count": "exact"}}):  # fmt: skip
        body = job_body(uid("job"), name)
        body.update(bad)
        r = raw.create(body)
        assert 400 <= r.status_code < 500, (bad, r.status_code, r.text)
    r = raw.create(job_body(uid("job"), name, batch_size=n + 1, drop_last=True))
    assert 400 <= r.status_code < 500, r.text  # no full batch at all
    assert raw.http.get("/v1/jobs").json() == {"jobs": []}  # nothing was created by any of them


def test_job_batch_size_is_limited_like_batches(raw: Raw, ds, settings):
    """The service's max_batch_size bounds a job's batches as it bounds GET /v1/datasets/{d}/batch."""
    name, n = ds
    limit = settings.max_batch_size
    r = raw.http.get(f"/v1/datasets/{name}/batch", params={"size": limit + 1})
    stateless = r.json()
    assert 400 <= r.status_code < 500 and stateless["type"] == PROBLEM + "limit-exceeded"
    r = raw.create(job_body(uid("job"), name, batch_size=limit + 1))
    assert r.status_code == stateless["status"], f"a job with batch_size {limit + 1} was accepted: {r.status_code}"
    assert r.json()["type"] == PROBLEM + "limit-exceeded"


def test_unknown_job_is_404_everywhere(raw: Raw, client: Client, ds):
    job = "no-such-job"
    assert_problem(raw.http.get(f"/v1/jobs/{job}"), 404, "job-not-found")
    assert_problem(raw.http.post(f"/v1/jobs/{job}/next", params={"worker": "w"}), 404, "job-not-found")
    assert_problem(raw.http.post(f"/v1/jobs/{job}/ack", json={"worker": "w", "leases": ["0:0:1:ab"]}), 404,
                   "job-not-found")  # fmt: skip
    assert_problem(raw.http.post(f"/v1/jobs/{job}/release", json={"leases": ["0:0:1:ab"]}), 404, "job-not-found")
    assert_problem(raw.http.post(f"/v1/jobs/{job}/cancel"), 404, "job-not-found")
    assert_problem(raw.http.delete(f"/v1/jobs/{job}"), 404, "job-not-found")
    with pytest.raises(NotFoundError):
        client.job_progress(job)
    with pytest.raises(NotFoundError):
        next(iter(client.job(job)))


# ---- epochs, permutations, coverage ----------------------------------------------------


def test_two_epochs_cover_every_sequence_once_per_epoch(raw: Raw, ds):
    name, n = ds
    job = uid("job")
    b = 16
    bpe = -(-n // b)
    assert n % b, "the dataset should leave a short last batch"
    assert raw.create(job_body(job, name, batch_size=b, epochs=2, seed=11)).status_code == 201
    got = drain(raw, job, worker="solo")

    assert sorted(got) == [(e, i) for e in range(2) for i in range(bpe)]
    orders = []
    for e in range(2):
        order = np.concatenate([got[(e, i)].arrays["sequence_ids"] for i in range(bpe)])
        assert len(order) == n and sorted(order.tolist()) == list(range(n)), f"epoch {e} is not a permutation"
        assert len(got[(e, bpe - 1)].ids) == n % b  # the short last batch is served
        for i in range(bpe):
            assert got[(e, i)].ids == batch_ids(11, e, n, b, i, True).tolist()
            assert got[(e, i)].arrays["input_ids"].shape == (len(got[(e, i)].ids), SEQ_LEN)
            assert not got[(e, i)].redelivered
        orders.append(order)
    assert (orders[0] != orders[1]).any(), "both epochs have the same order"
    assert (orders[0] != np.arange(n)).any(), "shuffle=True served dataset order"

    p = raw.progress(job)
    assert p["status"] == "done" and p["epoch"] == 1 and p["epochs"] == 2
    assert p["acked"] == p["handed_out"] == 2 * bpe
    assert p["leased"] == 0 and p["redelivered"] == 0 and p["late_acks"] == 0
    assert p["acked_per_epoch"] == {"0": bpe, "1": bpe}
    assert p["workers"]["solo"]["acked"] == 2 * bpe and p["workers"]["solo"]["handed"] == 2 * bpe
    assert p["workers"]["solo"]["acked_sequences"] == 2 * n
    out = raw.next(job, "late-comer")
    assert isinstance(out, httpx.Response)
    assert_problem(out, 410, "job-finished")


def test_same_seed_same_batches_other_seed_differs(client: Client, ds):
    name, n = ds
    cfg = {"dataset": name, "batch_size": 16, "epochs": 2, "seed": 5}
    runs = {}
    for job, seed in ((uid("a"), 5), (uid("b"), 5), (uid("c"), 6)):
        with client.job(job, create={**cfg, "seed": seed}, prefetch=1) as stream:
            runs[seed if seed not in runs else "again"] = {
                (bt.epoch, bt.index): {k: np.array(v) for k, v in bt.arrays.items()} for bt in stream
            }
    a, again, other = runs[5], runs["again"], runs[6]
    assert len(a) == 2 * -(-n // 16) and set(a) == set(again) == set(other)
    for key in a:
        for arr in ("sequence_ids", "input_ids", "labels", "attention_mask"):
            assert np.array_equal(a[key][arr], again[key][arr]), (key, arr)
    assert any(not np.array_equal(a[k]["sequence_ids"], other[k]["sequence_ids"]) for k in a)
    for e in range(2):  # every epoch of the other seed is still a permutation
        ids = np.concatenate([other[(e, i)]["sequence_ids"] for i in range(-(-n // 16))])
        assert sorted(ids.tolist()) == list(range(n))


def test_shuffle_off_serves_dataset_order(raw: Raw, ds):
    name, n = ds
    job = uid("job")
    assert raw.create(job_body(job, name, batch_size=16, epochs=2, shuffle=False)).status_code == 201
    got = drain(raw, job)
    bpe = -(-n // 16)
    for e in range(2):
        order = np.concatenate([got[(e, i)].arrays["sequence_ids"] for i in range(bpe)])
        assert order.tolist() == list(range(n))


def test_drop_last_drops_the_short_tail(raw: Raw, ds):
    name, n = ds
    job = uid("job")
    b = 16
    assert n % b
    assert raw.create(job_body(job, name, batch_size=b, epochs=2, drop_last=True, seed=9)).status_code == 201
    p = raw.progress(job)
    assert p["batches_per_epoch"] == n // b and p["sequences_per_epoch"] == n // b * b
    got = drain(raw, job)
    assert sorted(got) == [(e, i) for e in range(2) for i in range(n // b)]
    for e in range(2):
        ids = np.concatenate([got[(e, i)].arrays["sequence_ids"] for i in range(n // b)])
        assert len(ids) == n // b * b and len(set(ids.tolist())) == len(ids)
        assert all(len(got[(e, i)].ids) == b for i in range(n // b))
        full = batch_ids(9, e, n, n, 0, True)  # the whole epoch's permutation
        assert ids.tolist() == full[: n // b * b].tolist()  # the tail of the permutation is what is dropped
    assert raw.progress(job)["acked_per_epoch"] == {"0": n // b, "1": n // b}


# ---- acks, releases, redelivery --------------------------------------------------------


def test_ack_results_acked_duplicate_invalid_late(raw: Raw, ds):
    name, n = ds
    job = uid("job")
    assert raw.create(job_body(job, name, batch_size=64, lease_timeout_s=0.3)).status_code == 201
    a = raw.lease(job, "A")
    b = raw.lease(job, "B")
    assert (a.epoch, a.index, b.index) == (0, 0, 1)
    assert raw.ack(job, [a.lease], "A") == ["acked"]
    assert raw.ack(job, [a.lease], "A") == ["duplicate"]
    not_handed = f"0:{n // 64}:1:deadbeef"  # the last batch: never handed out yet
    assert raw.ack(job, ["garbage", "", "1:0:1:ab", not_handed, "0:999:1:ab"], "A") == ["invalid"] * 5

    # B's lease runs out; the batch is handed to C; B's late ack still counts once, C's is then a duplicate
    deadline = time.monotonic() + 30
    while True:
        c = raw.lease_when_ready(job, "C")
        if c.redelivered:
            break
        raw.ack(job, [c.lease], "C")
        assert time.monotonic() < deadline
    assert c.key == b.key and c.lease != b.lease
    assert c.expires_ms - 300 >= b.expires_ms  # handed out again only once the first lease had expired
    assert raw.ack(job, [b.lease], "B") == ["late"]
    assert raw.ack(job, [c.lease], "C") == ["duplicate"]
    p = raw.progress(job)
    assert p["late_acks"] == 1 and p["redelivered"] == 1 and p["acked_per_epoch"]["0"] == p["acked"]
    assert p["workers"]["B"]["acked"] == 1 and p["workers"]["C"]["redelivered"] == 1
    assert raw.ack(job, ["garbage"]) == ["invalid"]


def test_acks_piggyback_on_next(raw: Raw, ds):
    name, n = ds
    job = uid("job")
    assert raw.create(job_body(job, name, batch_size=64)).status_code == 201
    first = raw.lease(job)
    second = raw.lease(job, acks=[first.lease, "junk"])
    assert second.acks == ["acked", "invalid"]
    third = raw.lease(job, acks=[first.lease, second.lease])
    assert third.acks == ["duplicate", "acked"]
    assert raw.progress(job)["acked"] == 2


def test_release_makes_a_batch_leasable_again_at_once(raw: Raw, ds):
    name, n = ds
    job = uid("job")
    assert raw.create(job_body(job, name, batch_size=16, lease_timeout_s=60)).status_code == 201
    a = raw.lease(job, "A")
    assert raw.release(job, ["0:0:1:not-the-lease", "junk"]) == 0  # only the holder's lease id releases
    assert raw.release(job, [a.lease], "A") == 1
    again = raw.lease(job, "B")
    assert again.key == a.key and again.redelivered and again.lease != a.lease
    for k in a.arrays:
        assert np.array_equal(a.arrays[k], again.arrays[k]), k
    assert raw.release(job, [a.lease], "A") == 0  # an old lease id no longer releases anything
    assert raw.ack(job, [again.lease], "B") == ["acked"]
    assert raw.release(job, [again.lease], "B") == 0  # nor does an acked one
    nxt = raw.lease(job, "B")
    assert nxt.key == (0, 1) and not nxt.redelivered
    p = raw.progress(job)
    assert p["redelivered"] == 1 and p["leased"] == 1 and p["acked"] == 1


def test_redelivered_batch_is_identical_and_masks_are_recomputable(raw: Raw, client: Client, bpe_tokenizer, corpus):
    name, n = make_dataset(client, bpe_tokenizer, corpus, docs=60)
    job = uid("job")
    b, seed = 64, 42
    masking = {"mlm_probability": 0.3, "mask_ratio": 0.6, "random_ratio": 0.3}
    assert raw.create(job_body(job, name, batch_size=b, lease_timeout_s=0.4, seed=seed, masking=masking)).status_code == 201
    first = raw.lease(job, "dies")
    deadline = time.monotonic() + 30
    while True:  # another worker takes the other batches, then the expired one
        out = raw.next(job, "lives")
        assert time.monotonic() < deadline, "the expired lease was never handed out again"
        if isinstance(out, Leased) and out.redelivered:
            break
        if isinstance(out, Leased):
            raw.ack(job, [out.lease], "lives")
        else:
            assert out.status_code == 204 and int(out.headers["maskserve-retry-after-ms"]) > 0
            time.sleep(int(out.headers["maskserve-retry-after-ms"]) / 1000)
    again = out
    assert again.key == first.key == (0, 0)
    assert set(again.arrays) == set(first.arrays)
    for k in first.arrays:
        assert first.arrays[k].dtype == again.arrays[k].dtype
        assert first.arrays[k].tobytes() == again.arrays[k].tobytes(), k
    assert {k: v for k, v in again.metadata.items() if k != "lease"} == \
        {k: v for k, v in first.metadata.items() if k != "lease"}  # fmt: skip

    # recompute: the batch's sequences from the permutation, its masks from masking.mask_batch
    seq = batch_ids(seed, 0, n, b, 0, True)
    assert first.ids == seq.tolist()
    labels, masked_ids, attn = first.arrays["labels"], first.arrays["input_ids"], first.arrays["attention_mask"]
    original = np.where(labels != -100, labels, masked_ids).astype(np.int32)
    info = prepare(load_tokenizer(bpe_tokenizer))
    vocab = Vocab.build(info.vocab_size, info.all_special_ids, info.special_ids["mask"], info.special_ids["pad"])
    m = mask_batch(original, attn.sum(axis=1).astype(np.int64), seq, seed=seed, epoch=0,
                   spec=MaskingParams(**masking).spec(), vocab=vocab)  # fmt: skip
    assert (labels != -100).sum() > 0.2 * attn.sum()  # a real mask, not an empty one
    assert np.array_equal(m.labels, labels)
    assert np.array_equal(m.input_ids, masked_ids)
    assert np.array_equal(m.attention_mask, attn)


# ---- cancel, unbounded epochs, epoch boundaries ------------------------------------------


def test_cancel_ends_the_job(raw: Raw, client: Client, ds):
    name, n = ds
    job = uid("job")
    stream = client.job(job, create={"dataset": name, "batch_size": 16, "epochs": None}, prefetch=2)
    first = next(stream)
    assert first.epoch == 0
    p = client.cancel_job(job)
    assert p["status"] == "cancelled"
    assert_problem(raw.http.post(f"/v1/jobs/{job}/next", params={"worker": "x"}), 410, "job-finished")
    given = 1
    with pytest.raises(JobCancelled):  # not a plain end: a finished job would just stop the iteration
        for _ in range(10):
            next(stream)  # batches leased before the cancel may still come
            given += 1
    stream.close()
    assert stream.acked == given and client.job_progress(job)["acked"] == given  # each batch it was given counts
    assert client.cancel_job(job)["status"] == "cancelled"  # cancelling again is harmless
    assert client.job_progress(job)["status"] == "cancelled"


def test_unbounded_epochs_run_past_epoch_one(raw: Raw, ds):
    name, n = ds
    job = uid("job")
    r = raw.create(job_body(job, name, batch_size=128, epochs=None))
    assert r.status_code == 201 and r.json()["epochs"] is None
    bpe = -(-n // 128)
    acks: list[str] = []
    seen: Counter[int] = Counter()
    while len(seen) < 4:
        got = raw.lease(job, acks=acks)
        seen[got.epoch] += 1
        acks = [got.lease]
    assert raw.ack(job, acks) == ["acked"]
    assert [seen[e] for e in range(3)] == [bpe] * 3 and seen[3] == 1
    p = raw.progress(job)
    assert p["status"] == "active" and p["epoch"] == 3 and p["epochs"] is None
    assert p["acked_per_epoch"] == {"0": bpe, "1": bpe, "2": bpe, "3": 1}


@pytest.mark.parametrize("boundary", ["ack", "handout"])
def test_epoch_boundary(raw: Raw, ds, boundary: str):
    name, n = ds
    job = uid("job")
    b = -(-n // 3)  # three batches per epoch
    assert raw.create(job_body(job, name, batch_size=b, epochs=2, epoch_boundary=boundary)).status_code == 201
    epoch0 = [raw.lease(job, f"w{i}") for i in range(3)]
    assert [x.key for x in epoch0] == [(0, 0), (0, 1), (0, 2)]
    if boundary == "handout":  # epoch 1 starts as soon as epoch 0 is handed out
        assert raw.lease(job, "w9").key == (1, 0)
        return
    for pending in (epoch0, epoch0[1:], epoch0[2:]):
        out = raw.next(job, "w9")
        assert isinstance(out, httpx.Response) and out.status_code == 204, "epoch 1 started before epoch 0 was acked"
        assert int(out.headers["maskserve-retry-after-ms"]) > 0
        assert raw.progress(job)["epoch"] == 0
        assert raw.ack(job, [pending[0].lease], f"w{3 - len(pending)}") == ["acked"]
    nxt = raw.lease(job, "w9")
    assert nxt.key == (1, 0)
    assert raw.progress(job)["acked_per_epoch"] == {"0": 3}


# ---- delete ----------------------------------------------------------------------


def _job_keys(rdb) -> list[bytes]:
    return sorted(k for k in rdb.keys("*") if b":job" in k)


def _busy_job(raw: Raw, name: str, n: int) -> str:
    """A two-epoch job with acks in both epochs and leases outstanding."""
    job = uid("job")
    assert raw.create(job_body(job, name, batch_size=-(-n // 3), epochs=2)).status_code == 201
    leases = [raw.lease(job, "w") for i in range(5)]
    assert raw.ack(job, [leases[0].lease, leases[3].lease], "w") == ["acked", "acked"]
    assert leases[3].epoch == 1
    return job


def test_delete_job_leaves_no_keys(raw: Raw, client: Client, ds, rdb):
    name, n = ds
    before = set(rdb.keys("*"))
    job = _busy_job(raw, name, n)
    keep = _busy_job(raw, name, n)
    assert any(job.encode() in k for k in rdb.keys("*"))
    client.delete_job(job)
    assert not [k for k in rdb.keys("*") if job.encode() in k]
    assert rdb.smembers(f"ms:ds:{{{name}}}:jobs") == {keep.encode()}  # no longer listed with its dataset
    assert_problem(raw.http.get(f"/v1/jobs/{job}"), 404, "job-not-found")
    assert_problem(raw.http.post(f"/v1/jobs/{job}/next"), 404, "job-not-found")
    assert_problem(raw.http.delete(f"/v1/jobs/{job}"), 404, "job-not-found")
    assert raw.progress(keep)["acked"] == 2  # the other job is untouched
    client.delete_job(keep)
    assert set(rdb.keys("*")) == before  # exactly the dataset's keys are left
    assert not _job_keys(rdb)
    assert client.dataset(name)["num_sequences"] == n


def test_delete_dataset_removes_its_jobs(raw: Raw, client: Client, bpe_tokenizer, corpus, rdb):
    name, n = make_dataset(client, bpe_tokenizer, corpus, docs=60)
    other, m = make_dataset(client, bpe_tokenizer, corpus, docs=60)
    jobs = [_busy_job(raw, name, n), _busy_job(raw, name, n)]
    survivor = _busy_job(raw, other, m)
    uid = client.dataset(name)["uid"] if "uid" in client.dataset(name) else rdb.hget(f"ms:ds:{{{name}}}:meta", "uid")
    client.delete_dataset(name)
    gone = (name.encode(), uid if isinstance(uid, bytes) else uid.encode(), *(j.encode() for j in jobs))
    left = [k for k in rdb.keys("*") if any(g in k for g in gone)]  # chunk keys carry the dataset's uid
    assert not left, left
    assert rdb.smembers(f"ms:ds:{{{other}}}:jobs") == {survivor.encode()}
    assert raw.progress(survivor)["name"] == survivor
    for job in jobs:
        assert_problem(raw.http.get(f"/v1/jobs/{job}"), 404, "job-not-found")
        assert_problem(raw.http.post(f"/v1/jobs/{job}/next"), 404, "job-not-found")
    assert raw.progress(survivor)["acked"] == 2
    client.delete_dataset(other)
    assert rdb.keys("*") == []  # nothing of either dataset or any of their jobs is left


def test_recreated_job_on_a_recreated_dataset_serves_the_new_data(raw: Raw, client: Client, bpe_tokenizer, corpus):
    """A job re-created under the same name and config, on a dataset that was
    deleted and re-created with more sequences, covers the new dataset."""
    name = uid("ds")
    job = uid("job")
    client.create_dataset(name, tokenizer=bpe_tokenizer, seq_len=SEQ_LEN, packing="doc")
    client.ingest(name, corpus[:40])
    small = client.dataset(name)["num_sequences"]
    assert raw.create(job_body(job, name, batch_size=16)).status_code == 201
    raw.lease(job)  # the service has now served this job once
    client.delete_dataset(name)
    client.create_dataset(name, tokenizer=bpe_tokenizer, seq_len=SEQ_LEN, packing="doc")
    client.ingest(name, corpus[:120])
    n = client.dataset(name)["num_sequences"]
    assert n > small
    assert raw.create(job_body(job, name, batch_size=16)).status_code == 201
    assert raw.progress(job)["sequences_per_epoch"] == n
    got = drain(raw, job)
    ids = sorted(i for bt in got.values() for i in bt.ids)
    assert ids == list(range(n)), f"served {len(ids)} of {n} sequences"


def test_replicas_agree_on_a_job_recreated_elsewhere(raw: Raw, client: Client, settings, bpe_tokenizer, corpus):
    """Replica 2 served job J on dataset A; J is then deleted and re-created on dataset B through
    replica 1. Replica 2 must act on the new J: ack, release, cancel and delete reach it."""
    a, _ = make_dataset(client, bpe_tokenizer, corpus, docs=40)
    b, _ = make_dataset(client, bpe_tokenizer, corpus, docs=40)
    job = uid("job")
    with ServerThread(settings) as replica:
        r2 = Raw(replica.url)
        try:
            assert raw.create(job_body(job, a)).status_code == 201
            old = r2.lease(job, "w2")
            assert r2.ack(job, [old.lease], "w2") == ["acked"]
            client.delete_job(job)  # through replica 1
            assert raw.create(job_body(job, b)).status_code == 201
            assert raw.progress(job)["dataset"] == b

            first, second = raw.lease(job, "w1"), raw.lease(job, "w1")
            wrong = []
            r = r2.http.post(f"/v1/jobs/{job}/ack", json={"worker": "w1", "leases": [first.lease]})
            if r.status_code != 200 or r.json()["results"] != ["acked"]:
                wrong.append(f"ack: {r.status_code} {r.text}")
            r = r2.http.post(f"/v1/jobs/{job}/release", json={"worker": "w1", "leases": [second.lease]})
            if r.status_code != 200 or r.json()["released"] != 1:
                wrong.append(f"release: {r.status_code} {r.text}")
            r = r2.http.post(f"/v1/jobs/{job}/cancel")
            if r.status_code != 200 or raw.progress(job)["status"] != "cancelled":
                wrong.append(f"cancel: {r.status_code}, job status {raw.progress(job)['status']!r}")
            assert not wrong, "replica 2 acted on the deleted job: " + "; ".join(wrong)
            assert raw.progress(job)["acked"] == 1
            assert r2.http.delete(f"/v1/jobs/{job}").status_code == 204
            assert raw.http.get(f"/v1/jobs/{job}").status_code == 404
        finally:
            r2.close()


# ---- concurrency -------------------------------------------------------------------


def test_sixteen_threads_race_next_and_ack(raw: Raw, service_url: str, ds):
    """16 threads lease and ack (some abandon a lease, some ack late); no live
    lease is ever handed out twice and every batch is acked exactly once."""
    name, n = ds
    job = uid("job")
    b, epochs, lease_ms = 8, 2, 400
    bpe = -(-n // b)
    assert raw.create(job_body(job, name, batch_size=b, epochs=epochs, lease_timeout_s=lease_ms / 1000)).status_code == 201

    lock = threading.Lock()
    expiries: dict[tuple[int, int], list[int]] = {}  # (epoch, index) -> lease expiries (ms, service clock)
    handed: Counter[tuple[int, int]] = Counter()
    results: Counter[str] = Counter()
    counted: Counter[tuple[int, int]] = Counter()  # acks that counted ('acked' or 'late')
    ids_per_epoch: dict[int, list[int]] = {e: [] for e in range(epochs)}
    errors: list[str] = []

    def record(batch: Leased, outcome: str) -> None:
        results[outcome] += 1
        if outcome in ("acked", "late"):
            counted[batch.key] += 1
            ids_per_epoch[batch.epoch].extend(batch.ids)

    def worker(k: int) -> None:
        rng = np.random.default_rng(k)
        w = Raw(service_url)
        me = f"t{k}"
        piggy: list[Leased] = []
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                out = w.next(job, me, [x.lease for x in piggy])
                if isinstance(out, httpx.Response):
                    if out.status_code == 410:
                        with lock:
                            for x, res in zip(piggy, out.json().get("acks", []) or [], strict=False):
                                record(x, res)
                        return
                    assert out.status_code == 204, out.text
                    with lock:
                        for x, res in zip(piggy, (out.headers.get("maskserve-acks") or "").split(","), strict=False):
                            if res:
                                record(x, res)
                    piggy = []
                    time.sleep(min(int(out.headers["maskserve-retry-after-ms"]), 50) / 1000)
                    continue
                with lock:
                    for x, res in zip(piggy, out.acks, strict=True):
                        record(x, res)
                    piggy = []
                    handed[out.key] += 1
                    expiries.setdefault(out.key, []).append(out.expires_ms)
                r = rng.random()
                if r < 0.05:
                    continue  # abandon the lease: it must expire and go to someone else
                if r < 0.10:
                    time.sleep((lease_ms + 50) / 1000)  # ack after the lease ran out: late or duplicate
                if r < 0.55:
                    res = w.ack(job, [out.lease], me)
                    with lock:
                        record(out, res[0])
                else:
                    piggy = [out]
            errors.append(f"{me} ran out of time")
        except Exception as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(f"{me}: {exc!r}")
        finally:
            w.close()

    ghost = raw.lease(job, "ghost")  # leased and never acked: it must expire and go to a thread
    expiries[ghost.key] = [ghost.expires_ms]
    handed[ghost.key] += 1
    threads = [threading.Thread(target=worker, args=(k,)) for k in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    assert not any(t.is_alive() for t in threads)
    assert not errors, errors[:5]

    keys = {(e, i) for e in range(epochs) for i in range(bpe)}
    for key, ends in expiries.items():  # a lease is granted at expiry - lease_ms: never before the last one ended
        ends.sort()
        overlaps = [(a, b) for a, b in zip(ends, ends[1:]) if b - lease_ms < a]
        assert not overlaps, f"batch {key} was leased again while a lease was live: {overlaps}"
    assert set(counted) == keys and set(counted.values()) == {1}, "some batch counted twice or never"
    for e in range(epochs):
        assert sorted(ids_per_epoch[e]) == list(range(n))
    p = raw.progress(job)
    assert p["status"] == "done"
    assert p["acked"] == epochs * bpe and p["acked_per_epoch"] == {str(e): bpe for e in range(epochs)}
    assert p["handed_out"] == sum(handed.values()) and p["redelivered"] == p["handed_out"] - epochs * bpe
    assert p["redelivered"] >= 1 and handed[ghost.key] >= 2
    assert p["late_acks"] == results["late"]
    assert results["invalid"] == 0
    assert sum(w.get("acked", 0) for w in p["workers"].values()) == epochs * bpe


# ---- the client's JobStream --------------------------------------------------------


def test_job_stream_acks_on_next_and_gives_back_unused_leases(client: Client, ds):
    name, n = ds
    job = uid("job")
    bpe = -(-n // 16)
    seen: list[tuple[int, int]] = []
    stream = client.job(job, create={"dataset": name, "batch_size": 16}, worker="first", prefetch=3)
    for bt in stream:
        seen.append((bt.epoch, bt.index))
        if len(seen) == 5:
            break
    poll_until(lambda: client.job_progress(job)["handed_out"] > 5, "the stream to prefetch")
    stream.close()  # acks the 5 batches it handed out (trained); gives back the prefetched ones
    p = client.job_progress(job)
    given_back = p["handed_out"] - 5
    assert p["acked"] == 5 and given_back >= 1 and p["leased"] == given_back
    deadline = time.monotonic() + 60
    with client.job(job, worker="second", prefetch=1) as rest:
        for bt in rest:
            seen.append((bt.epoch, bt.index))
            assert time.monotonic() < deadline
    p = client.job_progress(job)
    assert p["status"] == "done" and p["acked"] == bpe
    assert p["workers"]["first"]["acked"] == 5 and p["workers"]["second"]["acked"] == bpe - 5
    assert seen[:5] == [(0, i) for i in range(5)]  # one worker alone gets its batches in order
    assert seen[5 : 5 + given_back] == [(0, 5 + i) for i in range(given_back)]  # given back: served again at once
    assert p["redelivered"] == given_back
    assert sorted(seen) == [(0, i) for i in range(bpe)]  # nothing trained twice


def test_job_stream_prefetch_does_not_wait_for_its_own_leases(raw: Raw, client: Client, ds):
    """A prefetch request that found nothing to hand out must not hold up a batch that a later request
    of the same stream already leased: the stream would wait for its own lease to expire, then yield
    that batch twice."""
    name, n = ds
    lease_s = 30.0  # long: the stream must not wait for it (were it to, the test would take this long and fail)
    job = uid("job")
    client.create_job(job, name, batch_size=-(-n // 3), lease_timeout_s=lease_s)  # three batches
    other = raw.lease(job, "other")  # batch 0 is held elsewhere for now
    t0 = time.monotonic()
    with client.job(job, worker="me", prefetch=2) as stream:
        seen = [next(stream), next(stream)]  # batches 1 and 2; asking for the 2nd acks the 1st
        # that ack rode on a third lease request, which found nothing free (204) and now waits
        poll_until(lambda: client.job_progress(job)["acked"] == 1, "the first ack")
        released = raw.release(job, [other.lease], "other")  # batch 0 is free again
        seen += list(stream)
    took = time.monotonic() - t0
    keys = [(bt.epoch, bt.index) for bt in seen]
    p = client.job_progress(job)
    assert sorted(keys) == [(0, 0), (0, 1), (0, 2)], f"yielded {keys} in {took:.1f}s"
    assert p["status"] == "done" and p["redelivered"] == 1  # only the release, no expired lease
    assert took < lease_s, f"the stream waited {took:.1f}s for its own lease to expire"
    assert released == 1


def poll_until(cond, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def test_job_batches_dataset_covers_the_epoch_once(client, bpe_tokenizer, corpus, service_url):
    """The torch IterableDataset over a job: one epoch, every sequence exactly once, job done after."""
    import torch
    from torch.utils.data import DataLoader

    from client.torch import JobBatches

    client.create_dataset("jb", tokenizer=bpe_tokenizer, seq_len=64, packing="doc")
    n = client.ingest("jb", corpus[:120])["sequences"]
    ds = JobBatches(service_url, "jb-job", create={"dataset": "jb", "batch_size": 16, "epochs": 1, "seed": 3},
                    metadata=True)
    seen = []
    for item in DataLoader(ds, batch_size=None):
        assert item["input_ids"].dtype == torch.int64 and item["input_ids"].shape[1] == 64
        assert int(item["epoch"]) == 0
        seen += item["sequence_ids"].tolist()
    assert sorted(seen) == list(range(n))
    progress = client.job_progress("jb-job")
    assert progress["status"] == "done" and progress["acked"] == progress["batches_per_epoch"]


def test_listing_jobs_reads_their_progress_in_a_few_round_trips(client, service_url, bpe_tokenizer, corpus, monkeypatch):
    """GET /v1/jobs answers what GET /v1/jobs/{name} answers for each job, in a number of Redis round trips
    that does not grow with the number of jobs."""
    from redis.asyncio.connection import Connection

    ds, _ = make_dataset(client, bpe_tokenizer, corpus)
    names = [uid("listed") for _ in range(12)]
    for i, name in enumerate(names):
        client.create_job(name, ds, batch_size=8, seed=i)
    with client.job(names[3], worker="w") as stream:
        next(iter(stream))
    trips = Counter()
    send = Connection.send_packed_command

    async def counted(self, command, check_health=True):  # noqa: ANN001
        trips["sent"] += 1
        return await send(self, command, check_health)

    monkeypatch.setattr(Connection, "send_packed_command", counted)
    listed = {j["name"]: j for j in httpx.get(f"{service_url}/v1/jobs").json()["jobs"]}
    monkeypatch.undo()
    assert set(names) <= set(listed)
    assert trips["sent"] <= 6, trips  # dataset names, their job lists, the owners, the progress
    for name in names:
        one = httpx.get(f"{service_url}/v1/jobs/{name}").json()
        for field_ in ("status", "config", "epoch", "handed_out", "acked", "leased", "workers", "acked_per_epoch"):
            assert listed[name][field_] == one[field_], (name, field_)
    assert listed[names[3]]["acked"] == 1 and listed[names[3]]["workers"]["w"]["acked"] == 1


# ---- jobs in Prometheus ------------------------------------------------------------------------


def _job_series(service_url: str) -> dict[tuple[str, str], float]:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{service_url}/metrics").text
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name.startswith("maskserve_job"):
                out[(s.name, s.labels.get("job") or s.labels.get("status"))] = s.value
    return out


def _worker_series(service_url: str, job: str) -> dict[str, dict[str, float]]:
    """``maskserve_job_worker_*`` of ``job``: series name -> worker -> value."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, dict[str, float]] = {}
    for family in text_string_to_metric_families(httpx.get(f"{service_url}/metrics").text):
        for s in family.samples:
            if s.name.startswith("maskserve_job_worker_") and s.labels.get("job") == job:
                out.setdefault(s.name, {})[s.labels["worker"]] = s.value
    return out


def test_metrics_report_each_jobs_progress(client, service_url, bpe_tokenizer, corpus):
    name, _ = make_dataset(client, bpe_tokenizer, corpus, docs=40)
    job = uid("prom")
    client.create_job(job, name, batch_size=4, epochs=1, lease_timeout_s=60)
    leases = []
    for _ in range(3):
        r = httpx.post(f"{service_url}/v1/jobs/{job}/next", params={"worker": "w1"})
        assert r.status_code == 200, r.text
        leases.append(r.headers["maskserve-lease"])
    r = httpx.post(f"{service_url}/v1/jobs/{job}/ack", json={"worker": "w1", "leases": leases[:2]})
    assert r.json()["results"] == ["acked", "acked"]  # two acked, one held
    series, p = _job_series(service_url), client.job_progress(job)
    assert p["acked"] == 2 and p["leased"] == 1
    for metric, key in (("acked_batches", "acked"), ("leased_batches", "leased"), ("epoch", "epoch"),
                        ("next_batch", "next_batch"), ("batches_per_epoch", "batches_per_epoch"),
                        ("redelivered_batches", "redelivered"), ("late_acks", "late_acks")):  # fmt: skip
        assert series[(f"maskserve_job_{metric}", job)] == p[key], metric
    assert series[("maskserve_job_workers", job)] == 1 and series[("maskserve_job_active", job)] == 1
    assert series[("maskserve_jobs", "active")] >= 1
    client.cancel_job(job)
    assert _job_series(service_url)[("maskserve_job_active", job)] == 0


def test_metrics_report_at_most_the_configured_jobs_active_first():
    from service.http.metrics import job_exposition

    def progress(name: str, status: str) -> dict[str, Any]:
        return {"name": name, "dataset": "d", "status": status, "epoch": 0, "next_batch": 0, "batches_per_epoch": 1,
                "acked": 0, "leased": 0, "redelivered": 0, "late_acks": 0, "workers": {}, "sequences_per_s": 0.0}

    jobs = [progress("a", "done"), progress("b", "active"), progress("c", "cancelled"), progress("d", "active")]
    text = job_exposition(jobs, 2).decode()
    shown = {line.split('job="')[1].split('"')[0] for line in text.splitlines() if line.startswith("maskserve_job_epoch{")}
    assert shown == {"b", "d"}  # the limit keeps the active ones
    assert 'maskserve_jobs{status="done"} 1.0' in text and 'maskserve_jobs{status="active"} 2.0' in text


def test_metrics_count_what_ingest_and_static_builds_stored(client, service_url, bpe_tokenizer, corpus):
    from prometheus_client.parser import text_string_to_metric_families

    def series(dataset: str) -> dict[str, float]:
        text = httpx.get(f"{service_url}/metrics").text
        return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples
                if s.labels.get("dataset") == dataset}  # fmt: skip

    name, _ = make_dataset(client, bpe_tokenizer, corpus, docs=40)
    info = client.dataset(name)
    got = series(name)
    assert got["maskserve_bytes_stored_total"] == info["bytes"]
    assert got["maskserve_tokens_ingested_total"] > 0 and got["maskserve_documents_ingested_total"] == 40
    client.build_static_masks(name, seed=1, copies=2)
    assert series(name)["maskserve_static_mask_chunks_built_total"] == info["num_chunks"]


def test_metrics_time_each_stage_of_a_batch(client, service_url, bpe_tokenizer, corpus):
    from prometheus_client.parser import text_string_to_metric_families

    def counts() -> dict[str, float]:
        text = httpx.get(f"{service_url}/metrics").text
        return {s.labels["stage"]: s.value for f in text_string_to_metric_families(text) for s in f.samples
                if s.name == "maskserve_batch_stage_seconds_count"}  # fmt: skip

    name, _ = make_dataset(client, bpe_tokenizer, corpus, docs=40)
    client.batch(name, 4, seed=0)  # the dataset is known to the process from here on
    before = counts()
    client.batch(name, 4, seed=1)
    job = uid("stages")
    client.create_job(job, name, batch_size=4, epochs=1)
    r = httpx.post(f"{service_url}/v1/jobs/{job}/next", params={"worker": "w"})
    assert r.status_code == 200
    after = counts()
    assert {stage: after[stage] - before.get(stage, 0) for stage in ("fetch", "mask", "encode")} == \
        {"fetch": 2, "mask": 2, "encode": 2}  # fmt: skip


# ---- input-boundness: workers' summaries ------------------------------------------------------------


def _next_with(service_url: str, job: str, worker: str, **stats: float) -> None:
    r = httpx.post(f"{service_url}/v1/jobs/{job}/next", params={"worker": worker}, json={"stats": stats})
    assert r.status_code == 200, r.text


def test_progress_flags_input_bound_workers_and_stragglers(client, service_url, bpe_tokenizer, corpus):
    name, _ = make_dataset(client, bpe_tokenizer, corpus, docs=60)
    job = uid("bound")
    client.create_job(job, name, batch_size=2, epochs=1, lease_timeout_s=60)
    _next_with(service_url, job, "steady", batches=20, wait_s=0.2, step_s=9.8, leases=4, lease_s=0.2)  # waits 2%
    _next_with(service_url, job, "starved", batches=20, wait_s=6.0, step_s=4.0)  # 2 batches/s, waits 60%
    _next_with(service_url, job, "slow", batches=4, wait_s=0.1, step_s=9.9)  # 0.4 batches/s: a straggler
    p = client.job_progress(job)
    w = p["workers"]
    assert w["steady"]["data_wait_share"] == pytest.approx(0.02) and not w["steady"]["input_bound"]
    assert w["starved"]["data_wait_share"] == pytest.approx(0.6) and w["starved"]["input_bound"]
    assert w["starved"]["data_wait_s"] == pytest.approx(0.3) and w["starved"]["step_s"] == pytest.approx(0.2)
    assert w["slow"]["straggler"] and not w["steady"]["straggler"] and not w["starved"]["straggler"]
    assert p["input_bound_workers"] == ["starved"] and p["stragglers"] == ["slow"]
    assert w["steady"]["lease_rtt_s"] == pytest.approx(0.05) and "lease_rtt_s" not in w["starved"]  # none counted
    series = _job_series(service_url)
    assert series[("maskserve_job_input_bound_workers", job)] == 1 and series[("maskserve_job_stragglers", job)] == 1
    per_worker = _worker_series(service_url, job)
    assert per_worker["maskserve_job_worker_input_bound"] == {"steady": 0, "starved": 1, "slow": 0}
    assert per_worker["maskserve_job_worker_straggler"] == {"steady": 0, "starved": 0, "slow": 1}
    assert per_worker["maskserve_job_worker_data_wait_share"]["starved"] == pytest.approx(0.6)
    assert per_worker["maskserve_job_worker_lease_rtt_seconds"] == {"steady": pytest.approx(0.05)}
    _next_with(service_url, job, "starved", batches=10, wait_s=0.1, step_s=9.9)  # the latest summary counts
    assert client.job_progress(job)["input_bound_workers"] == []
    bad = httpx.post(f"{service_url}/v1/jobs/{job}/next", params={"worker": "x"},
                     json={"stats": {"batches": 0, "wait_s": -1, "step_s": 1}})  # fmt: skip
    assert bad.status_code == 422 and bad.headers["content-type"] == "application/problem+json"


def test_summaries_go_with_their_job(client, service_url, rdb, bpe_tokenizer, corpus):
    from service.store.jobkeys import JobKeys

    name, _ = make_dataset(client, bpe_tokenizer, corpus, docs=60)
    job = uid("gone")
    client.create_job(job, name, batch_size=2, epochs=1, lease_timeout_s=60)
    _next_with(service_url, job, "w", batches=3, wait_s=1, step_s=1)
    key = JobKeys("ms").stats(job)
    assert rdb.exists(key) and 0 < rdb.pttl(key)
    client.delete_job(job)
    assert not rdb.exists(key)


def test_a_job_stream_sends_its_consumers_wait_and_step(client, bpe_tokenizer, corpus):
    name, _ = make_dataset(client, bpe_tokenizer, corpus, docs=60)
    job = uid("stream")
    client.create_job(job, name, batch_size=2, epochs=1, lease_timeout_s=60)
    with client.job(job, worker="trainer", prefetch=1, stats_every=0) as stream:
        for k, _ in zip(range(6), stream):
            time.sleep(0.05)  # the training step
        p = client.job_progress(job)
    mine = p["workers"]["trainer"]
    assert mine["reported_batches"] >= 1 and mine["step_s"] >= 0.05  # the steps it took, as it measured them
    assert mine["lease_rtt_s"] > 0  # its lease requests' round trips, as it measured them
    assert 0 <= mine["data_wait_share"] < 1
