"""Serving under load: many concurrent clients against one service, with 1 or more worker processes.

For each worker count (``--workers``, default 1 and 2), a ``maskserve serve --workers W``
subprocess on a real Redis holds the stdlib docstrings at L=128 and L=512. For each
batch shape (``--shapes``, default B=64 L=128 and B=256 L=512) and each level of
concurrency (``--levels``, default 4 16 64 256), that many clients (asyncio tasks
spread over ``--client-procs`` processes, each client with its own connection) pull
batches back to back for
``--warmup`` + ``--seconds`` (only the last ``--seconds`` are measured); a client
told 503 ``overloaded`` waits as advised (``Maskserve-Retry-After-Ms``, else
``Retry-After``) and asks again, as the thin client does. Meanwhile a separate process probes ``/healthz``
every 20 ms, and this process samples the service's resident memory (manager
and workers together) every 50 ms. Reported per run:

* sequences/s and batches/s actually served (200s),
* p50/p99 latency of the served requests,
* every other answer counted by kind (``overloaded``, ``store-unavailable``, other
  problem types, transport errors),
* ``/healthz`` p99 and worst latency,
* peak RSS of the service, next to the bound documented in the README
  (baseline + ``cpu_threads`` x W x the masking peak + W x the bodies in flight,
  at most ``max_inflight`` of them and about ``max_inflight_bytes``; see "Memory").

``--storm N`` measures a burst instead: N clients at once, each asking for one
batch of ``--storm-shape`` (default the largest, 4096x512) and reading it at
``--storm-read-mbps`` (a slow link); refusals are counted, not retried. It
reports ``/healthz`` p50/p99/max meanwhile, how many were served and refused,
and the peak RSS next to the README's bound. ``--service-root DIR`` runs the
service from another checkout (e.g. a worktree at an older commit), so two
versions can be compared back to back with the same parameters.

The load generator shares the machine with the service: on a 2-core host the
figures are those of the pair, and the same for every run. The client processes
run at a lower priority (``--client-nice``, default 10), standing for clients on
other machines; the probe runs at normal priority, as a health checker would.

    .venv/bin/python bench/load.py --embedded
    .venv/bin/python bench/load.py --levels 4 64 --shapes 64x128 --seconds 5
    .venv/bin/python bench/load.py --embedded --workers 2 --storm 200 --storm-formats safetensors json
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import random
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

from _common import (
    BenchRedis,
    Service,
    add_service_args,
    header,
    percentile,
    repeat_to,
    service_env,
    start_service,
    stdlib_docs,
    train_bpe,
)


@dataclass
class Run:
    workers: int
    batch: int
    seq_len: int
    clients: int
    seconds: float = 0.0
    served: int = 0
    latencies: list[float] = field(default_factory=list)
    errors: Counter = field(default_factory=Counter)
    health: list[float] = field(default_factory=list)
    peak_rss: int = 0

    @property
    def sequences_per_s(self) -> float:
        return self.served * self.batch / self.seconds if self.seconds else 0.0


# ---- the service's memory ----------------------------------------------------------------------------------


def _rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def _family(root: int) -> list[int]:
    """``root`` and its descendants that are Python (the embedded Redis is reported apart)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        if "valkey" not in name and "redis" not in name:
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


