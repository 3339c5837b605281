"""A run's measurements: per-step training loss and accuracy, evaluations on fixed mask sets, and on a
mixture job each source's share of the rows trained.

Per-step values stay on the device until a flush (a log line, an evaluation,
a checkpoint), so collecting them costs no synchronisation per step. Rows go
to ``--metrics-out``; evaluations are also printed.
"""

from __future__ import annotations

import argparse
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from .data import epoch_of_step, epochs_done
from .evaluate import FIELDS, EvalSet, MetricsWriter, evaluate, fetch_set, spread_ids


class SourceShares:
    """Each source's share of the rows trained: per log interval and over the whole run (a resumed run goes
    on from its checkpoint's counts). The counts come from each batch's ``sources`` (plain lists: no device
    sync)."""

    def __init__(self, names: list[str], rows: Mapping[str, int] | None = None) -> None:
        self.names = list(names)
        self.total: Counter[str] = Counter({k: int(v) for k, v in (rows or {}).items()})
        self.interval: Counter[str] = Counter()

    @property
    def fields(self) -> list[str]:
        """The metrics columns: this step's share and the run's so far, per source."""
        return [f"share:{n}" for n in self.names] + [f"total_share:{n}" for n in self.names]

    def add(self, sources: Iterable[str] | None) -> dict[str, float]:
        """Count a step's rows; the step's metrics columns."""
        step = Counter(sources or ())
        self.total.update(step)
        self.interval.update(step)
        rows, total = max(1, sum(step.values())), max(1, sum(self.total.values()))
        return {**{f"share:{n}": round(step[n] / rows, 6) for n in self.names},
                **{f"total_share:{n}": round(self.total[n] / total, 6) for n in self.names}}  # fmt: skip

    def note(self) -> str:
        """`` | rows python 62.5% (so far 70.1%), linux ...``: the interval's shares and the run's; a new interval
        starts."""
        rows, total = max(1, sum(self.interval.values())), max(1, sum(self.total.values()))
        parts = [f"{n} {100 * self.interval[n] / rows:.1f}% (so far {100 * self.total[n] / total:.1f}%)"
                 for n in self.names]  # fmt: skip
        self.interval.clear()
        return " | rows " + ", ".join(parts)


