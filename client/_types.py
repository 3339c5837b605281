"""The client's enumerations: one ``Literal`` per set of values the service accepts, and its media types."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal, get_args

TokenizerKind = Literal["bpe", "wordpiece", "unigram"]
Packing = Literal["complete", "doc", "none"]
#: how a plain-text upload is cut into documents
TextSplit = Literal["none", "line", "paragraph"]
#: when a job's next epoch starts: once the last batch was handed out, or once it was acked
EpochBoundary = Literal["handout", "ack"]
ScheduleKind = Literal["constant", "linear", "cosine"]
#: what a mask-rate schedule counts
ScheduleUnit = Literal["epoch", "step"]
#: the media types documents are uploaded in
DocumentType = Literal["application/x-ndjson", "text/plain"]

SCHEDULE_KINDS: tuple[ScheduleKind, ...] = get_args(ScheduleKind)
SCHEDULE_UNITS: tuple[ScheduleUnit, ...] = get_args(ScheduleUnit)
NDJSON: DocumentType = "application/x-ndjson"
PLAIN_TEXT: DocumentType = "text/plain"
#: a mixture job's sources: dataset -> weight, or ``{"dataset", "weight", "repeat"}`` each
Sources = Mapping[str, float] | Sequence[Mapping[str, Any]]
