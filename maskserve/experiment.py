"""``maskserve experiment``: train and compare masking strategies (the runs live in trainer.experiment)."""

from __future__ import annotations

import argparse
import sys

from .common import connect


def cmd_experiment(args: argparse.Namespace) -> int:
    try:
        from trainer.experiment import run
    except ImportError as exc:
        print(f"maskserve experiment: needs the trainer extra (torch) and matplotlib: {exc}", file=sys.stderr)
        return 1
    with connect(args) as c:
        info = c.dataset(args.dataset)
        c.dataset(args.eval_dataset)  # fails early, with the service's message, when it is missing
    return run(args, info)


def _experiment_args(p: argparse.ArgumentParser) -> None:
    """Options every experiment takes (trainer.experiment reads them)."""
    p.add_argument("--dataset", required=True, help="training dataset")
    p.add_argument("--eval-dataset", required=True, help="held-out dataset (see `maskserve dataset ingest --holdout`)")
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--seeds", default="0,1", help="comma-separated: each seeds init, data order and masks")
    p.add_argument("--out", required=True, help="output directory (resumable: run again to continue)")
    g = p.add_argument_group("model and optimisation (small defaults: the whole run fits 2 CPU cores)")
    g.add_argument("--batch-size", type=int, default=32)
    g.add_argument("--d-model", type=int, default=64)
    g.add_argument("--layers", type=int, default=2)
    g.add_argument("--heads", type=int, default=2)
    g.add_argument("--d-ff", type=int, default=256)
    g.add_argument("--dropout", type=float, default=0.1)
    g.add_argument("--lr", type=float, default=2e-3)
    g.add_argument("--threads", type=int, default=1, help="torch CPU threads (more than the free cores only slows it)")
    g.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    g.add_argument("--eval-sequences", type=int, default=256, help="held-out sequences evaluated each epoch")
    g.add_argument("--unseen-eval", type=int, default=256, help="training sequences evaluated under unseen masks")


def experiment_parser(sub: argparse._SubParsersAction, conn: argparse.ArgumentParser) -> None:
    ex = sub.add_parser("experiment", help="train and compare masking strategies, with curves")
    exsub = ex.add_subparsers(dest="experiment", required=True, metavar="EXPERIMENT")
    sd = exsub.add_parser(
        "static-vs-dynamic", parents=[conn], help="static (BERT) vs dynamic (RoBERTa) masks: curves and a summary",
        description="For each seed, train the same model from the same init on the same data order with static "
        "masks (K cached copies) and with dynamic ones; evaluate every epoch on held-out data and on training "
        "sequences under unseen masks; write curves.csv, curves.png and summary.md. Run again to resume.",
    )  # fmt: skip
    _experiment_args(sd)
    sd.add_argument("--copies", type=int, default=10, help="static masks per sequence (BERT's dupe_factor)")
    sd.add_argument("--mlm-probability", type=float, default=0.15)
    mr = exsub.add_parser(
        "mask-rate", parents=[conn], help="constant low vs constant high vs a high-to-low schedule of the mask rate",
        description="For each seed, train the same model from the same init on the same data order at a constant "
        "low mask rate, a constant high one, and one that moves from high to low over the run (the service's "
        "mask-rate schedule); evaluate all at the low rate every epoch; write curves.csv, curves.png and "
        "summary.md. Run again to resume.",
    )  # fmt: skip
    _experiment_args(mr)
    mr.add_argument("--low", type=float, default=0.15, help="the baseline rate, and the evaluation's")
    mr.add_argument("--high", type=float, default=0.30)
    mr.add_argument("--schedule", default="linear", choices=["linear", "cosine"], help="how high moves to low")
    ex.set_defaults(func=cmd_experiment)
