"""The ``masks`` commands: static-mask caches and the masking report."""

from __future__ import annotations

import argparse

from .common import add_actions, add_masking_args, connect, masking, print_json


def cmd_masks(args: argparse.Namespace) -> int:
    with connect(args) as c:
        if args.action == "build":
            from tqdm import tqdm

            status = c.build_static_masks(args.name, seed=args.seed, copies=args.copies, max_chunks=1, **masking(args))
            with tqdm(total=status["chunks"], initial=status["built"], unit="chunk", desc=f"static masks {args.name}",
                      disable=None, leave=False) as bar:  # fmt: skip
                while not status["complete"]:
                    status = c.build_static_masks(args.name, seed=args.seed, copies=args.copies, max_chunks=8,
                                                  **masking(args))  # fmt: skip
                    bar.update(status["built"] - bar.n)
            print_json(status)
        elif args.action == "list":
            print_json(c.static_masks(args.name))
        elif args.action == "drop":
            c.drop_static_masks(args.name, args.cache)
            print(f"dropped static-mask cache {args.cache} of {args.name}")
        elif args.action == "report":
            print_json(c.masking_report(args.name, seed=args.seed, sequences=args.sequences, epochs=args.epochs,
                                        mode=args.mode, copies=args.copies, **masking(args)))  # fmt: skip
    return 0


def masks_parser(sub: argparse._SubParsersAction, conn: argparse.ArgumentParser) -> None:
    mk = sub.add_parser("masks", help="static-mask caches and the masking report")
    msub = mk.add_subparsers(dest="action", required=True, metavar="ACTION")
    mb = msub.add_parser("build", parents=[conn], help="build a static-mask cache (K masks per sequence), with progress; idempotent")
    mb.add_argument("name")
    add_masking_args(mb)
    add_actions(msub, conn, ("list", "a dataset's static-mask caches", ("name",)),
                ("drop", "drop one static-mask cache", ("name", "cache")))  # fmt: skip
    mr = msub.add_parser("report", parents=[conn], help="mask N sequences for several epochs and measure rates, split, leakage")
    mr.add_argument("name")
    mr.add_argument("--mode", default="dynamic", choices=["dynamic", "static"])
    mr.add_argument("--sequences", type=int, default=256)
    mr.add_argument("--epochs", type=int, default=None)
    add_masking_args(mr)
    mk.set_defaults(func=cmd_masks)
