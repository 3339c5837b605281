"""``maskserve top``: the service's jobs and their workers, live, in the terminal.

Each frame reads ``GET /v1/jobs`` (one request, every job's progress) and shows per job its status, epoch,
position in the epoch, acked / leased / redelivered / late batches and throughput, and under it each worker's
batches and throughput and, where its client sends summaries, its data-wait share, step time and flags
(INPUT-BOUND, STRAGGLER). Throughputs are over the last interval (acked sequences between two frames); the
first frame, and ``--once``, show each job's and worker's average since it started.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from .common import connect

Counts = dict[tuple[str, str], int]  # (job, worker or "") -> acked sequences at the last frame


def frame(jobs: list[dict[str, Any]], before: Counts | None, dt: float, only: str | None = None) -> tuple[str, Counts]:
    """One screen of text for ``jobs`` and the counts the next frame's rates start from."""
    now: Counts = {}
    lines = [f"{'JOB':20} {'READS':18} {'STATUS':9} {'EPOCH':>9} {'BATCH':>13} {'ACKED':>8} {'LEASED':>6} "
             f"{'REDELIV':>7} {'LATE':>5} {'WORKERS':>7} {'SEQ/S':>9}"]  # fmt: skip
    for j in sorted(jobs, key=lambda j: j["name"]):
        if only is not None and j["name"] != only:
            continue
        reads = "+".join(s["dataset"] for s in j["sources"]) if j.get("sources") else j["dataset"]
        epochs = "inf" if j["epochs"] is None else j["epochs"]
        now[(j["name"], "")] = acked = int(sum(w.get("acked_sequences", 0) for w in j["workers"].values()))
        rate = _rate(before, (j["name"], ""), acked, dt, j["sequences_per_s"])
        lines.append(f"{j['name'][:20]:20} {reads[:18]:18} {j['status']:9} {j['epoch']:>4}/{epochs!s:<4} "
                     f"{j['next_batch']:>6}/{j['batches_per_epoch']:<6} {j['acked']:>8} {j['leased']:>6} "
                     f"{j['redelivered']:>7} {j['late_acks']:>5} {len(j['workers']):>7} {rate:>9,.0f}")  # fmt: skip
        for name, w in sorted(j["workers"].items()):
            now[(j["name"], name)] = seqs = int(w.get("acked_sequences", 0))
            w_rate = _rate(before, (j["name"], name), seqs, dt, w.get("sequences_per_s", 0.0))
            said = ""
            if "data_wait_share" in w:  # the worker's client sends summaries of its consumer
                flags = [f for f, on in (("INPUT-BOUND", w.get("input_bound")), ("STRAGGLER", w.get("straggler"))) if on]
                said = f"  data wait {w['data_wait_share']:>4.0%} step {w['step_s'] * 1000:,.0f} ms {' '.join(flags)}"
            lines.append(f"  worker {name[:30]:30} handed {w.get('handed', 0):>7} acked {w.get('acked', 0):>7} "
                         f"redelivered {w.get('redelivered', 0):>5} {w_rate:>9,.0f} seq/s{said}".rstrip())  # fmt: skip
    if len(lines) == 1:
        lines.append("(no jobs)" if only is None else f"(no job named {only!r})")
    return "\n".join(lines), now


def _rate(before: Counts | None, key: tuple[str, str], now: int, dt: float, average: float) -> float:
    if before is None or key not in before or dt <= 0:
        return float(average)
    return max(0, now - before[key]) / dt


def cmd_top(args: argparse.Namespace) -> int:
    tty = sys.stdout.isatty() and not args.once
    before: Counts | None = None
    last = time.monotonic()
    shown = 0
    with connect(args) as c:
        while True:
            jobs = c.jobs()
            t = time.monotonic()
            text, before = frame(jobs, before, t - last, args.job)
            last = t
            head = f"maskserve top  {args.url or 'http://127.0.0.1:8000'}  {time.strftime('%H:%M:%S')}"
            if not args.once:
                head += f"  (every {args.interval:g} s; Ctrl-C to quit)"
            print(("\x1b[H\x1b[2J" if tty else "") + head + "\n" + text, flush=True)
            shown += 1
            if args.once or (args.iterations and shown >= args.iterations):
                return 0
            time.sleep(args.interval)


def top_parser(sub: argparse._SubParsersAction, conn: argparse.ArgumentParser) -> None:
    t = sub.add_parser("top", parents=[conn], help="jobs and their workers, live (like the dashboard's job page)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    t.add_argument("--job", default=None, help="show only this job")
    t.add_argument("--interval", type=float, default=2.0, help="seconds between frames [default: 2]")
    t.add_argument("--once", action="store_true", help="print one frame and exit (averages since each job began)")
    t.add_argument("--iterations", type=int, default=0, help="stop after this many frames [default: until Ctrl-C]")
    t.set_defaults(func=cmd_top)


__all__ = ["frame", "top_parser"]
