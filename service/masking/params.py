"""The masking parameters a request carries (and the widest integers any request may carry)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field, model_validator

from ..core.errors import ValidationFailed
from .masking import MaskCount, MaskSpec, RandomTokens
from .schedule import ScheduleKind, ScheduleUnit, rate_at
from .units import MaskUnit

#: a fresh mask per epoch, or one of a fixed number of copies built ahead (the static cache)
MaskMode = Literal["dynamic", "static"]

# The widest integers the code holds, so that every integer a request carries has a bound (a 422 past it):
# seeds are hashed as uint64; epochs, sequence ids and counts live in int64 numpy arrays and Redis integers;
# a stateless batch's stream positions (index x size) stay well inside int64; positions within a
# sequence are stored in the token ids' dtype, so L fits 16 bits.
MAX_SEED = (1 << 64) - 1
MAX_INT64 = (1 << 63) - 1
MAX_BATCH = 1 << 20
MAX_INDEX = 1 << 40
MAX_SEQ_LEN = 1 << 16


class MaskingParams(BaseModel):
    """How to mask; every field has the RoBERTa/BERT default."""

    mlm_probability: float = Field(default=0.15, ge=0.0, le=1.0, description="Share of candidate tokens to predict.")
    mask_ratio: float = Field(default=0.8, ge=0.0, le=1.0, description="Share of selected tokens set to the mask token.")
    random_ratio: float = Field(default=0.1, ge=0.0, le=1.0, description="Share replaced by a random ordinary token.")
    unit: MaskUnit = Field(default="token", description="What is selected together.")
    count: MaskCount = Field(
        default="bernoulli", description="Each unit with p, or exactly round(p*n) tokens per sequence."
    )
    max_predictions: int | None = Field(
        default=None, ge=0, le=65536, description="Cap on selected tokens per sequence (exact); at most the longest L."
    )
    random_tokens: RandomTokens = Field(
        default="uniform", description="How random replacements are drawn from the ordinary vocabulary."
    )
    span_p: float = Field(default=0.2, gt=0.0, lt=1.0, description="Span lengths ~ Geometric(span_p) (span unit).")
    span_max: int = Field(default=10, ge=1, le=64, description="Longest span, in words (span unit).")
    mode: MaskMode = Field(
        default="dynamic", description="A fresh mask per epoch, or epoch mod `copies` from the static cache."
    )
    copies: int = Field(default=10, ge=1, le=1000, description="Static masks per sequence (BERT's dupe_factor).")
    schedule: ScheduleKind = Field(
        default="constant",
        description="Mask-rate schedule: mlm_probability moves to mlm_probability_end over schedule_length "
        "epochs or steps (dynamic mode only).",
    )  # fmt: skip
    mlm_probability_end: float | None = Field(
        default=None, ge=0.0, le=1.0, description="The rate a schedule reaches at schedule_length, and keeps."
    )
    schedule_unit: ScheduleUnit = Field(
        default="epoch",
        description="What a schedule counts: epochs, or steps (a stateless batch's index; a job's "
        "epoch * batches_per_epoch + index).",
    )  # fmt: skip
    schedule_length: int | None = Field(
        default=None, ge=1, le=1_000_000_000, description="Epochs or steps from mlm_probability to mlm_probability_end."
    )

    @model_validator(mode="after")
    def _check_schedule(self) -> "MaskingParams":
        if self.schedule == "constant":
            if self.mlm_probability_end is not None or self.schedule_length is not None:
                raise ValueError("mlm_probability_end and schedule_length need schedule=linear or cosine")
            return self
        if self.mlm_probability_end is None or self.schedule_length is None:
            raise ValueError(f"schedule={self.schedule} needs mlm_probability_end and schedule_length")
        if self.mode == "static":
            raise ValueError("a mask-rate schedule needs mode=dynamic: static masks are built once, at one rate")
        return self

    def spec(self) -> MaskSpec:
        """The spec at the schedule's start (``mlm_probability``); ``spec_at`` gives it anywhere."""
        return self._spec(self.mlm_probability)

    def spec_at(self, epoch: int, step: int) -> MaskSpec:
        """The spec for a batch of ``epoch`` at ``step``: the scheduled rate there."""
        if self.schedule == "constant":
            return self.spec()
        position = epoch if self.schedule_unit == "epoch" else step
        assert self.mlm_probability_end is not None and self.schedule_length is not None  # _check_schedule
        return self._spec(
            rate_at(self.schedule, self.mlm_probability, self.mlm_probability_end, self.schedule_length, position)
        )

    def _spec(self, p: float) -> MaskSpec:
        try:
            return MaskSpec(
                p, self.mask_ratio, self.random_ratio, unit=self.unit, count=self.count,
                max_predictions=self.max_predictions, random_tokens=self.random_tokens,
                span_p=self.span_p, span_max=self.span_max,
            )  # fmt: skip
        except ValueError as exc:
            raise ValidationFailed(str(exc)) from None