class RssSampler(threading.Thread):
    def __init__(self, root: int, every: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.root, self.every, self.peak = root, every, 0
        self._stop_event = threading.Event()

    def run(self) -> None:
        pids = _family(self.root)
        last_scan = time.monotonic()
        while not self._stop_event.wait(self.every):
            if time.monotonic() - last_scan > 1:
                pids, last_scan = _family(self.root), time.monotonic()
            self.peak = max(self.peak, sum(_rss(p) for p in pids))

    def stop(self) -> int:
        self._stop_event.set()
        self.join()
        return self.peak


# ---- the health prober (its own process, so that the load generator's loop does not delay it) ----------------


def _probe(url: str, stop: mp.Event, out: mp.Queue) -> None:  # noqa: ANN001 - multiprocessing types
    latencies = []
    with httpx.Client(timeout=30) as h:
        while not stop.is_set():
            t0 = time.perf_counter()
            try:
                h.get(f"{url}/healthz")
                latencies.append(time.perf_counter() - t0)
            except httpx.HTTPError:
                latencies.append(float("inf"))
            stop.wait(0.02)
    out.put(latencies)


# ---- the load ------------------------------------------------------------------------------------------------


async def _client(url: str, name: str, run: Run, window: tuple[float, float], rng: random.Random) -> None:
    """Pull batches until the window closes; what completes inside the window counts."""
    opens, closes = window
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=httpx.Limits(max_connections=1)) as h:
        index = 0
        while time.monotonic() < closes:
            t0 = time.monotonic()
            try:
                r = await h.get(f"/v1/datasets/{name}/batch",
                                params={"size": run.batch, "seed": rng.randrange(1 << 30), "index": index})  # fmt: skip
                body = r.content
            except httpx.HTTPError as exc:
                if opens <= time.monotonic() <= closes:
                    run.errors[f"transport:{type(exc).__name__}"] += 1
                continue
            t1 = time.monotonic()
            counted = opens <= t1 <= closes
            index += 1
            if r.status_code == 200:
                if counted:
                    run.served += 1
                    run.latencies.append(t1 - t0)
                del body
                continue
            kind = str(r.status_code)
            if r.headers.get("content-type", "").startswith("application/problem+json"):
                kind = r.json()["type"].rsplit(":", 1)[-1]
            if counted:
                run.errors[kind] += 1
            hint = r.headers.get("Maskserve-Retry-After-Ms")  # as the thin client does: the finer hint first
            wait = int(hint) / 1000 if hint else float(r.headers.get("Retry-After", 0))
            await asyncio.sleep(min(wait, max(0.0, closes - time.monotonic())))


async def _load(url: str, name: str, run: Run, seconds: float, warmup: float) -> None:
    """``run.clients`` clients for ``warmup + seconds``; only the last ``seconds`` are measured (connections
    opened, the first wave of refusals retried), and answers that arrive after the window are not counted."""
    rng = random.Random(run.clients * 1_000_003 + run.batch)
    opens = time.monotonic() + warmup
    window = (opens, opens + seconds)
    await asyncio.gather(*(_client(url, name, run, window, random.Random(rng.random())) for _ in range(run.clients)))
    run.seconds = seconds


def _load_part(url: str, name: str, run: Run, seconds: float, warmup: float, nice: int,
               out: mp.Queue) -> None:  # noqa: ANN001 - multiprocessing types
    if nice:
        os.nice(nice)  # the clients stand for other machines: on a shared host they yield the CPU first
    asyncio.run(_load(url, name, run, seconds, warmup))
    out.put(run)


