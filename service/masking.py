"""Masking: pure functions, arrays in, arrays out, no I/O.

Determinism (DESIGN.md): every random decision is a hash (rng.py) of
``(seed, epoch, sequence id, config digest)`` and a position, span or word
index, so a mask never depends on batch composition, order, worker count or
process. A 32-bit hash per position decides selection; only at selected
positions, a 64-bit hash decides the replacement kind (mask / random / keep
by the configured split: bits 40..63) and, where a random token is needed,
which one among the ordinary (non-special) ids, uniformly or by corpus
frequency.

Units (a registry, ``UNITS``): ``token``; ``whole_word`` (all pieces of a
word together, words given by the stored word-start bits); ``span`` (SpanBERT:
spans of whole words with lengths ~ Geometric(span_p) clipped to span_max by
renormalizing over 1..span_max, as SpanBERT does, mean 3.8 for 0.2 and 10).
Counts: ``bernoulli`` (each unit independently with p) or ``exact``
(round(p * candidates) tokens per sequence, capped by ``max_predictions``;
whole words and spans fill that budget without exceeding it).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import cached_property, lru_cache

import numpy as np

from . import rng
from .packing import runs
from .rng import MAX64, S40, chance, fmix64, sample_ids, threshold24

__all__ = ["IGNORE_INDEX", "MaskSpec", "Masked", "Vocab", "mask_batch", "mask_tokens", "sample_ids", "UNITS"]

IGNORE_INDEX = -100
COUNTS = ("bernoulli", "exact")
RANDOM_TOKENS = ("uniform", "frequency")


@dataclass(frozen=True)
class MaskSpec:
    """How to select and replace; its digest is folded into every mask."""

    mlm_probability: float = 0.15
    mask_ratio: float = 0.8
    random_ratio: float = 0.1
    unit: str = "token"
    count: str = "bernoulli"
    max_predictions: int | None = None
    random_tokens: str = "uniform"
    span_p: float = 0.2
    span_max: int = 10
    keep_ratio: float = field(init=False)

    def __post_init__(self) -> None:
        if not 0.0 <= self.mlm_probability <= 1.0:
            raise ValueError("mlm_probability must lie in [0, 1]")
        if self.mask_ratio < 0 or self.random_ratio < 0 or self.mask_ratio + self.random_ratio > 1.0 + 1e-9:
            raise ValueError("mask_ratio and random_ratio must be >= 0 and sum to at most 1")
        if self.unit not in UNITS:
            raise ValueError(f"unit must be one of {tuple(UNITS)}")
        if self.count not in COUNTS:
            raise ValueError(f"count must be one of {COUNTS}")
        if self.random_tokens not in RANDOM_TOKENS:
            raise ValueError(f"random_tokens must be one of {RANDOM_TOKENS}")
        if self.max_predictions is not None and self.max_predictions < 0:
            raise ValueError("max_predictions must be >= 0")
        if not 0.0 < self.span_p < 1.0 or not 1 <= self.span_max <= 64:
            raise ValueError("span_p must lie in (0, 1) and span_max in [1, 64]")
        # one spelling per value: 1 and 1.0, -0.0 and 0.0 are equal (and hash alike) but would
        # not serialize alike, and the digest is cached per equal spec
        for name in ("mlm_probability", "mask_ratio", "random_ratio", "span_p"):
            object.__setattr__(self, name, float(getattr(self, name)) + 0.0)
        object.__setattr__(self, "keep_ratio", max(0.0, 1.0 - self.mask_ratio - self.random_ratio))

    def key(self) -> int:
        """A stable 64-bit digest of the config."""
        return _digest(self)

    def span_lengths(self) -> tuple[np.ndarray, float]:
        """CDF of the span-length law over 1..span_max, and its mean."""
        k = np.arange(1, self.span_max + 1)
        pmf = self.span_p * (1 - self.span_p) ** (k - 1)
        pmf /= pmf.sum()
        cdf = np.cumsum(pmf)
        cdf[-1] = 1.0  # not 1 - rounding error: no uniform draw may fall past the last length
        return cdf, float((k * pmf).sum())


# Folded into every config digest: a change to how masks are drawn changes every
# mask, and the ids of static caches, so a cache built by another algorithm is
# never served as if it were this one's.
ALGORITHM = 2


@lru_cache(maxsize=1024)
def _digest(spec: MaskSpec) -> int:  # specs are frozen: one digest per distinct config, not per request
    canonical = json.dumps({**asdict(spec), "algorithm": ALGORITHM}, sort_keys=True).encode()
    return int.from_bytes(hashlib.blake2b(canonical, digest_size=8).digest(), "little")


@dataclass(frozen=True)
class Vocab:
    """The ids masking needs: the mask token, which ids are special, and
    (optionally) corpus counts per id for frequency-weighted replacements."""

    mask_id: int
    pad_id: int
    is_special: np.ndarray  # bool, one per id
    counts: np.ndarray | None = None  # int64 per id, or None
    ordinary_ids: np.ndarray = field(init=False)
    _cdf: np.ndarray | None = field(init=False)

    def __post_init__(self) -> None:
        ordinary = np.flatnonzero(~self.is_special).astype(np.int32)
        object.__setattr__(self, "ordinary_ids", ordinary)
        cdf = None
        if self.counts is not None:
            w = self.counts[ordinary].astype(np.float64) + 1e-3  # unseen ids stay possible, barely
            cdf = np.cumsum(w) / w.sum()
        object.__setattr__(self, "_cdf", cdf)

    @classmethod
    def build(
        cls, vocab_size: int, special_ids: list[int] | tuple[int, ...], mask_id: int, pad_id: int,
        counts: np.ndarray | None = None,
    ) -> "Vocab":  # fmt: skip
        is_special = np.zeros(vocab_size, dtype=bool)
        is_special[list(special_ids)] = True
        is_special[[mask_id, pad_id]] = True
        return cls(mask_id=mask_id, pad_id=pad_id, is_special=is_special, counts=counts)

    def draw(self, h: np.ndarray, weighted: bool) -> np.ndarray:
        """Ordinary ids for hashes ``h``: uniform, or by corpus frequency."""
        if weighted and self._cdf is not None:
            idx = np.searchsorted(self._cdf, rng.uniform01(h), side="left")
            return self.ordinary_ids[np.minimum(idx, len(self.ordinary_ids) - 1)]
        return self.ordinary_ids[rng.below(h, len(self.ordinary_ids))]


def padded(ids: np.ndarray, real: np.ndarray, pad_id: int) -> np.ndarray:
    """``ids`` as int32 with ``pad_id`` beyond each row's length (no copy when all rows are full)."""
    if real.all():
        return ids.astype(np.int32, copy=False)
    return np.where(real, ids, np.int32(pad_id)).astype(np.int32, copy=False)


