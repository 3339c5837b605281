"""GET /v1/datasets/{name}/batch over real HTTP, on the corpus fixture.

Statistical checks use a binomial bound: |p_hat - p| <= 5 * sqrt(p(1-p)/n)
(5 standard errors) over n >= 10**5 candidate tokens, each (sequence, epoch)
counted once so that the trials are independent.
"""

from __future__ import annotations

import math
import uuid

import httpx
import numpy as np
import pytest
from tokenizers import Tokenizer

from client import decode
from tests.conftest import service_env

SEQ_LEN = 128
SIGMAS = 5.0
CT = "application/vnd.safetensors"


def within(observed: float, expected: float, n: int) -> bool:
    return abs(observed - expected) <= SIGMAS * math.sqrt(expected * (1 - expected) / n)


@pytest.fixture
def ds(client, bpe_tokenizer, corpus):
    """The corpus ingested into one dataset; returns its info and the special ids.

    Each test gets its own dataset name: a service process caches datasets by
    name, and the database is flushed between tests (see the re-creation test).
    """
    name = f"wiki-{uuid.uuid4().hex[:12]}"
    client.create_dataset(name, tokenizer=bpe_tokenizer, seq_len=SEQ_LEN)
    res = client.ingest(name, corpus)
    assert res["sequences"] > 500
    info = client.dataset(name)
    tok = Tokenizer.from_str(bpe_tokenizer)
    special = {i for i, t in tok.get_added_tokens_decoder().items() if t.special}
    special |= {i for i in info["special_tokens"].values() if i is not None}
    is_special = np.zeros(info["vocab_size"], dtype=bool)
    is_special[sorted(special)] = True
    return {**info, "is_special": is_special}


@pytest.fixture
def http(service_url):
    with httpx.Client(base_url=service_url, timeout=30) as h:
        yield h


def get(http: httpx.Client, name: str, headers: dict | None = None, **params) -> httpx.Response:
    return http.get(f"/v1/datasets/{name}/batch", params=params, headers=headers or {})


def arrays(r: httpx.Response) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith(CT)
    return decode(r.content)


def pair(http, name, **params):
    """A masked batch and the same draw unmasked (mlm_probability=0): the stored ids."""
    masked, _ = arrays(get(http, name, **params))
    plain, _ = arrays(get(http, name, **{**params, "mlm_probability": 0.0}))
    np.testing.assert_array_equal(masked["sequence_ids"], plain["sequence_ids"])
    assert (plain["labels"] == -100).all()
    return masked, plain


def check_invariants(masked, plain, ds) -> np.ndarray:
    """Assert every per-token rule; return the candidate mask (real, non-special)."""
    is_special = ds["is_special"]
    pad, mask_id = ds["special_tokens"]["pad"], ds["special_tokens"]["mask"]
    ids, labels, attn = masked["input_ids"], masked["labels"], masked["attention_mask"]
    stored = plain["input_ids"]
    b, seq_len = ids.shape
    assert seq_len == SEQ_LEN and labels.shape == attn.shape == (b, seq_len)
    assert ids.dtype == np.int32 and labels.dtype == np.int32 and attn.dtype == np.uint8
    assert masked["sequence_ids"].dtype == np.int64 and masked["sequence_ids"].shape == (b,)
    np.testing.assert_array_equal(attn, plain["attention_mask"])
    real = attn.astype(bool)
    # attention is a prefix of ones: positions < length
    lengths = real.sum(axis=1)
    np.testing.assert_array_equal(real, np.arange(seq_len)[None, :] < lengths[:, None])
    assert (lengths >= 1).all()
    # pads carry the pad id in both
    assert (ids[~real] == pad).all() and (stored[~real] == pad).all()
    candidates = real & ~is_special[stored]
    selected = labels != -100
    assert not (selected & ~candidates).any(), "a special token or pad was selected"
    # labels are the stored token exactly where selected
    np.testing.assert_array_equal(labels[selected], stored[selected])
    # anything that differs from the stored ids is a selected position
    assert not ((ids != stored) & ~selected).any()
    # a selected position is the mask token, the original, or an ordinary token
    changed = selected & (ids != stored) & (ids != mask_id)
    assert not is_special[ids[changed]].any(), "a random replacement was a special token"
    assert ((ids >= 0) & (ids < ds["vocab_size"])).all()
    return candidates


