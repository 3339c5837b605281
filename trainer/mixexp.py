"""``maskserve experiment mixture``: a fixed 50/50 mixture of two corpora against a curriculum over them.

Two runs per seed train the same model from the same initialisation for the
same steps on mixture jobs over ``python`` and ``linux`` (each source
repeating, so neither runs out): ``fixed-50-50`` draws both equally
throughout; ``curriculum`` moves linearly from 90/10 (python/linux) at step 0
to 10/90 at the last step (the service's linear curriculum, stepping per
block of positions). Both are evaluated every ``--eval-every`` steps on a
held-out set of each corpus (``--eval-dataset`` twice), and count each
source's share of the rows they trained. Each run is ``python -m trainer`` in
this process; a finished run is skipped when the command runs again, one cut
off starts over (its job too).

Outputs in ``--out``: ``runs/`` (each run's metrics CSV, checkpoint and job
curriculum), ``curves.csv`` (one row per run and evaluation), ``curves.png``,
``summary.md``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from .evaluate import read_metrics
from .experiment import COLORS, Plan, _fmt, _mean, run_name, write_curves

SOURCES = ("python", "linux")
CURVE_FIELDS = ("variant", "seed", "step", "train_loss", "python_share", "linux_share", "python_heldout_loss",
                "python_heldout_accuracy", "linux_heldout_loss", "linux_heldout_accuracy")  # fmt: skip


def plan(args: argparse.Namespace, out: Path) -> Plan:
    """The two runs, as trainer flags (beyond the ones they share)."""
    py, lx = (float(w) for w in str(args.start).split("/"))
    ds = {k: f"{args.prefix}-{k}" for k in SOURCES}
    curriculum = out / "runs" / "curriculum.json"
    curriculum.parent.mkdir(parents=True, exist_ok=True)
    curriculum.write_text(json.dumps([{"step": 0, "weights": {ds["python"]: py, ds["linux"]: lx}},
                                      {"step": args.steps, "weights": {ds["python"]: lx, ds["linux"]: py}}]) + "\n")
    label = f"{py:g}/{lx:g}"
    return Plan(
        title="A fixed data mixture vs a curriculum",
        variants={"fixed-50-50": ["--source", f"{ds['python']}=1:repeat", "--source", f"{ds['linux']}=1:repeat"],
                  "curriculum": ["--source", f"{ds['python']}=1:repeat", "--source", f"{ds['linux']}=1:repeat",
                                 "--curriculum", str(curriculum), "--interpolation", "linear"]},  # fmt: skip
        block=max(1, args.steps // 4),
        marker=None,
        reading=_reading,
        notes=f"python/linux weights 50/50 throughout vs {label} moving linearly to {lx:g}/{py:g} over the run "
              f"(blocks of {mixture_block(args)} positions)",
    )


def mixture_block(args: argparse.Namespace) -> int:
    """Positions per stratified block: the service's 256, or fewer on a short run, so that the curriculum
    moves in at least 32 steps (its weights hold for a block)."""
    return min(256, max(2, args.steps * args.batch_size // 64 * 2))  # even: a 50/50 block splits exactly


def _trainer_argv(args: argparse.Namespace, p: Plan, variant: str, seed: int, runs: Path) -> list[str]:
    name = run_name(variant, seed)
    argv = ["--job", f"{args.prefix}-{name}", "--num-samples", str(args.steps * args.batch_size),
            "--batch-size", str(args.batch_size), "--seed", str(seed), "--eval-every", str(args.eval_every),
            "--eval-dataset", f"{args.prefix}-python-heldout", "--eval-dataset", f"{args.prefix}-linux-heldout",
            "--eval-sequences", str(args.eval_sequences), "--metrics-out", str(runs / f"{name}.csv"),
            "--mixture-block", str(mixture_block(args)),
            "--checkpoint", str(runs / f"{name}.pt"), "--log-every", str(args.eval_every), "--device", args.device,
            "--threads", str(args.threads), "--d-model", str(args.d_model), "--layers", str(args.layers),
            "--heads", str(args.heads), "--d-ff", str(args.d_ff), "--dropout", str(args.dropout), "--lr", str(args.lr),
            *p.variants[variant]]  # fmt: skip
    if args.url:
        argv += ["--url", args.url]
    if args.token:
        argv += ["--token", args.token]
    return argv


def run(args: argparse.Namespace, infos: dict[str, dict[str, Any]]) -> int:
    """Train every (seed, variant) not finished yet, then write the curves, the figure and the summary."""
    from client import Client, NotFoundError

    from .__main__ import main as trainer_main

    out = Path(args.out)
    runs = out / "runs"
    p = plan(args, out)
    seeds = [int(s) for s in str(args.seeds).split(",") if s.strip()]
    (out / "config.json").write_text(json.dumps({k: v for k, v in vars(args).items() if k not in ("func", "token")},
                                                indent=2) + "\n")  # fmt: skip
    for seed in seeds:
        for variant in p.variants:
            name = run_name(variant, seed)
            done = runs / f"{name}.done"
            if done.exists():
                print(f"[{name}] finished earlier; skipped")
                continue
            with Client(args.url, token=args.token) as c:  # a run cut off starts over, on a fresh job
                try:
                    c.delete_job(f"{args.prefix}-{name}")
                except NotFoundError:
                    pass
            (runs / f"{name}.pt").unlink(missing_ok=True)
            print(f"[{name}] training: {args.steps} steps of {args.batch_size}", flush=True)
            t0 = time.perf_counter()
            rc = trainer_main(_trainer_argv(args, p, variant, seed, runs))
            if rc != 0:
                print(f"[{name}] the trainer failed (exit status {rc}); run the command again to redo it")
                return rc
            done.write_text(f"{time.perf_counter() - t0:.1f}\n")
    curves = collect(runs, list(p.variants), seeds, args.prefix)
    write_curves(out / "curves.csv", curves, CURVE_FIELDS)
    plot(out / "curves.png", curves, p)
    (out / "summary.md").write_text(summarize(p, curves, args, infos))
    print(f"wrote {out / 'curves.csv'}, {out / 'curves.png'}, {out / 'summary.md'}")
    return 0


def collect(runs: Path, variants: list[str], seeds: list[int], prefix: str) -> list[dict[str, Any]]:
    """One row per (variant, seed, evaluation): the held-out losses of each source, and since the last
    evaluation the mean training loss and each source's share of the rows trained."""
    rows = []
    for seed in seeds:
        for variant in variants:
            metrics = read_metrics(runs / f"{run_name(variant, seed)}.csv")
            steps = sorted({m["step"] for m in metrics if m["split"].startswith("heldout")})
            last = -1
            for step in steps:
                row: dict[str, Any] = {"variant": variant, "seed": seed, "step": step}
                train = [m for m in metrics if m["split"] == "train" and last < m["step"] <= step]
                if train:
                    tokens = sum(m["tokens"] for m in train)
                    row["train_loss"] = sum(m["loss"] * m["tokens"] for m in train) / max(tokens, 1)
                    for k in SOURCES:
                        row[f"{k}_share"] = sum(m[f"share:{prefix}-{k}"] for m in train) / len(train)
                for k in SOURCES:
                    at = [m for m in metrics if m["split"] == f"heldout:{prefix}-{k}-heldout" and m["step"] == step]
                    if at:
                        row[f"{k}_heldout_loss"], row[f"{k}_heldout_accuracy"] = at[-1]["loss"], at[-1]["accuracy"]
                rows.append(row)
                last = step
    return rows


