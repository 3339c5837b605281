"""A mixture job's sources on a command line: ``--source NAME=WEIGHT[:repeat]`` and the flags that go with it.

Shared by ``maskserve jobs create`` and ``python -m trainer`` (which may not import the command line's
package), so both read a mixture the same way and hand ``Client.create_job`` the same keywords.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

#: the mixture flags' dests, by the job config field each sets (what an attach compares)
MIXTURE_FLAGS = {"sources": "source", "num_samples": "num_samples", "until": "until", "curriculum": "curriculum",
                 "interpolation": "interpolation", "mixture_block": "mixture_block"}  # fmt: skip


def parse_source(text: str) -> dict[str, Any]:
    """``NAME=WEIGHT`` or ``NAME=WEIGHT:repeat`` (``--source``)."""
    name, sep, rest = text.partition("=")
    weight, _, flag = rest.partition(":")
    try:
        value = float(weight) if sep else 1.0
    except ValueError:
        raise argparse.ArgumentTypeError(f"--source {text!r}: NAME=WEIGHT, e.g. wiki=3 or books=1:repeat") from None
    if flag not in ("", "repeat") or not name or not value > 0:
        raise argparse.ArgumentTypeError(f"--source {text!r}: NAME=WEIGHT with a weight > 0, optionally :repeat")
    return {"dataset": name, "weight": value, "repeat": flag == "repeat"}


def format_sources(sources: list[dict[str, Any]] | None) -> str:
    """``wiki=3 books=1:repeat``: sources as ``--source`` takes them (for messages)."""
    if not sources:
        return "none"
    return " ".join(f"{s['dataset']}={float(s.get('weight', 1.0)):g}" + (":repeat" if s.get("repeat") else "")
                    for s in sources)  # fmt: skip


def read_curriculum(path: str | None) -> list[dict[str, Any]] | None:
    """A curriculum file: JSON ``[{"step": BATCH, "weights": {NAME: WEIGHT, ...}}, ...]``."""
    if not path:
        return None
    with open(path, encoding="utf-8") as f:
        points = json.load(f)
    if not isinstance(points, list) or not all(isinstance(p, dict) for p in points):
        raise ValueError(f"curriculum {path}: a JSON list of {{\"step\": ..., \"weights\": {{...}}}} points")
    return points


def mixture_request(args: argparse.Namespace) -> dict[str, Any]:
    """The mixture keywords of ``create_job`` the flags give (those left out, or None, are not in it)."""
    out = {field: getattr(args, dest, None) for field, dest in MIXTURE_FLAGS.items()}
    out["curriculum"] = read_curriculum(out["curriculum"])
    return {k: v for k, v in out.items() if v is not None}


def add_mixture_args(p: argparse.ArgumentParser, *, interpolation_default: str | None = "linear",
                     intro: str = "a job over several datasets, each drawn by weight (instead of --dataset)") -> None:
    """``--source`` and what goes with it: a job over a weighted mixture of datasets. A default of None for
    ``--interpolation`` tells a flag given from one left out (what attaching to an existing job needs)."""
    g = p.add_argument_group("mixtures", intro)
    g.add_argument("--source", action="append", type=parse_source, metavar="NAME=WEIGHT[:repeat]",
                   help="a dataset of the mixture and its weight, once per dataset; :repeat starts its next epoch "
                   "when it runs out (else it drops out)")  # fmt: skip
    g.add_argument("--num-samples", type=int, default=None, metavar="N", help="end after N sequences")
    g.add_argument("--until", default=None, metavar="NAME", help="end when source NAME has served --epochs epochs")
    g.add_argument("--curriculum", default=None, metavar="FILE",
                   help='weights that change over the run: JSON [{"step": BATCH, "weights": {"wiki": 9, "books": 1}}, '
                   "...]")  # fmt: skip
    g.add_argument("--interpolation", default=interpolation_default, choices=["linear", "step"],
                   help="between curriculum points" + ("" if interpolation_default else " [default: linear]"))
    g.add_argument("--mixture-block", type=int, default=None, metavar="M",
                   help="positions per stratified block (each holds every share to within one) [service: 256]")


__all__ = ["MIXTURE_FLAGS", "add_mixture_args", "format_sources", "mixture_request", "parse_source",
           "read_curriculum"]
