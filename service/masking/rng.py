"""Counter-based randomness: SplitMix64 hashing of integer keys, vectorized.

Every random decision in maskserve is a hash of the full 64-bit key tuple it
depends on (seed, epoch, sequence id, config digest, position, ...), never a
stateful generator, so results do not depend on order, batching or process.
"""

from __future__ import annotations

import numpy as np

GOLDEN = 0x9E3779B97F4A7C15
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_S30, _S27, _S31 = np.uint64(30), np.uint64(27), np.uint64(31)
S16, S32, S40 = np.uint64(16), np.uint64(32), np.uint64(40)
LOW24 = np.uint64(0xFFFFFF)
MAX64 = np.uint64(0xFFFFFFFFFFFFFFFF)
_LOW64 = (1 << 64) - 1

# Domain constants keep the hash streams of different decisions apart.
MASK, TOKEN, SAMPLE, KIND, SPAN_LEN, SPAN_GAP, SPAN_KIND, SPAN_ORDER = (
    0x6D61736B, 0x746F6B65, 0x73616D70, 0x6B696E64, 0x73706C6E, 0x73706770, 0x73706B64, 0x73706F72,
)  # fmt: skip


def fmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finalizer, in place on a uint64 array (returned)."""
    x ^= x >> _S30
    x *= _M1
    x ^= x >> _S27
    x *= _M2
    x ^= x >> _S31
    return x


def u64(values: int | np.ndarray) -> np.ndarray:
    if isinstance(values, np.ndarray):
        return values.astype(np.uint64)  # two's complement for negatives; always a copy
    return np.array([int(values) & _LOW64], dtype=np.uint64)


def _fmix64_int(x: int) -> int:
    x ^= x >> 30
    x = (x * 0xBF58476D1CE4E5B9) & _LOW64
    x ^= x >> 27
    x = (x * 0x94D049BB133111EB) & _LOW64
    return x ^ (x >> 31)


def key64(*parts: int) -> np.ndarray:
    """Chain-hash integers into one uint64 key (a 1-element array): the same
    finalizer as ``fmix64``, on Python ints (cheaper than numpy for scalars)."""
    k = GOLDEN
    for p in parts:
        k = _fmix64_int(k ^ (int(p) & _LOW64))
    return np.array([k], dtype=np.uint64)


_POSITIONS: dict[int, np.ndarray] = {}


def position_keys(n: int) -> np.ndarray:
    """Fixed, well-mixed keys for positions 0..n-1 (cached, read-only)."""
    keys = _POSITIONS.get(n)
    if keys is None:
        keys = fmix64(np.arange(n, dtype=np.uint64) * np.uint64(GOLDEN) + np.uint64(1))
        keys.setflags(write=False)
        _POSITIONS[n] = keys
    return keys


def grid(rows: np.ndarray, n: int) -> np.ndarray:
    """One 64-bit hash per (row, position): (B, n) uint64."""
    h = rows[:, None] ^ position_keys(n)[None, :]
    return fmix64(h)


_U16, _U13 = np.uint32(16), np.uint32(13)
_N1, _N2 = np.uint32(0x85EBCA6B), np.uint32(0xC2B2AE35)


def fmix32(x: np.ndarray) -> np.ndarray:
    """MurmurHash3's 32-bit finalizer, in place on a uint32 array (returned)."""
    x ^= x >> _U16
    x *= _N1
    x ^= x >> _U13
    x *= _N2
    x ^= x >> _U16
    return x


def grid32(rows: np.ndarray, n: int) -> np.ndarray:
    """One 32-bit hash per (row, position): (B, n) uint32.

    Both halves of each 64-bit row key are mixed in (two rounds), so rows
    differ unless their full keys collide; 32-bit lanes keep this about ten
    times cheaper than 64-bit hashing in numpy.
    """
    lo = (rows & np.uint64(0xFFFFFFFF)).astype(np.uint32)
    hi = (rows >> S32).astype(np.uint32)
    h = lo[:, None] ^ position_keys32(n)[None, :]
    fmix32(h)
    h ^= hi[:, None]
    return fmix32(h)


_POSITIONS32: dict[int, np.ndarray] = {}


def position_keys32(n: int) -> np.ndarray:
    keys = _POSITIONS32.get(n)
    if keys is None:
        keys = (position_keys(n) >> S32).astype(np.uint32)
        keys.setflags(write=False)
        _POSITIONS32[n] = keys
    return keys


def chance(h32: np.ndarray, p: float) -> np.ndarray:
    """Bool per 32-bit hash: true with probability p (exactly never at 0, always at 1)."""
    if p <= 0:
        return np.zeros(h32.shape, dtype=bool)
    if p >= 1:
        return np.ones(h32.shape, dtype=bool)
    return h32 < np.uint32(round(p * (1 << 32)))


def threshold24(p: float) -> np.uint64:
    """Compare ``(h >> 40)`` against this for an event of probability ``p``."""
    return np.uint64(min(1 << 24, round(p * (1 << 24))))


def below(values: np.ndarray, n: int) -> np.ndarray:
    """Map uint64 hashes to integers uniform in [0, n) (n < 2**32), multiply-shift."""
    return (((values >> S32) * np.uint64(n)) >> S32).astype(np.int64)


def uniform01(values: np.ndarray) -> np.ndarray:
    """Hashes -> floats uniform in (0, 1] (53 bits)."""
    return ((values >> np.uint64(11)).astype(np.float64) + 1.0) * (1.0 / (1 << 53))


def sample_ids(seed: int, index: int, batch_size: int, num_sequences: int) -> np.ndarray:
    """B sequence ids drawn uniformly (with replacement) by ``(seed, index)``."""
    if not 0 < num_sequences < 1 << 32:
        raise ValueError("num_sequences must lie in [1, 2**32)")
    h = fmix64(key64(seed, index, SAMPLE) ^ (np.arange(batch_size, dtype=np.uint64) * np.uint64(GOLDEN)))
    return below(h, num_sequences)
