"""Masking: pure functions, arrays in, arrays out, no I/O.

Determinism (DESIGN.md): every random decision about a token is a hash of
``(seed, epoch, sequence id, masking config, position)``, computed with the
SplitMix64 finalizer on uint64 arrays. Nothing depends on batch composition,
request order, worker count or the process, so the same request yields the
same mask on any replica, after any retry or restart. One 64-bit hash per
position gives independent bit fields:

* bits 40..63: selection (selected when below p * 2**24),
* bits 16..39: replacement kind (mask / random / keep by the configured split),
* a second hash, only at positions replaced by a random token, picks that
  token uniformly among the ordinary (non-special) ids.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field

import numpy as np

IGNORE_INDEX = -100

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_GOLDEN = 0x9E3779B97F4A7C15
_S30, _S27, _S31, _S40, _S32, _S16 = (np.uint64(s) for s in (30, 27, 31, 40, 32, 16))
_LOW24 = np.uint64(0xFFFFFF)
_LOW64 = (1 << 64) - 1
# Domain constants keep the hash streams of different decisions apart.
_DOMAIN_MASK, _DOMAIN_TOKEN, _DOMAIN_SAMPLE = 0x6D61736B, 0x746F6B65, 0x73616D70


def fmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finalizer, in place on a uint64 array (returned)."""
    x ^= x >> _S30
    x *= _M1
    x ^= x >> _S27
    x *= _M2
    x ^= x >> _S31
    return x


def _u64(values: int | np.ndarray) -> np.ndarray:
    if isinstance(values, np.ndarray):
        return values.astype(np.uint64)  # two's complement for negatives, a copy
    return np.array([int(values) & _LOW64], dtype=np.uint64)


def key64(*parts: int | np.ndarray) -> np.ndarray:
    """Chain-hash integers (or arrays of them, broadcast) into uint64 keys."""
    k = np.array([_GOLDEN], dtype=np.uint64)
    for p in parts:
        k = fmix64(k ^ _u64(p))
    return k


@dataclass(frozen=True)
class MaskSpec:
    """What to mask and how to replace it (token level, Bernoulli selection)."""

    mlm_probability: float = 0.15
    mask_ratio: float = 0.8
    random_ratio: float = 0.1
    keep_ratio: float = field(init=False)

    def __post_init__(self) -> None:
        if not 0.0 <= self.mlm_probability <= 1.0:
            raise ValueError("mlm_probability must lie in [0, 1]")
        if self.mask_ratio < 0 or self.random_ratio < 0 or self.mask_ratio + self.random_ratio > 1.0 + 1e-9:
            raise ValueError("mask_ratio and random_ratio must be >= 0 and sum to at most 1")
        object.__setattr__(self, "keep_ratio", max(0.0, 1.0 - self.mask_ratio - self.random_ratio))

    def key(self) -> int:
        """A stable 64-bit digest of the config, folded into every mask."""
        canonical = json.dumps(asdict(self), sort_keys=True).encode()
        return int.from_bytes(hashlib.blake2b(canonical, digest_size=8).digest(), "little")


@dataclass(frozen=True)
class Vocab:
    """The ids masking needs: the mask token and which ids are special."""

    mask_id: int
    pad_id: int
    is_special: np.ndarray  # bool, one per id
    ordinary_ids: np.ndarray = field(init=False)  # the ids random replacements are drawn from

    def __post_init__(self) -> None:
        object.__setattr__(self, "ordinary_ids", np.flatnonzero(~self.is_special).astype(np.int32))

    @classmethod
    def build(cls, vocab_size: int, special_ids: list[int] | tuple[int, ...], mask_id: int, pad_id: int) -> "Vocab":
        is_special = np.zeros(vocab_size, dtype=bool)
        is_special[list(special_ids)] = True
        is_special[[mask_id, pad_id]] = True
        return cls(mask_id=mask_id, pad_id=pad_id, is_special=is_special)


def _threshold(p: float) -> np.uint64:
    return np.uint64(min(1 << 24, round(p * (1 << 24))))


def mask_tokens(
    ids: np.ndarray,
    lengths: np.ndarray,
    seq_ids: np.ndarray,
    *,
    seed: int,
    epoch: int,
    spec: MaskSpec,
    vocab: Vocab,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Dynamic token-level masking of a padded batch.

    ``ids`` int32 (B, L) with anything beyond ``lengths``; returns
    ``(input_ids, labels, attention_mask)``: int32, int32 (-100 where not
    selected), uint8. Pads carry ``vocab.pad_id``.
    """
    b, seq_len = ids.shape
    positions = np.arange(seq_len)
    real = positions[None, :] < lengths[:, None]
    input_ids = np.where(real, ids, np.int32(vocab.pad_id)).astype(np.int32, copy=False)
    candidates = real & ~vocab.is_special[input_ids]

    rows = key64(seed, epoch, spec.key(), _DOMAIN_MASK) ^ _u64(seq_ids)
    rows = fmix64(rows)
    h = rows[:, None] ^ _position_keys(seq_len)[None, :]
    fmix64(h)

    selected = candidates & ((h >> _S40) < _threshold(spec.mlm_probability))
    kind = (h >> _S16) & _LOW24
    to_mask = selected & (kind < _threshold(spec.mask_ratio))
    to_random = selected & ~to_mask & (kind < _threshold(spec.mask_ratio + spec.random_ratio))

    labels = np.where(selected, input_ids, np.int32(IGNORE_INDEX))
    out = input_ids.copy() if input_ids is ids else input_ids
    out[to_mask] = vocab.mask_id
    if to_random.any():
        h2 = fmix64(h[to_random] ^ np.uint64(_DOMAIN_TOKEN))
        n = np.uint64(len(vocab.ordinary_ids))
        out[to_random] = vocab.ordinary_ids[((h2 >> _S32) * n) >> _S32]
    return out, labels, real.astype(np.uint8)


_POSITION_CACHE: dict[int, np.ndarray] = {}


def _position_keys(seq_len: int) -> np.ndarray:
    keys = _POSITION_CACHE.get(seq_len)
    if keys is None:
        keys = fmix64(np.arange(seq_len, dtype=np.uint64) * np.uint64(_GOLDEN) + np.uint64(1))
        keys.setflags(write=False)
        _POSITION_CACHE[seq_len] = keys
    return keys


def sample_ids(seed: int, index: int, batch_size: int, num_sequences: int) -> np.ndarray:
    """B sequence ids drawn uniformly (with replacement) by ``(seed, index)``."""
    if not 0 < num_sequences < 1 << 32:
        raise ValueError("num_sequences must lie in [1, 2**32)")
    h = fmix64(key64(seed, index, _DOMAIN_SAMPLE) ^ (np.arange(batch_size, dtype=np.uint64) * np.uint64(_GOLDEN)))
    return (((h >> _S32) * np.uint64(num_sequences)) >> _S32).astype(np.int64)
