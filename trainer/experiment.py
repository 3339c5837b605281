"""``maskserve experiment static-vs-dynamic``: BERT's static masks against RoBERTa's dynamic ones.

For every seed, a static run (K cached masks per sequence, epoch e serves copy
e mod K) and a dynamic run (a fresh mask each epoch) train the same model from
the same initialisation on the same data order: the two differ in the masks
only, and for the first K epochs not even there (copy c *is* the dynamic mask
of epoch c). Each run is ``python -m trainer`` in this process, evaluated at
every epoch on the held-out set and on training sequences under masks no run
trains on. A run checkpoints every epoch; running the command again resumes
what was interrupted and skips what is finished.

Outputs in ``--out``: ``runs/`` (each run's metrics CSV and checkpoint),
``curves.csv`` (one row per run and epoch), ``curves.png``, ``summary.md``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import time
from pathlib import Path
from typing import Any

from .evaluate import read_metrics

MODES = ("dynamic", "static")
CURVE_FIELDS = ("mode", "seed", "epoch", "train_loss", "train_accuracy", "heldout_loss", "heldout_accuracy",
                "unseen_loss", "unseen_accuracy")  # fmt: skip


def run_name(mode: str, seed: int) -> str:
    return f"{mode}-seed{seed}"


def _trainer_argv(args: argparse.Namespace, mode: str, seed: int, runs: Path, steps_per_epoch: int) -> list[str]:
    name = run_name(mode, seed)
    argv = ["--dataset", args.dataset, "--eval-dataset", args.eval_dataset, "--epochs", str(args.epochs),
            "--mode", mode, "--seed", str(seed), "--batch-size", str(args.batch_size),
            "--mlm-probability", str(args.mlm_probability), "--eval-sequences", str(args.eval_sequences),
            "--unseen-eval", str(args.unseen_eval), "--eval-every", "epoch",
            "--metrics-out", str(runs / f"{name}.csv"), "--checkpoint-every", str(steps_per_epoch),
            "--log-every", str(steps_per_epoch), "--device", args.device, "--threads", str(args.threads),
            "--d-model", str(args.d_model), "--layers", str(args.layers), "--heads", str(args.heads),
            "--d-ff", str(args.d_ff), "--dropout", str(args.dropout), "--lr", str(args.lr)]  # fmt: skip
    if mode == "static":
        argv += ["--copies", str(args.copies)]
    if args.url:
        argv += ["--url", args.url]
    if args.token:
        argv += ["--token", args.token]
    ckpt = runs / f"{name}.pt"
    return argv + (["--resume", str(ckpt)] if ckpt.exists() else ["--checkpoint", str(ckpt)])


def run(args: argparse.Namespace, info: dict[str, Any]) -> int:
    """Train every (seed, mode) not finished yet, then write the curves, the figure and the summary."""
    from .__main__ import main as trainer_main

    out = Path(args.out)
    runs = out / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    seeds = [int(s) for s in str(args.seeds).split(",") if s.strip()]
    n = int(info["num_sequences"])
    steps_per_epoch = math.ceil(n / args.batch_size)
    (out / "config.json").write_text(json.dumps({k: v for k, v in vars(args).items() if k not in ("func", "token")},
                                                indent=2) + "\n")  # fmt: skip
    for seed in seeds:
        for mode in MODES:
            name = run_name(mode, seed)
            done = runs / f"{name}.done"
            if done.exists():
                print(f"[{name}] finished earlier; skipped")
                continue
            if _finished(runs / f"{name}.pt", math.ceil(args.epochs * n / args.batch_size)):
                done.write_text("finished before it was marked\n")  # stopped between its last save and here
                continue
            print(f"[{name}] training: {args.epochs} epochs of {n} sequences", flush=True)
            t0 = time.perf_counter()
            rc = trainer_main(_trainer_argv(args, mode, seed, runs, steps_per_epoch))
            if rc != 0:
                print(f"[{name}] the trainer failed (exit status {rc}); run the command again to resume")
                return rc
            done.write_text(f"{time.perf_counter() - t0:.1f}\n")
    curves = collect(runs, seeds, args.epochs)
    write_curves(out / "curves.csv", curves)
    plot(out / "curves.png", curves, args.copies, args.epochs)
    (out / "summary.md").write_text(summarize(curves, args, info))
    print(f"wrote {out / 'curves.csv'}, {out / 'curves.png'}, {out / 'summary.md'}")
    return 0


def _finished(checkpoint: Path, steps: int) -> bool:
    if not checkpoint.exists():
        return False
    from .loop import load_checkpoint

    return int(load_checkpoint(checkpoint)["step"]) >= steps


def collect(runs: Path, seeds: list[int], epochs: int) -> list[dict[str, Any]]:
    """One row per (mode, seed, epoch 0..E): the epoch's mean training loss, and the evaluations at its end."""
    rows = []
    for seed in seeds:
        for mode in MODES:
            metrics = read_metrics(runs / f"{run_name(mode, seed)}.csv")
            for epoch in range(epochs + 1):
                row: dict[str, Any] = {"mode": mode, "seed": seed, "epoch": epoch}
                train = [m for m in metrics if m["split"] == "train" and int(m["epoch"]) == epoch - 1]
                if train:
                    tokens = sum(m["tokens"] for m in train)
                    row["train_loss"] = sum(m["loss"] * m["tokens"] for m in train) / max(tokens, 1)
                    row["train_accuracy"] = sum(m["accuracy"] * m["tokens"] for m in train) / max(tokens, 1)
                for split in ("heldout", "unseen"):
                    at = [m for m in metrics if m["split"] == split and math.floor(m["epoch"] + 1e-9) == epoch]
                    if at:
                        row[f"{split}_loss"], row[f"{split}_accuracy"] = at[-1]["loss"], at[-1]["accuracy"]
                rows.append(row)
    return rows


