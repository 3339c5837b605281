"""Masking: pure functions, arrays in, arrays out, no I/O.

Determinism (docs/masking.md): every random decision is a hash (rng.py) of
``(seed, epoch, sequence id, config digest)`` and a position, span or word
index, so a mask never depends on batch composition, order, worker count or
process. A 32-bit hash per position decides selection; only at selected
positions, a 64-bit hash decides the replacement kind (mask / random / keep
by the configured split: bits 40..63) and, where a random token is needed,
which one among the ordinary (non-special) ids, uniformly or by corpus
frequency.

Units (``units.UNITS``): ``token``, ``whole_word``, ``span``. Counts: ``bernoulli`` (each unit independently with p) or ``exact``
(round(p * candidates) tokens per sequence, capped by ``max_predictions``;
whole words and spans fill that budget without exceeding it).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from typing import Literal, get_args

import numpy as np

from . import rng
from .rng import S40, fmix64, sample_ids, threshold24
from .units import UNITS, Context, MaskUnit, span_law

__all__ = ["IGNORE_INDEX", "MaskSpec", "Masked", "Vocab", "mask_batch", "mask_tokens", "sample_ids", "UNITS"]

IGNORE_INDEX = -100
#: how many units a sequence selects: each independently with p, or exactly round(p*n) tokens
MaskCount = Literal["bernoulli", "exact"]
#: how random replacement tokens are drawn from the ordinary vocabulary
RandomTokens = Literal["uniform", "frequency"]
COUNTS: tuple[MaskCount, ...] = get_args(MaskCount)
RANDOM_TOKENS: tuple[RandomTokens, ...] = get_args(RandomTokens)


@dataclass(frozen=True)
class MaskSpec:
    """How to select and replace; its digest is folded into every mask."""

    mlm_probability: float = 0.15
    mask_ratio: float = 0.8
    random_ratio: float = 0.1
    unit: MaskUnit = "token"
    count: MaskCount = "bernoulli"
    max_predictions: int | None = None
    random_tokens: RandomTokens = "uniform"
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
        return span_law(self.span_p, self.span_max)


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


def _budget(cand: np.ndarray, spec: MaskSpec) -> np.ndarray:
    n = cand.sum(axis=1)
    budget = np.floor(n * spec.mlm_probability + 0.5).astype(np.int64)
    if spec.max_predictions is not None:
        np.minimum(budget, spec.max_predictions, out=budget)
    return budget


def mask_batch(
    ids: np.ndarray,
    lengths: np.ndarray,
    seq_ids: np.ndarray,
    *,
    seed: int,
    epoch: int | np.ndarray,
    spec: MaskSpec,
    vocab: Vocab,
    word_start: np.ndarray | None = None,
) -> Masked:
    """Mask a padded batch: ``ids`` int32 (B, L), anything beyond ``lengths``. ``epoch``: the batch's, or
    one per row (rows of several epochs, each masked as in a batch of its own epoch)."""
    b, n = ids.shape
    real = np.arange(n)[None, :] < lengths[:, None]
    input_ids = padded(ids, real, vocab.pad_id)
    special = np.take(vocab.is_special, input_ids) | ~real  # np.take: a third of fancy indexing's time
    cand = ~special
    if np.ndim(epoch) == 0:
        row_keys = rng.key64(seed, int(epoch), spec.key(), rng.MASK)
    else:
        epochs, which = np.unique(np.asarray(epoch), return_inverse=True)
        row_keys = np.concatenate([rng.key64(seed, int(e), spec.key(), rng.MASK) for e in epochs])[which]
    rows = fmix64(row_keys ^ rng.u64(seq_ids))
    if spec.unit != "token":
        if word_start is None:
            raise ValueError(f"unit {spec.unit!r} needs word_start")
        word_start = word_start | ~real  # each pad is a word of its own
        word_start[:, 0] = True
    budget = _budget(cand, spec) if spec.count == "exact" else None
    ctx = Context(rows, cand, word_start, budget, spec.mlm_probability, spec.span_p, spec.span_max)
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