@dataclass
class Masked:
    """A masked batch, all (B, L): ``selected`` marks the tokens to predict."""

    input_ids: np.ndarray  # int32
    labels: np.ndarray  # int32, IGNORE_INDEX where not selected
    attention_mask: np.ndarray  # uint8
    selected: np.ndarray  # bool
    word_start: np.ndarray | None = None  # bool, when the unit used words
    special: np.ndarray | None = None  # bool: special or pad (derived from ``is_special`` when not given)
    is_special: np.ndarray | None = None  # bool per id

    @property
    def special_tokens_mask(self) -> np.ndarray:
        """Special or pad, per position of the original sequence."""
        if self.special is None:
            assert self.is_special is not None, "Masked needs special or is_special"
            original = np.where(self.selected, self.labels, self.input_ids)
            self.special = np.take(self.is_special, original) | (self.attention_mask == 0)
        return self.special


@dataclass
class _Ctx:
    """What every unit selector gets."""

    rows: np.ndarray  # (B,) uint64 row keys
    cand: np.ndarray  # (B, L) bool: real, non-special tokens
    word_start: np.ndarray  # (B, L) bool: word starts; pads and specials are words of their own
    budget: np.ndarray | None  # (B,) int64: exact count mode's token budget
    spec: MaskSpec

    @cached_property
    def h(self) -> np.ndarray:
        """(B, L) uint32: one hash per position (computed only for the units that use it)."""
        return rng.grid32(self.rows, self.cand.shape[1])


