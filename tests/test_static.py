"""Static masking (docs/masking.md, "Static masks"): K masks per sequence cached in Redis.

Contract checked here, over real HTTP and a real Redis:

* copy c of sequence s is the dynamic mask of (seed, epoch=c, s), so static
  epoch e serves exactly what dynamic epoch e mod K serves, and e == e + K;
* at most K distinct masks per sequence are ever served;
* building is idempotent and resumable; new documents make the cache
  incomplete (409 ``static-masks-missing``) until a build adds the new chunks,
  and that build leaves the chunks already built alone;
* dropping a cache removes its keys, deleting the dataset removes every key;
* the cache's size is reported and is far below K copies of the token ids.

Statistical checks use 5 binomial standard errors (see test_conformance.py).
"""

from __future__ import annotations

import math
import uuid

import httpx
import numpy as np
import pytest

from client import decode
from service.masking.rng import sample_ids

SEQ_LEN = 128
K = 4
SIGMAS = 5.0
CT = "application/vnd.safetensors"
MISSING = "urn:maskserve:problem:static-masks-missing"


def within(observed: float, expected: float, n: int) -> bool:
    return abs(observed - expected) <= SIGMAS * math.sqrt(expected * (1 - expected) / n)


def _param(v):
    return ("true" if v else "false") if isinstance(v, bool) else v


def batch_response(http: httpx.Client, name: str, **params) -> httpx.Response:
    return http.get(f"/v1/datasets/{name}/batch", params={k: _param(v) for k, v in params.items() if v is not None})


def get_arrays(http: httpx.Client, name: str, **params) -> dict[str, np.ndarray]:
    r = batch_response(http, name, **params)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith(CT)
    return decode(r.content)[0]


def assert_same_arrays(a: dict[str, np.ndarray], b: dict[str, np.ndarray], what: str) -> None:
    assert sorted(a) == sorted(b), what
    for key in a:
        assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape, (what, key)
        assert a[key].tobytes() == b[key].tobytes(), f"{what}: {key} differs"


def assert_problem(r: httpx.Response, status: int, type_: str) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    body = r.json()
    assert body["type"] == type_, body
    return body


def snapshot(rdb) -> dict[bytes, tuple[bytes, object]]:
    """Every key of the test database with its type and full value."""
    out = {}
    for key in rdb.keys("*"):
        kind = rdb.type(key)
        if kind == b"string":
            value: object = rdb.get(key)
        elif kind == b"hash":
            value = rdb.hgetall(key)
        elif kind == b"set":
            value = rdb.smembers(key)
        elif kind == b"list":
            value = rdb.lrange(key, 0, -1)
        elif kind == b"zset":
            value = rdb.zrange(key, 0, -1, withscores=True)
        else:
            value = rdb.dump(key)
        out[key] = (kind, value)
    return out


def cache_keys(rdb, cache: str) -> list[bytes]:
    return sorted(k for k in rdb.keys(f"*{cache}*"))


def cache_strings(rdb, cache: str) -> dict[bytes, bytes]:
    """The cache's blobs (string keys whose name carries the cache id)."""
    return {k: rdb.get(k) for k in cache_keys(rdb, cache) if rdb.type(k) == b"string"}


@pytest.fixture
def http(service_url):
    with httpx.Client(base_url=service_url, timeout=60) as h:
        yield h


@pytest.fixture
def ds(client, bpe_tokenizer, corpus):
    """The first 300 documents (several chunks), byte-level BPE, complete packing."""
    name = f"st-{uuid.uuid4().hex[:12]}"
    client.create_dataset(name, tokenizer=bpe_tokenizer, seq_len=SEQ_LEN)
    client.ingest(name, corpus[:300])
    info = client.dataset(name)
    assert info["num_chunks"] >= 2 and info["id_dtype"] == "<u2"
    return info


