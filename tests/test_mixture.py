"""Mixture math: which source each position draws and its source position (pure; no service, no Redis).

The stream is checked against what the contract in service/jobs/mixture.py promises: per-block quotas,
exact quotas in every window of a block's length under constant weights, the window bound, curricula,
exhaustion, the end of the stream, determinism, and lookups that never walk from the start.
"""

from __future__ import annotations

import numpy as np
import pytest

from service.jobs import mixture
from service.jobs.mixture import MAX_POSITION, Mixture, block_pattern, quotas

CHI2_1DOF_1PCT = 6.635
BIG = 10**9


def _windows(source: np.ndarray, s: int, m: int) -> np.ndarray:
    """Positions of source ``s`` in every window of ``m`` consecutive positions of ``source``."""
    cs = np.concatenate([[0], np.cumsum(source == s)])
    return cs[m:] - cs[:-m]


def _onehot_steps(mix: Mixture, stop: int) -> np.ndarray:
    counts = np.array([mix.counts(k) for k in range(stop + 1)])
    return np.diff(counts, axis=0)


def test_three_to_one_passes_chi_square_and_every_window_of_a_block_holds_the_quota():
    mix = Mixture([BIG, BIG], [3, 1], True, block=256, seed=7)
    n = 100_000
    counts = mix.counts(n)
    expected = np.array([0.75, 0.25]) * n
    assert float(((counts - expected) ** 2 / expected).sum()) < CHI2_1DOF_1PCT
    assert mix.block_quotas(0).tolist() == [192, 64]
    source, _ = mix.locate(0, n)
    assert np.array_equal(np.bincount(source, minlength=2), counts)
    for s, q in enumerate([192, 64]):
        assert np.all(_windows(source, s, 256) == q)


@pytest.mark.parametrize(
    "weights",
    [
        [3, 1], [0.7, 0.3], [5, 3, 1], [231, 5, 20], [1, 2, 3, 4, 5],
        [1.0 + i for i in range(16)], [50, *[1] * 9], [1.0 + i for i in range(64)],
    ],  # fmt: skip
)
def test_every_window_stays_within_the_bound_under_constant_weights(weights):
    """Any m consecutive positions hold m*q/M of a source within 2 - 1/(n-1) (within 1 for two sources)."""
    block = 256
    mix = Mixture([BIG] * len(weights), weights, True, block=block, seed=11)
    q = mix.block_quotas(0)
    live = int((q > 0).sum())
    bound = 2 - 1 / (live - 1) if live > 1 else 0
    source, _ = mix.locate(0, 4 * block)
    worst = 0.0
    for s in range(len(weights)):
        for m in range(1, block + 1):
            worst = max(worst, float(np.abs(_windows(source, s, m) - m * q[s] / block).max()))
        assert np.all(_windows(source, s, block) == q[s])
    assert worst <= bound + 1e-12
    if weights == [231, 5, 20]:
        assert worst > 1  # the honest part of the bound: three sources can be off by more than one


