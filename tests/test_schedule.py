"""Mask-rate schedules: the rate as a function of progress, deterministic, on batches and jobs.

Rates are compared with the schedule by a binomial bound: over n candidate tokens
selected independently with probability p, the count is within 5 standard
deviations (sqrt(n p (1 - p))) of n p except with probability below 1e-6. Over
batches of different rates the expected count and variance are summed per batch.
"""

from __future__ import annotations

import math
import uuid

import httpx
import numpy as np
import pytest

from client import BadRequestError, mask_rate_schedule
from service.masking.schedule import rate_at

SIGMAS = 5.0
PROBLEM = "application/problem+json"


def _linear(p0: float, p1: float, length: int, x: int) -> float:
    return p0 + (p1 - p0) * min(1.0, x / length)


def _cosine(p0: float, p1: float, length: int, x: int) -> float:
    return p1 + (p0 - p1) * (1 + math.cos(math.pi * min(1.0, x / length))) / 2


def test_rate_at_follows_each_shape():
    for x in range(0, 14):
        assert rate_at("constant", 0.15, 0.9, 10, x) == 0.15
        assert rate_at("linear", 0.3, 0.1, 10, x) == pytest.approx(_linear(0.3, 0.1, 10, x), abs=1e-9)
        assert rate_at("cosine", 0.3, 0.1, 10, x) == pytest.approx(_cosine(0.3, 0.1, 10, x), abs=1e-9)
    assert rate_at("cosine", 0.3, 0.1, 10, 5) == pytest.approx(0.2, abs=1e-9)  # halfway in time, halfway in rate
    assert rate_at("cosine", 0.3, 0.1, 10, 1) > rate_at("linear", 0.3, 0.1, 10, 1)  # slow start
    assert rate_at("linear", 0.1, 0.4, 3, 1000) == pytest.approx(0.4)  # held at the end


@pytest.fixture
def ds(client, bpe_tokenizer, corpus) -> dict:
    name = f"sched-{uuid.uuid4().hex[:10]}"
    client.create_dataset(name, tokenizer=bpe_tokenizer, seq_len=64)
    client.ingest(name, corpus[:300])
    return {"name": name, **client.dataset(name)}


def _counts(batch) -> tuple[int, int]:
    """(selected, candidates) of a batch fetched with special_tokens_mask."""
    return int((batch["labels"] != -100).sum()), int((batch["special_tokens_mask"] == 0).sum())


def _agrees(selected: int, expected: float, variance: float) -> bool:
    return abs(selected - expected) <= SIGMAS * math.sqrt(variance)


def test_schedule_by_epoch_is_deterministic_and_is_the_constant_rate_of_its_epoch(client, ds):
    sched = mask_rate_schedule("linear", 0.4, 0.1, 4)
    for epoch in (0, 2, 5):
        a = client.batch(ds["name"], 32, seed=3, index=1, epoch=epoch, **sched)
        again = client.batch(ds["name"], 32, seed=3, index=1, epoch=epoch, **sched)
        p = round(_linear(0.4, 0.1, 4, epoch), 9)  # rates are rounded to 9 decimals (see service/masking/schedule.py)
        plain = client.batch(ds["name"], 32, seed=3, index=1, epoch=epoch, mlm_probability=p)
        for key in ("input_ids", "labels", "sequence_ids"):
            np.testing.assert_array_equal(a[key], again[key])
            np.testing.assert_array_equal(a[key], plain[key])


def test_schedule_by_step_uses_the_batch_index(client, ds):
    sched = mask_rate_schedule("cosine", 0.1, 0.5, 8, unit="step")
    for index in (0, 3, 8, 20):
        a = client.batch(ds["name"], 32, seed=9, index=index, epoch=0, **sched)
        plain = client.batch(ds["name"], 32, seed=9, index=index, epoch=0,
                             mlm_probability=round(_cosine(0.1, 0.5, 8, index), 9))  # fmt: skip
        np.testing.assert_array_equal(a["labels"], plain["labels"])