# ---- invariants and rates --------------------------------------------------


@pytest.mark.parametrize("p", [0.15, 0.5, 1.0])
def test_batches_satisfy_invariants(http, ds, p):
    for seed, index in ((0, 0), (7, 3), ((1 << 64) - 1, 11)):
        masked, plain = pair(http, ds["name"], size=128, seed=seed, index=index, mlm_probability=p)
        candidates = check_invariants(masked, plain, ds)
        assert candidates.sum() > 1000
        # specials really occur inside the real region (cls at 0, sep between documents)
        assert ds["is_special"][plain["input_ids"][plain["attention_mask"].astype(bool)]].any()
        if p == 1.0:
            np.testing.assert_array_equal(masked["labels"] != -100, candidates)


@pytest.mark.parametrize("p", [0.15, 0.4])
def test_selection_rate_and_split_over_many_batches(http, ds, p):
    n_cand = n_sel = n_mask = n_keep = 0
    mask_id = ds["special_tokens"]["mask"]
    epoch = 0
    while n_cand < 10**5:
        # a new epoch per batch: every (sequence, epoch) pair is an independent draw
        masked, plain = pair(http, ds["name"], size=256, seed=2024, index=epoch, epoch=epoch, mlm_probability=p)
        candidates = check_invariants(masked, plain, ds)
        _, first = np.unique(masked["sequence_ids"], return_index=True)  # duplicates repeat the same mask
        cand = candidates[first]
        sel = (masked["labels"][first] != -100) & cand
        ids, stored = masked["input_ids"][first], plain["input_ids"][first]
        n_cand += int(cand.sum())
        n_sel += int(sel.sum())
        n_mask += int((sel & (ids == mask_id)).sum())
        n_keep += int((sel & (ids == stored)).sum())
        epoch += 1
    assert within(n_sel / n_cand, p, n_cand), f"rate {n_sel / n_cand:.5f} vs {p} over {n_cand}"
    assert within(n_mask / n_sel, 0.8, n_sel), f"mask share {n_mask / n_sel:.4f} over {n_sel}"
    # "kept" includes random draws that happen to equal the original (about 1/2000 of 0.1)
    assert within(n_keep / n_sel, 0.1, n_sel), f"keep share {n_keep / n_sel:.4f} over {n_sel}"
    n_random = n_sel - n_mask - n_keep
    assert within(n_random / n_sel, 0.1, n_sel), f"random share {n_random / n_sel:.4f} over {n_sel}"


def test_custom_split_is_served(http, ds):
    masked, plain = pair(http, ds["name"], size=512, seed=1, index=0, mlm_probability=1.0, mask_ratio=0.0, random_ratio=0.0)
    candidates = check_invariants(masked, plain, ds)
    # everything selected, nothing replaced
    np.testing.assert_array_equal(masked["labels"] != -100, candidates)
    np.testing.assert_array_equal(masked["input_ids"], plain["input_ids"])
    masked, plain = pair(http, ds["name"], size=512, seed=1, index=0, mlm_probability=1.0, mask_ratio=1.0, random_ratio=0.0)
    check_invariants(masked, plain, ds)
    sel = masked["labels"] != -100
    assert (masked["input_ids"][sel] == ds["special_tokens"]["mask"]).all()


def packed_corpus(corpus: list[str], tokenizer_json: str, cls: int, sep: int) -> list[list[int]]:
    """The corpus tokenized and packed RoBERTa-style: documents joined by sep, cut into L-1 blocks, cls first."""
    stream = []
    for enc in Tokenizer.from_str(tokenizer_json).encode_batch(corpus, add_special_tokens=False):
        if enc.ids:
            stream.extend(enc.ids)
            stream.append(sep)
    room = SEQ_LEN - 1
    return [[cls, *stream[a : a + room]] for a in range(0, len(stream), room)]