CONFIGS = [
    dict(unit="token"),
    dict(unit="whole_word", mlm_probability=0.2),
    dict(unit="span", count="exact"),
    dict(unit="token", count="exact", max_predictions=10, random_tokens="frequency", mask_ratio=0.5, random_ratio=0.4),
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "-".join(str(v) for v in c.values()))
def test_static_epochs_cycle_with_period_k_and_equal_dynamic_epoch_mod_k(client, http, ds, config):
    name = ds["name"]
    seed = 1234
    status = client.build_static_masks(name, seed=seed, copies=K, **config)
    assert status["complete"] and status["built"] == status["chunks"] == ds["num_chunks"]
    assert status["copies"] == K and status["seed"] == seed

    common = dict(size=256, seed=seed, index=2, **config)
    static = [get_arrays(http, name, mode="static", copies=K, epoch=e, **common) for e in range(2 * K)]
    dynamic = [get_arrays(http, name, epoch=c, **common) for c in range(K)]
    for e in range(2 * K):
        # static epoch e is dynamic epoch e mod K, array for array
        assert_same_arrays(static[e], dynamic[e % K], f"static epoch {e} vs dynamic epoch {e % K}")
    for e in range(K):
        assert_same_arrays(static[e], static[e + K], f"static epochs {e} and {e + K}")
        for f in range(e + 1, K):
            assert not np.array_equal(static[e]["labels"], static[f]["labels"]), f"copies {e} and {f} are equal"

    # per sequence: at most K distinct masks over 2K epochs, exactly K for long ones
    seen: dict[int, set[bytes]] = {}
    lengths: dict[int, int] = {}
    for a in static:
        for i, s in enumerate(a["sequence_ids"].tolist()):
            seen.setdefault(s, set()).add(a["labels"][i].tobytes() + a["input_ids"][i].tobytes())
            lengths[s] = int(a["attention_mask"][i].sum())
    assert max(len(v) for v in seen.values()) <= K
    long = [s for s, n in lengths.items() if n >= 100]
    assert len(long) > 50
    assert all(len(seen[s]) == K for s in long), "a long sequence has fewer than K distinct static masks"


def test_static_batch_needs_its_own_cache(client, http, ds):
    name = ds["name"]
    params = dict(size=32, seed=5, index=0, mode="static", copies=K)
    assert_problem(batch_response(http, name, **params), 409, MISSING)
    client.build_static_masks(name, seed=5, copies=K)
    assert batch_response(http, name, **params).status_code == 200
    # another seed, another K, another config: other caches, not built
    for other in (dict(seed=6), dict(copies=K + 1), dict(unit="whole_word"), dict(mlm_probability=0.2)):
        assert_problem(batch_response(http, name, **{**params, **other}), 409, MISSING)


def test_build_is_idempotent(client, http, ds, rdb):
    name = ds["name"]
    first = client.build_static_masks(name, seed=3, copies=K, unit="span")
    get_arrays(http, name, size=64, seed=3, mode="static", copies=K, unit="span", epoch=1)
    before = snapshot(rdb)
    again = client.build_static_masks(name, seed=3, copies=K, unit="span")
    assert again == first
    after = snapshot(rdb)
    assert sorted(after) == sorted(before), "building again added or removed keys"
    changed = [k for k in before if before[k] != after[k]]
    assert not changed, f"building again rewrote {changed}"
    caches = client.static_masks(name)
    assert len(caches) == 1 and caches[0]["cache"] == first["cache"] and caches[0]["built"] == first["built"]


