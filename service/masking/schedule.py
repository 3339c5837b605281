"""Mask-rate schedules: ``mlm_probability`` as a function of training progress.

A schedule moves the selection rate from p0 (``mlm_probability``) to p1
(``mlm_probability_end``) over ``schedule_length`` epochs or steps, then holds
p1. Progress is a pure function of where a batch sits (its epoch, or its step:
the stateless route's batch index, a job's ``epoch * batches_per_epoch + index``),
so the rate, and with it every mask, is as deterministic as the rest: the same
(seed, epoch, sequence, step) gets the same mask on any replica.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal, get_args

#: the shape of a mask-rate schedule
ScheduleKind = Literal["constant", "linear", "cosine"]
#: what a mask-rate schedule counts
ScheduleUnit = Literal["epoch", "step"]
SCHEDULES: tuple[ScheduleKind, ...] = get_args(ScheduleKind)
SCHEDULE_UNITS: tuple[ScheduleUnit, ...] = get_args(ScheduleUnit)
# Rates are rounded to this many decimals: the rate is folded into the mask's config digest, and
# a last-bit difference between two machines' cos() must not give them different masks.
DECIMALS = 9


def _linear(t: float) -> float:
    return t


def _cosine(t: float) -> float:
    """Half a cosine: slow at both ends, as cosine learning-rate schedules."""
    return (1.0 - math.cos(math.pi * t)) / 2.0


_SHAPES: dict[ScheduleKind, Callable[[float], float]] = {"constant": lambda t: 0.0, "linear": _linear, "cosine": _cosine}


def rate_at(kind: str, p0: float, p1: float, length: int, position: int) -> float:
    """The selection rate at ``position`` (an epoch or step number, from 0) of a schedule that
    goes from p0 at 0 to p1 at ``length`` and stays there."""
    if kind == "constant":
        return p0
    t = min(1.0, max(0, position) / length)
    p = p0 + (p1 - p0) * _SHAPES[kind](t)
    return min(1.0, max(0.0, round(p, DECIMALS)))