@pytest.mark.parametrize("gather", ["per chunk", "per row"])
def test_unmasked_ids_are_the_packed_corpus(http, ds, corpus, bpe_tokenizer, gather, monkeypatch):
    """With p=0 a batch is the stored sequences: the corpus tokenized and packed
    RoBERTa-style (documents joined by sep, cut into L-1 blocks, cls first).
    Both ways of looking sequences up in the chunk tables are checked (a batch
    over few chunks gathers chunk by chunk, one over many chunks row by row)."""
    assert ds["num_chunks"] >= 2
    if gather == "per row":  # the test server runs in this process
        monkeypatch.setattr("service.data.catalog._GROUPED_UP_TO", 0)
    expected = packed_corpus(corpus, bpe_tokenizer, ds["special_tokens"]["cls"], ds["special_tokens"]["sep"])
    assert ds["num_sequences"] == len(expected)
    plain, _ = arrays(get(http, ds["name"], size=512, seed=3, index=0, mlm_probability=0.0))
    for row, sid, n in zip(plain["input_ids"], plain["sequence_ids"], plain["attention_mask"].sum(axis=1)):
        assert list(row[:n]) == expected[sid]


def test_same_sequence_same_mask_in_any_batch_of_an_epoch(http, ds):
    # batches of one pass never share a sequence (each pass is a permutation): take one from the next pass
    later = -(-ds["num_sequences"] // 256)
    a, _ = arrays(get(http, ds["name"], size=256, seed=5, index=0, epoch=2))
    b, _ = arrays(get(http, ds["name"], size=256, seed=5, index=later, epoch=2))
    common = np.intersect1d(a["sequence_ids"], b["sequence_ids"])
    assert len(common) > 10
    for sid in common[:20]:
        ra = np.flatnonzero(a["sequence_ids"] == sid)
        rb = np.flatnonzero(b["sequence_ids"] == sid)
        for name in ("input_ids", "labels", "attention_mask"):
            for i in ra:
                np.testing.assert_array_equal(a[name][i], b[name][rb[0]])


# ---- reproducibility -------------------------------------------------------


def test_same_request_gives_identical_body_on_two_processes(http, ds, spawn_service, redis_url):
    params = dict(size=64, seed=77, index=5, mlm_probability=0.2)
    first = get(http, ds["name"], **params)
    second = get(http, ds["name"], **params)
    assert first.status_code == second.status_code == 200
    assert first.content == second.content
    other = spawn_service(service_env(REDIS_URL=redis_url))
    with httpx.Client(base_url=other.url, timeout=30) as h2:
        third = get(h2, ds["name"], **params)
        assert third.status_code == 200
        assert third.content == first.content
        for k in ("maskserve-seed", "maskserve-epoch", "maskserve-batch-index", "maskserve-dataset"):
            assert third.headers[k] == first.headers[k]
        # and a different seed differs there too
        assert get(h2, ds["name"], **{**params, "seed": 78}).content != first.content


def test_no_seed_gives_fresh_seed_that_reproduces(http, ds):
    r1 = get(http, ds["name"], size=32, index=2)
    r2 = get(http, ds["name"], size=32, index=2)
    s1, s2 = int(r1.headers["maskserve-seed"]), int(r2.headers["maskserve-seed"])
    assert s1 != s2, "two requests without a seed got the same seed"
    assert r1.content != r2.content
    for r, s in ((r1, s1), (r2, s2)):
        a, meta = arrays(r)
        assert int(meta["seed"]) == s
        again = get(http, ds["name"], size=32, index=2, seed=s)
        assert again.headers["maskserve-seed"] == str(s)
        assert again.content == r.content


def test_epoch_defaults_to_passes_over_the_data(http, ds):
    n = ds["num_sequences"]
    size = 64
    boundary = -(-n // size)  # first index whose index*size reaches n
    for index in (0, 1, boundary - 1, boundary, 3 * boundary + 1):
        r = get(http, ds["name"], size=size, seed=9, index=index)
        expected = index * size // n
        assert r.headers["maskserve-epoch"] == str(expected)
        assert r.headers["maskserve-batch-index"] == str(index)
        _, meta = arrays(r)
        assert meta["epoch"] == str(expected) and meta["index"] == str(index)
        # naming that epoch explicitly is the same request, for a batch within one pass; a batch that
        # straddles two passes masks each row for its own pass unless one epoch is named for all
        explicit = get(http, ds["name"], size=size, seed=9, index=index, epoch=expected).content
        within_one_pass = ((index + 1) * size - 1) // n == expected
        assert (explicit == r.content) == within_one_pass
    assert get(http, ds["name"], size=size, seed=9, index=boundary - 1).headers["maskserve-epoch"] == "0"
    assert get(http, ds["name"], size=size, seed=9, index=boundary).headers["maskserve-epoch"] == "1"


def test_explicit_epoch_changes_masks_not_sequences(http, ds):
    base, _ = arrays(get(http, ds["name"], size=128, seed=4, index=3))
    for epoch in (1, 2, 1000):
        r = get(http, ds["name"], size=128, seed=4, index=3, epoch=epoch)
        assert r.headers["maskserve-epoch"] == str(epoch)
        other, meta = arrays(r)
        assert meta["epoch"] == str(epoch)
        np.testing.assert_array_equal(other["sequence_ids"], base["sequence_ids"])
        np.testing.assert_array_equal(other["attention_mask"], base["attention_mask"])
        assert not np.array_equal(other["labels"] != -100, base["labels"] != -100)
        # the stored tokens are the same: labels agree wherever both select
        both = (other["labels"] != -100) & (base["labels"] != -100)
        assert both.any()
        np.testing.assert_array_equal(other["labels"][both], base["labels"][both])


def test_masking_config_changes_masks_not_sequences(http, ds):
    base, _ = arrays(get(http, ds["name"], size=128, seed=4, index=3))
    other, _ = arrays(get(http, ds["name"], size=128, seed=4, index=3, mask_ratio=0.7, random_ratio=0.2))
    np.testing.assert_array_equal(other["sequence_ids"], base["sequence_ids"])
    assert not np.array_equal(other["labels"], base["labels"])


# ---- formats and headers ---------------------------------------------------


@pytest.mark.parametrize("how", ["accept", "format"])
def test_json_has_the_same_arrays(http, ds, how):
    params = dict(size=16, seed=12, index=4, mlm_probability=0.3)
    binary, meta = arrays(get(http, ds["name"], **params))
    if how == "accept":
        r = get(http, ds["name"], headers={"Accept": "application/json"}, **params)
    else:
        r = get(http, ds["name"], headers={"Accept": CT}, format="json", **params)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    for name, arr in binary.items():
        np.testing.assert_array_equal(np.asarray(body[name]), arr)
        assert np.asarray(body[name]).shape == arr.shape
    assert {k: str(v) for k, v in body["metadata"].items()} == meta
    for k in ("maskserve-seed", "maskserve-epoch", "maskserve-batch-index", "maskserve-dataset"):
        assert k in r.headers


def test_format_safetensors_overrides_accept_json(http, ds):
    r = get(http, ds["name"], headers={"Accept": "application/json"}, size=4, seed=1, format="safetensors")
    a, _ = arrays(r)
    assert a["input_ids"].shape == (4, SEQ_LEN)


def test_headers_present(http, ds):
    r = get(http, ds["name"], size=8, seed=3, index=6)
    assert r.status_code == 200
    assert r.headers["maskserve-dataset"] == ds["name"]
    assert r.headers["maskserve-batch-index"] == "6"
    assert r.headers["maskserve-seed"] == "3"
    assert int(r.headers["maskserve-epoch"]) == 6 * 8 // ds["num_sequences"]
    _, meta = arrays(r)
    assert meta["dataset"] == ds["name"] and meta["pad_id"] == str(ds["special_tokens"]["pad"])


# ---- errors ----------------------------------------------------------------


def problem(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    body = r.json()
    assert body["status"] == status and body["type"] and body["detail"]
    return body


def test_errors_are_problems(http, ds, client, bpe_tokenizer):
    assert "dataset-not-found" in problem(get(http, "nope", size=4), 404)["type"]
    problem(get(http, ds["name"], size=10**6), 422)
    problem(get(http, ds["name"], size=0), 422)
    problem(get(http, ds["name"], size=4, mlm_probability=1.5), 422)
    problem(get(http, ds["name"], size=4, mask_ratio=0.8, random_ratio=0.5), 422)
    problem(get(http, ds["name"], size=4, seed=-1), 422)
    problem(get(http, ds["name"], size=4, format="xml"), 422)
    problem(get(http, ds["name"], size=4, headers={"Accept": "text/html"}), 406)
    empty = f"empty-{uuid.uuid4().hex[:12]}"
    client.create_dataset(empty, tokenizer=bpe_tokenizer, seq_len=SEQ_LEN)
    problem(get(http, empty, size=4), 409)


# ---- a dataset re-created behind a replica's back --------------------------


def test_dataset_recreated_by_another_replica_can_be_ingested_and_served(
    client, http, bpe_tokenizer, corpus, spawn_service, redis_url
):
    """Replicas are stateless: a dataset deleted and re-created (same name)
    through another replica is usable on this one, ingest included."""
    name = f"recreated-{uuid.uuid4().hex[:12]}"
    client.create_dataset(name, tokenizer=bpe_tokenizer, seq_len=SEQ_LEN)
    client.ingest(name, corpus[:40])
    assert get(http, name, size=4, seed=0).status_code == 200  # this replica now knows the dataset
    from client import Client

    other = spawn_service(service_env(REDIS_URL=redis_url))
    with Client(other.url, retries=0) as c2:
        c2.delete_dataset(name)
        c2.create_dataset(name, tokenizer=bpe_tokenizer, seq_len=SEQ_LEN)
    res = client.ingest(name, corpus[40:80])  # through the first replica
    assert res["documents"] == 40 and res["first_sequence_id"] == 0
    info = client.dataset(name)
    assert info["num_sequences"] == res["sequences"]
    a, _ = arrays(get(http, name, size=8, seed=1))
    assert (a["sequence_ids"] < res["sequences"]).all()



def test_batches_follow_growth_and_deletion_through_another_replica(
    client, http, bpe_tokenizer, corpus, spawn_service, redis_url
):
    """A replica draws batches from the counters it saw last and its fetch checks
    them in the same round trip: documents added, a dataset deleted or re-created
    through another replica are seen by the very next batch."""
    from client import Client

    name = f"grown-{uuid.uuid4().hex[:12]}"
    client.create_dataset(name, tokenizer=bpe_tokenizer, seq_len=SEQ_LEN)
    before = client.ingest(name, corpus[:40])["sequences"]
    a, _ = arrays(get(http, name, size=64, seed=2, index=0))  # this replica now holds the counters
    assert (a["sequence_ids"] < before).all()
    other = spawn_service(service_env(REDIS_URL=redis_url))
    with Client(other.url, retries=0) as c2:
        after = before + c2.ingest(name, corpus[40:400])["sequences"]
        assert after > 4 * before
        a, headers = arrays(get(http, name, size=256, seed=2, index=1))
        assert a["sequence_ids"].max() >= before, "the batch was drawn from the old sequence count"
        assert (a["sequence_ids"] < after).all()
        assert headers["epoch"] == str(256 // after)
        # the same draw again (now without a stale check): byte-identical
        assert get(http, name, size=256, seed=2, index=1).content == get(http, name, size=256, seed=2, index=1).content
        c2.delete_dataset(name)
        r = get(http, name, size=8, seed=2)
        assert r.status_code == 404 and r.headers["content-type"].startswith("application/problem+json")
        assert r.json()["type"].endswith("dataset-not-found")
        c2.create_dataset(name, tokenizer=bpe_tokenizer, seq_len=SEQ_LEN)
        r = get(http, name, size=8, seed=2)
        assert r.status_code == 409 and r.json()["type"].endswith("dataset-empty")
        small = c2.ingest(name, corpus[:5])["sequences"]
    a, _ = arrays(get(http, name, size=64, seed=2))
    assert (a["sequence_ids"] < small).all()


def test_dataset_recreated_through_this_replica_with_more_chunks(client, http, bpe_tokenizer, corpus):
    """Counters remembered for a dataset since deleted are never paired with its
    successor's chunk tables: every batch after a re-creation is whole and right."""
    name = f"regrown-{uuid.uuid4().hex[:12]}"
    client.create_dataset(name, tokenizer=bpe_tokenizer, seq_len=SEQ_LEN)
    client.ingest(name, corpus[:30])
    assert get(http, name, size=16, seed=0).status_code == 200  # this replica now remembers its counters
    client.delete_dataset(name)
    client.create_dataset(name, tokenizer=bpe_tokenizer, seq_len=SEQ_LEN)
    client.ingest(name, corpus)
    info = client.dataset(name)
    assert info["num_chunks"] >= 2
    expected = packed_corpus(corpus, bpe_tokenizer, info["special_tokens"]["cls"], info["special_tokens"]["sep"])
    assert info["num_sequences"] == len(expected)
    for index in range(12):
        plain, _ = arrays(get(http, name, size=64, seed=1, index=index, mlm_probability=0.0))
        for row, sid, n in zip(plain["input_ids"], plain["sequence_ids"], plain["attention_mask"].sum(axis=1)):
            assert list(row[:n]) == expected[sid]