@dataclass
class _Selection:
    """A selector's answer: the selected tokens and, for units whose replacement is
    decided once per group (spans), each selected token's group number, in flat
    position order (``at``, the flat positions, when the selector has them)."""

    selected: np.ndarray  # (B, L) bool
    at: np.ndarray | None = None
    groups: np.ndarray | None = None  # uint64, one per selected token


Selector = Callable[[_Ctx], _Selection]


def _budget(cand: np.ndarray, spec: MaskSpec) -> np.ndarray:
    n = cand.sum(axis=1)
    budget = np.floor(n * spec.mlm_probability + 0.5).astype(np.int64)
    if spec.max_predictions is not None:
        np.minimum(budget, spec.max_predictions, out=budget)
    return budget


def _smallest(keys: np.ndarray, budget: np.ndarray, never: np.generic) -> np.ndarray:
    """Per row, mark the ``budget`` smallest keys (keys distinct; ``never`` = not eligible)."""
    ordered = np.sort(keys, axis=1)
    b, n = keys.shape
    k = np.clip(budget, 1, n) - 1
    thr = ordered[np.arange(b), k]
    return (keys <= thr[:, None]) & (keys != never) & (budget > 0)[:, None]


def _unique_keys(h: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray, np.generic]:
    """Sortable keys without ties: random high bits, the position in the low bits."""
    n = h.shape[1]
    bits = max(1, int(n - 1).bit_length())
    if bits <= 12:  # 32-bit keys keep at least 20 random bits
        keys = ((h >> np.uint32(bits)) << np.uint32(bits)) | np.arange(n, dtype=np.uint32)[None, :]
        never: np.generic = np.uint32(0xFFFFFFFF)
    else:
        keys = (h.astype(np.uint64) << np.uint64(16)) | np.arange(n, dtype=np.uint64)[None, :]
        never = MAX64
    keys[~valid] = never
    return keys, never


def _select_token(c: _Ctx) -> _Selection:
    if c.budget is None:
        return _Selection(c.cand & chance(c.h, c.spec.mlm_probability))
    keys, never = _unique_keys(c.h, c.cand)
    return _Selection(_smallest(keys, c.budget, never))


class _Words:
    """Word structure of a batch: word starts, each token's word, word lengths."""

    def __init__(self, word_start: np.ndarray, cand: np.ndarray) -> None:
        b, n = word_start.shape
        flat = word_start.ravel()
        self.starts = np.flatnonzero(flat)  # flat positions of word starts
        self.word_of = np.cumsum(flat, dtype=np.int32) - 1  # flat token -> word number
        # candidate tokens per word (what a word costs against a token budget), by prefix sums
        seen = np.cumsum(cand.ravel(), dtype=np.int32)
        self.length = np.diff(np.append(seen[self.starts] - cand.ravel()[self.starts], seen[-1] if len(seen) else 0))
        # a word is a candidate when any of its tokens is (a special piece inside a word,
        # e.g. an unknown-token piece, is never selected, but the rest of the word can be)
        self.cand_word = self.length > 0
        self.shape = (b, n)

    def per_start(self, values: np.ndarray, fill: int | np.generic) -> np.ndarray:
        """A (B, L) matrix with ``values`` at word starts and ``fill`` elsewhere."""
        out = np.full(self.shape[0] * self.shape[1], fill, dtype=np.asarray(values).dtype)
        out[self.starts] = values
        return out.reshape(self.shape)

    def tokens(self, word_selected: np.ndarray, cand: np.ndarray) -> np.ndarray:
        return (np.take(word_selected, self.word_of) & cand.ravel()).reshape(self.shape)