def test_a_linear_curriculum_gives_each_block_its_interpolated_share():
    block, batch, steps = 256, 32, 1000
    mix = Mixture([BIG, BIG], [1, 1], True, block=block, seed=3, batch_size=batch,
                  schedule=[(0, [0.9, 0.1]), (steps, [0.1, 0.9])])  # fmt: skip
    for b in range(0, steps * batch // block + 20):
        t = min(1.0, b * block / (steps * batch))
        want = np.array([0.9 - 0.8 * t, 0.1 + 0.8 * t])
        q = mix.block_quotas(b)
        assert q.sum() == block
        assert np.all(np.abs(q / block - want) < 1 / block)
        assert np.array_equal(mix.counts((b + 1) * block) - mix.counts(b * block), q)
    assert mix.block_quotas(0).tolist() == [230, 26]
    assert mix.block_quotas(10**6).tolist() == [26, 230]  # the last point's weights hold after it


def test_step_interpolation_switches_at_the_first_block_at_or_after_each_point():
    block, batch = 64, 16
    # points at positions 320 (before it: its weights), 1024 = block 16's start, 1616 = inside block 25
    mix = Mixture([BIG, BIG], [1, 1], True, block=block, seed=0, batch_size=batch, interpolation="step",
                  schedule=[(20, [3, 1]), (64, [1, 1]), (101, [1, 3])])  # fmt: skip
    assert mix.block_quotas(0).tolist() == [48, 16]
    assert mix.block_quotas(15).tolist() == [48, 16]
    assert mix.block_quotas(16).tolist() == [32, 32]
    assert mix.block_quotas(25).tolist() == [32, 32]
    assert mix.block_quotas(26).tolist() == [16, 48]
    assert mix.runs == 3


def _tangled() -> Mixture:
    """Three sources, one that runs out mid-curriculum, small blocks: every code path at once."""
    return Mixture([700, 5, BIG], [1, 1, 1], [False, True, True], block=32, seed=5, batch_size=8,
                   schedule=[(10, [6, 1, 1]), (200, [1, 1, 6]), (260, [1, 4, 1])])  # fmt: skip


@pytest.mark.parametrize("make", [_tangled, lambda: Mixture([BIG] * 3, [5, 3, 1], True, block=16, seed=2)])
def test_counts_step_one_hot_and_agree_with_locate(make):
    mix = make()
    steps = _onehot_steps(mix, 3000)
    assert np.all(steps.sum(axis=1) == 1) and np.all((steps == 0) | (steps == 1))
    source, at = mix.locate(0, 3000)
    assert np.array_equal(source, steps.argmax(axis=1))
    for s in range(3):  # a source's source positions are 0, 1, 2, ... in stream order
        assert np.array_equal(at[source == s], np.arange(int((source == s).sum())))


def test_locate_splits_anywhere_and_starts_at_the_counts():
    mix = _tangled()
    rng = np.random.default_rng(0)
    for _ in range(50):
        a, c, b = sorted(int(x) for x in rng.integers(0, 6000, 3))
        whole = mix.locate(a, b)
        left, right = mix.locate(a, c), mix.locate(c, b)
        assert np.array_equal(whole[0], np.concatenate([left[0], right[0]]))
        assert np.array_equal(whole[1], np.concatenate([left[1], right[1]]))
        before = mix.counts(a)
        for s in range(3):
            mine = whole[1][whole[0] == s]
            assert np.array_equal(mine, before[s] + np.arange(len(mine)))


def test_a_source_that_runs_out_draws_exactly_its_size_and_the_rest_renormalise():
    mix = Mixture([1000, BIG, BIG], [2, 1, 1], [False, True, True], block=256, seed=1)
    source, at = mix.locate(0, 20_000)
    assert int((source == 0).sum()) == 1000 and sorted(at[source == 0]) == list(range(1000))
    assert mix.counts(10**12)[0] == 1000
    assert mix.block_quotas(6).tolist() == [128, 64, 64]
    assert mix.block_quotas(7).tolist() == [104, 76, 76]  # 104 left: capped, the rest shared 1:1
    assert mix.block_quotas(8).tolist() == [0, 128, 128]
    assert np.allclose(mix.share(8 * 256, 10**9), [0, 0.5, 0.5])
    assert mix.exhausted_at is None and mix.runs == 3


def test_the_stream_ends_where_every_source_has_run_out():
    mix = Mixture([50, 70], [1, 1], False, block=64, seed=9)
    assert mix.exhausted_at == 120 == mix.end()
    assert mix.end(num_samples=100) == 100 and mix.end(num_samples=500) == 120
    assert mix.counts(120).tolist() == [50, 70]
    assert mix.block_quotas(1).tolist() == [18, 38]  # the short last block
    with pytest.raises(ValueError):
        mix.locate(0, 121)
    with pytest.raises(ValueError):
        mix.end(until=0, epochs=2)  # one epoch only: it does not repeat


def test_until_epochs_gives_the_exact_end_and_a_repeating_source_upsamples():
    mix = Mixture([100, 37], [1, 1], True, block=16, seed=4)
    end = mix.end(until=1, epochs=3)
    assert mix.counts(end)[1] == 111 and mix.counts(end - 1)[1] == 110
    assert mix.locate(end - 1, end)[0].tolist() == [1]
    source, at = mix.locate(0, end)
    assert at[source == 1].max() == 110  # past n = 37: three epochs of the small source
    assert mix.end(until=1, epochs=3, num_samples=50) == 50
    assert mix.end(until=1) == mix.end(until=1, epochs=1)


def test_a_stream_that_nothing_bounds_is_refused():
    mix = Mixture([100, 37], [1, 1e-6], True, block=16, seed=4)
    assert mix.block_quotas(0).tolist() == [16, 0]
    with pytest.raises(ValueError, match="must end"):
        mix.end()
    with pytest.raises(ValueError, match="must end"):
        mix.end(until=1)  # never drawn: it never gets there
    with pytest.raises(ValueError):
        mix.end(epochs=2)
    with pytest.raises(ValueError, match="run past"):
        Mixture([10**12], [1], True).end(until=0, epochs=10**7)


def test_same_arguments_agree_and_the_seed_moves_only_the_layout():
    args = ([800, BIG, 300], [1, 2, 1], [False, True, True])
    kw = dict(block=64, batch_size=4, schedule=[(0, [1, 2, 1]), (500, [3, 1, 2])])
    one, two, other = Mixture(*args, seed=1, **kw), Mixture(*args, seed=1, **kw), Mixture(*args, seed=2, **kw)
    n = 64 * 200
    assert all(np.array_equal(x, y) for x, y in zip(one.locate(0, n), two.locate(0, n)))
    for b in range(200):
        assert np.array_equal(one.block_quotas(b), other.block_quotas(b))
        assert np.array_equal(one.counts(b * 64), other.counts(b * 64))
    assert not np.array_equal(one.locate(0, n)[0], other.locate(0, n)[0])


def test_far_lookups_are_closed_forms_not_scans():
    block_pattern.cache_clear()
    mix = Mixture([BIG, BIG, BIG], [5, 3, 1], True, block=256, seed=8)
    assert mix.runs == 1  # constant weights: one run, its counts a closed form
    k = 10**12 + 77
    q = mix.block_quotas(0)
    pattern, _ = block_pattern(tuple(q.tolist()), 8)
    want = (k // 256) * q + np.bincount(pattern[: k % 256], minlength=3)
    assert np.array_equal(mix.counts(k), want)
    assert mix.locate(k, k + 5)[1].tolist() == [int(want[s]) + list(mix.locate(k, k + 5)[0][:i]).count(s)
                                                for i, s in enumerate(mix.locate(k, k + 5)[0])]  # fmt: skip
    assert block_pattern.cache_info().misses == 1  # one pattern built, whatever k
    ran_out = Mixture([1000, BIG], [3, 1], [False, True], block=256, seed=8)
    assert ran_out.runs == 3 and ran_out.counts(10**12).tolist() == [1000, 10**12 - 1000]


def test_a_long_linear_segment_keeps_one_run_per_change_and_has_a_bound():
    mix = Mixture([BIG, BIG], [1, 1], True, block=256, batch_size=256,
                  schedule=[(0, [0.9, 0.1]), (100_000, [0.1, 0.9])])  # fmt: skip
    assert mix.runs < 300  # 100,000 blocks, but the quota vector changes about 205 times
    with pytest.raises(ValueError, match="linear segments span"):
        Mixture([BIG, BIG], [1, 1], True, block=256, batch_size=256, max_table_blocks=50_000,
                schedule=[(0, [0.9, 0.1]), (100_000, [0.1, 0.9])])  # fmt: skip
    assert Mixture([BIG, BIG], [1, 1], True, block=256, batch_size=256, interpolation="step",
                   schedule=[(0, [0.9, 0.1]), (10**12, [0.1, 0.9])]).runs == 2  # fmt: skip


@pytest.mark.parametrize(
    "args, kw",
    [
        (([10] * 65, [1] * 65, True), {}),
        (([10, 10], [1, 0], True), {}),
        (([10, 10], [1, float("nan")], True), {}),
        (([10, 0], [1, 1], True), {}),
        (([10] * 4, [1] * 4, True), {"block": 3}),
        (([10, 10], [1, 1], True), {"schedule": [(0, [1, 1])]}),
        (([10, 10], [1, 1], True), {"schedule": [(5, [1, 1]), (5, [1, 2])], "batch_size": 2}),
        (([10, 10], [1, 1], True), {"schedule": [(0, [1, 1, 1])], "batch_size": 2}),
        (([10, 10], [1, 1], True), {"interpolation": "cubic"}),
    ],
)
def test_bad_arguments_are_refused(args, kw):
    with pytest.raises(ValueError):
        Mixture(*args, **kw)


def test_positions_outside_the_stream_are_refused():
    mix = Mixture([BIG], [1], True, block=8)
    assert mix.locate(5, 5)[0].size == 0
    for bad in (-1, MAX_POSITION + 1):
        with pytest.raises(ValueError):
            mix.counts(bad)
    with pytest.raises(ValueError):
        mix.locate(6, 5)


def _reference_blocks(sizes, weights, repeat, block, points, interpolation, blocks):
    """The contract walked block by block, naively: each block's quota vector, and where the stream ends."""
    sizes, repeat = np.array(sizes), np.array(repeat)
    norm = [(p, np.asarray(w, dtype=float) / sum(float(v) for v in w)) for p, w in points]
    count, active, out = np.zeros(len(sizes), dtype=np.int64), np.ones(len(sizes), dtype=bool), []
    for b in range(blocks):
        x = b * block
        w = norm[0][1] if x <= norm[0][0] else norm[-1][1]
        for (p0, w0), (p1, w1) in zip(norm[:-1], norm[1:]):
            if p0 <= x < p1:
                w = w0 if interpolation == "step" else w0 + (w1 - w0) * (float(x - p0) / float(p1 - p0))
        left = np.where(repeat, 1 << 62, sizes - count)
        q, fixed = np.zeros(len(sizes), dtype=np.int64), ~active
        while not fixed.all():
            share = quotas(w[None, :], ~fixed, block - int(q.sum()))[0]
            over = ~fixed & (share >= left)
            if not over.any():
                q[~fixed] = share[~fixed]
                break
            q[over], fixed = left[over], fixed | over
        out.append(q)
        count += q
        active &= repeat | (count < sizes)
        if not active.any():
            return out, x + int(q.sum())
    return out, None


@pytest.mark.parametrize("seed", range(24))
def test_random_mixtures_match_a_block_by_block_walk(seed, monkeypatch):
    """Runs, closed forms, chunked linear segments (chunks of 1, 5 and the default) and exhaustion agree with
    a walk over every block."""
    monkeypatch.setattr(mixture, "_CHUNK", [1, 5, mixture._CHUNK][seed % 3])
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 6))
    block = int(rng.integers(n, 40))
    sizes = rng.integers(1, 1500, n).tolist()
    repeat = (rng.random(n) < 0.5).tolist()
    weights = (rng.random(n) + 0.05).tolist()
    steps = np.cumsum(rng.integers(1, 300, int(rng.integers(1, 4)))).tolist()
    points = [(int(s), (rng.random(n) + 0.05).tolist()) for s in steps]
    interpolation = "step" if seed % 4 == 0 else "linear"
    batch = int(rng.integers(1, 9))
    mix = Mixture(sizes, weights, repeat, block=block, seed=seed, schedule=points, interpolation=interpolation,
                  batch_size=batch)  # fmt: skip
    want, end = _reference_blocks(sizes, weights, repeat, block, [(s * batch, w) for s, w in points],
                                  interpolation, 300)  # fmt: skip
    assert mix.exhausted_at == end or (end is None and mix.exhausted_at >= 300 * block)  # ends past the walk
    for b, q in enumerate(want):
        assert mix.block_quotas(b).tolist() == q.tolist(), b
        assert np.array_equal(mix.counts(b * block + int(q.sum())) - mix.counts(b * block), q)
    source, at = mix.locate(0, min(mix.limit, 300 * block))
    for s in range(n):
        assert np.array_equal(at[source == s], np.arange(int((source == s).sum())))
        assert (source == s).sum() <= sizes[s] or repeat[s]