def _drive(svc: Service, run: Run | Storm, procs: int, loader: Callable[..., mp.Process],
           merge: Callable[[Any], None], wait_s: float) -> float:
    """The health probe and the RSS sampler, then ``run.clients`` split over ``procs`` loader processes
    (``loader(ctx, i, n, parts)`` makes the i-th, for ``n`` clients, reporting to ``parts``), each report
    merged by ``merge``; the probe's figures and the peak RSS go into ``run``. Returns the seconds it took."""
    ctx = mp.get_context("spawn")
    stop, out, parts = ctx.Event(), ctx.Queue(), ctx.Queue()
    prober = ctx.Process(target=_probe, args=(svc.url, stop, out))
    prober.start()
    sampler = RssSampler(svc.pid)
    sampler.start()
    shares = [run.clients // procs + (i < run.clients % procs) for i in range(procs)]
    loaders = [loader(ctx, i, n, parts) for i, n in enumerate(shares) if n]
    t0 = time.monotonic()
    try:
        for p in loaders:
            p.start()
        for _ in loaders:
            merge(parts.get(timeout=wait_s))
        for p in loaders:
            p.join()
    finally:
        elapsed = time.monotonic() - t0
        stop.set()
        run.health = out.get(timeout=60)
        prober.join()
        run.peak_rss = sampler.stop()
    return elapsed


def measure(svc: Service, name: str, run: Run, seconds: float, warmup: float, procs: int, nice: int) -> Run:
    """The load from ``procs`` processes (one event loop cannot drive hundreds of clients alone), the
    health probe from another; their figures merged into ``run``."""

    def loader(ctx: Any, i: int, n: int, parts: Any) -> mp.Process:
        part = Run(run.workers, run.batch, run.seq_len, n)
        return ctx.Process(target=_load_part, args=(svc.url, name, part, seconds, warmup, nice, parts))

    def merge(part: Run) -> None:
        run.served += part.served
        run.latencies += part.latencies
        run.errors += part.errors

    _drive(svc, run, procs, loader, merge, seconds + warmup + 600)
    run.seconds = seconds
    return run


# ---- the storm: every client at once, each asking for one batch of the largest size and reading it slowly ----


@dataclass
class Storm:
    workers: int
    batch: int
    seq_len: int
    clients: int
    fmt: str
    served: int = 0
    answers: Counter = field(default_factory=Counter)
    health: list[float] = field(default_factory=list)
    peak_rss: int = 0
    seconds: float = 0.0


async def _slow_reader(h: httpx.AsyncClient, name: str, storm: Storm, rate: float, seed: int) -> None:
    """One request; a 200 body is read at no more than ``rate`` bytes/s (a client on a slow link)."""
    try:
        async with h.stream("GET", f"/v1/datasets/{name}/batch",
                            params={"size": storm.batch, "seed": seed, "format": storm.fmt}) as r:  # fmt: skip
            if r.status_code != 200:
                await r.aread()
                kind = str(r.status_code)
                if r.headers.get("content-type", "").startswith("application/problem+json"):
                    kind = r.json()["type"].rsplit(":", 1)[-1]
                storm.answers[kind] += 1
                return
            t0, got = time.monotonic(), 0
            async for piece in r.aiter_raw(1 << 16):
                got += len(piece)
                ahead = got / rate - (time.monotonic() - t0)
                if ahead > 0:
                    await asyncio.sleep(ahead)
            storm.served += 1
            storm.answers["200"] += 1
    except httpx.HTTPError as exc:
        storm.answers[f"transport:{type(exc).__name__}"] += 1


async def _storm_part(url: str, name: str, storm: Storm, rate: float, first_seed: int) -> None:
    limits = httpx.Limits(max_connections=storm.clients, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as h:
        await asyncio.gather(*(_slow_reader(h, name, storm, rate, first_seed + i) for i in range(storm.clients)))


def _storm_proc(url: str, name: str, storm: Storm, rate: float, first_seed: int, nice: int,
                out: mp.Queue) -> None:  # noqa: ANN001 - multiprocessing types
    if nice:
        os.nice(nice)
    asyncio.run(_storm_part(url, name, storm, rate, first_seed))
    out.put(storm)


def storm(svc: Service, name: str, run: Storm, rate: float, procs: int, nice: int) -> Storm:
    """``run.clients`` requests at once, from ``procs`` processes; the probe and the RSS sampler meanwhile."""

    def loader(ctx: Any, i: int, n: int, parts: Any) -> mp.Process:
        part = Storm(run.workers, run.batch, run.seq_len, n, run.fmt)
        return ctx.Process(target=_storm_proc, args=(svc.url, name, part, rate, 1000 * i, nice, parts))

    def merge(part: Storm) -> None:
        run.served += part.served
        run.answers += part.answers

    run.seconds = _drive(svc, run, procs, loader, merge, 900)
    return run


def memory_bound(env: dict[str, str], workers: int, b: int, seq_len: int, fmt: str) -> float:
    """The README's bound on the service's peak RSS (its "Memory" formula, per process, times the workers),
    in bytes, for batches of ``b`` x ``seq_len`` in ``fmt`` and the settings in ``env`` (else the defaults)."""
    from service.core.config import Settings

    s = Settings(**{k.removeprefix("MASKSERVE_").lower(): v for k, v in env.items() if k.startswith("MASKSERVE_")
                    and k != "MASKSERVE_WORKERS"})  # fmt: skip
    tokens = b * seq_len
    body = tokens * (15 if fmt == "json" else 12)  # the body and the stored tokens it is read from
    held = min(s.max_inflight * body, max(s.max_inflight_bytes, body))
    return workers * (145 * 2**20 + s.cpu_threads * tokens * 30 + held)


def storm_line(run: Storm, bound: float) -> str:
    health = run.health or [float("nan")]
    answers = ", ".join(f"{k} {v}" for k, v in sorted(run.answers.items())) or "none"
    return (f"  storm W={run.workers} B={run.batch} L={run.seq_len} {run.fmt} clients={run.clients}: "
            f"{run.served} served in {run.seconds:.1f} s; answers: {answers}; "
            f"healthz p50 {1000 * percentile(health, 50):.1f} ms, p99 {1000 * percentile(health, 99):.1f} ms, "
            f"max {1000 * max(health):.1f} ms ({len(health)} probes); "
            f"peak RSS {run.peak_rss / 2**20:.0f} MiB (README bound {bound / 2**20:.0f} MiB)")  # fmt: skip


# ---- set-up and report --------------------------------------------------------------------------------------


def prepare(url: str, tokenizer: dict, docs: list[str], seq_len: int) -> str:
    from client import Client

    name = f"load-{seq_len}"
    with Client(url, timeout=600) as c:
        try:
            info = c.dataset(name)
            if info["num_sequences"]:
                return name
            c.delete_dataset(name)
        except Exception:  # noqa: BLE001 - not there yet
            pass
        c.create_dataset(name, tokenizer=tokenizer, seq_len=seq_len, packing="complete")
        c.ingest(name, docs)
    return name


def report_line(run: Run) -> str:
    lat = run.latencies or [float("nan")]
    health = run.health or [float("nan")]
    errors = ", ".join(f"{k} {v}" for k, v in sorted(run.errors.items())) or "none"
    return (f"  W={run.workers} B={run.batch:<4} L={run.seq_len:<4} clients={run.clients:<4} "
            f"{run.sequences_per_s:>9,.0f} seq/s  {run.served / max(run.seconds, 1e-9):>6.1f} batch/s  "
            f"p50 {1000 * percentile(lat, 50):>7.1f} ms  p99 {1000 * percentile(lat, 99):>7.1f} ms  "
            f"healthz p99 {1000 * percentile(health, 99):>6.1f} ms (max {1000 * max(health):.1f})  "
            f"peak RSS {run.peak_rss / 2**20:>6.0f} MiB  non-200: {errors}")  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_service_args(p)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="service worker processes per run")
    p.add_argument("--levels", type=int, nargs="+", default=[4, 16, 64, 256], help="concurrent clients")
    p.add_argument("--shapes", nargs="+", default=["64x128", "256x512"], help="batch shapes BxL")
    p.add_argument("--seconds", type=float, default=8.0, help="measured load per (workers, shape, level)")
    p.add_argument("--warmup", type=float, default=3.0, help="unmeasured load before each measurement")
    p.add_argument("--client-procs", type=int, default=4, help="processes the clients are spread over")
    p.add_argument("--client-nice", type=int, default=10,
                   help="niceness of the client processes (they stand for other machines; 0: same priority)")
    p.add_argument("--corpus-mb", type=float, default=4.0, help="text ingested per dataset")
    g = p.add_argument_group("storm (instead of the sweep above)")
    g.add_argument("--storm", type=int, default=0, metavar="N",
                   help="N clients at once, each asking for one batch of --storm-shape and reading it at "
                        "--storm-read-mbps; reports /healthz p50/p99/max, served and refused, peak RSS next to "
                        "the README's memory bound (uses --workers, --client-procs, --client-nice, --corpus-mb)")
    g.add_argument("--storm-shape", default="4096x512", help="batch shape BxL of the storm (default: the largest B)")
    g.add_argument("--storm-formats", nargs="+", default=["safetensors"], choices=["safetensors", "json"],
                   help="one storm per format")
    g.add_argument("--storm-read-mbps", type=float, default=50.0, help="how fast each storm client reads, MB/s")
    args = p.parse_args()
    if args.storm:
        run_storms(args)
        return
    shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes]
    env = service_env(args)
    header("serving under load", [
        "N concurrent clients pulling stateless dynamic batches back to back; 503 overloaded honoured (Retry-After)",
        "healthz probed every 20 ms from its own process; service RSS = manager + workers (Redis apart)",
    ], {"workers": args.workers, "levels": args.levels, "shapes": args.shapes, "seconds": args.seconds,
        "service env": env or "defaults"})  # fmt: skip
    docs = repeat_to(stdlib_docs(), min_bytes=int(args.corpus_mb * 1e6))
    _, tokenizer = train_bpe(docs)
    runs: list[Run] = []
    with BenchRedis(args):
        for workers in args.workers:
            svc = Service(redis_url=args.redis_url, embedded=args.embedded, log_file=args.service_log,
                          env={**env, "MASKSERVE_WORKERS": str(workers)})  # fmt: skip
            with svc:
                names = {L: prepare(svc.url, tokenizer, docs, L) for L in sorted({L for _, L in shapes})}
                print(f"W={workers}: service pid {svc.pid}, idle RSS {sum(_rss(q) for q in _family(svc.pid)) / 2**20:.0f} MiB",
                      flush=True)  # fmt: skip
                for b, L in shapes:
                    for level in args.levels:
                        run = measure(svc, names[L], Run(workers, b, L, level), args.seconds, args.warmup,
                                      args.client_procs, args.client_nice)  # fmt: skip
                        runs.append(run)
                        print(report_line(run), flush=True)
    print()
    print("targets:")
    unavailable = sum(r.errors.get("store-unavailable", 0) for r in runs)
    others = sum(v for r in runs for k, v in r.errors.items() if k != "overloaded")
    worst_health = max(percentile(r.health, 99) for r in runs if r.health)
    print(f"  store-unavailable answers: {unavailable} (target 0); non-200 other than overloaded: {others} (target 0)")
    print(f"  worst /healthz p99: {1000 * worst_health:.1f} ms (target < 100 ms)")
    for workers in args.workers:
        for b, L in shapes:
            mine = [r for r in runs if r.workers == workers and r.batch == b and r.seq_len == L]
            best = max(r.sequences_per_s for r in mine)
            at64 = next((r.sequences_per_s for r in mine if r.clients == 64), float("nan"))
            print(f"  W={workers} B={b} L={L}: 64 clients {at64:,.0f} seq/s = {100 * at64 / best:.0f}% of the best "
                  f"level ({best:,.0f}) (target >= 90%); peak RSS {max(r.peak_rss for r in mine) / 2**20:.0f} MiB")