def write_curves(path: Path, curves: list[dict[str, Any]]) -> None:
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CURVE_FIELDS)
        w.writeheader()
        for row in curves:
            w.writerow({k: (f"{v:.5f}" if isinstance(v, float) else v) for k, v in row.items()})


def plot(path: Path, curves: list[dict[str, Any]], copies: int, epochs: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (("train_loss", "training loss (the run's own masks)"), ("heldout_loss", "held-out loss (fixed masks)"),
              ("unseen_loss", "training sequences, unseen masks"))  # fmt: skip
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5), sharex=True)
    colors = {"dynamic": "tab:blue", "static": "tab:orange"}
    seeds = sorted({r["seed"] for r in curves})
    styles = ["-", "--", ":", "-."]
    for ax, (key, title) in zip(axes, panels):
        for mode in MODES:
            for i, seed in enumerate(seeds):
                pts = [(r["epoch"], r[key]) for r in curves if r["mode"] == mode and r["seed"] == seed and key in r]
                if pts:
                    ax.plot(*zip(*pts), styles[i % len(styles)], color=colors[mode], label=f"{mode}, seed {seed}")
        if copies < epochs:
            ax.axvline(copies + 0.5, color="grey", lw=0.8)
            ax.text(copies + 0.7, 0.97, "static masks\nrepeat", transform=ax.get_xaxis_transform(), va="top",
                    fontsize=8, color="grey")  # fmt: skip
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.set_ylabel("masked-token cross-entropy (nats)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("static (BERT, K cached masks) vs dynamic (RoBERTa) masking")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _value(curves: list[dict[str, Any]], mode: str, seed: int, epoch: int, key: str) -> float | None:
    for r in curves:
        if r["mode"] == mode and r["seed"] == seed and r["epoch"] == epoch:
            return r.get(key)
    return None


def _mean(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def _fmt(v: float | None, signed: bool = False) -> str:
    return "–" if v is None else (f"{v:+.3f}" if signed else f"{v:.3f}")


def summarize(curves: list[dict[str, Any]], args: argparse.Namespace, info: dict[str, Any]) -> str:
    """The figures that answer the question, and a plain reading of them."""
    seeds = sorted({r["seed"] for r in curves})
    epochs, k = args.epochs, args.copies
    lines = ["# Static vs dynamic masking", "",
             f"Dataset `{args.dataset}` ({info['num_sequences']} sequences of {info['seq_len']} tokens, vocabulary "
             f"{info['vocab_size']}), held-out `{args.eval_dataset}`; {epochs} epochs, batch {args.batch_size}, "
             f"static copies K={k}, seeds {', '.join(map(str, seeds))}; model d={args.d_model}, {args.layers} layers, "
             f"{args.heads} heads, d_ff={args.d_ff}, dropout {args.dropout}, peak lr {args.lr}. Losses are "
             "masked-token cross-entropy in nats; held-out and unseen-mask sets use one fixed mask set for every "
             "run.", "", "## Per run", "",
             "| run | final train | final held-out | best held-out (epoch) | final unseen-mask |",
             "|---|---|---|---|---|"]  # fmt: skip
    for mode in MODES:
        for seed in seeds:
            held = [(r["heldout_loss"], r["epoch"]) for r in curves
                    if r["mode"] == mode and r["seed"] == seed and r.get("heldout_loss") is not None]
            best = min(held) if held else (None, None)
            lines.append(f"| {mode}, seed {seed} | {_fmt(_value(curves, mode, seed, epochs, 'train_loss'))} | "
                         f"{_fmt(_value(curves, mode, seed, epochs, 'heldout_loss'))} | {_fmt(best[0])} ({best[1]}) | "
                         f"{_fmt(_value(curves, mode, seed, epochs, 'unseen_loss'))} |")  # fmt: skip
    lines += ["", "## Static − dynamic, per block of epochs (mean over seeds; negative: static lower)", "",
              "| epochs | train | held-out | unseen-mask |", "|---|---|---|---|"]
    blocks = [(a, min(a + k - 1, epochs)) for a in range(1, epochs + 1, k)]
    gaps: dict[str, dict[tuple[int, int], float | None]] = {}
    for key in ("train_loss", "heldout_loss", "unseen_loss"):
        gaps[key] = {}
        for a, b in blocks:
            diffs = [None if (s := _value(curves, "static", seed, e, key)) is None
                     or (d := _value(curves, "dynamic", seed, e, key)) is None else s - d
                     for seed in seeds for e in range(a, b + 1)]  # fmt: skip
            gaps[key][(a, b)] = _mean(diffs)
    for a, b in blocks:
        lines.append(f"| {a}–{b} | {_fmt(gaps['train_loss'][(a, b)], True)} | "
                     f"{_fmt(gaps['heldout_loss'][(a, b)], True)} | {_fmt(gaps['unseen_loss'][(a, b)], True)} |")
    lines += ["", "## Reading", ""] + _reading(curves, seeds, epochs, k, gaps, blocks)
    return "\n".join(lines) + "\n"


def _reading(curves: list[dict[str, Any]], seeds: list[int], epochs: int, k: int,
             gaps: dict[str, dict[tuple[int, int], float | None]], blocks: list[tuple[int, int]]) -> list[str]:  # fmt: skip
    out = []
    first = gaps["train_loss"].get(blocks[0])
    if first is not None:
        out.append(f"- Epochs 1–{min(k, epochs)}: static serves exactly the masks dynamic draws (copy c is the "
                   f"dynamic mask of epoch c), so the runs match there (train gap {first:+.4f}).")
    if len(blocks) < 2:
        out.append("- The run is not longer than K epochs: static masks never repeat, so it cannot show a difference.")
        return out
    last = blocks[-1]
    train, unseen, held = (gaps[key][last] for key in ("train_loss", "unseen_loss", "heldout_loss"))
    if train is not None:
        side = "below" if train < 0 else "above"
        out.append(f"- Once the masks repeat, static's training loss (on its own, repeated masks) is {side} "
                   f"dynamic's: {train:+.3f} nats over epochs {last[0]}–{last[1]}.")
    if unseen is not None and train is not None:
        verdict = "no better" if unseen >= -0.01 else "also lower"
        out.append(f"- On training sequences under masks neither run has seen, static is {verdict} "
                   f"({unseen:+.3f} nats): "
                   + ("what static gains on its training batches is memorised masks, not sequences."
                      if unseen > train + 0.02 else "the training-loss gap is not explained by memorised masks alone."))
    final = [(_value(curves, "static", s, epochs, "heldout_loss"), _value(curves, "dynamic", s, epochs, "heldout_loss"))
             for s in seeds]  # fmt: skip
    final = [(a, b) for a, b in final if a is not None and b is not None]
    if final:
        gap = sum(a - b for a, b in final) / len(final)
        spreads = []
        for idx in (0, 1):
            vals = [pair[idx] for pair in final]
            spreads.append(max(vals) - min(vals))
        spread = max(spreads)
        favour = "dynamic" if gap > 0 else "static"
        if len(final) > 1:
            out.append(f"- Final held-out loss: static − dynamic = {gap:+.3f} nats (in favour of {favour}); the "
                       f"seed-to-seed spread of either mode is up to {spread:.3f} nats, so the gap "
                       + ("exceeds" if abs(gap) > spread else "does not exceed") + " the spread.")
        else:
            out.append(f"- Final held-out loss: static − dynamic = {gap:+.3f} nats (in favour of {favour}); one "
                       "seed only, so there is no seed-to-seed spread to compare it with.")
    return out


__all__ = ["run", "collect", "summarize", "plot"]