def test_new_documents_make_the_cache_incomplete_until_rebuilt(client, http, ds, rdb, corpus):
    name = ds["name"]
    seed, config = 21, dict(unit="whole_word", copies=K)
    # a build may be done in steps
    step = client.build_static_masks(name, seed=seed, max_chunks=1, **config)
    assert step["built"] == 1 and not step["complete"]
    done = client.build_static_masks(name, seed=seed, **config)
    assert done["complete"] and done["built"] == ds["num_chunks"]
    old_blobs = cache_strings(rdb, done["cache"])
    assert len(old_blobs) == ds["num_chunks"]

    res = client.ingest(name, corpus[300:])
    info = client.dataset(name)
    assert info["num_chunks"] > ds["num_chunks"]
    listed = [c for c in client.static_masks(name) if c["cache"] == done["cache"]]
    assert len(listed) == 1
    assert not listed[0]["complete"] and listed[0]["built"] == ds["num_chunks"] and listed[0]["chunks"] == info["num_chunks"]

    # a batch that draws one of the new sequences has no masks for it: 409, never a partial batch
    params = dict(size=256, seed=seed, mode="static", unit="whole_word", copies=K, epoch=1)
    new_first = res["first_sequence_id"]
    assert new_first == ds["num_sequences"]
    for index in range(4):
        drawn = sample_ids(seed, index, 256, info["num_sequences"])  # the (seed, index) draw
        assert (drawn >= new_first).any()
        assert_problem(batch_response(http, name, index=index, **params), 409, MISSING)
    assert cache_strings(rdb, done["cache"]) == old_blobs

    # mark the blobs built before: a rebuild that rewrote them would lose the mark
    for key in old_blobs:
        rdb.append(key, b"\x00built-before")
    rebuilt = client.build_static_masks(name, seed=seed, **config)
    assert rebuilt["complete"] and rebuilt["built"] == info["num_chunks"]
    blobs = cache_strings(rdb, done["cache"])
    assert len(blobs) == info["num_chunks"]
    for key in old_blobs:
        assert blobs[key].endswith(b"\x00built-before"), f"{key!r} was rebuilt"
    assert rebuilt["bytes"] == done["bytes"] + sum(len(v) for k, v in blobs.items() if k not in old_blobs)

    # and every batch is served again, equal to the dynamic one, new sequences included
    drew_new = False
    for index in range(4):
        s = get_arrays(http, name, index=index, **params)
        d = get_arrays(http, name, index=index, **{**params, "mode": "dynamic", "epoch": 1 % K})
        assert_same_arrays(s, d, f"index {index}")
        drew_new |= bool((s["sequence_ids"] >= new_first).any())
    assert drew_new


def test_dropping_a_cache_removes_only_its_keys(client, http, ds, rdb):
    name = ds["name"]
    a = client.build_static_masks(name, seed=1, copies=K)
    b = client.build_static_masks(name, seed=2, copies=K, unit="span")
    assert a["cache"] != b["cache"]
    keys_a, keys_b = cache_keys(rdb, a["cache"]), cache_keys(rdb, b["cache"])
    assert len(keys_a) > ds["num_chunks"] and len(keys_b) > ds["num_chunks"]
    b_before = {k: snapshot(rdb)[k] for k in keys_b}
    others = {k: v for k, v in snapshot(rdb).items() if k not in keys_a and k not in keys_b}

    client.drop_static_masks(name, a["cache"])
    assert cache_keys(rdb, a["cache"]) == []
    after = snapshot(rdb)
    assert {k: after[k] for k in keys_b} == b_before
    # everything else stays, except the cache index (a set that names the caches)
    changed = [k for k in others if after.get(k) != others[k]]
    assert all(after[k][0] == b"set" and a["cache"].encode() in others[k][1] for k in changed), changed
    assert [c["cache"] for c in client.static_masks(name)] == [b["cache"]]
    assert_problem(batch_response(http, name, size=8, seed=1, mode="static", copies=K), 409, MISSING)
    assert batch_response(http, name, size=8, seed=2, mode="static", copies=K, unit="span").status_code == 200
    r = http.delete(f"/v1/datasets/{name}/static-masks/{a['cache']}")
    assert r.status_code == 404 and r.headers["content-type"].startswith("application/problem+json")


def test_deleting_the_dataset_leaves_no_keys(client, http, ds, rdb):
    name = ds["name"]
    client.build_static_masks(name, seed=1, copies=K, unit="whole_word")
    client.build_static_masks(name, seed=1, copies=2, random_tokens="frequency")
    get_arrays(http, name, size=32, seed=1, mode="static", copies=2, random_tokens="frequency")
    get_arrays(http, name, size=32, seed=1, random_tokens="frequency")
    client.masking_report(name, seed=1, sequences=50, epochs=2, mode="static", copies=K, unit="whole_word")
    assert len(rdb.keys("*")) > 10
    client.delete_dataset(name)
    assert rdb.keys("*") == [], "keys left after deleting the only dataset"