def run_storms(args: argparse.Namespace) -> None:
    b, seq_len = (int(x) for x in args.storm_shape.split("x"))
    env = service_env(args)
    header("a storm of the largest batches", [
        f"{args.storm} clients at once, each asking for one B={b} L={seq_len} batch and reading it at "
        f"{args.storm_read_mbps} MB/s; 503 overloaded counted, not retried",
        "healthz probed every 20 ms from its own process; service RSS = manager + workers (Redis apart)",
    ], {"workers": args.workers, "formats": args.storm_formats, "service root": args.service_root or "this checkout",
        "service env": env or "defaults"})  # fmt: skip
    docs = repeat_to(stdlib_docs(), min_bytes=int(args.corpus_mb * 1e6))
    _, tokenizer = train_bpe(docs)
    with BenchRedis(args):
        for workers in args.workers:
            with start_service(args, env={**env, "MASKSERVE_WORKERS": str(workers)}) as svc:
                name = prepare(svc.url, tokenizer, docs, seq_len)
                print(f"W={workers}: service pid {svc.pid}, idle RSS {sum(_rss(q) for q in _family(svc.pid)) / 2**20:.0f} MiB",
                      flush=True)  # fmt: skip
                for fmt in args.storm_formats:
                    run = storm(svc, name, Storm(workers, b, seq_len, args.storm, fmt), args.storm_read_mbps * 1e6,
                                args.client_procs, args.client_nice)  # fmt: skip
                    print(storm_line(run, memory_bound(env, workers, b, seq_len, fmt)), flush=True)
    print("target: /healthz p99 < 100 ms; no answers but 200 and overloaded")


if __name__ == "__main__":
    main()
