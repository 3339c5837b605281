"""A job's config: one dataset, or a weighted mixture of datasets, and how its batches are masked.

``JobConfig.digest`` is what attaching compares; docs/jobs.md has every field.
"""

from __future__ import annotations

import hashlib
from typing import Any, Literal

from pydantic import BaseModel, Field, model_validator

from ..masking.params import MAX_BATCH, MAX_SEED, MaskingParams

JOB_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
MAX_SOURCES = 64
MAX_CURRICULUM_POINTS = 1024
Interpolation = Literal["linear", "step"]
#: the fields only a mixture job sets: a one-dataset job's digest leaves them out (so it is what it was)
MIXTURE_FIELDS = frozenset({"sources", "num_samples", "until", "curriculum", "interpolation", "mixture_block"})
#: when a job's next epoch starts: once the last batch was handed out, or once it was acked
EpochBoundary = Literal["handout", "ack"]


class Source(BaseModel):
    """One dataset of a mixture job."""

    dataset: str = Field(pattern=JOB_NAME, description="A dataset the job reads.")
    weight: float = Field(default=1.0, gt=0, le=1e9, description="Its share of the stream, relative to the others.")
    repeat: bool = Field(
        default=False,
        description="Start its next epoch when it runs out (upsampling); false: it drops out after one epoch and "
        "the others' weights are renormalised.",
    )  # fmt: skip


class CurriculumPoint(BaseModel):
    """A curriculum point: from batch ``step`` on, these weights (interpolated between points)."""

    step: int = Field(ge=0, le=1 << 40, description="The job's batch index where these weights hold.")
    weights: dict[str, float] = Field(description="A weight per source dataset, each > 0.")


