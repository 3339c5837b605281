"""Mixture jobs: several datasets behind one job's stream.

A mixture job is, to the leasing machinery, a one-epoch job over a stream of
``K`` positions (``n = K`` in its hash, ``epochs = 1``): batch i holds
positions ``[i*B, (i+1)*B)``. What a position holds is worked out here, per
batch and in O(B log P) (``mixture.Mixture``): the source it draws from and
that source's draw count c, so the c-th draw of source s is element
``c mod n_s`` of its epoch ``c div n_s``, permuted as a one-dataset job over
that source would permute it, and masked for that source epoch. So mixing
changes which sequences are served, never how a sequence is masked.

The sources are fixed when the job is created, each at its generation and
size then (``mixture`` in the job's hash), like a one-dataset job's ``n``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from ..batches.batching import DatasetSnapshot
from ..batches.permute import epoch_slice
from ..core.errors import SourcesMismatch
from .config import JobConfig
from .mixture import Mixture

#: what every source must share: what a model fed the stream sees
COMPARED = ("seq_len", "vocab_size", "id_dtype", "special_tokens")


@dataclass(frozen=True)
class SourceState:
    """A source as the job fixed it: its dataset's generation, sequences and chunks then."""

    dataset: str
    uid: str
    n: int
    num_chunks: int

    @classmethod
    def of(cls, ds: DatasetSnapshot) -> "SourceState":
        return cls(ds.rt.name, ds.rt.uid, ds.num_sequences, ds.num_chunks)


def check_compatible(snaps: list[DatasetSnapshot]) -> None:
    """Refuse sources that disagree on what a model sees, naming each differing field of each source."""
    first = snaps[0].rt.meta
    mismatches = []
    for ds in snaps[1:]:
        meta = ds.rt.meta
        for field in COMPARED:
            if meta[field] != first[field]:
                mismatches.append({"field": field, "source": ds.rt.name, "value": meta[field],
                                   "first_source": snaps[0].rt.name, "first_value": first[field]})  # fmt: skip
    if mismatches:
        said = "; ".join(f"{m['source']}.{m['field']} = {m['value']} (not {m['first_value']})" for m in mismatches)
        raise SourcesMismatch(f"the sources disagree on what a model sees: {said}", mismatches=mismatches)


def encode(states: list[SourceState]) -> str:
    return json.dumps([s.__dict__ for s in states])


def decode(raw: str) -> list[SourceState]:
    return [SourceState(**s) for s in json.loads(raw)]


def mixture_of(cfg: JobConfig, sizes: tuple[int, ...], max_curriculum_blocks: int | None = None) -> Mixture:
    """The job's mixture (cached per config and sizes: one per job and process). Building one may take a
    while (a long linear curriculum): call it off the event loop. ``max_curriculum_blocks`` bounds a linear
    curriculum when a job is created (MASKSERVE_MIXTURE_MAX_CURRICULUM_BLOCKS); a job that exists passed it."""
    return _mixture(cfg.model_dump_json(), sizes, max_curriculum_blocks or 1 << 62)


@lru_cache(maxsize=256)
def _mixture(config_json: str, sizes: tuple[int, ...], max_blocks: int) -> Mixture:
    cfg = JobConfig.model_validate_json(config_json)
    assert cfg.sources is not None
    names = [s.dataset for s in cfg.sources]
    schedule = None
    if cfg.curriculum:
        schedule = [(p.step, [float(p.weights.get(n, 0.0)) for n in names]) for p in cfg.curriculum]
    # the job ends with ``until``'s last draw, so that source never runs out before: it has no exhaustion block
    # (whose renormalised quotas would crowd the others into the job's last positions)
    repeat = [s.repeat or s.dataset == cfg.until for s in cfg.sources]
    return Mixture(list(sizes), [s.weight for s in cfg.sources], repeat,
                   block=cfg.mixture_block, seed=cfg.seed, schedule=schedule, interpolation=cfg.interpolation,
                   batch_size=cfg.batch_size, max_table_blocks=max_blocks)  # fmt: skip


def stream_length(cfg: JobConfig, mixture: Mixture) -> int:
    """Positions in the job's stream: ``num_samples``, or up to the end of ``until``'s ``epochs``, or until
    every source ran out (ValueError when nothing ends it)."""
    assert cfg.sources is not None
    until = None if cfg.until is None else [s.dataset for s in cfg.sources].index(cfg.until)
    return mixture.end(num_samples=cfg.num_samples, until=until, epochs=cfg.epochs if until is not None else None)


@dataclass(frozen=True)
class Draws:
    """A batch's positions resolved: per row, its source, that source's epoch and the sequence id."""

    source: np.ndarray
    epoch: np.ndarray
    seq_ids: np.ndarray
    groups: list[tuple[int, int, np.ndarray]]  # (source, epoch, rows) of each source epoch, rows in position order


def _groups(source: np.ndarray, epoch: np.ndarray) -> list[tuple[int, int, np.ndarray]]:
    """(source, epoch, rows) of each source epoch among a batch's rows."""
    out = []
    for s in np.unique(source).tolist():
        rows_s = np.flatnonzero(source == s)
        ep = epoch[rows_s]
        if ep[0] == ep[-1]:  # a source's epochs only rise: one epoch of it in this batch
            out.append((s, int(ep[0]), rows_s))
            continue
        cuts = [0, *(np.flatnonzero(ep[1:] != ep[:-1]) + 1).tolist(), len(rows_s)]
        out.extend((s, int(ep[a]), rows_s[a:b]) for a, b in zip(cuts, cuts[1:]))
    return out


def draws(cfg: JobConfig, mixture: Mixture, sizes: tuple[int, ...], start: int, stop: int) -> Draws:
    """Positions ``[start, stop)``: which source each draws, in which of its epochs, which sequence (CPU work).

    A source's draws among consecutive positions are consecutive, so each source epoch of the batch is one
    contiguous slice of that epoch's order: read through the block cache one-dataset jobs use."""
    source, count = mixture.locate(start, stop)
    n = np.asarray(sizes, dtype=np.int64)[source]
    epoch, element = np.divmod(count, n)
    seq_ids = element.copy()
    groups = _groups(source, epoch)
    if cfg.shuffle:
        for s, e, rows in groups:
            first, last = int(element[rows[0]]), int(element[rows[-1]])
            assert last - first + 1 == len(rows), "a source's draws in a batch are consecutive"
            seq_ids[rows] = epoch_slice(cfg.seed, e, sizes[s], first, last + 1)
    return Draws(source, epoch, seq_ids, groups)


def source_progress(cfg: JobConfig, mixture: Mixture, states: list[SourceState], served: int) -> list[dict]:
    """Each source's epoch and share among the first ``served`` positions."""
    assert cfg.sources is not None
    counts = mixture.counts(served) if served else np.zeros(len(states), np.int64)
    return [{"dataset": st.dataset, "weight": src.weight, "repeat": src.repeat, "sequences": st.n,
             "served": int(c), "epoch": int(c // st.n), "share": (int(c) / served) if served else 0.0}
            for st, src, c in zip(states, cfg.sources, counts)]  # fmt: skip