def _select_whole_word(c: _Ctx) -> _Selection:
    w = _Words(c.word_start, c.cand)
    if c.budget is None:
        hit = chance(c.h.ravel()[w.starts], c.spec.mlm_probability)
        return _Selection(w.tokens(w.cand_word & hit, c.cand))
    # exact: words in hash order, as many as fit the token budget
    token_keys, never = _unique_keys(c.h, np.ones(c.h.shape, dtype=bool))
    keys = w.per_start(token_keys.ravel()[w.starts], never)
    keys.ravel()[w.starts[~w.cand_word]] = never
    lengths = w.per_start(w.length, 0)
    order = np.argsort(keys, axis=1)
    took = (np.take_along_axis(keys, order, 1) != never) & (
        np.cumsum(np.take_along_axis(lengths, order, 1), axis=1) <= c.budget[:, None]
    )
    chosen = np.zeros(w.shape, dtype=bool)
    np.put_along_axis(chosen, order, took, 1)
    return _Selection(w.tokens(chosen.ravel()[w.starts], c.cand))


@lru_cache(maxsize=64)
def _length_draws(span_p: float, span_max: int) -> Callable[[np.ndarray], np.ndarray]:
    """Span lengths for 64-bit hashes by the inverse CDF of the clipped geometric law:
    the length is 1 + the number of CDF points below the hash's uniform (53 bits).

    A table over the top 16 of those bits answers almost every hash; the few
    hashes in a bucket that holds a CDF point are settled by an exact search
    (numpy's searchsorted costs about 20 ns a query, the table a tenth of that).
    """
    cdf, _ = MaskSpec(span_p=span_p, span_max=span_max).span_lengths()
    # u = (v + 1) / 2**53 with v = h >> 11; cdf[k] < u exactly when floor(cdf[k] * 2**53) <= v
    points = np.floor(cdf * 2.0**53).astype(np.uint64)
    shift = np.uint64(53 - 16)
    bucket_starts = np.arange(1 << 16, dtype=np.uint64) << shift
    below_start = np.searchsorted(points, bucket_starts, side="right")
    below_end = np.searchsorted(points, bucket_starts + ((np.uint64(1) << shift) - np.uint64(1)), side="right")
    table = (below_start + 1).astype(np.int64)
    straddles = below_start != below_end

    def draw(h: np.ndarray) -> np.ndarray:
        v = h >> np.uint64(11)
        bucket = (v >> shift).astype(np.intp)
        out = np.take(table, bucket)
        exact = np.take(straddles, bucket)
        if exact.any():
            out[exact] = np.searchsorted(points, v[exact], side="right") + 1
        return out

    return draw


