"""The output parameters a batch request carries: label layout, extra arrays, padding."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

#: how labels travel: a (B, L) array with -100 off the selected tokens, or the selected positions and ids
Labels = Literal["dense", "sparse"]


class OutputParams(BaseModel):
    labels: Labels = Field(
        default="dense",
        description="dense: `labels` (B, L) with -100; sparse: `masked_positions` (N, 2) and `masked_ids` (N,) instead.",
    )
    special_tokens_mask: bool = Field(default=False, description="Also send `special_tokens_mask` (B, L).")
    pad_to_multiple_of: int | None = Field(
        default=None, ge=1, le=4096,
        description="Pad to the batch's longest sequence rounded up to this multiple, instead of to L "
        "(never past L).",
    )  # fmt: skip
