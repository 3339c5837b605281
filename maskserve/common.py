"""What the client commands share: the connection, JSON output, progress bars, the masking options."""

from __future__ import annotations

import argparse
import json


def connect(args: argparse.Namespace):  # noqa: ANN202 - the client is imported lazily
    from client import Client

    return Client(args.url, token=args.token)


def print_json(obj: object) -> None:
    print(json.dumps(obj, indent=2, sort_keys=False))


def progress(total: int, desc: str):  # noqa: ANN202
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, desc=desc, disable=None, leave=False)


def add_masking_args(sp: argparse.ArgumentParser) -> None:
    g = sp.add_argument_group("masking")
    g.add_argument("--mlm-probability", type=float, default=0.15)
    g.add_argument("--mask-ratio", type=float, default=0.8)
    g.add_argument("--random-ratio", type=float, default=0.1)
    g.add_argument("--unit", default="token", choices=["token", "whole_word", "span"])
    g.add_argument("--count", default="bernoulli", choices=["bernoulli", "exact"])
    g.add_argument("--max-predictions", type=int, default=None)
    g.add_argument("--random-tokens", default="uniform", choices=["uniform", "frequency"])
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--copies", type=int, default=10, help="static masks per sequence (BERT's dupe_factor)")
    g.add_argument("--schedule", default=None, choices=["constant", "linear", "cosine"],
                   help="mask-rate schedule: --mlm-probability moves to --mlm-probability-end (dynamic masks only)")
    g.add_argument("--mlm-probability-end", type=float, default=None, help="the rate the schedule ends at")
    g.add_argument("--schedule-unit", default=None, choices=["epoch", "step"], help="what the schedule counts")
    g.add_argument("--schedule-length", type=int, default=None, help="epochs or steps from start to end rate")


MASKING_KEYS = ("mlm_probability", "mask_ratio", "random_ratio", "unit", "count", "max_predictions", "random_tokens",
                "schedule", "mlm_probability_end", "schedule_unit", "schedule_length")  # fmt: skip


def masking(args: argparse.Namespace) -> dict:
    return {k: getattr(args, k) for k in MASKING_KEYS if getattr(args, k, None) is not None}


def add_actions(sub: argparse._SubParsersAction, conn: argparse.ArgumentParser,
                *actions: tuple[str, str, tuple[str, ...]]) -> None:  # fmt: skip
    """Client actions that take only positional arguments: each ``(action, help, argument names)``."""
    for action, help_text, names in actions:
        sp = sub.add_parser(action, parents=[conn], help=help_text)
        for name in names:
            sp.add_argument(name)