def _select_span(c: _Ctx) -> _Selection:
    """Spans of whole candidate words laid out by a renewal process.

    Along each row's candidate words, gaps (1 + geometric: spans never touch,
    so each masked run is one span) and spans (the clipped geometric law)
    alternate, so span lengths follow the law exactly (only a span cut by the
    start or end of its row is shorter) and every word is covered with
    probability p, the row's first words included.
    Exact mode lays spans out at twice the rate and keeps them, in hash order,
    while they fit the token budget (a greedy fill, which favours short spans,
    so spans cut by a row's ends a little). A span's replacement kind is decided once
    for the whole span (its group number: the span's rank among its row's kept
    spans, from 1).

    Only words and spans are enumerated, never the (B, L) grid: the row's
    candidate words are indexed by rank, and the covered ranks are generated
    span by span.
    """
    spec = c.spec
    b, n = c.cand.shape
    nothing = _Selection(np.zeros((b, n), bool), np.empty(0, np.int64), np.empty(0, np.uint64))
    p = spec.mlm_probability if c.budget is None else min(0.9, 2 * spec.mlm_probability)
    if p < 2.0**-33 or b == 0:  # as for tokens (rng.chance), a rate below 2**-33 selects nothing
        return nothing
    cand = c.cand.ravel()
    starts = np.flatnonzero(c.word_start.ravel())  # every row begins a word

    def word_len(words: np.ndarray) -> np.ndarray:
        following = np.take(starts, words + 1, mode="clip")
        return np.where(words + 1 < len(starts), following, b * n) - starts[words]

    # A word is a candidate when any of its tokens is (an unknown piece inside a word
    # is never selected, but the rest of the word can be): usually its first token
    # says so; the few words that begin with a special piece are checked in full.
    cand_word = cand[starts]
    odd = np.flatnonzero(~cand_word)
    odd = odd[word_len(odd) > 1]
    if len(odd):
        lengths = word_len(odd)
        inside = cand[runs(starts[odd], lengths)].astype(np.int32)
        cand_word[odd] = np.add.reduceat(inside, np.cumsum(lengths) - lengths) > 0
    cw = np.flatnonzero(cand_word)  # word numbers of candidate words, in flat order
    # each row's first candidate word (an index into cw); the rows' candidate word counts
    first = np.searchsorted(cw, np.searchsorted(starts, np.arange(b + 1) * n))
    words_in_row = np.diff(first)

    cdf, mean_len = spec.span_lengths()
    # The process starts ``burn`` ranks before the row (spans cut by the row's start
    # are cut like those at its end), so that its first words are masked at the same
    # rate as the rest: a process started at the row's first word would never cover it.
    cycle = mean_len / p  # mean words per (gap, span) pair
    burn = int(np.ceil(8 * cycle))
    n_pairs = int(np.ceil((n + burn) / cycle * 1.5)) + 8
    j = np.arange(n_pairs, dtype=np.uint64)[None, :] * np.uint64(rng.GOLDEN)
    lengths = _length_draws(spec.span_p, spec.span_max)(fmix64(c.rows[:, None] ^ (j + np.uint64(rng.SPAN_LEN))))
    extra = mean_len * (1 - p) / p - 1.0  # mean gap = mean_len * (1 - p) / p covers a share p
    if extra <= 0:
        gaps = np.ones_like(lengths)
    else:
        u = rng.uniform01(fmix64(c.rows[:, None] ^ (j + np.uint64(rng.SPAN_GAP))))
        gaps = 1 + np.floor(np.log(u) / np.log1p(-1.0 / (1.0 + extra))).astype(np.int64)
    ends = np.cumsum(gaps + lengths, axis=1) - burn
    # spans over candidate-word ranks, cut at the row's first and last candidate words
    last = words_in_row[:, None]
    lo = np.minimum(np.maximum(ends - lengths, 0), last)
    hi = np.minimum(np.maximum(ends, 0), last)
    if c.budget is None:
        keep = hi > lo
        group = np.broadcast_to(np.arange(1, n_pairs + 1, dtype=np.uint64), keep.shape)
    else:
        keep = _fit_spans(c, starts, cw, first, lo, hi)
        group = np.cumsum(keep, axis=1).astype(np.uint64)
    spans = np.flatnonzero(keep)
    count = (hi - lo).ravel()[spans]
    begin = (first[:-1, None] + lo).ravel()[spans]  # the span's first word, as an index into cw
    words = cw[runs(begin, count)]  # word numbers of the covered words, in flat order
    tokens = word_len(words)
    at = runs(starts[words], tokens)
    groups = np.repeat(np.repeat(group.ravel()[spans], count), tokens)
    ok = cand[at]
    at, groups = at[ok], groups[ok]
    selected = np.zeros(b * n, dtype=bool)
    selected[at] = True
    return _Selection(selected.reshape(b, n), at, groups)


