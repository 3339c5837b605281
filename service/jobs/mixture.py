"""Mixtures: which source each position of a job's stream draws, and that source's own position.

A mixture job reads several sources (datasets) at once. Position k (0, 1, 2, ...) of its stream draws one
source; batch i of a job of batch size B is positions [i*B, (i+1)*B). The c-th draw of source s (its *source
position* c, from 0) serves epoch c // n_s of that source, element c % n_s of the epoch's permutation (that part
lives with the epochs, not here). Everything below is a pure function of the constructor's arguments: no
state, no order dependence, and no scan from the start of the run (cost per lookup is O(log runs) + O(M)).

The contract
------------
Sources 0..S-1 (1 <= S <= 64) each have a size n_s >= 1, a weight w_s > 0 and ``repeat``. A repeating source
starts its next epoch when one ends (upsampling); a non-repeating source has exactly one epoch.

**Blocks.** The stream is cut into blocks of M positions (``block``, M >= S): block b is [b*M, (b+1)*M).
Weights change only at block starts.

**Weights of a block.** Without a schedule, every block has the sources' own weights. A schedule is a list
of points (step, weights), steps (in batches, so at position step*B) strictly increasing, every weight > 0.
Each point's weights are first normalised to sum 1. Block b takes the schedule at position x = b*M: before
the first point (x <= its position) the first point's weights, at or after the last point the last's;
between points i and i+1 (p_i <= x < p_{i+1}), ``linear`` gives w_i + (w_{i+1} - w_i) * (x - p_i) /
(p_{i+1} - p_i) and ``step`` gives w_i (the last point at or before x). A point that falls inside a block
takes effect at the next block start.

**Quotas.** In block b each *active* source s gets an integer quota q_s(b), the quotas summing to M: the
largest-remainder rounding of M * w_s(b) / W(b), W(b) the sum of the active sources' weights (each gets the
floor; the floors' shortfall goes one each to the largest fractional parts, ties to the lower source index).
So |q_s(b) - M * w_s(b) / W(b)| < 1: a block's share of each source is within 1/M of its weight.

**Exhaustion.** Every source is active in block 0. A non-repeating source runs out when it has made n_s
draws. In the block where some source would reach its n_s-th draw, every source whose quota is at least
what it has left is capped at what it has left (and so runs out in that block); the block's other positions
are shared among the other active sources by the same rounding of their renormalised weights, capping again
if that makes another reach its end. From the next block on, a source that has run out is inactive. When
no active source is left, the stream ends at the position after the last draw (the last block may be short).

**Layout inside a block.** Positions of a block are laid out by a pattern that depends only on the block's
quota vector and the seed, so constant weights give a periodic stream (period M). The pattern is the
earliest-deadline-first sequence of Tijdeman's chairman assignment: with n sources of positive quota,
T = sum of quotas and delta = 1 / (2n - 2), slot k (1-based) of source s is released at position
(k - 1 + delta) * T / q_s and due at (k - delta) * T / q_s (1-based), and at each position the released
slot with the earliest deadline is placed (equal deadlines: a seed-drawn priority of the sources). That
sequence keeps every prefix of t positions within 1 - delta of t * q_s / T for every source. The pattern is
then rotated by a seed-drawn offset. Source s's slots inside a block take its next q_s source positions,
in order: source positions of a source are 0, 1, 2, ... in the order of its stream positions.

**Bounds that hold** (constant weights, all sources of positive quota counted in n): every window of M
consecutive positions holds exactly q_s positions of source s; every window of m consecutive positions
holds m * q_s / M +- (2 - 1/(n - 1)) of them: within 1 with two sources, but with three or more a window can
be off by more than 1 (quotas 231/5/20 of 256 reach 1.45), though never by 2. Across blocks whose weights
differ, only the per-block quotas are guaranteed.

**End.** ``Mixture.end`` takes num_samples (positions), and/or ``until`` (a source) with ``epochs`` (default
1): the position after that source's (epochs * n_until)-th draw. The stream ends at the first of these and
of every source running out; if none of them bounds it, it is refused (ValueError: a mixture job must end).

**Bound on the tables.** Constant spans of weights are one run each (closed form), whatever their length.
A linear segment of a schedule changes weights every block, so its quotas are computed once per block at
construction and kept run-length encoded (a run per change of the quota vector): its cost is linear in the
segment's blocks, and the segments of a schedule may span at most ``max_table_blocks`` blocks in all.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from fractions import Fraction
from functools import lru_cache
from typing import Literal

import numpy as np

from ..masking.rng import key64

MAX_SOURCES = 64
DEFAULT_BLOCK = 256
MAX_BLOCK = 1 << 16
#: blocks a schedule's linear segments may span in all (each is tabled at construction)
MAX_TABLE_BLOCKS = 1 << 20
#: positions beyond this are refused: block arithmetic stays far inside int64
MAX_POSITION = 1 << 60
_CHUNK = 1 << 14  # blocks of a linear segment evaluated at once
_ROTATE, _PRIORITY = 0x6D697872, 0x6D697870  # hash domains of the pattern's rotation and priorities
Interpolation = Literal["linear", "step"]


def _row_sums(w: np.ndarray) -> np.ndarray:
    """Sums of the rows of ``w`` added left to right: the same bits whatever the number of rows."""
    total = np.zeros(w.shape[0], dtype=np.float64)
    for j in range(w.shape[1]):
        total += w[:, j]
    return total


def quotas(weights: np.ndarray, active: np.ndarray, total: int) -> np.ndarray:
    """Largest-remainder quotas of ``total`` for each row of ``weights`` (K, S) among the ``active`` sources.

    Inactive sources get 0; the rounding's extra units go to the largest fractional parts, ties to the lower
    source index (a stable sort), so a row's result does not depend on the other rows.
    """
    w = np.where(active[None, :], weights, 0.0)
    x = w * (float(total) / _row_sums(w))[:, None]
    floor = np.floor(x)
    q = floor.astype(np.int64)
    extra = total - q.sum(axis=1)
    frac = np.where(active[None, :], x - floor, -1.0)
    order = np.argsort(-frac, axis=1, kind="stable")
    gets = np.arange(w.shape[1])[None, :] < extra[:, None]
    q[np.arange(w.shape[0])[:, None], order] += gets  # each row's indices are distinct: no lost updates
    return q


def _edf(counts: tuple[int, ...], priority: tuple[int, ...]) -> list[int]:
    """Tijdeman's earliest-deadline-first sequence for these quotas (the module docstring says which)."""
    total = sum(counts)
    live = [s for s, q in enumerate(counts) if q > 0]
    if len(live) == 1:
        return live * total
    d = 2 * len(live) - 2
    slots = []
    for s in live:
        q = counts[s]
        for k in range(1, q + 1):
            release = -(-((k - 1) * d + 1) * total // (q * d))
            slots.append((release, Fraction(k * d - 1, q), priority[s], s))
    slots.sort()
    ready: list[tuple[Fraction, int, int]] = []
    out, i = [], 0
    for t in range(1, total + 1):
        while i < len(slots) and slots[i][0] <= t:
            heapq.heappush(ready, slots[i][1:])
            i += 1
        out.append(heapq.heappop(ready)[2])  # never empty: Tijdeman (1980) shows every slot fits its window
    return out


@lru_cache(maxsize=4096)
def block_pattern(counts: tuple[int, ...], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A block's layout for quota vector ``counts``: (source of each slot, its rank among that source's slots).

    Only the quotas and the seed decide it (cached per pair; the arrays are read-only).
    """
    priority = tuple(int(key64(_PRIORITY, seed, s)[0]) for s in range(len(counts)))
    base = np.array(_edf(counts, priority), dtype=np.int64)
    total = len(base)
    source = np.roll(base, -(int(key64(_ROTATE, seed, total)[0]) % total)) if total else base
    rank = np.zeros(total, dtype=np.int64)
    for s in np.unique(source):
        at = source == s
        rank[at] = np.arange(int(at.sum()))
    source.setflags(write=False)
    rank.setflags(write=False)
    return source, rank


def _points(schedule: Sequence[tuple[int, Sequence[float]]], sources: int, batch: int) -> list[tuple[int, np.ndarray]]:
    """The schedule as (position, normalised weights), checked."""
    out: list[tuple[int, np.ndarray]] = []
    for step, weights in schedule:
        if int(step) != step or step < 0 or (out and step * batch <= out[-1][0]):
            raise ValueError("schedule steps must be integers >= 0, strictly increasing")
        out.append((int(step) * batch, _weights(weights, sources)))
    if not out:
        raise ValueError("a schedule needs at least one point")
    return out


def _weights(weights: Sequence[float], sources: int) -> np.ndarray:
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != (sources,) or not np.all(np.isfinite(w)) or not np.all(w > 0):
        raise ValueError(f"weights must be {sources} finite numbers > 0")
    return w / sum(float(v) for v in w)


def _spans(points: list[tuple[int, np.ndarray]], interpolation: Interpolation, block: int) -> list[tuple]:
    """Block ranges of one kind of weights: ('const', b0, b1, w) or ('linear', b0, b1, (w0, w1, p0, p1)).

    b1 None is for ever; a point takes effect at the first block starting at or after it.
    """
    starts = [-(-p // block) for p, _ in points]
    spans: list[tuple] = [("const", 0, starts[0], points[0][1])]
    for i in range(len(points) - 1):
        (p0, w0), (p1, w1) = points[i], points[i + 1]
        if interpolation == "step" or np.array_equal(w0, w1):
            spans.append(("const", starts[i], starts[i + 1], w0))
        else:
            spans.append(("linear", starts[i], starts[i + 1], (w0, w1, p0, p1)))
    spans.append(("const", starts[-1], None, points[-1][1]))
    return [s for s in spans if s[2] is None or s[2] > s[1]]


class _Builder:
    """Walks the spans once, block ranges at a time, and records runs: (first block, quotas, counts before).

    A run is a block range of one quota vector, so the counts at any block inside it are a closed form.
    """

    def __init__(self, sizes: np.ndarray, repeat: np.ndarray, block: int) -> None:
        self.sizes, self.repeat, self.m = sizes, repeat, block
        self.count = np.zeros(len(sizes), dtype=np.int64)
        self.active = np.ones(len(sizes), dtype=bool)
        self.starts: list[int] = []
        self.qs: list[np.ndarray] = []
        self.cs: list[np.ndarray] = []
        self.end: int | None = None  # where every source has run out, if they do

    def emit(self, b: int, q: np.ndarray, blocks: int) -> None:
        if not (self.qs and np.array_equal(self.qs[-1], q)):
            self.starts.append(b)
            self.qs.append(q.copy())
            self.cs.append(self.count.copy())
        self.count += blocks * q

    def _finite(self) -> np.ndarray:
        return self.active & ~self.repeat

    def constant(self, b: int, stop: int | None, w: np.ndarray) -> None:
        """Blocks [b, stop) (stop None: for ever) of weights ``w``: a run per change of the active sources."""
        while self.end is None and (stop is None or b < stop):
            q = quotas(w[None, :], self.active, self.m)[0]
            hit = self._finite() & (q > 0)
            out = None  # the block where the first source runs out
            if hit.any():
                out = b + int(((self.sizes - self.count - 1)[hit] // q[hit]).min())
            if out is None and stop is None:
                self.emit(b, q, 0)  # the last run: it goes on for ever
                return
            inside = out is not None and (stop is None or out < stop)
            until = out if inside else stop
            assert until is not None
            if until > b:
                self.emit(b, q, until - b)
            if inside:
                self.event(until, w)
                until += 1
            b = until

    def linear(self, b: int, stop: int, spec: tuple[np.ndarray, np.ndarray, int, int]) -> None:
        """Blocks [b, stop) of a linear segment, evaluated a chunk of blocks at a time."""
        w0, w1, p0, p1 = spec
        while self.end is None and b < stop:
            k = min(_CHUNK, stop - b)
            t = (np.arange(b, b + k, dtype=np.int64) * self.m - p0).astype(np.float64) / float(p1 - p0)
            w = w0[None, :] + (w1 - w0)[None, :] * t[:, None]
            q = quotas(w, self.active, self.m)
            reached = (self.count[None, :] + np.cumsum(q, axis=0) >= self.sizes[None, :]) & self._finite()[None, :]
            rows = np.flatnonzero(reached.any(axis=1))
            out = int(rows[0]) if rows.size else k
            moved = (np.flatnonzero(np.any(q[1:out] != q[: out - 1], axis=1)) + 1).tolist() if out > 1 else []
            changes = [0, *moved, out]
            for lo, hi in zip(changes[:-1], changes[1:]):
                if hi > lo:
                    self.emit(b + lo, q[lo], hi - lo)
            if out < k:
                self.event(b + out, w[out])
                out += 1
            b += out

    def event(self, b: int, w: np.ndarray) -> None:
        """Block ``b``, where a source runs out: cap those that reach their end, share the rest, retire them."""
        left = np.where(self.repeat, np.iinfo(np.int64).max, self.sizes - self.count)
        q = np.zeros(len(self.sizes), dtype=np.int64)
        fixed = np.zeros(len(self.sizes), dtype=bool)
        while (free := self.active & ~fixed).any():
            share = quotas(w[None, :], free, self.m - int(q.sum()))[0]
            over = free & (share >= left)
            if not over.any():
                q[free] = share[free]
                break
            q[over] = left[over]
            fixed |= over
        self.emit(b, q, 1)
        self.active &= self.repeat | (self.count < self.sizes)
        if not self.active.any():
            self.end = b * self.m + int(q.sum())


class Mixture:
    """The position -> (source, source position) map of one mixture stream (the module docstring is its contract).

    Built once (cheap unless a schedule has long linear segments); every lookup is a bisect over the runs plus
    at most one block's pattern, never a walk from the start.
    """

    def __init__(
        self,
        sizes: Sequence[int],
        weights: Sequence[float],
        repeat: bool | Sequence[bool],
        *,
        block: int = DEFAULT_BLOCK,
        seed: int = 0,
        schedule: Sequence[tuple[int, Sequence[float]]] | None = None,
        interpolation: Interpolation = "linear",
        batch_size: int | None = None,
        max_table_blocks: int = MAX_TABLE_BLOCKS,
    ) -> None:
        n = len(sizes)
        if not 1 <= n <= MAX_SOURCES:
            raise ValueError(f"a mixture has 1 to {MAX_SOURCES} sources")
        self.sizes = np.array([int(s) for s in sizes], dtype=np.int64)
        if np.any(self.sizes < 1) or any(int(s) != s for s in sizes):
            raise ValueError("source sizes must be integers >= 1")
        self.repeat = np.broadcast_to(np.asarray(repeat, dtype=bool), (n,)).copy()
        if not n <= block <= MAX_BLOCK:
            raise ValueError(f"block must be at least the number of sources ({n}) and at most {MAX_BLOCK}")
        if not 0 <= seed < 1 << 64:
            raise ValueError("seed must be in [0, 2**64)")
        if interpolation not in ("linear", "step"):
            raise ValueError("interpolation is 'linear' or 'step'")
        self.block, self.seed = int(block), int(seed)
        self.weights = _weights(weights, n)
        if schedule is None:
            points = [(0, self.weights)]
        elif batch_size is None or batch_size < 1:
            raise ValueError("a schedule counts steps of batch_size positions: give batch_size >= 1")
        else:
            points = _points(schedule, n, int(batch_size))
        self._build(_spans(points, interpolation, self.block), max_table_blocks)

    def _build(self, spans: list[tuple], max_table_blocks: int) -> None:
        tabled = sum(stop - start for kind, start, stop, _ in spans if kind == "linear")
        if tabled > max_table_blocks:
            raise ValueError(
                f"the schedule's linear segments span {tabled} blocks of {self.block} positions; at most "
                f"{max_table_blocks} are allowed (fewer, longer steps, a larger block, or step interpolation)"
            )
        b = _Builder(self.sizes, self.repeat, self.block)
        for kind, start, stop, spec in spans:
            if kind == "linear":
                b.linear(start, stop, spec)
            else:
                b.constant(start, stop, spec)
        self._starts = np.array(b.starts, dtype=np.int64)
        self._q = np.array(b.qs, dtype=np.int64)
        self._c = np.array(b.cs, dtype=np.int64)
        assert np.all(np.diff(self._starts) > 0), "runs must start at increasing blocks"
        #: the position where every source has run out (the stream's natural end), or None
        self.exhausted_at = b.end

    @property
    def runs(self) -> int:
        """Block ranges of one quota vector the stream is made of (what a lookup bisects)."""
        return len(self._starts)

    @property
    def limit(self) -> int:
        """Positions below this exist: where every source has run out, else MAX_POSITION."""
        return MAX_POSITION if self.exhausted_at is None else self.exhausted_at

    def _run(self, b: int) -> int:
        return int(np.searchsorted(self._starts, b, side="right")) - 1

    def block_quotas(self, b: int) -> np.ndarray:
        """q_s(b): the positions of each source in block ``b`` (0 for an inactive source)."""
        if not 0 <= b * self.block < self.limit:
            raise ValueError(f"block {b} is outside the stream")
        return self._q[self._run(b)].copy()

    def _check(self, *positions: int) -> None:
        for p in positions:
            if not 0 <= p <= self.limit:
                raise ValueError(f"position {p} is outside the stream [0, {self.limit}]")

    def counts(self, k: int) -> np.ndarray:
        """Draws of each source among positions [0, k)."""
        self._check(k)
        b, r = divmod(int(k), self.block)
        i = self._run(b)
        out = self._c[i] + (b - int(self._starts[i])) * self._q[i]
        if r:
            source, _ = block_pattern(tuple(self._q[i].tolist()), self.seed)
            out += np.bincount(source[:r], minlength=len(self.sizes))
        return out

    def share(self, start: int, stop: int) -> np.ndarray:
        """The fraction of positions [start, stop) each source draws."""
        if stop <= start:
            raise ValueError("share needs start < stop")
        return (self.counts(stop) - self.counts(start)) / float(stop - start)

    def locate(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """(source, source position) of every position in [start, stop), as two int64 arrays."""
        self._check(start, stop)
        if stop < start:
            raise ValueError("locate needs start <= stop")
        source = np.empty(stop - start, dtype=np.int64)
        at = np.empty(stop - start, dtype=np.int64)
        p = start
        while p < stop:
            i = self._run(p // self.block)
            first = int(self._starts[i])
            upto = stop if i + 1 == self.runs else min(stop, int(self._starts[i + 1]) * self.block)
            pattern, rank = block_pattern(tuple(self._q[i].tolist()), self.seed)
            blocks, slot = np.divmod(np.arange(p, upto, dtype=np.int64) - first * self.block, self.block)
            s = pattern[slot]
            source[p - start : upto - start] = s
            at[p - start : upto - start] = self._c[i][s] + blocks * self._q[i][s] + rank[slot]
            p = upto
        return source, at

    def reach(self, source: int, draws: int) -> int | None:
        """The position just after source ``source``'s ``draws``-th draw (draws >= 1), or None if it never makes it."""
        if not 0 <= source < len(self.sizes) or not 1 <= draws <= MAX_POSITION:
            raise ValueError(f"reach needs a source index and 1 to {MAX_POSITION} draws")
        col = self._c[:, source]
        i = int(np.searchsorted(col, draws, side="left")) - 1
        q = int(self._q[i, source])
        if q == 0:
            return None  # the last run, and it no longer draws this source
        b = int(self._starts[i]) + (draws - int(col[i]) - 1) // q
        if self.exhausted_at is not None and b * self.block >= self.exhausted_at:
            return None  # every source runs out first
        j = draws - (int(col[i]) + (b - int(self._starts[i])) * q) - 1
        pattern, _ = block_pattern(tuple(self._q[i].tolist()), self.seed)
        return b * self.block + int(np.flatnonzero(pattern == source)[j]) + 1

    def end(self, num_samples: int | None = None, until: int | None = None, epochs: int | None = None) -> int:
        """The stream's length: the first of num_samples, ``until``'s ``epochs`` epochs, every source run out."""
        ends = [] if self.exhausted_at is None else [self.exhausted_at]
        if num_samples is not None:
            if num_samples < 1:
                raise ValueError("num_samples must be >= 1")
            ends.append(int(num_samples))
        if until is None:
            if epochs is not None:
                raise ValueError("epochs counts the epochs of a source: give until")
        else:
            if not 0 <= until < len(self.sizes):
                raise ValueError(f"until must name a source, 0 to {len(self.sizes) - 1}")
            epochs = 1 if epochs is None else int(epochs)
            if epochs < 1 or (epochs > 1 and not self.repeat[until]):
                raise ValueError("epochs must be >= 1, and 1 for a source that does not repeat")
            draws = epochs * int(self.sizes[until])
            if draws > MAX_POSITION:
                raise ValueError(f"the stream would run past {MAX_POSITION} positions")
            after = self.reach(until, draws)
            if after is not None:
                ends.append(after)
        if not ends:
            raise ValueError("a mixture job must end: give num_samples, or until and epochs, or no repeating source")
        if min(ends) > MAX_POSITION:
            raise ValueError(f"the stream would run past {MAX_POSITION} positions")
        return min(ends)