class RunLog:
    def __init__(self, *, eval_sets: list[EvalSet], writer: MetricsWriter | None, device: torch.device,
                 num_sequences: int, batch_size: int, steps: int, eval_every: str | None, log_every: int,
                 checkpoint_every: int, log: Any = print, shares: SourceShares | None = None) -> None:  # fmt: skip
        self.eval_sets = eval_sets
        self.shares = shares
        self.writer = writer
        self.device = device
        self.num_sequences = num_sequences
        self.batch_size = batch_size
        self.steps = steps
        self.eval_every = eval_every
        self.log_every = log_every
        self.checkpoint_every = checkpoint_every
        self.log = log
        self.batches_per_epoch: int | None = None  # set for a job stream: its epochs end at its own batches
        self.last_eval: int | None = None
        self._pending: list[tuple[int, float, float, torch.Tensor, torch.Tensor, int, dict]] = []

    @classmethod
    def open(cls, client: Any, args: argparse.Namespace, *, masking: dict, device: torch.device, num_sequences: int,
             batch_size: int, steps: int, eval_every: str | None, start_step: int, datasets: list[str] | None = None,
             sources: list[str] | None = None, source_rows: Mapping[str, int] | None = None) -> "RunLog":  # fmt: skip
        """Fetch the evaluation sets (once: they never change) and open the metrics file. ``datasets``: what the
        run trains on (unseen-mask sets come from each); ``sources``: a mixture job's, whose shares are counted
        (from ``source_rows`` on, a resumed run's)."""
        if args.eval_mlm_probability is not None:
            masking = {**masking, "mlm_probability": args.eval_mlm_probability}
        eval_sets = _eval_sets(client, args, masking, num_sequences, datasets or [args.dataset], bool(sources))
        for s in eval_sets:
            print(f"eval set {s.name}: {sum(len(b['input_ids']) for b in s.batches)} sequences, "
                  f"{s.tokens} tokens to predict (fixed masks)")
        shares = SourceShares(sources, source_rows) if sources else None
        fields = [*FIELDS, *(shares.fields if shares else [])]
        writer = MetricsWriter(args.metrics_out, resume_step=start_step if args.resume else None, fields=fields) \
            if args.metrics_out else None  # fmt: skip
        return cls(eval_sets=eval_sets, writer=writer, device=device, num_sequences=num_sequences,
                   batch_size=batch_size, steps=steps, eval_every=eval_every, log_every=args.log_every,
                   checkpoint_every=args.checkpoint_every, shares=shares)  # fmt: skip

    def data_state(self) -> dict[str, Any]:
        """What a checkpoint keeps of the log: the rows trained per source (so the shares go on when resumed)."""
        return {"source_rows": dict(self.shares.total)} if self.shares else {}

    # ---- per step ------------------------------------------------------------

    def on_step(self, step: int, info: dict[str, Any]) -> str | None:
        """After step ``step`` (steps done): keep its figures, flush or evaluate when due. On a mixture, what
        the step's log line adds: each source's share of the rows trained."""
        meta = info.get("metadata") or {}
        if self.batches_per_epoch is not None and "epoch" in meta:
            epoch = int(meta["epoch"])
            ends_epoch = int(meta.get("index", -1)) == self.batches_per_epoch - 1
        else:
            epoch = epoch_of_step(step - 1, self.num_sequences, self.batch_size)
            ends_epoch = epochs_done(step, self.num_sequences, self.batch_size) > epoch
        shares = self.shares.add(info.get("sources")) if self.shares else {}
        self._pending.append((step, epoch, info["lr"], info["loss"], info["correct"], int(info["tokens"]), shares))
        due = self._eval_due(step, ends_epoch)
        if due or (self.log_every and step % self.log_every == 0) or \
                (self.checkpoint_every and step % self.checkpoint_every == 0):  # fmt: skip
            self.flush()
        if due:
            model = info["model"]
            self.evaluate(model, step, final=step == self.steps, epoch=epoch + 1 if ends_epoch else None)
        if self.shares and self.log_every and step % self.log_every == 0:  # the loop logs this step: the shares
            return self.shares.note()
        return None

    def _eval_due(self, step: int, ends_epoch: bool) -> bool:
        if not self.eval_sets or self.eval_every is None:
            return bool(self.eval_sets) and step == self.steps
        if self.eval_every == "epoch":
            return ends_epoch or step == self.steps
        return step % int(self.eval_every) == 0 or step == self.steps

    def flush(self) -> None:
        if not self._pending:
            return
        losses = torch.stack([p[3].float() for p in self._pending]).tolist()
        correct = torch.stack([torch.as_tensor(p[4]) for p in self._pending]).tolist()
        rows = []
        for (step, epoch, lr, _, _, tokens, shares), loss, right in zip(self._pending, losses, correct):
            rows.append({"step": step, "epoch": epoch, "split": "train", "loss": round(loss, 6),
                         "accuracy": round(right / max(tokens, 1), 6), "tokens": tokens, "lr": f"{lr:.6g}",
                         **shares})  # fmt: skip
        self._pending.clear()
        if self.writer is not None:
            self.writer.write(rows)

    # ---- evaluation ----------------------------------------------------------

    def evaluate(self, model: torch.nn.Module, step: int, *, final: bool, epoch: float | None = None) -> None:
        if not self.eval_sets:
            return
        self.flush()
        if epoch is None:
            epoch = round(step * self.batch_size / self.num_sequences, 4)
        parts, rows = [], []
        for s in self.eval_sets:
            r = evaluate(model, s, self.device)
            rows.append({"step": step, "epoch": epoch, "split": s.name, "loss": round(r["loss"], 6),
                         "accuracy": round(r["accuracy"], 6), "tokens": r["tokens"], "lr": ""})
            parts.append(f"{s.name} loss {r['loss']:.4f} acc {r['accuracy']:.3f}")
        self.last_eval = step
        self.log(f"eval step {step} (epoch {epoch}){' final' if final else ''} | " + " | ".join(parts))
        if self.writer is not None:
            self.writer.write(rows)

    def close(self) -> None:
        self.flush()
        if self.writer is not None:
            self.writer.close()


def _eval_sets(client: Any, args: argparse.Namespace, masking: dict, num_sequences: int, datasets: list[str],
               mixture: bool) -> list[EvalSet]:  # fmt: skip
    """The held-out sets (one per --eval-dataset: 'heldout', or 'heldout:NAME' each when there are several)
    and the unseen-mask sets (of the dataset: 'unseen'; of each source of a mixture: 'unseen:NAME')."""
    out = []
    held = list(args.eval_dataset or [])
    for name in held:
        ids = spread_ids(int(client.dataset(name)["num_sequences"]), args.eval_sequences)
        out.append(fetch_set(client, "heldout" if len(held) == 1 else f"heldout:{name}", name, ids, masking))
    if args.unseen_eval:
        for name in datasets:
            n = int(client.dataset(name)["num_sequences"]) if mixture else num_sequences
            split = f"unseen:{name}" if mixture and len(datasets) > 1 else "unseen"
            out.append(fetch_set(client, split, name, spread_ids(n, args.unseen_eval), masking))
    return out
