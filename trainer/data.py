"""Where the trainer's batches come from: masking options, static caches, epoch-exact streams.

A stateless stream's batch k holds positions kB .. kB+B-1 of the seed's
per-epoch permutations (see the service's ``permute.stream_ids``), so a run of
``E`` epochs is ``ceil(E * N / B)`` steps, with the rows past ``E * N`` cut
from the last batch: every sequence is trained exactly E times.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from typing import Any

# Masking options of the service, as the trainer's flags name them (None: the service's default).
MASKING_KEYS = ("mlm_probability", "mode", "copies", "unit", "count", "mask_ratio", "random_ratio",
                "random_tokens", "max_predictions", "span_p", "span_max", "schedule", "mlm_probability_end",
                "schedule_unit", "schedule_length")  # fmt: skip
MASKING_DEFAULTS: dict[str, Any] = {"mlm_probability": 0.15, "mode": "dynamic", "copies": 10, "unit": "token",
                                    "count": "bernoulli", "mask_ratio": 0.8, "random_ratio": 0.1,
                                    "random_tokens": "uniform", "max_predictions": None, "span_p": None,
                                    "span_max": None, "schedule": None, "mlm_probability_end": None,
                                    "schedule_unit": None, "schedule_length": None}  # fmt: skip
# A mask-rate schedule is how a run trains, not how a fixed evaluation set is masked.
SCHEDULE_KEYS = ("schedule", "mlm_probability_end", "schedule_unit", "schedule_length")


def masking_options(masking: Mapping[str, Any]) -> dict[str, Any]:
    """The options to send: every key, with ``copies`` only where it matters (static)."""
    out = {k: masking[k] for k in MASKING_KEYS if masking.get(k) is not None}
    if out.get("mode") != "static":
        out.pop("copies", None)
    return out


def ensure_static_cache(client: Any, dataset: str, *, seed: int, masking: Mapping[str, Any],
                        log: Any = print) -> dict[str, Any]:  # fmt: skip
    """Build the static-mask cache for (masking, seed, copies) unless it is complete, with a progress bar.

    The cache's id is a digest of exactly that config, so a cache built with
    any other masking, seed or copies is never used for this run.
    """
    from tqdm import tqdm

    options = {k: v for k, v in masking_options(masking).items() if k not in ("mode", "copies", *SCHEDULE_KEYS)}
    copies = int(masking.get("copies") or MASKING_DEFAULTS["copies"])
    status = client.build_static_masks(dataset, seed=seed, copies=copies, max_chunks=1, **options)
    if not status["complete"]:
        log(f"building static masks of {dataset!r}: {copies} copies, cache {status['cache']}")
        with tqdm(total=status["chunks"], initial=status["built"], unit="chunk", desc="static masks",
                  disable=None, leave=False) as bar:  # fmt: skip
            while not status["complete"]:
                status = client.build_static_masks(dataset, seed=seed, copies=copies, max_chunks=4, **options)
                bar.update(status["built"] - bar.n)
    return status


def steps_for_epochs(epochs: int, num_sequences: int, batch_size: int) -> int:
    return math.ceil(epochs * num_sequences / batch_size)


def epoch_of_step(step: int, num_sequences: int, batch_size: int) -> int:
    """The epoch of the first row of 0-based step ``step`` of a stateless stream."""
    return step * batch_size // num_sequences


def epochs_done(steps: int, num_sequences: int, batch_size: int) -> int:
    """Whole epochs covered once ``steps`` steps are done."""
    return steps * batch_size // num_sequences


class EpochCap:
    """Cut a stateless stream at ``epochs * N`` rows: the last batch loses its rows of the next epoch."""

    def __init__(self, stream: Any, start: int, batch_size: int, limit_rows: int | None) -> None:
        self.stream = stream
        self.step = start
        self.batch_size = batch_size
        self.limit_rows = limit_rows

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        from client import Batch

        batch = next(self.stream)
        keep = self.batch_size if self.limit_rows is None else self.limit_rows - self.step * self.batch_size
        self.step += 1
        if keep >= len(batch):
            return batch
        arrays = {k: v[:keep] for k, v in batch.arrays.items() if v.ndim >= 1 and len(v) == len(batch)}
        return Batch(arrays, batch.metadata, step=batch.step)

    def close(self) -> None:
        self.stream.close()


__all__ = ["EpochCap", "MASKING_DEFAULTS", "MASKING_KEYS", "SCHEDULE_KEYS", "ensure_static_cache", "epoch_of_step", "epochs_done",
           "masking_options", "steps_for_epochs"]  # fmt: skip