def test_cache_size_is_reported_and_compact(client, ds, rdb):
    """Positions and replacement ids of the selected tokens, not K copies of the
    sequences: with p=0.15 about 2 * 2 bytes * 0.15 per token and copy, far
    below the 2 bytes per token and copy (uint16) a full copy would take."""
    k = 10
    status = client.build_static_masks(ds["name"], seed=0, copies=k, mlm_probability=0.15)
    blobs = cache_strings(rdb, status["cache"])
    assert len(blobs) == ds["num_chunks"]
    assert status["bytes"] == sum(len(v) for v in blobs.values()), "reported bytes are not the blobs' size"
    tokens = client.dataset(ds["name"])["num_tokens"]
    assert status["bytes_per_token"] == pytest.approx(status["bytes"] / tokens, rel=1e-9)
    full_copies = k * np.dtype(ds["id_dtype"]).itemsize
    assert status["bytes_per_token"] < 0.5 * full_copies, status
    # and its size grows with the share of selected tokens, not with K copies of the data
    dense = client.build_static_masks(ds["name"], seed=0, copies=k, mlm_probability=0.45)
    assert 2.0 < dense["bytes"] / status["bytes"] < 3.5, (status["bytes"], dense["bytes"])
    listed = {c["cache"]: c for c in client.static_masks(ds["name"])}
    assert listed[status["cache"]]["bytes"] == status["bytes"]
    assert listed[status["cache"]]["bytes_per_token"] == pytest.approx(status["bytes_per_token"])


def test_masking_report_static_at_most_k_dynamic_grows(client, ds):
    name = ds["name"]
    p = 0.15
    client.build_static_masks(name, seed=9, copies=K, mlm_probability=p)
    rep = client.masking_report(name, seed=9, sequences=1000, mode="static", copies=K, mlm_probability=p)
    assert rep["epochs"] == 2 * K  # default: two passes over the K copies
    d = rep["distinct_masks_per_sequence"]
    assert d["max"] <= K and d["mean"] > K - 0.2, d
    # each copy is served twice: K of the 2K epochs are independent trials
    n = rep["candidates"] // 2
    assert n >= 10**5
    assert within(rep["selection_rate"], p, n), rep["selection_rate"]
    assert rep["special_or_pad_selected"] == 0 and rep["special_drawn_as_replacement"] == 0
    assert within(rep["split"]["mask"], 0.8, rep["selected"] // 2)

    dyn = client.masking_report(name, seed=9, sequences=1000, epochs=2 * K, mlm_probability=p)
    d = dyn["distinct_masks_per_sequence"]
    assert d["max"] == 2 * K and d["mean"] > 2 * K - 0.2, d


def test_static_sparse_labels_match_dense(client, http, ds):
    name = ds["name"]
    client.build_static_masks(name, seed=4, copies=K, unit="span")
    params = dict(size=64, seed=4, index=1, epoch=K + 2, mode="static", copies=K, unit="span")
    dense = get_arrays(http, name, **params)
    sparse = get_arrays(http, name, labels="sparse", **params)
    pos, ids = sparse["masked_positions"], sparse["masked_ids"]
    rebuilt = np.full(dense["labels"].shape, -100, dtype=np.int64)
    rebuilt[pos[:, 0], pos[:, 1]] = ids
    np.testing.assert_array_equal(rebuilt, dense["labels"])
    np.testing.assert_array_equal(sparse["input_ids"], dense["input_ids"])
    assert len(pos) == int((dense["labels"] != -100).sum()) > 0


def test_frequency_cache_stays_equal_to_dynamic_after_new_documents(client, http, ds, corpus):
    """Frequency-weighted replacements read corpus counts; after more documents
    are ingested and the cache is completed, static epoch e must still be
    dynamic epoch e mod K for every sequence, old ones included (otherwise the
    cache silently serves masks that no dynamic epoch serves)."""
    name = ds["name"]
    config = dict(mlm_probability=0.5, mask_ratio=0.0, random_ratio=1.0, random_tokens="frequency")
    client.build_static_masks(name, seed=8, copies=K, **config)
    client.ingest(name, corpus[300:])
    status = client.build_static_masks(name, seed=8, copies=K, **config)
    assert status["complete"]
    params = dict(size=256, seed=8, index=0, **config)
    for e in range(K):
        s = get_arrays(http, name, mode="static", copies=K, epoch=e, **params)
        d = get_arrays(http, name, epoch=e, **params)
        old = s["sequence_ids"] < ds["num_sequences"]
        assert old.sum() > 50
        np.testing.assert_array_equal(s["labels"], d["labels"])
        differ = (s["input_ids"] != d["input_ids"]).any(axis=1)
        assert not differ.any(), (
            f"epoch {e}: {int(differ.sum())} of {len(differ)} sequences ({int((differ & old).sum())} of them "
            "built before the ingest) get other random replacements from the cache than dynamically"
        )
