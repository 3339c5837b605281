"""Unit selectors: which tokens a batch selects, per masking unit (a registry, ``UNITS``).

``token``: each candidate token. ``whole_word``: all pieces of a word together,
words given by the stored word-start bits. ``span`` (SpanBERT): spans of whole
words with lengths ~ Geometric(span_p) clipped to span_max by renormalizing
over 1..span_max, as SpanBERT does (mean 3.8 for 0.2 and 10). In ``exact``
count mode a selector fills the row's token budget without exceeding it.

Every decision is a hash of the row key (rng.py) and a position, word or span
index; ``masking.mask_batch`` builds the context and applies the replacements.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property, lru_cache
from typing import Literal

import numpy as np

from ..core.arrays import runs
from . import rng
from .rng import MAX64, chance, fmix64


__all__ = ["UNITS", "Context", "Selection", "Selector", "span_law"]


def span_law(span_p: float, span_max: int) -> tuple[np.ndarray, float]:
    """CDF of the span-length law over 1..span_max, and its mean."""
    k = np.arange(1, span_max + 1)
    pmf = span_p * (1 - span_p) ** (k - 1)
    pmf /= pmf.sum()
    cdf = np.cumsum(pmf)
    cdf[-1] = 1.0  # not 1 - rounding error: no uniform draw may fall past the last length
    return cdf, float((k * pmf).sum())


@dataclass
class Context:
    """What every unit selector gets."""

    rows: np.ndarray  # (B,) uint64 row keys
    cand: np.ndarray  # (B, L) bool: real, non-special tokens
    word_start: np.ndarray  # (B, L) bool: word starts; pads and specials are words of their own
    budget: np.ndarray | None  # (B,) int64: exact count mode's token budget
    p: float  # the selection rate (mlm_probability)
    span_p: float  # span lengths ~ Geometric(span_p), at most span_max words (span unit)
    span_max: int

    @cached_property
    def h(self) -> np.ndarray:
        """(B, L) uint32: one hash per position (computed only for the units that use it)."""
        return rng.grid32(self.rows, self.cand.shape[1])


@dataclass
class Selection:
    """A selector's answer: the selected tokens and, for units whose replacement is
    decided once per group (spans), each selected token's group number, in flat
    position order (``at``, the flat positions, when the selector has them)."""

    selected: np.ndarray  # (B, L) bool
    at: np.ndarray | None = None
    groups: np.ndarray | None = None  # uint64, one per selected token


Selector = Callable[[Context], Selection]


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


def _select_token(c: Context) -> Selection:
    if c.budget is None:
        return Selection(c.cand & chance(c.h, c.p))
    keys, never = _unique_keys(c.h, c.cand)
    return Selection(_smallest(keys, c.budget, never))


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


def _select_whole_word(c: Context) -> Selection:
    w = _Words(c.word_start, c.cand)
    if c.budget is None:
        hit = chance(c.h.ravel()[w.starts], c.p)
        return Selection(w.tokens(w.cand_word & hit, c.cand))
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
    return Selection(w.tokens(chosen.ravel()[w.starts], c.cand))


@lru_cache(maxsize=64)
def _length_draws(span_p: float, span_max: int) -> Callable[[np.ndarray], np.ndarray]:
    """Span lengths for 64-bit hashes by the inverse CDF of the clipped geometric law:
    the length is 1 + the number of CDF points below the hash's uniform (53 bits).

    A table over the top 16 of those bits answers almost every hash; the few
    hashes in a bucket that holds a CDF point are settled by an exact search
    (numpy's searchsorted costs about 20 ns a query, the table a tenth of that).
    """
    cdf, _ = span_law(span_p, span_max)
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


def _select_span(c: Context) -> Selection:
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
    b, n = c.cand.shape
    nothing = Selection(np.zeros((b, n), bool), np.empty(0, np.int64), np.empty(0, np.uint64))
    p = c.p if c.budget is None else min(0.9, 2 * c.p)
    if p < 2.0**-33 or b == 0:  # as for tokens (rng.chance), a rate below 2**-33 selects nothing
        return nothing
    cand = c.cand.ravel()
    starts = np.flatnonzero(c.word_start.ravel())  # every row begins a word
    cw, first = _candidate_words(cand, starts, b, n)
    lo, hi = _lay_out_spans(c, p, np.diff(first))
    if c.budget is None:
        keep = hi > lo
        group = np.broadcast_to(np.arange(1, lo.shape[1] + 1, dtype=np.uint64), keep.shape)
    else:
        keep = _fit_spans(c, starts, cw, first, lo, hi)
        group = np.cumsum(keep, axis=1).astype(np.uint64)
    spans = np.flatnonzero(keep)
    count = (hi - lo).ravel()[spans]
    begin = (first[:-1, None] + lo).ravel()[spans]  # the span's first word, as an index into cw
    words = cw[runs(begin, count)]  # word numbers of the covered words, in flat order
    tokens = _word_len(starts, words, b * n)
    at = runs(starts[words], tokens)
    groups = np.repeat(np.repeat(group.ravel()[spans], count), tokens)
    ok = cand[at]
    at, groups = at[ok], groups[ok]
    selected = np.zeros(b * n, dtype=bool)
    selected[at] = True
    return Selection(selected.reshape(b, n), at, groups)


def _word_len(starts: np.ndarray, words: np.ndarray, total: int) -> np.ndarray:
    """Token counts of the given words (``starts``: every word's first flat position; ``total``: B * L)."""
    following = np.take(starts, words + 1, mode="clip")
    return np.where(words + 1 < len(starts), following, total) - starts[words]


def _candidate_words(cand: np.ndarray, starts: np.ndarray, b: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The word numbers of the candidate words, in flat order, and (B + 1,) each row's first
    one as an index into them (the last entry: their count)."""
    # A word is a candidate when any of its tokens is (an unknown piece inside a word
    # is never selected, but the rest of the word can be): usually its first token
    # says so; the few words that begin with a special piece are checked in full.
    cand_word = cand[starts]
    odd = np.flatnonzero(~cand_word)
    odd = odd[_word_len(starts, odd, b * n) > 1]
    if len(odd):
        lengths = _word_len(starts, odd, b * n)
        inside = cand[runs(starts[odd], lengths)].astype(np.int32)
        cand_word[odd] = np.add.reduceat(inside, np.cumsum(lengths) - lengths) > 0
    cw = np.flatnonzero(cand_word)
    return cw, np.searchsorted(cw, np.searchsorted(starts, np.arange(b + 1) * n))


def _lay_out_spans(c: Context, p: float, words_in_row: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The renewal process at rate ``p``: (B, pairs) spans as [lo, hi) ranges of candidate-word
    ranks, cut at each row's first and last candidate words (empty where wholly outside)."""
    n = c.cand.shape[1]
    _, mean_len = span_law(c.span_p, c.span_max)
    # The process starts ``burn`` ranks before the row (spans cut by the row's start
    # are cut like those at its end), so that its first words are masked at the same
    # rate as the rest: a process started at the row's first word would never cover it.
    cycle = mean_len / p  # mean words per (gap, span) pair
    burn = int(np.ceil(8 * cycle))
    n_pairs = int(np.ceil((n + burn) / cycle * 1.5)) + 8
    j = np.arange(n_pairs, dtype=np.uint64)[None, :] * np.uint64(rng.GOLDEN)
    lengths = _length_draws(c.span_p, c.span_max)(fmix64(c.rows[:, None] ^ (j + np.uint64(rng.SPAN_LEN))))
    extra = mean_len * (1 - p) / p - 1.0  # mean gap = mean_len * (1 - p) / p covers a share p
    if extra <= 0:
        gaps = np.ones_like(lengths)
    else:
        u = rng.uniform01(fmix64(c.rows[:, None] ^ (j + np.uint64(rng.SPAN_GAP))))
        gaps = 1 + np.floor(np.log(u) / np.log1p(-1.0 / (1.0 + extra))).astype(np.int64)
    ends = np.cumsum(gaps + lengths, axis=1) - burn
    last = words_in_row[:, None]
    return np.minimum(np.maximum(ends - lengths, 0), last), np.minimum(np.maximum(ends, 0), last)


def _fit_spans(
    c: Context, starts: np.ndarray, cw: np.ndarray, first: np.ndarray, lo: np.ndarray, hi: np.ndarray
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


#: what a masking unit selects together: a token, a whole word, or a span of words
MaskUnit = Literal["token", "whole_word", "span"]
UNITS: dict[MaskUnit, Selector] = {"token": _select_token, "whole_word": _select_whole_word, "span": _select_span}