def test_served_selection_rate_follows_the_schedule(client, ds):
    """Per epoch, the share of candidate tokens selected is the scheduled rate, and it moves."""
    sched = mask_rate_schedule("cosine", 0.35, 0.1, 4)
    rates = []
    for epoch in range(6):
        p = _cosine(0.35, 0.1, 4, epoch)
        sel = cand = 0
        for index in range(4):
            b = client.batch(ds["name"], 256, seed=1, index=index, epoch=epoch, special_tokens_mask=True, **sched)
            s, c = _counts(b)
            sel, cand = sel + s, cand + c
        assert cand > 40_000
        assert _agrees(sel, cand * p, cand * p * (1 - p)), (epoch, sel / cand, p)
        rates.append(sel / cand)
    assert rates[0] - rates[4] > 0.2 and abs(rates[4] - rates[5]) < 0.02


@pytest.mark.parametrize("unit", ["epoch", "step"])
def test_job_selection_rate_follows_the_schedule(client, ds, unit):
    """A job's batches are masked at the rate of their epoch, or of their global step
    (epoch * batches_per_epoch + index): the summed counts agree with the summed expectations."""
    length = 2 if unit == "epoch" else 10
    sched = mask_rate_schedule("linear", 0.4, 0.1, length, unit=unit)
    name = f"sched-job-{unit}-{uuid.uuid4().hex[:6]}"
    create = {"dataset": ds["name"], "batch_size": 128, "seed": 4, "epochs": 3, "masking": sched}
    per_epoch: dict[int, list[float]] = {}
    bpe = math.ceil(ds["num_sequences"] / 128)
    with client.job(name, create=create, worker="w", special_tokens_mask=True) as stream:
        for b in stream:
            s, c = _counts(b)
            x = b.epoch if unit == "epoch" else b.epoch * bpe + b.index
            p = _linear(0.4, 0.1, length, x)
            acc = per_epoch.setdefault(b.epoch, [0, 0.0, 0.0])
            acc[0] += s
            acc[1] += c * p
            acc[2] += c * p * (1 - p)
    assert sorted(per_epoch) == [0, 1, 2]
    for epoch, (sel, expected, variance) in per_epoch.items():
        assert _agrees(sel, expected, variance), (unit, epoch, sel, expected)
    assert per_epoch[0][0] > 1.5 * per_epoch[2][0]


@pytest.mark.parametrize(
    "params",
    [
        {"schedule": "linear", "mlm_probability_end": 0.1},  # no length
        {"schedule": "cosine", "schedule_length": 5},  # no end rate
        {"schedule": "linear", "mlm_probability_end": 1.5, "schedule_length": 5},
        {"schedule": "linear", "mlm_probability_end": 0.1, "schedule_length": 0},
        {"schedule": "exponential", "mlm_probability_end": 0.1, "schedule_length": 5},
        {"schedule": "linear", "mlm_probability_end": 0.1, "schedule_length": 5, "schedule_unit": "hour"},
        {"mlm_probability_end": 0.1},  # an end rate without a schedule
        {"schedule": "linear", "mlm_probability_end": 0.1, "schedule_length": 5, "mode": "static"},
    ],
)
def test_bad_schedules_are_problems_and_change_nothing(service_url, client, ds, params):
    with httpx.Client(base_url=service_url) as h:
        r = h.get(f"/v1/datasets/{ds['name']}/batch", params={"size": 4, "seed": 1, **params})
        assert r.status_code == 422 and r.headers["content-type"].startswith(PROBLEM), r.text
        job = f"bad-{uuid.uuid4().hex[:6]}"
        r = h.post("/v1/jobs", json={"name": job, "dataset": ds["name"], "masking": params})
        assert r.status_code == 422 and r.headers["content-type"].startswith(PROBLEM), r.text
        assert h.get(f"/v1/jobs/{job}").status_code == 404


def test_static_masks_refuse_a_schedule(client, ds):
    with pytest.raises(BadRequestError) as err:
        client.build_static_masks(ds["name"], copies=2, **mask_rate_schedule("linear", 0.3, 0.1, 5))
    assert err.value.status == 422
    assert client.static_masks(ds["name"]) == []


@pytest.mark.parametrize(
    "args",
    [("cubic", 0.3, 0.1, 5), ("linear", 1.3, 0.1, 5), ("linear", 0.3, -0.1, 5), ("linear", 0.3, 0.1, 0),
     ("linear", 0.3, 0.1, 5, "minute")],
)  # fmt: skip
def test_client_schedule_helper_checks_its_arguments(args):
    with pytest.raises(ValueError):
        mask_rate_schedule(*args)
