"""``maskserve experiment static-vs-dynamic | mask-rate``: masking strategies compared, with curves.

static-vs-dynamic: BERT's static masks against RoBERTa's dynamic ones. For every seed, a static run (K cached masks per sequence, epoch e serves copy
e mod K) and a dynamic run (a fresh mask each epoch) train the same model from
the same initialisation on the same data order: the two differ in the masks
only, and for the first K epochs not even there (copy c *is* the dynamic mask
of epoch c). Each run is ``python -m trainer`` in this process, evaluated at
every epoch on the held-out set and on training sequences under masks no run
trains on. A run checkpoints every epoch; running the command again resumes
what was interrupted and skips what is finished.

mask-rate: the same machinery over mask-rate variants (a low constant rate,
a high one, and high to low by the service's schedule), every run evaluated
at the low rate so that the curves compare.

Outputs in ``--out``: ``runs/`` (each run's metrics CSV and checkpoint),
``curves.csv`` (one row per run and epoch), ``curves.png``, ``summary.md``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .evaluate import read_metrics

CURVE_FIELDS = ("variant", "seed", "epoch", "train_loss", "train_accuracy", "heldout_loss", "heldout_accuracy",
                "unseen_loss", "unseen_accuracy")  # fmt: skip
COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple")


@dataclass
class Plan:
    """What an experiment trains and how it reads the result. ``variants``: name -> the trainer flags
    that set it apart (the first is the baseline the others are compared with)."""

    title: str
    variants: dict[str, list[str]]
    block: int  # epochs per row of the gap tables
    marker: tuple[float, str] | None  # a vertical line on every panel: (epoch, label)
    reading: Callable[["Plan", list[dict[str, Any]], argparse.Namespace], list[str]]
    notes: str = ""
    eval_flags: list[str] = field(default_factory=list)

    @property
    def baseline(self) -> str:
        return next(iter(self.variants))


def static_vs_dynamic(args: argparse.Namespace) -> Plan:
    return Plan(
        title="Static vs dynamic masking",
        variants={"dynamic": ["--mode", "dynamic"], "static": ["--mode", "static", "--copies", str(args.copies)]},
        block=args.copies,
        marker=(args.copies + 0.5, "static masks\nrepeat") if args.copies < args.epochs else None,
        reading=_static_reading,
        notes=f"static copies K={args.copies}",
    )


def mask_rate(args: argparse.Namespace) -> Plan:
    """Constant low rate (the baseline), constant high rate, and high -> low over the run."""
    low, high = f"{args.low:g}", f"{args.high:g}"
    return Plan(
        title="Mask-rate schedules",
        variants={
            f"p{low}": ["--mlm-probability", low],
            f"p{high}": ["--mlm-probability", high],
            f"p{high}-to-{low}": ["--mlm-probability", high, "--schedule", args.schedule, "--mlm-probability-end", low,
                                  "--schedule-length", str(args.epochs)],
        },  # fmt: skip
        block=max(1, args.epochs // 4),
        marker=None,
        reading=_rate_reading,
        notes=(f"rates {low} and {high} constant, and {high} to {low} ({args.schedule}, over the run); every "
               f"evaluation masks {low} of the tokens, whatever the run trains at, so held-out and unseen-mask "
               "losses compare across runs while training losses (each at its own rate) do not"),
        eval_flags=["--eval-mlm-probability", low],
    )


PLANS: dict[str, Callable[[argparse.Namespace], Plan]] = {"static-vs-dynamic": static_vs_dynamic,
                                                          "mask-rate": mask_rate}  # fmt: skip


def run_name(variant: str, seed: int) -> str:
    return f"{variant}-seed{seed}"


def _trainer_argv(args: argparse.Namespace, plan: Plan, variant: str, seed: int, runs: Path,
                  steps_per_epoch: int) -> list[str]:  # fmt: skip
    name = run_name(variant, seed)
    argv = ["--dataset", args.dataset, "--eval-dataset", args.eval_dataset, "--epochs", str(args.epochs),
            "--seed", str(seed), "--batch-size", str(args.batch_size), "--eval-sequences", str(args.eval_sequences),
            "--unseen-eval", str(args.unseen_eval), "--eval-every", "epoch",
            "--metrics-out", str(runs / f"{name}.csv"), "--checkpoint-every", str(steps_per_epoch),
            "--log-every", str(steps_per_epoch), "--device", args.device, "--threads", str(args.threads),
            "--d-model", str(args.d_model), "--layers", str(args.layers), "--heads", str(args.heads),
            "--d-ff", str(args.d_ff), "--dropout", str(args.dropout), "--lr", str(args.lr)]  # fmt: skip
    if getattr(args, "mlm_probability", None) is not None:
        argv += ["--mlm-probability", str(args.mlm_probability)]
    argv += plan.variants[variant] + plan.eval_flags  # later flags win
    if args.url:
        argv += ["--url", args.url]
    if args.token:
        argv += ["--token", args.token]
    ckpt = runs / f"{name}.pt"
    return argv + (["--resume", str(ckpt)] if ckpt.exists() else ["--checkpoint", str(ckpt)])


def run(args: argparse.Namespace, info: dict[str, Any]) -> int:
    """Train every (seed, variant) not finished yet, then write the curves, the figure and the summary."""
    from .__main__ import main as trainer_main

    plan = PLANS[args.experiment](args)
    out = Path(args.out)
    runs = out / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    seeds = [int(s) for s in str(args.seeds).split(",") if s.strip()]
    n = int(info["num_sequences"])
    steps_per_epoch = math.ceil(n / args.batch_size)
    (out / "config.json").write_text(json.dumps({k: v for k, v in vars(args).items() if k not in ("func", "token")},
                                                indent=2) + "\n")  # fmt: skip
    for seed in seeds:
        for variant in plan.variants:
            name = run_name(variant, seed)
            done = runs / f"{name}.done"
            if done.exists():
                print(f"[{name}] finished earlier; skipped")
                continue
            if _finished(runs / f"{name}.pt", math.ceil(args.epochs * n / args.batch_size)):
                done.write_text("finished before it was marked\n")  # stopped between its last save and here
                continue
            print(f"[{name}] training: {args.epochs} epochs of {n} sequences", flush=True)
            t0 = time.perf_counter()
            rc = trainer_main(_trainer_argv(args, plan, variant, seed, runs, steps_per_epoch))
            if rc != 0:
                print(f"[{name}] the trainer failed (exit status {rc}); run the command again to resume")
                return rc
            done.write_text(f"{time.perf_counter() - t0:.1f}\n")
    curves = collect(runs, list(plan.variants), seeds, args.epochs)
    write_curves(out / "curves.csv", curves)
    plot(out / "curves.png", curves, plan)
    (out / "summary.md").write_text(summarize(plan, curves, args, info))
    print(f"wrote {out / 'curves.csv'}, {out / 'curves.png'}, {out / 'summary.md'}")
    return 0


def _finished(checkpoint: Path, steps: int) -> bool:
    if not checkpoint.exists():
        return False
    from .loop import load_checkpoint

    return int(load_checkpoint(checkpoint)["step"]) >= steps


def collect(runs: Path, variants: list[str], seeds: list[int], epochs: int) -> list[dict[str, Any]]:
    """One row per (variant, seed, epoch 0..E): the epoch's mean training loss, and the evaluations at its end."""
    rows = []
    for seed in seeds:
        for variant in variants:
            metrics = read_metrics(runs / f"{run_name(variant, seed)}.csv")
            for epoch in range(epochs + 1):
                row: dict[str, Any] = {"variant": variant, "seed": seed, "epoch": epoch}
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