def _fit_spans(
    c: _Ctx, starts: np.ndarray, cw: np.ndarray, first: np.ndarray, lo: np.ndarray, hi: np.ndarray
) -> np.ndarray:
    """Exact mode: keep spans, in hash order, while their tokens fit the budget."""
    seen = np.cumsum(c.cand.ravel(), dtype=np.int64)
    below = seen[starts] - c.cand.ravel()[starts]  # candidate tokens before each word
    cum = np.append(below[cw], seen[-1])  # ... before the k-th candidate word, and in all
    base = first[:-1, None]
    span_tokens = cum[base + hi] - cum[base + lo]
    j = np.arange(lo.shape[1], dtype=np.uint64)[None, :]
    keys = fmix64(c.rows[:, None] ^ (j * np.uint64(rng.GOLDEN) + np.uint64(rng.SPAN_ORDER)))
    keys[span_tokens == 0] = MAX64
    order = np.argsort(keys, axis=1)
    tokens = np.take_along_axis(span_tokens, order, 1)
    valid = np.take_along_axis(keys, order, 1) != MAX64
    left = c.budget.copy()
    took = np.zeros(order.shape, dtype=bool)
    for j in range(int(valid.sum(axis=1).max(initial=0))):  # a span that does not fit is skipped; smaller ones after it may fit
        ok = valid[:, j] & (tokens[:, j] <= left)
        took[:, j] = ok
        left -= np.where(ok, tokens[:, j], 0)
    keep = np.zeros(lo.shape, dtype=bool)
    np.put_along_axis(keep, order, took, 1)
    return keep


UNITS: dict[str, Selector] = {"token": _select_token, "whole_word": _select_whole_word, "span": _select_span}


def mask_batch(
    ids: np.ndarray,
    lengths: np.ndarray,
    seq_ids: np.ndarray,
    *,
    seed: int,
    epoch: int,
    spec: MaskSpec,
    vocab: Vocab,
    word_start: np.ndarray | None = None,
) -> Masked:
    """Mask a padded batch: ``ids`` int32 (B, L), anything beyond ``lengths``."""
    b, n = ids.shape
    real = np.arange(n)[None, :] < lengths[:, None]
    input_ids = padded(ids, real, vocab.pad_id)
    special = np.take(vocab.is_special, input_ids) | ~real  # np.take: a third of fancy indexing's time
    cand = ~special
    rows = fmix64(rng.key64(seed, epoch, spec.key(), rng.MASK) ^ rng.u64(seq_ids))
    if spec.unit != "token":
        if word_start is None:
            raise ValueError(f"unit {spec.unit!r} needs word_start")
        word_start = word_start | ~real  # each pad is a word of its own
        word_start[:, 0] = True
    ctx = _Ctx(rows, cand, word_start, _budget(cand, spec) if spec.count == "exact" else None, spec)
    sel = UNITS[spec.unit](ctx)
    selected = sel.selected

    # Replacement decisions, only where selected.
    at = np.flatnonzero(selected) if sel.at is None else sel.at
    r, col = np.divmod(at, n)
    labels = np.full((b, n), IGNORE_INDEX, dtype=np.int32)
    labels.ravel()[at] = input_ids.ravel()[at]
    if sel.groups is None:  # one decision per token
        k = fmix64(rows[r] ^ rng.position_keys(n)[col] ^ np.uint64(rng.KIND))
    else:  # one decision per span
        k = fmix64(rows[r] ^ (sel.groups * np.uint64(rng.GOLDEN) + np.uint64(rng.SPAN_KIND)))
    kind = k >> S40
    to_mask = kind < threshold24(spec.mask_ratio)
    to_random = ~to_mask & (kind < threshold24(spec.mask_ratio + spec.random_ratio))
    out = input_ids.copy() if input_ids is ids else input_ids
    out.ravel()[at[to_mask]] = vocab.mask_id
    if to_random.any():
        k2 = fmix64(k[to_random] ^ np.uint64(rng.TOKEN))
        out.ravel()[at[to_random]] = vocab.draw(k2, spec.random_tokens == "frequency")
    return Masked(out, labels, real.astype(np.uint8), selected, word_start, special=special)


def mask_tokens(
    ids: np.ndarray, lengths: np.ndarray, seq_ids: np.ndarray, *, seed: int, epoch: int, spec: MaskSpec, vocab: Vocab,
    word_start: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # fmt: skip
    """``mask_batch`` as ``(input_ids, labels, attention_mask)``."""
    m = mask_batch(ids, lengths, seq_ids, seed=seed, epoch=epoch, spec=spec, vocab=vocab, word_start=word_start)
    return m.input_ids, m.labels, m.attention_mask
