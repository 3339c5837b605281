"""Joining a shared job: take its config, refuse flags that differ from it, estimate this worker's steps.

A worker that names an existing job trains with the job's batch size, seed,
epochs and masking; only the flags given explicitly are compared with the
job's, and the service names each field that differs (``JobConflict``), which
the trainer reports as flags with both values. A missing job is created from
the flags (their defaults where none is given).
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .data import MASKING_DEFAULTS, MASKING_KEYS, SCHEDULE_KEYS

# the job's config fields the trainer sets, by the flag that sets them (a masking option X: --X, dashed)
FLAGS = {"dataset": "--dataset", "batch_size": "--batch-size", "seed": "--seed", "epochs": "--epochs",
         "lease_timeout_s": "--lease-timeout", "mask_seed": "--mask-seed", "sources": "--source",
         "num_samples": "--num-samples", "until": "--until", "curriculum": "--curriculum",
         "interpolation": "--interpolation", "mixture_block": "--mixture-block"}  # fmt: skip
_ARGS = {"batch_size": "batch_size", "seed": "seed", "epochs": "epochs", "lease_timeout_s": "lease_timeout"}


@dataclass
class Joined:
    """The config of the job a worker attached to, in the trainer's terms."""

    batch_size: int
    seed: int
    mask_seed: int
    epochs: int | None  # None: the job runs until it is cancelled
    masking: dict[str, Any]
    batches_per_epoch: int
    acked: int  # batches acked when this worker attached
    dataset: str = ""  # the job's dataset (a mixture's: its first source's)
    sources: list[str] | None = None  # a mixture job's datasets, in order
    sequences_per_epoch: int = 0  # a mixture's: the positions of its stream

    @property
    def batches_left(self) -> int | None:
        return None if self.epochs is None else max(0, self.batches_per_epoch * self.epochs - self.acked)


def describe_conflicts(job: str, conflicts: list[Mapping[str, Any]]) -> str:
    """``--batch-size 32 (the job's: 64), ...``: what a worker whose flags differ from the job is told."""
    parts = []
    for c in conflicts:
        field = str(c.get("field"))
        flag = FLAGS.get(field) or ("--" + field.removeprefix("masking.").replace("_", "-")
                                    if field.startswith("masking.") else field)  # fmt: skip
        parts.append(f"{flag} {_shown(c.get('requested'))} (the job's: {_shown(c.get('job'))})")
    return (f"job {job!r} exists with another config: {', '.join(parts) or 'its config differs'}; leave those "
            "flags out to train with the job's values, or name another job")  # fmt: skip


def _shown(value: Any) -> str:
    from client.mixtures import format_sources

    if isinstance(value, list) and value and isinstance(value[0], Mapping) and "dataset" in value[0]:
        return format_sources(value)
    return "none" if value is None else str(value)


def attach(client: Any, args: argparse.Namespace) -> Joined | None:
    """Attach to job ``args.job`` with its own config, overridden by the flags given explicitly (None: there
    is no such job). Raises the client's ``JobConflict`` (its ``conflicts`` name each differing field) when
    a flag differs from the job."""
    from client import NotFoundError

    try:
        progress = client.job_progress(args.job)
    except NotFoundError:
        return None
    config = dict(progress["config"])
    client.create_job(args.job, **requested(config, args))  # the service compares: the same config attaches,
    # another is a conflict
    masks_seed = config["seed"] if config.get("mask_seed") is None else config["mask_seed"]
    sources = [s["dataset"] for s in config["sources"]] if config.get("sources") else None
    # a mixture is one epoch of its stream's positions to the leasing (its `epochs` count its until source's)
    epochs = progress.get("epochs") if sources else config.get("epochs")
    return Joined(batch_size=int(config["batch_size"]), seed=int(config["seed"]), mask_seed=int(masks_seed),
                  epochs=epochs, masking=_trainer_masking(dict(config.get("masking") or {})),
                  batches_per_epoch=int(progress["batches_per_epoch"]), acked=int(progress["acked"]),
                  dataset=str(config.get("dataset") or (sources or [""])[0]), sources=sources,
                  sequences_per_epoch=int(progress.get("sequences_per_epoch") or 0))  # fmt: skip


def requested(config: Mapping[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """What attaching asks for: the job's config with the flags given explicitly in its place. A mixture's
    flags (``--source`` and the rest) are compared like the others; ``--source`` names the first source the
    job's dataset."""
    from client.mixtures import mixture_request

    request = {**config}
    mixture = mixture_request(args)
    if "sources" in mixture:
        request["dataset"] = mixture["sources"][0]["dataset"]
    elif args.dataset is not None:
        request["dataset"] = args.dataset
    request.update(mixture)
    for field, name in _ARGS.items():
        if getattr(args, name) is not None:
            request[field] = getattr(args, name)
    masks_seed = config["seed"] if config.get("mask_seed") is None else config["mask_seed"]
    if args.mask_seed is not None and args.mask_seed != masks_seed:
        request["mask_seed"] = args.mask_seed
    masking = dict(config.get("masking") or {})
    request["masking"] = {**masking, **{k: getattr(args, k) for k in MASKING_KEYS if getattr(args, k) is not None}}
    return request


def _trainer_masking(job_masking: Mapping[str, Any]) -> dict[str, Any]:
    out = {k: job_masking.get(k, MASKING_DEFAULTS[k]) for k in MASKING_KEYS}
    if out.get("schedule") in (None, "constant"):  # a constant rate: no schedule, as the flags say it
        out.update(dict.fromkeys(SCHEDULE_KEYS))
    return out


class JobHorizon:
    """Where this worker's lr schedule ends: the step it is at, plus the job's batches after the one it just
    trained times the share of the job's batches this worker gets (1 alone; about 1/W of W workers, however
    many attach or leave). A batch's place in the job is ``epoch * batches_per_epoch + index``; the share is
    the batches this worker trained over the places they spread across (``workers``, the ranks it steps with,
    gives the guess before there are two)."""

    def __init__(self, batches_per_epoch: int, epochs: int, workers: int = 1) -> None:
        self.batches_per_epoch = batches_per_epoch
        self.total = batches_per_epoch * epochs
        self.guess = 1.0 / max(1, workers)
        self.first: int | None = None
        self.last = -1
        self.trained = 0

    def __call__(self, step: int, metadata: Mapping[str, Any] | None) -> int | None:
        if not metadata or "epoch" not in metadata or "index" not in metadata:
            return None
        place = int(metadata["epoch"]) * self.batches_per_epoch + int(metadata["index"])
        self.first = place if self.first is None else min(self.first, place)
        self.last = max(self.last, place)
        self.trained += 1
        spread = self.last - self.first  # places from this worker's first batch to its last: trained - 1 of them
        share = min(1.0, (self.trained - 1) / spread) if spread > 0 else self.guess
        return step + round(max(0, self.total - self.last - 1) * share)


__all__ = ["FLAGS", "JobHorizon", "Joined", "attach", "describe_conflicts", "requested"]