def write_curves(path: Path, curves: list[dict[str, Any]], fields: tuple[str, ...] | None = None) -> None:
    """``curves`` as CSV, floats to 5 decimals; columns ``fields`` (default: this experiment's)."""
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CURVE_FIELDS if fields is None else fields)
        w.writeheader()
        for row in curves:
            w.writerow({k: (f"{v:.5f}" if isinstance(v, float) else v) for k, v in row.items()})


def plot(path: Path, curves: list[dict[str, Any]], plan: Plan) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (("train_loss", "training loss (the run's own masks)"), ("heldout_loss", "held-out loss (fixed masks)"),
              ("unseen_loss", "training sequences, unseen masks"))  # fmt: skip
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5), sharex=True)
    seeds = sorted({r["seed"] for r in curves})
    styles = ["-", "--", ":", "-."]
    for ax, (key, title) in zip(axes, panels):
        for v, variant in enumerate(plan.variants):
            for i, seed in enumerate(seeds):
                pts = [(r["epoch"], r[key]) for r in curves if r["variant"] == variant and r["seed"] == seed
                       and key in r]  # fmt: skip
                if pts:
                    ax.plot(*zip(*pts), styles[i % len(styles)], color=COLORS[v % len(COLORS)],
                            label=f"{variant}, seed {seed}")  # fmt: skip
        if plan.marker is not None:
            ax.axvline(plan.marker[0], color="grey", lw=0.8)
            ax.text(plan.marker[0] + 0.2, 0.97, plan.marker[1], transform=ax.get_xaxis_transform(), va="top",
                    fontsize=8, color="grey")  # fmt: skip
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.set_ylabel("masked-token cross-entropy (nats)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(plan.title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _value(curves: list[dict[str, Any]], variant: str, seed: int, epoch: int, key: str) -> float | None:
    for r in curves:
        if r["variant"] == variant and r["seed"] == seed and r["epoch"] == epoch:
            return r.get(key)
    return None


def _mean(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def _fmt(v: float | None, signed: bool = False) -> str:
    return "–" if v is None else (f"{v:+.3f}" if signed else f"{v:.3f}")


KEYS = ("train_loss", "heldout_loss", "unseen_loss")


def blocks(epochs: int, size: int) -> list[tuple[int, int]]:
    return [(a, min(a + size - 1, epochs)) for a in range(1, epochs + 1, size)]


def gaps(curves: list[dict[str, Any]], variant: str, baseline: str, epochs: int,
         size: int) -> dict[str, dict[tuple[int, int], float | None]]:  # fmt: skip
    """variant − baseline, per key and block of epochs, averaged over seeds and the block's epochs."""
    seeds = sorted({r["seed"] for r in curves})
    out: dict[str, dict[tuple[int, int], float | None]] = {}
    for key in KEYS:
        out[key] = {}
        for a, b in blocks(epochs, size):
            diffs = [None if (x := _value(curves, variant, seed, e, key)) is None
                     or (y := _value(curves, baseline, seed, e, key)) is None else x - y
                     for seed in seeds for e in range(a, b + 1)]  # fmt: skip
            out[key][(a, b)] = _mean(diffs)
    return out


def summarize(plan: Plan, curves: list[dict[str, Any]], args: argparse.Namespace, info: dict[str, Any]) -> str:
    """The figures that answer the question, and a plain reading of them."""
    seeds = sorted({r["seed"] for r in curves})
    epochs = args.epochs
    lines = [f"# {plan.title}", "",
             f"Dataset `{args.dataset}` ({info['num_sequences']} sequences of {info['seq_len']} tokens, vocabulary "
             f"{info['vocab_size']}), held-out `{args.eval_dataset}`; {epochs} epochs, batch {args.batch_size}, "
             f"{plan.notes}, seeds {', '.join(map(str, seeds))}; model d={args.d_model}, {args.layers} layers, "
             f"{args.heads} heads, d_ff={args.d_ff}, dropout {args.dropout}, peak lr {args.lr}. Losses are "
             "masked-token cross-entropy in nats; held-out and unseen-mask sets use one fixed mask set for every "
             "run.", "", "## Per run", "",
             "| run | final train | final held-out | best held-out (epoch) | final unseen-mask |",
             "|---|---|---|---|---|"]  # fmt: skip
    for variant in plan.variants:
        for seed in seeds:
            held = [(r["heldout_loss"], r["epoch"]) for r in curves
                    if r["variant"] == variant and r["seed"] == seed and r.get("heldout_loss") is not None]
            best = min(held) if held else (None, None)
            lines.append(f"| {variant}, seed {seed} | {_fmt(_value(curves, variant, seed, epochs, 'train_loss'))} | "
                         f"{_fmt(_value(curves, variant, seed, epochs, 'heldout_loss'))} | {_fmt(best[0])} "
                         f"({best[1]}) | {_fmt(_value(curves, variant, seed, epochs, 'unseen_loss'))} |")  # fmt: skip
    for variant in list(plan.variants)[1:]:
        table = gaps(curves, variant, plan.baseline, epochs, plan.block)
        lines += ["", f"## {variant} − {plan.baseline}, per block of epochs (mean over seeds; negative: "
                  f"{variant} lower)", "", "| epochs | train | held-out | unseen-mask |", "|---|---|---|---|"]
        for a, b in blocks(epochs, plan.block):
            lines.append(f"| {a}–{b} | {_fmt(table['train_loss'][(a, b)], True)} | "
                         f"{_fmt(table['heldout_loss'][(a, b)], True)} | {_fmt(table['unseen_loss'][(a, b)], True)} |")
    lines += ["", "## Reading", ""] + plan.reading(plan, curves, args)
    return "\n".join(lines) + "\n"


def _final_gap(curves: list[dict[str, Any]], variant: str, baseline: str, epochs: int,
               key: str = "heldout_loss") -> tuple[float, float, int] | None:  # fmt: skip
    """Mean final ``key`` gap (variant − baseline) over seeds, the largest seed-to-seed spread of either, seeds."""
    seeds = sorted({r["seed"] for r in curves})
    pairs = [(_value(curves, variant, s, epochs, key), _value(curves, baseline, s, epochs, key)) for s in seeds]
    pairs = [(a, b) for a, b in pairs if a is not None and b is not None]
    if not pairs:
        return None
    gap = sum(a - b for a, b in pairs) / len(pairs)
    spread = max(max(p[i] for p in pairs) - min(p[i] for p in pairs) for i in (0, 1))
    return gap, spread, len(pairs)


def _gap_sentence(what: str, variant: str, baseline: str, found: tuple[float, float, int]) -> str:
    gap, spread, n = found
    favour = baseline if gap > 0 else variant
    if n < 2:
        return (f"- Final {what}: {variant} − {baseline} = {gap:+.3f} nats (in favour of {favour}); one seed only, "
                "so there is no seed-to-seed spread to compare it with.")
    return (f"- Final {what}: {variant} − {baseline} = {gap:+.3f} nats (in favour of {favour}); the seed-to-seed "
            f"spread of either is up to {spread:.3f} nats, so the gap "
            + ("exceeds" if abs(gap) > spread else "does not exceed") + " the spread.")


def _static_reading(plan: Plan, curves: list[dict[str, Any]], args: argparse.Namespace) -> list[str]:
    epochs, k = args.epochs, args.copies
    table = gaps(curves, "static", "dynamic", epochs, plan.block)
    spans = blocks(epochs, plan.block)
    out = []
    first = table["train_loss"].get(spans[0])
    if first is not None:
        out.append(f"- Epochs 1–{min(k, epochs)}: static serves exactly the masks dynamic draws (copy c is the "
                   f"dynamic mask of epoch c), so the runs match there (train gap {first:+.4f}).")
    if len(spans) < 2:
        out.append("- The run is not longer than K epochs: static masks never repeat, so it cannot show a difference.")
        return out
    last = spans[-1]
    train, unseen = table["train_loss"][last], table["unseen_loss"][last]
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
    found = _final_gap(curves, "static", "dynamic", epochs)
    if found is not None:
        out.append(_gap_sentence("held-out loss", "static", "dynamic", found))
    return out


def _rate_reading(plan: Plan, curves: list[dict[str, Any]], args: argparse.Namespace) -> list[str]:
    out = [f"- Training losses are each at their run's own rate and do not compare; the held-out and unseen-mask "
           f"sets mask {args.low:g} of the tokens for every run."]
    for variant in list(plan.variants)[1:]:
        for key, what in (("heldout_loss", "held-out loss"), ("unseen_loss", "unseen-mask loss")):
            found = _final_gap(curves, variant, plan.baseline, args.epochs, key)
            if found is not None:
                out.append(_gap_sentence(what, variant, plan.baseline, found))
    return out


__all__ = ["PLANS", "Plan", "run", "collect", "summarize", "plot"]
