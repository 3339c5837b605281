"""Evaluation on fixed mask sets, and the metrics file.

An evaluation set is a list of batches fetched once, by sequence id, under
masks that are a pure function of (eval seed, epoch 0, id, masking config):
every run that names the same set sees the same tokens to predict, so curves
of different runs (static vs dynamic, seed 0 vs seed 1) are comparable point
by point. Two sets matter for the static-vs-dynamic question:

* ``heldout``: sequences of another dataset (documents no run trains on);
* ``unseen``: training sequences under masks no run trains on (the eval seed
  differs from every training mask seed). A run that memorises its masks
  does well on its training batches and no better here; a run that learns
  the sequences does well on both.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .model import IGNORE_INDEX, MaskedLM

# Seeds the fixed evaluation masks. Training runs must use another mask seed (the trainer refuses this one).
EVAL_SEED = 0x5EED_E7A1
EVAL_CHUNK = 64  # sequences per request and per forward pass


@dataclass
class EvalSet:
    name: str  # "heldout" or "unseen"
    batches: list[dict[str, torch.Tensor]]

    @property
    def tokens(self) -> int:
        return int(sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in self.batches))


def spread_ids(num_sequences: int, count: int) -> list[int]:
    """``count`` ids spread evenly over ``[0, num_sequences)`` (all of them when count >= num_sequences)."""
    if count >= num_sequences:
        return list(range(num_sequences))
    return sorted({i * num_sequences // count for i in range(count)})


def fetch_set(client: Any, name: str, dataset: str, ids: Sequence[int], masking: Mapping[str, Any],
              seed: int = EVAL_SEED) -> EvalSet:  # fmt: skip
    """Fetch ``ids`` of ``dataset`` once, masked dynamically for (seed, epoch 0) with ``masking`` at its
    starting rate (a run's mask-rate schedule is not the evaluation's)."""
    from .data import SCHEDULE_KEYS

    options = {k: v for k, v in masking.items() if k not in ("mode", "copies", *SCHEDULE_KEYS) and v is not None}
    batches = []
    for start in range(0, len(ids), EVAL_CHUNK):
        b = client.sequences(dataset, ids[start : start + EVAL_CHUNK], seed=seed, epoch=0, **options)
        batches.append(b.torch())
    return EvalSet(name, batches)


@torch.no_grad()
def evaluate(model: MaskedLM, eval_set: EvalSet, device: torch.device) -> dict[str, float]:
    """Mean cross-entropy and accuracy over every masked token of the set (token-weighted)."""
    was_training = model.training
    model.eval()
    total_loss, correct, tokens = 0.0, 0, 0
    try:
        for batch in eval_set.batches:
            labels = batch["labels"].to(device)
            logits, _ = model(batch["input_ids"].to(device), batch["attention_mask"].to(device), labels)
            targets = labels[labels != IGNORE_INDEX]
            if targets.numel() == 0:
                continue
            total_loss += float(torch.nn.functional.cross_entropy(logits.float(), targets, reduction="sum"))
            correct += int((logits.argmax(dim=-1) == targets).sum())
            tokens += int(targets.numel())
    finally:
        model.train(was_training)
    return {"loss": total_loss / max(tokens, 1), "accuracy": correct / max(tokens, 1), "tokens": tokens}


FIELDS = ("step", "epoch", "split", "loss", "accuracy", "tokens", "lr")


class MetricsWriter:
    """Rows of ``fields`` (``FIELDS``, then any a run adds: a mixture's ``share:NAME`` and
    ``total_share:NAME``) to a CSV file, or JSON lines when the path ends in ``.jsonl``.

    Resuming at step s keeps the rows of steps <= s and drops the rest: the
    file then reads as if the run had never stopped.
    """

    def __init__(self, path: str | os.PathLike, resume_step: int | None = None,
                 fields: Sequence[str] = FIELDS) -> None:  # fmt: skip
        self.path = os.fspath(path)
        self.fields = tuple(fields)
        self.jsonl = self.path.endswith((".jsonl", ".ndjson"))
        kept = read_metrics(self.path) if resume_step is not None and os.path.exists(self.path) else []
        kept = [r for r in kept if int(r["step"]) <= (resume_step or 0)]
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        self._f = open(self.path, "w", newline="", encoding="utf-8")
        self._csv = None if self.jsonl else csv.DictWriter(self._f, fieldnames=self.fields)
        if self._csv is not None:
            self._csv.writeheader()
        self.write(kept)

    def write(self, rows: Iterable[Mapping[str, Any]]) -> None:
        for row in rows:
            clean = {k: row.get(k, "") for k in self.fields}
            if self._csv is not None:
                self._csv.writerow(clean)
            else:
                self._f.write(json.dumps(clean) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The rows of a metrics file (CSV or JSON lines), numbers parsed (the columns past ``FIELDS`` too)."""
    path = os.fspath(path)
    with open(path, encoding="utf-8") as f:
        if path.endswith((".jsonl", ".ndjson")):
            rows = [json.loads(line) for line in f if line.strip()]
        else:
            rows = list(csv.DictReader(f))
    out = []
    for r in rows:
        parsed: dict[str, Any] = {"split": r["split"]}
        for k in ("step", "tokens"):
            parsed[k] = int(float(r[k])) if r.get(k) not in (None, "") else None
        for k in ("epoch", "loss", "accuracy", "lr"):
            parsed[k] = float(r[k]) if r.get(k) not in (None, "") else None
        for k in r.keys() - set(FIELDS):
            parsed[k] = float(r[k]) if r[k] not in (None, "") else None
        out.append(parsed)
    return out


__all__ = ["EVAL_SEED", "EvalSet", "MetricsWriter", "evaluate", "fetch_set", "read_metrics", "spread_ids"]