class JobConfig(BaseModel):
    dataset: str | None = Field(
        default=None, description="The dataset the job reads (with `sources`: the first source's, or left out)."
    )
    sources: list[Source] | None = Field(
        default=None, min_length=1, max_length=MAX_SOURCES,
        description="A weighted mixture of datasets instead of one (docs/jobs.md, Mixtures). Position k of the "
        "job's stream draws from a source chosen by (seed, k) and the weights; each source keeps its own epochs.",
    )  # fmt: skip
    num_samples: int | None = Field(
        default=None, ge=1, le=1 << 50, description="Mixtures: the job ends after this many sequences (positions)."
    )
    until: str | None = Field(
        default=None, description="Mixtures: the job ends when this source has served `epochs` epochs."
    )
    curriculum: list[CurriculumPoint] | None = Field(
        default=None, max_length=MAX_CURRICULUM_POINTS,
        description="Mixtures: a curriculum, weights that change over the run (steps in batches, increasing).",
    )  # fmt: skip
    interpolation: Interpolation = Field(default="linear", description="Between curriculum points: linear or step.")
    mixture_block: int = Field(
        default=256, ge=1, le=1 << 16,
        description="Mixtures: positions per stratified block; each holds every source's share to within one.",
    )  # fmt: skip
    batch_size: int = Field(
        default=32, ge=1, le=MAX_BATCH, description="Sequences per batch (at most MASKSERVE_MAX_BATCH_SIZE)."
    )
    seed: int = Field(default=0, ge=0, le=MAX_SEED, description="Seeds the permutations (and the masks).")
    shuffle: bool = Field(default=True, description="A fresh seeded permutation per epoch; off: dataset order.")
    epochs: int | None = Field(default=1, ge=1, le=1_000_000, description="Number of epochs; null runs until cancelled.")
    drop_last: bool = Field(default=False, description="Drop the short last batch of each epoch.")
    lease_timeout_s: float = Field(
        default=60.0, ge=0.01, le=86400, description="A batch not acked by then is handed out again (10 ms or more)."
    )
    epoch_boundary: EpochBoundary = Field(
        default="handout", description="Start epoch e+1 when e is fully handed out, or only when it is fully acked."
    )
    masking: MaskingParams = Field(default_factory=MaskingParams)
    mask_seed: int | None = Field(
        default=None, ge=0, le=MAX_SEED,
        description="Seeds the masks (and names the static cache) apart from the order; default `seed`.",
    )  # fmt: skip

    @model_validator(mode="after")
    def _one_dataset_or_sources(self) -> "JobConfig":
        if self.sources is None:
            if self.dataset is None:
                raise ValueError("name a dataset, or sources")
            if any(getattr(self, f) is not None for f in ("num_samples", "until", "curriculum")):
                raise ValueError("num_samples, until and curriculum apply to mixtures (sources)")
            return self
        names = [s.dataset for s in self.sources]
        if len(set(names)) != len(names):
            raise ValueError(f"sources name a dataset more than once: {names}")
        if self.dataset is not None and self.dataset != names[0]:
            raise ValueError("with sources, dataset is the first source's (or left out)")
        self.dataset = names[0]
        if self.until is not None and self.until not in names:
            raise ValueError(f"until names {self.until!r}, not one of the sources {names}")
        for point in self.curriculum or []:
            if set(point.weights) != set(names) or not all(w > 0 for w in point.weights.values()):
                raise ValueError(f"curriculum point at step {point.step}: a weight > 0 for each source {names}, "
                                 f"not {point.weights}")  # fmt: skip
        steps = [p.step for p in self.curriculum or []]
        if steps != sorted(set(steps)):
            raise ValueError("curriculum steps must increase")
        return self

    @property
    def mixture(self) -> bool:
        return self.sources is not None

    @property
    def masks_seed(self) -> int:
        """The seed the masks are drawn with."""
        return self.seed if self.mask_seed is None else self.mask_seed

    def batches_per_epoch(self, num_sequences: int) -> int:
        """Batches an epoch of ``num_sequences`` makes: a short last one counts unless ``drop_last``."""
        full, rest = divmod(num_sequences, self.batch_size)
        return full + (1 if rest and not self.drop_last else 0)

    def _compared(self) -> dict:
        exclude: dict = {"mask_seed": True} if self.mask_seed is None else {}
        if self.sources is None:
            exclude.update(dict.fromkeys(MIXTURE_FIELDS, True))
        if self.masking.schedule == "constant":
            exclude["masking"] = {"schedule", "mlm_probability_end", "schedule_unit", "schedule_length"}
        return exclude

    def digest(self) -> str:
        """What attaching compares. A constant mask rate leaves the schedule fields out, and an unset mask
        seed leaves that field out, so a job created before either existed keeps its digest (and workers
        can still attach to it)."""
        return hashlib.sha256(self.model_dump_json(exclude=self._compared()).encode()).hexdigest()[:32]

    def differences(self, requested: "JobConfig") -> list[dict[str, Any]]:
        """The fields (``masking.unit`` for a masking option) where ``requested`` differs from this config,
        each with both values: what a refused attach reports. Fields the digest leaves out are compared as
        it does (a field one side leaves out counts as unset)."""
        mine = _flat(self.model_dump(mode="json", exclude=self._compared()))
        theirs = _flat(requested.model_dump(mode="json", exclude=requested._compared()))
        return [{"field": f, "job": mine.get(f), "requested": theirs.get(f)}
                for f in sorted(mine.keys() | theirs.keys(), key=_field_order)
                if mine.get(f) != theirs.get(f)]  # fmt: skip


class JobCreate(JobConfig):
    name: str = Field(pattern=JOB_NAME, description="Workers attach by this name.")



def _flat(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _field_order(name: str) -> tuple[int, int, str]:
    """Fields in the order the config declares them (the masking options in theirs)."""
    top, _, sub = name.partition(".")
    tops, subs = list(JobConfig.model_fields), list(MaskingParams.model_fields)
    return tops.index(top) if top in tops else len(tops), subs.index(sub) if sub in subs else len(subs), name