def plot(path: Path, curves: list[dict[str, Any]], p: Plan) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (("python_heldout_loss", "Python docs, held-out loss"), ("linux_heldout_loss", "kernel docs, held-out "
              "loss"), ("python_share", "Python docs' share of the rows trained"))  # fmt: skip
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5), sharex=True)
    seeds = sorted({r["seed"] for r in curves})
    styles = ["-", "--", ":", "-."]
    for ax, (key, title) in zip(axes, panels):
        for v, variant in enumerate(p.variants):
            for i, seed in enumerate(seeds):
                pts = [(r["step"], r[key]) for r in curves if r["variant"] == variant and r["seed"] == seed
                       and r.get(key) is not None]  # fmt: skip
                if pts:
                    ax.plot(*zip(*pts), styles[i % len(styles)], color=COLORS[v % len(COLORS)], marker=".",
                            label=f"{variant}, seed {seed}")  # fmt: skip
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_ylabel("share of rows" if key.endswith("share") else "masked-token cross-entropy (nats)")
        ax.grid(alpha=0.3)
    axes[2].set_ylim(0, 1)
    axes[0].legend(fontsize=8)
    fig.suptitle(p.title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _at(curves: list[dict[str, Any]], variant: str, step: int, key: str) -> float | None:
    """``key`` at ``step`` of ``variant``, the mean over seeds."""
    return _mean([r.get(key) for r in curves if r["variant"] == variant and r["step"] == step])


def _final(curves: list[dict[str, Any]]) -> int:
    return max(r["step"] for r in curves)


def summarize(p: Plan, curves: list[dict[str, Any]], args: argparse.Namespace, infos: dict[str, dict]) -> str:
    """The figures that answer the question, and a plain reading of them."""
    seeds = sorted({r["seed"] for r in curves})
    sizes = ", ".join(f"`{n}` {i['num_sequences']}" for n, i in infos.items())
    first = next(iter(infos.values()))
    last = _final(curves)
    lines = [f"# {p.title}", "",
             f"Datasets (sequences of {first['seq_len']} tokens, one BPE vocabulary of {first['vocab_size']} "
             f"trained on both corpora): {sizes}. {p.notes}; {args.steps} steps of {args.batch_size} sequences, "
             f"seeds {', '.join(map(str, seeds))}; model d={args.d_model}, {args.layers} layers, {args.heads} heads, "
             f"d_ff={args.d_ff}, dropout {args.dropout}, peak lr {args.lr}. Losses are masked-token cross-entropy "
             "in nats on each corpus' held-out set, under one fixed mask set for every run.", "",
             "## Per run (final)", "",
             "| run | python held-out | linux held-out | mean of both | python share of all rows |",
             "|---|---|---|---|---|"]  # fmt: skip
    for variant in p.variants:
        py, lx = _at(curves, variant, last, "python_heldout_loss"), _at(curves, variant, last, "linux_heldout_loss")
        share = _mean([r.get("python_share") for r in curves if r["variant"] == variant and r["step"] > 0])
        lines.append(f"| {variant} | {_fmt(py)} | {_fmt(lx)} | {_fmt(_mean([py, lx]))} | {_fmt(share)} |")
    base, other = list(p.variants)
    lines += ["", f"## {other} − {base} along the run (mean over seeds; negative: {other} lower)", "",
              f"| step | python share of rows ({other} / {base}) | python held-out | linux held-out |",
              "|---|---|---|---|"]  # fmt: skip
    for step in _quarters(curves):
        d = {k: _diff(curves, other, base, step, f"{k}_heldout_loss") for k in SOURCES}
        lines.append(f"| {step} | {_fmt(_at(curves, other, step, 'python_share'))} / "
                     f"{_fmt(_at(curves, base, step, 'python_share'))} | {_fmt(d['python'], True)} | "
                     f"{_fmt(d['linux'], True)} |")  # fmt: skip
    lines += ["", "## Reading", ""] + p.reading(p, curves, args)
    return "\n".join(lines) + "\n"


def _diff(curves: list[dict[str, Any]], a: str, b: str, step: int, key: str) -> float | None:
    x, y = _at(curves, a, step, key), _at(curves, b, step, key)
    return None if x is None or y is None else x - y


def _quarters(curves: list[dict[str, Any]]) -> list[int]:
    """The evaluation steps nearest to each quarter of the run."""
    steps = sorted({r["step"] for r in curves})
    last = steps[-1]
    return sorted({min(steps, key=lambda s: abs(s - q * last / 4)) for q in (1, 2, 3, 4)})


def _reading(p: Plan, curves: list[dict[str, Any]], args: argparse.Namespace) -> list[str]:
    base, other = list(p.variants)
    steps = sorted({r["step"] for r in curves if r["step"] > 0})
    out = []
    early, late = steps[0], steps[-1]
    out.append(f"- Rows trained: {base} takes python for {_fmt(_at(curves, base, early, 'python_share'))} of its "
               f"rows throughout; {other} for {_fmt(_at(curves, other, early, 'python_share'))} up to step {early} "
               f"and {_fmt(_at(curves, other, late, 'python_share'))} in the last interval (to step {late}).")
    for k in SOURCES:
        diffs = [(s, _diff(curves, other, base, s, f"{k}_heldout_loss")) for s in steps]
        diffs = [(s, d) for s, d in diffs if d is not None]
        if not diffs:
            continue
        ahead = [s for s, d in diffs if d < 0]
        when = (f"ahead of {base} (lower loss) at {len(ahead)} of {len(diffs)} evaluations"
                + (f", from step {ahead[0]} to step {ahead[-1]}" if ahead else ""))
        best = min(diffs, key=lambda sd: sd[1])
        lead = f"its largest lead {best[1]:+.3f} nats at step {best[0]}" if best[1] < 0 else "never ahead"
        out.append(f"- {k} held-out: {other} is {when}; {lead}, and at the end {diffs[-1][1]:+.3f} nats.")
    finals = {k: _diff(curves, other, base, late, f"{k}_heldout_loss") for k in SOURCES}
    if all(v is not None for v in finals.values()):
        mean = (finals["python"] + finals["linux"]) / 2
        out.append(f"- Final held-out losses, {other} − {base}: python {finals['python']:+.3f}, linux "
                   f"{finals['linux']:+.3f}, their mean {mean:+.3f} nats"
                   + (" (one seed: no seed-to-seed spread to compare with)." if len({r['seed'] for r in curves}) < 2
                      else "."))  # fmt: skip
    return out


__all__ = ["CURVE_FIELDS", "SOURCES", "collect", "plan", "run", "summarize"]
