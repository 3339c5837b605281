"""A run's measurements: per-step training loss and accuracy, evaluations on fixed mask sets.

Per-step values stay on the device until a flush (a log line, an evaluation,
a checkpoint), so collecting them costs no synchronisation per step. Rows go
to ``--metrics-out``; evaluations are also printed.
"""

from __future__ import annotations

import argparse
from typing import Any

import torch

from .data import epoch_of_step, epochs_done
from .evaluate import EvalSet, MetricsWriter, evaluate, fetch_set, spread_ids


class RunLog:
    def __init__(self, *, eval_sets: list[EvalSet], writer: MetricsWriter | None, device: torch.device,
                 num_sequences: int, batch_size: int, steps: int, eval_every: str | None, log_every: int,
                 checkpoint_every: int, log: Any = print) -> None:  # fmt: skip
        self.eval_sets = eval_sets
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
        self._pending: list[tuple[int, float, float, torch.Tensor, torch.Tensor, int]] = []

    @classmethod
    def open(cls, client: Any, args: argparse.Namespace, *, masking: dict, device: torch.device, num_sequences: int,
             batch_size: int, steps: int, eval_every: str | None, start_step: int) -> "RunLog":  # fmt: skip
        """Fetch the evaluation sets (once: they never change) and open the metrics file."""
        eval_sets = []
        if args.eval_mlm_probability is not None:
            masking = {**masking, "mlm_probability": args.eval_mlm_probability}
        if args.eval_dataset:
            held = client.dataset(args.eval_dataset)
            ids = spread_ids(int(held["num_sequences"]), args.eval_sequences)
            eval_sets.append(fetch_set(client, "heldout", args.eval_dataset, ids, masking))
        if args.unseen_eval:
            ids = spread_ids(num_sequences, args.unseen_eval)
            eval_sets.append(fetch_set(client, "unseen", args.dataset, ids, masking))
        for s in eval_sets:
            print(f"eval set {s.name}: {sum(len(b['input_ids']) for b in s.batches)} sequences, "
                  f"{s.tokens} tokens to predict (fixed masks)")
        writer = MetricsWriter(args.metrics_out, resume_step=start_step if args.resume else None) \
            if args.metrics_out else None  # fmt: skip
        return cls(eval_sets=eval_sets, writer=writer, device=device, num_sequences=num_sequences,
                   batch_size=batch_size, steps=steps, eval_every=eval_every, log_every=args.log_every,
                   checkpoint_every=args.checkpoint_every)  # fmt: skip

    # ---- per step ------------------------------------------------------------

    def on_step(self, step: int, info: dict[str, Any]) -> None:
        """After step ``step`` (steps done): keep its figures, flush or evaluate when due."""
        meta = info.get("metadata") or {}
        if self.batches_per_epoch is not None and "epoch" in meta:
            epoch = int(meta["epoch"])
            ends_epoch = int(meta.get("index", -1)) == self.batches_per_epoch - 1
        else:
            epoch = epoch_of_step(step - 1, self.num_sequences, self.batch_size)
            ends_epoch = epochs_done(step, self.num_sequences, self.batch_size) > epoch
        self._pending.append((step, epoch, info["lr"], info["loss"], info["correct"], int(info["tokens"])))
        due = self._eval_due(step, ends_epoch)
        if due or (self.log_every and step % self.log_every == 0) or \
                (self.checkpoint_every and step % self.checkpoint_every == 0):  # fmt: skip
            self.flush()
        if due:
            model = info["model"]
            self.evaluate(model, step, final=step == self.steps, epoch=epoch + 1 if ends_epoch else None)

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
        for (step, epoch, lr, _, _, tokens), loss, right in zip(self._pending, losses, correct):
            rows.append({"step": step, "epoch": epoch, "split": "train", "loss": round(loss, 6),
                         "accuracy": round(right / max(tokens, 1), 6), "tokens": tokens, "lr": f"{lr:.6g}"})
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
