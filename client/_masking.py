"""Masking parameters built on the client side: mask-rate schedules."""

from __future__ import annotations

from typing import Any

from ._types import SCHEDULE_KINDS, SCHEDULE_UNITS, ScheduleKind, ScheduleUnit

SCHEDULES = SCHEDULE_KINDS
UNITS = SCHEDULE_UNITS


def mask_rate_schedule(
    kind: ScheduleKind, start: float, end: float, length: int, unit: ScheduleUnit = "epoch"
) -> dict[str, Any]:
    """The service's parameters for a mask rate moving from ``start`` to ``end`` over ``length``
    epochs or steps (``unit``), then staying at ``end``. Pass them with the other masking
    options: ``c.batches("wiki", 64, **mask_rate_schedule("cosine", 0.3, 0.15, 10))``, or in a
    job's ``masking``. Checked here too, so a typo fails before any request."""
    if kind not in SCHEDULES:
        raise ValueError(f"schedule kind must be one of {SCHEDULES}, not {kind!r}")
    if unit not in UNITS:
        raise ValueError(f"schedule unit must be one of {UNITS}, not {unit!r}")
    for name, p in (("start", start), ("end", end)):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"{name} rate {p} is outside [0, 1]")
    if kind == "constant":
        return {"mlm_probability": start}
    if not isinstance(length, int) or length < 1:
        raise ValueError(f"length must be a positive number of {unit}s, not {length!r}")
    return {"mlm_probability": start, "schedule": kind, "mlm_probability_end": end, "schedule_unit": unit,
            "schedule_length": length}  # fmt: skip
