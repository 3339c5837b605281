"""Epoch-exact stateless batches, sequences by id, and a mask seed apart from the order seed,
over real HTTP on a real Redis."""

from __future__ import annotations

import uuid

import httpx
import numpy as np
import pytest

from client import BadRequestError, ConflictError, NotFoundError, decode

SEQ_LEN = 64


@pytest.fixture
def ds(client, bpe_tokenizer, corpus):
    name = f"ep-{uuid.uuid4().hex[:10]}"
    client.create_dataset(name, tokenizer=bpe_tokenizer, seq_len=SEQ_LEN)
    client.ingest(name, corpus[:150])
    info = client.dataset(name)
    assert info["num_sequences"] > 100
    return info


def test_stateless_stream_covers_every_sequence_once_per_epoch(client, ds):
    n, size = ds["num_sequences"], 48
    assert n % size, "the test wants batches that straddle epoch boundaries"
    batches = [client.batch(ds["name"], size, seed=3, index=k) for k in range(-(-3 * n // size))]
    ids = np.concatenate([b["sequence_ids"] for b in batches])
    for epoch in range(3):
        one_pass = ids[epoch * n : (epoch + 1) * n]
        assert sorted(one_pass.tolist()) == list(range(n)), f"epoch {epoch} is not a permutation"
    assert not np.array_equal(ids[:n], ids[n : 2 * n]), "every epoch should have its own order"
    for k, b in enumerate(batches):
        assert b.epoch == k * size // n  # the epoch of the batch's first row
    # a batch that straddles a boundary masks each row for its own epoch
    k = n // size
    straddle = batches[k]
    cut = n - k * size
    for rows, epoch in ((slice(0, cut), 0), (slice(cut, size), 1)):
        alone = client.sequences(ds["name"], straddle["sequence_ids"][rows], seed=3, epoch=epoch)
        for name in ("input_ids", "labels", "attention_mask"):
            np.testing.assert_array_equal(straddle[name][rows], alone[name])


# Every output option of the batch route, on a batch that straddles an epoch boundary: the rows of
# each epoch are exactly what /sequences serves for them alone, in both representations.
STRADDLE_OPTIONS = [
    {},
    {"special_tokens_mask": True},
    {"labels": "sparse"},
    {"labels": "sparse", "special_tokens_mask": True, "pad_to_multiple_of": 8},
    {"pad_to_multiple_of": 16, "special_tokens_mask": True},
    {"unit": "whole_word", "special_tokens_mask": True, "mlm_probability": 0.3},
    {"unit": "span", "count": "exact", "max_predictions": 12, "labels": "sparse", "special_tokens_mask": True},
    {"random_tokens": "frequency", "special_tokens_mask": True},
    {"schedule": "linear", "mlm_probability_end": 0.5, "schedule_length": 3, "special_tokens_mask": True},
    {"mode": "static", "copies": 3, "special_tokens_mask": True},
    {"mode": "static", "copies": 3, "labels": "sparse", "special_tokens_mask": True, "pad_to_multiple_of": 8},
]
# What each (B, width) array holds past a row's end, to widen a half served narrower than the whole
PADDING = {"input_ids": None, "attention_mask": 0, "labels": -100, "special_tokens_mask": 1}


def _served(r: httpx.Response, fmt: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    assert r.status_code == 200, r.text
    if fmt == "json":
        assert r.headers["content-type"].startswith("application/json")
        body = r.json()
        meta = {k: str(v) for k, v in body.pop("metadata").items()}
        return {k: np.asarray(v) for k, v in body.items()}, meta
    assert r.headers["content-type"].startswith("application/vnd.safetensors")
    return decode(r.content)


@pytest.mark.parametrize("fmt", ["safetensors", "json"])
@pytest.mark.parametrize(
    "options", STRADDLE_OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "plain"
)
def test_a_batch_across_an_epoch_boundary_serves_every_output_option(service_url, client, ds, options, fmt):
    n, size, seed = ds["num_sequences"], 48, 5
    k = n // size  # the batch that holds the last rows of epoch 0 and the first of epoch 1
    cut = n - k * size
    assert 0 < cut < size
    if options.get("mode") == "static":
        masking = {o: v for o, v in options.items() if o not in ("labels", "special_tokens_mask", "pad_to_multiple_of")}
        assert client.build_static_masks(ds["name"], seed=seed, **masking)["complete"]
    query = {o: str(v).lower() if isinstance(v, bool) else v for o, v in options.items()}
    with httpx.Client(base_url=service_url, timeout=60) as h:
        params = {"size": size, "index": k, "seed": seed, "format": fmt, **query}
        r = h.get(f"/v1/datasets/{ds['name']}/batch", params=params)
        whole, meta = _served(r, fmt)
        halves = []
        for rows, epoch in ((slice(0, cut), 0), (slice(cut, size), 1)):
            body = {"ids": whole["sequence_ids"][rows].tolist(), "seed": seed, "epoch": epoch, **options}
            alone = h.post(f"/v1/datasets/{ds['name']}/sequences", json=body)  # safetensors
            halves.append(_served(alone, "safetensors")[0])
    assert meta["epoch"] == "0" and r.headers["maskserve-epoch"] == "0"
    assert set(whole) == set(halves[0]) == set(halves[1])
    assert ("special_tokens_mask" in whole) == bool(options.get("special_tokens_mask"))
    assert ("masked_positions" in whole) == (options.get("labels") == "sparse")
    width = whole["input_ids"].shape[1]
    assert width == max(half["input_ids"].shape[1] for half in halves)
    for name, padding in PADDING.items():
        if name not in whole:
            continue
        parts = []
        for half in halves:
            a = half[name]
            fill = ds["special_tokens"]["pad"] if padding is None else padding
            parts.append(np.pad(a, ((0, 0), (0, width - a.shape[1])), constant_values=fill))
        np.testing.assert_array_equal(whole[name], np.concatenate(parts), err_msg=name)
    np.testing.assert_array_equal(whole["sequence_ids"], np.concatenate([h["sequence_ids"] for h in halves]))
    if "masked_positions" in whole:
        second = halves[1]["masked_positions"] + np.array([cut, 0])
        first = halves[0]["masked_positions"]
        np.testing.assert_array_equal(whole["masked_positions"], np.concatenate([first, second]))
        np.testing.assert_array_equal(whole["masked_ids"], np.concatenate([h["masked_ids"] for h in halves]))
        assert len(whole["masked_ids"]) > 0


def test_sequences_by_id_are_the_batch_rows_for_their_seed_and_epoch(client, ds):
    b = client.batch(ds["name"], 16, seed=11, index=2, mlm_probability=0.3, unit="whole_word")
    ids = b["sequence_ids"][::-1].copy()
    same = client.sequences(ds["name"], ids, seed=11, epoch=b.epoch, mlm_probability=0.3, unit="whole_word")
    np.testing.assert_array_equal(same["sequence_ids"], ids)
    for name in ("input_ids", "labels", "attention_mask"):
        np.testing.assert_array_equal(same[name], b[name][::-1])
    # the same call twice: the same masks; another epoch or seed: other masks
    again = client.sequences(ds["name"], ids, seed=11, epoch=b.epoch, mlm_probability=0.3, unit="whole_word")
    np.testing.assert_array_equal(again["labels"], same["labels"])
    for other in (dict(seed=11, epoch=b.epoch + 1), dict(seed=12, epoch=b.epoch)):
        moved = client.sequences(ds["name"], ids, mlm_probability=0.3, unit="whole_word", **other)
        assert not np.array_equal(moved["labels"], same["labels"])


def test_sequences_by_id_serve_static_copies(client, ds):
    with pytest.raises(ConflictError) as missing:
        client.sequences(ds["name"], [0, 1], seed=4, epoch=0, mode="static", copies=3)
    assert missing.value.type.endswith("static-masks-missing")
    assert client.build_static_masks(ds["name"], seed=4, copies=3)["complete"]
    ids = [5, 0, 7]
    for epoch in (0, 2, 3, 7):
        static = client.sequences(ds["name"], ids, seed=4, epoch=epoch, mode="static", copies=3)
        dynamic = client.sequences(ds["name"], ids, seed=4, epoch=epoch % 3)
        np.testing.assert_array_equal(static["input_ids"], dynamic["input_ids"])
        np.testing.assert_array_equal(static["labels"], dynamic["labels"])


@pytest.mark.parametrize(
    "body, status, kind",
    [
        ({"ids": [10**9]}, 422, "sequence-out-of-range"),
        ({"ids": [-1]}, 422, "sequence-out-of-range"),
        ({"ids": [0, 2**63 - 1]}, 422, "sequence-out-of-range"),
        ({"ids": [0, 2**70]}, 422, "validation-failed"),  # past what an id can be (int64)
        ({"ids": []}, 422, "validation-failed"),
        ({"ids": "0,1"}, 422, "validation-failed"),
        ({"ids": [0], "epoch": -1}, 422, "validation-failed"),
        ({"ids": [0], "mask_ratio": 0.9, "random_ratio": 0.2}, 422, "validation-failed"),
        ({"ids": list(range(2000))}, 422, "limit-exceeded"),
    ],
)
def test_sequences_by_id_refuse_bad_input(service_url, ds, body, status, kind):
    with httpx.Client(base_url=service_url) as h:
        r = h.post(f"/v1/datasets/{ds['name']}/sequences", json=body)
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    assert r.json()["type"].endswith(kind)


def test_sequences_by_id_of_a_missing_dataset(client):
    with pytest.raises(NotFoundError):
        client.sequences("no-such-dataset", [0])


def test_mask_seed_changes_masks_not_order(client, ds):
    base = client.batch(ds["name"], 32, seed=1, index=3)
    apart = client.batch(ds["name"], 32, seed=1, index=3, mask_seed=9)
    np.testing.assert_array_equal(apart["sequence_ids"], base["sequence_ids"])
    assert not np.array_equal(apart["labels"], base["labels"])
    replay = client.sequences(ds["name"], base["sequence_ids"], seed=9, epoch=base.epoch)
    np.testing.assert_array_equal(apart["labels"], replay["labels"])
    np.testing.assert_array_equal(apart["input_ids"], replay["input_ids"])


def test_static_job_uses_a_cache_built_with_its_mask_seed(client, ds):
    client.build_static_masks(ds["name"], seed=7, copies=2)
    masking = {"mode": "static", "copies": 2}
    with pytest.raises(ConflictError):  # the order seed's cache does not exist
        client.create_job("no-cache", ds["name"], batch_size=16, seed=0, masking=masking)
    client.create_job("apart", ds["name"], batch_size=16, seed=0, masking=masking, mask_seed=7)
    with client.job("apart") as stream:
        batch = next(iter(stream))
    assert batch.epoch == 0
    replay = client.sequences(ds["name"], batch["sequence_ids"], seed=7, epoch=0, mode="static", copies=2)
    np.testing.assert_array_equal(batch["labels"], replay["labels"])
    # and the order is the order seed's: the same as a dynamic job with seed 0
    client.create_job("order", ds["name"], batch_size=16, seed=0)
    with client.job("order") as stream:
        np.testing.assert_array_equal(next(iter(stream))["sequence_ids"], batch["sequence_ids"])


def test_a_job_without_mask_seed_keeps_its_config_digest():
    from service.jobs.jobs import JobConfig

    plain = JobConfig(dataset="d")
    assert "mask_seed" not in plain.model_dump_json(exclude={"mask_seed"})
    assert plain.digest() != JobConfig(dataset="d", mask_seed=0).digest()
    assert plain.masks_seed == 0 and JobConfig(dataset="d", seed=3, mask_seed=5).masks_seed == 5


def test_bad_mask_seed_is_a_problem(client, ds):
    with pytest.raises(BadRequestError):
        client.batch(ds["name"], 4, seed=1, mask_seed=-1)


@pytest.mark.parametrize("n, size", [(1, 3), (7, 3), (100, 32), (4096 + 5, 1000), (10, 25)])
def test_stream_ids_are_the_job_permutations_concatenated(n, size):
    from service.batches.permute import batch_ids, stream_ids

    k_max = -(-4 * n // size)
    ids, epochs = zip(*(stream_ids(2, k, size, n) for k in range(k_max)))
    ids, epochs = np.concatenate(ids), np.concatenate(epochs)
    for e in range(4):
        np.testing.assert_array_equal(ids[e * n : (e + 1) * n], batch_ids(2, e, n, n, 0, True))
        assert (epochs[e * n : (e + 1) * n] == e).all()


def test_holdout_rule_depends_on_the_document_alone():
    from service.data.holdout import held_out

    docs = [{"text": f"document number {i}"} for i in range(4000)]
    share = sum(held_out(d, 0.05) for d in docs) / len(docs)
    assert 0.04 < share < 0.06
    assert [held_out(d, 0.05) for d in docs] == [held_out(dict(d), 0.05) for d in reversed(docs)][::-1]
    assert not any(held_out(d, 0.0) for d in docs) and all(held_out(d, 1.0) for d in docs)
    assert held_out({"ids": [1, 2, 3]}, 0.5) == held_out({"ids": [1, 2, 3]}, 0.5)
