"""Batch serving on one Redis node against a local 3-master Redis Cluster, with the CPU each part spends.

Both backends are started once and kept up for the whole run, each with its
own ``python -m service serve --workers 1`` process (``MASKSERVE_REDIS_CLUSTER=1``
for the cluster, durable acks off, chunks of ``--chunk-kib``):

* one node: a ``redis-server`` without persistence,
* 3-master cluster: ``tests.cluster.LocalCluster`` (no replicas, no persistence).

On each backend and for each length of ``--seq-len``, a dataset (packing
``complete``) holds the stdlib docstrings repeated to ``--corpus-mb`` of text,
ingested through the service. Printed per dataset: tokens, sequences, chunks,
chunk bytes per token, and per Redis node the memory it gained (``used_memory``),
its keys and its chunk keys (``MEMORY USAGE``), so the spread over the masters
shows and the per-token cost is told apart from what each dataset holds once.

With ``--cache warm cold`` (the default) everything below runs twice: with
the services' chunk cache on (its default size; every sequence of the
dataset served once before the window, so no row is read from Redis in it)
and then with services restarted with ``MASKSERVE_CHUNK_CACHE_BYTES=0``
(every row read from Redis, as a dataset far larger than the cache is).

Then, per length, each backend in turn (the order alternates between lengths)
serves ``--clients`` concurrent clients pulling B x L batches back to back,
each with its random seed (a shuffled stream). The clients stand for trainers
on other machines: they are spread over ``--client-procs`` processes niced by
``--client-nice``, and each is a minimal HTTP/1.1 keep-alive client on asyncio
streams (one connection, one request in flight) that reads the safetensors
body without decoding it, so that the load takes little of the shared CPU. A
503 ``overloaded`` is retried after its hint, as the thin client does. After
``--warmup`` seconds, ``--seconds`` are measured; everything is read at the
start and at the end of that window:

* batches answered 200 within the window (latency p50/p99, body bytes), other answers by kind,
* per Redis node: CPU seconds (``INFO cpu``: used_cpu_user + used_cpu_sys), commands,
  bytes sent and received (``INFO stats``),
* the service's CPU seconds (/proc: the process and its descendants, user + system),
* the client processes' CPU seconds, and the whole host's busy CPU (/proc/stat), so
  that other load on a shared host shows.

Derived: sequences/s (wall), sequences per service CPU-second, sequences and
tokens (B x L slots) per Redis CPU-second (summed over the backend's nodes),
bytes per sequence from Redis and to the clients. The nodes and service of the
backend not being measured idle meanwhile; their CPU over the same window is
reported as background. A table at the end sums it up.

Everything (Redis, service, clients) shares this host: the sequences/s are
those of the host; the per-CPU-second figures are what a capacity plan can
scale. Cross-host network latency is not part of any figure.

    .venv/bin/python bench/cluster.py
    .venv/bin/python bench/cluster.py --seq-len 128 512 --seconds 20
    .venv/bin/python bench/cluster.py --seq-len 128 --seconds 5 --corpus-mb 6   # a quick look
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import multiprocessing as mp
import os
import random
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import redis

from _common import ROOT, Service, header, percentile, repeat_to, stdlib_docs, text_bytes, train_bpe

sys.path.insert(0, str(ROOT))
from tests.cluster import LocalCluster, _free_port  # noqa: E402

_TICK = os.sysconf("SC_CLK_TCK")


# ---- CPU from /proc -----------------------------------------------------------------------------------------


def _proc_stat(pid: int) -> tuple[int, float, float] | None:
    """(parent pid, own CPU seconds, CPU seconds of reaped children) of ``pid``, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(fields[1]), (int(fields[11]) + int(fields[12])) / _TICK, (int(fields[13]) + int(fields[14])) / _TICK


def tree_cpu(root: int) -> float:
    """CPU seconds of ``root``, its live descendants and the descendants it has reaped."""
    stats: dict[int, tuple[int, float, float]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (s := _proc_stat(int(entry))) is not None:
            stats[int(entry)] = s
    if root not in stats:
        return float("nan")
    total, todo = stats[root][2], [root]
    kids: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in stats.items():
        kids.setdefault(ppid, []).append(pid)
    while todo:
        pid = todo.pop()
        total += stats[pid][1]
        todo.extend(kids.get(pid, []))
    return total


def own_cpu(pid: int) -> float:
    s = _proc_stat(pid)
    return s[1] if s else float("nan")


def host_busy() -> float:
    """CPU seconds the whole host has been busy (all cores; /proc/stat, idle and iowait excluded)."""
    with open("/proc/stat") as f:
        values = [int(x) for x in f.readline().split()[1:]]
    return (sum(values[:8]) - values[3] - values[4]) / _TICK


# ---- the backends --------------------------------------------------------------------------------------------


@dataclass
class Dataset:
    name: str
    seq_len: int
    info: dict
    held: dict[int, int]  # used_memory gained per node
    keys: dict[int, int]  # keys gained per node
    chunks: dict[int, tuple[int, int, int]]  # per node: chunk keys, their STRLEN and MEMORY USAGE sums


@dataclass
class Backend:
    label: str
    short: str
    url: str
    ports: list[int]
    cluster: bool
    svc: Service | None = None
    datasets: dict[int, Dataset] = field(default_factory=dict)
    conns: dict[int, redis.Redis] = field(default_factory=dict)

    def node(self, port: int) -> redis.Redis:
        if port not in self.conns:
            self.conns[port] = redis.Redis(port=port, socket_timeout=30)
        return self.conns[port]

    def memory(self) -> tuple[dict[int, int], dict[int, int]]:
        return ({p: int(self.node(p).info("memory")["used_memory"]) for p in self.ports},
                {p: int(self.node(p).dbsize()) for p in self.ports})  # fmt: skip

    def chunk_keys(self, uid: str, prefix: str) -> dict[int, tuple[int, int, int]]:
        """Per node: the dataset's chunk keys, their bytes (STRLEN) and what Redis says they take (MEMORY USAGE)."""
        out = {}
        for p in self.ports:
            r = self.node(p)
            keys = list(r.scan_iter(match=f"{prefix}:c:*:{uid}:*", count=1000))
            pipe = r.pipeline(transaction=False)
            for k in keys:
                pipe.strlen(k)
                pipe.memory_usage(k, samples=0)
            got = pipe.execute()
            out[p] = (len(keys), sum(got[0::2]), sum(got[1::2]))
        return out

    def close(self) -> None:
        for r in self.conns.values():
            r.close()


def start_service(b: Backend, args: argparse.Namespace, log_dir: Path, stack: ExitStack, cache: str) -> None:
    """``cache``: "warm" keeps the service's chunk cache (its default size), "cold" turns it off."""
    env = {"MASKSERVE_REDIS_CLUSTER": "1" if b.cluster else "0", "MASKSERVE_DURABLE_ACKS": "off",
           "MASKSERVE_CHUNK_BYTES": str(args.chunk_kib * 1024), "MASKSERVE_WORKERS": "1"}  # fmt: skip
    if cache == "cold":
        env["MASKSERVE_CHUNK_CACHE_BYTES"] = "0"
    for kv in args.service_env:
        key, _, value = kv.partition("=")
        env[key] = value
    b.svc = stack.enter_context(Service(redis_url=b.url, embedded=False, env=env,
                                        log_file=str(log_dir / f"service-{b.short}-{cache}.log")))


def prefill(b: Backend, seq_len: int, batch: int) -> float:
    """Every sequence of the dataset served once, so that a warm service holds them all; returns the seconds."""
    from client import Client

    t0 = time.perf_counter()
    ds = b.datasets[seq_len]
    with Client(b.svc.url, timeout=900, retries=2) as c:
        for index in range(-(-ds.info["num_sequences"] // batch)):
            c.batch(ds.name, size=batch, seed=0, index=index)
    return time.perf_counter() - t0


def ingest(b: Backend, seq_len: int, tokenizer: dict, docs: list[str], prefix: str) -> Dataset:
    from client import Client

    name = f"bench-{seq_len}"
    mem0, keys0 = b.memory()
    with Client(b.svc.url, timeout=900, retries=2) as c:
        c.create_dataset(name, tokenizer=tokenizer, seq_len=seq_len, packing="complete")
        c.ingest(name, docs)
        info = c.dataset(name)
        c.batch(name, size=8, seed=1)  # loads the chunk tables into the service's cache
    mem1, keys1 = b.memory()
    ds = Dataset(name, seq_len, info, {p: mem1[p] - mem0[p] for p in b.ports},
                 {p: keys1[p] - keys0[p] for p in b.ports}, b.chunk_keys(info["uid"], prefix))  # fmt: skip
    b.datasets[seq_len] = ds
    return ds


def print_dataset(b: Backend, ds: Dataset, chunk_kib: int) -> None:
    info, held = ds.info, sum(ds.held.values())
    tokens = info["num_tokens"]
    _, length, usage = (sum(c[i] for c in ds.chunks.values()) for i in range(3))
    print(f"{b.label}, L={ds.seq_len}: {tokens:,} tokens in {info['num_sequences']:,} sequences, "
          f"{info['num_chunks']} chunks ({chunk_kib} KiB target)")  # fmt: skip
    print(f"  bytes per token: {info['bytes'] / tokens:.2f} chunk bytes (dataset info); chunk keys "
          f"{length / tokens:.2f} (STRLEN), {usage / tokens:.2f} (MEMORY USAGE); used_memory +{held / 2**20:.2f} MiB = "
          f"{held / tokens:.2f}, of which {(held - usage) / 2**10:,.0f} KiB outside the chunk keys "
          f"(tokenizer, tables: per dataset, not per token)")  # fmt: skip
    for p in b.ports:
        k, _, mine = ds.chunks[p]
        print(f"    node {p}: {ds.held[p] / 2**20:6.2f} MiB held ({ds.held[p] / max(1, held):4.0%}), "
              f"{ds.keys[p]:3d} keys; {k:3d} chunk keys, {mine / 2**20:6.2f} MiB ({mine / max(1, usage):4.0%} "
              f"of the chunk memory)")  # fmt: skip
    print(flush=True)


# ---- the load: client processes ------------------------------------------------------------------------------


async def _exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    request: bytes) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 request on a kept-alive connection: (status, headers in lower case, body)."""
    writer.write(request)
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
    status = int(head[0].split(" ", 2)[1])
    headers = {}
    for line in head[1:]:
        if line:
            k, _, v = line.partition(":")
            headers[k.strip().lower()] = v.strip()
    if "content-length" in headers:
        return status, headers, await reader.readexactly(int(headers["content-length"]))
    parts = []  # chunked transfer coding
    while size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
        parts.append(await reader.readexactly(size))
        await reader.readexactly(2)
    await reader.readuntil(b"\r\n")
    return status, headers, b"".join(parts)


async def _pull(host: str, port: int, name: str, batch: int, stop, rng: random.Random,
                out: list) -> None:  # noqa: ANN001 - multiprocessing types
    """One client: batches back to back until ``stop``; records (end time, latency, body bytes or answer kind).

    A minimal HTTP/1.1 keep-alive client on asyncio streams: what a trainer's client costs is spent on the
    trainer's machine, so here the load generator should take as little of the shared CPU as it can."""
    seed, index, conn = rng.randrange(1 << 30), 0, None
    while not stop.is_set():
        t0 = time.monotonic()
        try:
            if conn is None:
                conn = await asyncio.open_connection(host, port)
            request = (f"GET /v1/datasets/{name}/batch?size={batch}&seed={seed}&index={index} HTTP/1.1\r\n"
                       f"Host: {host}:{port}\r\nAccept: application/vnd.safetensors\r\n\r\n").encode()
            status, headers, body = await _exchange(*conn, request)
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as exc:
            out.append((time.monotonic(), 0.0, f"transport:{type(exc).__name__}"))
            if conn is not None:
                conn[1].close()
            conn = None
            await asyncio.sleep(0.1)
            continue
        t1 = time.monotonic()
        if headers.get("connection", "").lower() == "close":
            conn[1].close()
            conn = None
        if status == 200:
            out.append((t1, t1 - t0, len(body)))
            index += 1
            continue
        kind = str(status)
        if headers.get("content-type", "").startswith("application/problem+json"):
            kind = json.loads(body)["type"].rsplit(":", 1)[-1]
        out.append((t1, t1 - t0, kind))
        hint = headers.get("maskserve-retry-after-ms")  # as the thin client does: the finer hint first
        await asyncio.sleep(int(hint) / 1000 if hint else float(headers.get("retry-after", 1)))
    if conn is not None:
        conn[1].close()


def _client_proc(url: str, name: str, batch: int, clients: int, nice: int, seed: int, ready, stop,
                 results) -> None:  # noqa: ANN001 - multiprocessing types
    if nice:
        os.nice(nice)  # the clients stand for trainers elsewhere: on a shared host they yield first
    records: list = []

    async def main() -> None:
        rng = random.Random(seed)
        where = urlsplit(url)
        tasks = [asyncio.create_task(_pull(where.hostname, where.port, name, batch, stop, random.Random(rng.random()),
                                           records)) for _ in range(clients)]  # fmt: skip
        ready.put(os.getpid())
        await asyncio.gather(*tasks)

    asyncio.run(main())
    results.put(records)


# ---- one measured phase ------------------------------------------------------------------------------------


@dataclass
class Snapshot:
    t: float
    host: float
    services: dict[str, float]
    clients: dict[int, float]
    nodes: dict[int, dict[str, float]]


def snapshot(backends: list[Backend], client_pids: list[int]) -> Snapshot:
    nodes = {}
    for b in backends:
        for p in b.ports:
            info = {**b.node(p).info("cpu"), **b.node(p).info("stats")}
            nodes[p] = {"cpu": info["used_cpu_user"] + info["used_cpu_sys"],
                        "commands": info["total_commands_processed"],
                        "out": info["total_net_output_bytes"], "in": info["total_net_input_bytes"]}  # fmt: skip
    services = {b.short: tree_cpu(b.svc.pid) for b in backends}
    clients = {pid: own_cpu(pid) for pid in client_pids}
    return Snapshot(time.monotonic(), host_busy(), services, clients, nodes)


@dataclass
class Phase:
    backend: Backend
    seq_len: int
    batch: int
    cache: str = "warm"
    seconds: float = 0.0
    batches: int = 0
    body_bytes: int = 0
    latencies: list[float] = field(default_factory=list)
    errors: Counter = field(default_factory=Counter)
    service_cpu: float = 0.0
    client_cpu: float = 0.0
    host_cpu: float = 0.0
    node: dict[int, dict[str, float]] = field(default_factory=dict)  # deltas of the backend's own nodes
    idle: dict[str, float] = field(default_factory=dict)  # CPU seconds of the other backend's nodes and service

    @property
    def sequences(self) -> int:
        return self.batches * self.batch

    @property
    def redis_cpu(self) -> float:
        return sum(d["cpu"] for d in self.node.values())

    def per_s(self, x: float) -> float:
        return x / self.seconds if self.seconds else float("nan")


def measure(b: Backend, backends: list[Backend], seq_len: int, args: argparse.Namespace, cache: str) -> Phase:
    ctx = mp.get_context("spawn")
    ready, results, stop = ctx.Queue(), ctx.Queue(), ctx.Event()
    name = b.datasets[seq_len].name
    shares = [args.clients // args.client_procs + (i < args.clients % args.client_procs)
              for i in range(args.client_procs)]  # fmt: skip
    procs = [ctx.Process(target=_client_proc, args=(b.svc.url, name, args.batch_size, n, args.client_nice,
                                                    1000 * seq_len + i, ready, stop, results))
             for i, n in enumerate(shares) if n]  # fmt: skip
    for p in procs:
        p.start()
    records: list = []
    try:
        pids = [ready.get(timeout=120) for _ in procs]
        time.sleep(args.warmup)
        s0 = snapshot(backends, pids)
        time.sleep(args.seconds)
        s1 = snapshot(backends, pids)
        stop.set()
        for _ in procs:
            records += results.get(timeout=600)
        for p in procs:
            p.join(60)
    finally:
        stop.set()
        for p in procs:
            if p.is_alive():
                p.kill()
    ph = Phase(b, seq_len, args.batch_size, cache, seconds=s1.t - s0.t)
    for t, dt, what in records:
        if not s0.t <= t <= s1.t:
            continue
        if isinstance(what, int):
            ph.batches += 1
            ph.body_bytes += what
            ph.latencies.append(dt)
        else:
            ph.errors[what] += 1
    ph.service_cpu = s1.services[b.short] - s0.services[b.short]
    ph.client_cpu = sum(s1.clients[p] - s0.clients[p] for p in s0.clients)
    ph.host_cpu = s1.host - s0.host
    ph.node = {p: {k: s1.nodes[p][k] - s0.nodes[p][k] for k in s0.nodes[p]} for p in b.ports}
    for other in backends:
        if other is not b:
            ph.idle[f"{other.label}: service"] = s1.services[other.short] - s0.services[other.short]
            for p in other.ports:
                ph.idle[f"node {p}"] = s1.nodes[p]["cpu"] - s0.nodes[p]["cpu"]
    return ph


def print_phase(ph: Phase, args: argparse.Namespace) -> None:
    b, n, seqs = ph.backend, max(ph.batches, 1), max(ph.sequences, 1)
    lat = ph.latencies or [float("nan")]
    errors = ", ".join(f"{k} {v}" for k, v in sorted(ph.errors.items())) or "none"
    tokens = ph.sequences * ph.seq_len
    ours = ph.service_cpu + ph.client_cpu + ph.redis_cpu + sum(ph.idle.values())
    print(f"L={ph.seq_len} B={ph.batch}, {b.label}, {ph.cache} chunk cache: {ph.seconds:.1f} s measured after {args.warmup:g} s warm-up, "
          f"{args.clients} clients in {args.client_procs} processes")  # fmt: skip
    print(f"  served {ph.batches:,} batches = {ph.per_s(ph.sequences):,.0f} sequences/s "
          f"({ph.per_s(tokens) / 1e6:.2f} M token slots/s), latency p50 {1000 * percentile(lat, 50):.1f} ms "
          f"p99 {1000 * percentile(lat, 99):.1f} ms; non-200: {errors}")  # fmt: skip
    print(f"  service: {ph.service_cpu:.1f} CPU-s = {ph.per_s(ph.service_cpu):.2f} cores busy -> "
          f"{ph.sequences / ph.service_cpu:,.0f} sequences per service CPU-s")  # fmt: skip
    print(f"  Redis, {len(b.ports)} node(s): {ph.redis_cpu:.2f} CPU-s -> {ph.sequences / ph.redis_cpu:,.0f} sequences "
          f"and {tokens / ph.redis_cpu / 1e6:.2f} M tokens per Redis CPU-s")  # fmt: skip
    for p, d in ph.node.items():
        print(f"    node {p}: CPU {d['cpu']:.2f} s ({ph.per_s(d['cpu']):4.0%}), per batch {d['commands'] / n:5.1f} "
              f"commands, {d['out'] / n / 1024:6.1f} KiB sent, {d['in'] / n / 1024:5.2f} KiB received; "
              f"{b.datasets[ph.seq_len].held[p] / 2**20:.2f} MiB held")  # fmt: skip
    redis_out = sum(d["out"] for d in ph.node.values())
    print(f"  bytes per sequence: {redis_out / seqs:,.0f} from Redis to the service, "
          f"{ph.body_bytes / seqs:,.0f} from the service to the clients (safetensors body)")  # fmt: skip
    print(f"  clients: {ph.client_cpu:.1f} CPU-s ({ph.per_s(ph.client_cpu):.2f} cores); idle meanwhile, "
          + ", ".join(f"{k} {v:.2f} CPU-s" for k, v in ph.idle.items()))  # fmt: skip
    print(f"  host: {ph.per_s(ph.host_cpu):.2f} of {os.cpu_count()} cores busy, {ph.per_s(ours):.2f} of them this "
          f"bench's processes, {ph.per_s(ph.host_cpu - ours):.2f} other processes")  # fmt: skip
    print(flush=True)


def print_table(phases: list[Phase]) -> None:
    cols = ["L", "backend", "cache", "seq/s", "svc cores", "seq/svc-CPU-s", "Redis cores", "seq/Redis-CPU-s",
            "Mtok/Redis-CPU-s", "client cores", "B/seq Redis", "B/seq wire", "B/tok mem", "B/tok chunks",
            "p50 ms", "p99 ms"]  # fmt: skip
    rows = []
    for ph in phases:
        ds = ph.backend.datasets[ph.seq_len]
        seqs, tokens = max(ph.sequences, 1), ds.info["num_tokens"]
        lat = ph.latencies or [float("nan")]
        rows.append([str(ph.seq_len), ph.backend.short, ph.cache, f"{ph.per_s(ph.sequences):,.0f}",
                     f"{ph.per_s(ph.service_cpu):.2f}", f"{ph.sequences / ph.service_cpu:,.0f}",
                     f"{ph.per_s(ph.redis_cpu):.2f}", f"{ph.sequences / ph.redis_cpu:,.0f}",
                     f"{ph.sequences * ph.seq_len / ph.redis_cpu / 1e6:.2f}", f"{ph.per_s(ph.client_cpu):.2f}",
                     f"{sum(d['out'] for d in ph.node.values()) / seqs:,.0f}", f"{ph.body_bytes / seqs:,.0f}",
                     f"{sum(ds.held.values()) / tokens:.2f}", f"{sum(c[2] for c in ds.chunks.values()) / tokens:.2f}",
                     f"{1000 * percentile(lat, 50):.1f}", f"{1000 * percentile(lat, 99):.1f}"])  # fmt: skip
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(cols)]
    print("summary: per-CPU-second figures are sequences served in the window over CPU seconds spent in it;")
    print("B/seq Redis: bytes Redis sent per sequence; B/seq wire: safetensors body per sequence; B/tok mem: "
          "used_memory gained per token ingested; B/tok chunks: MEMORY USAGE of the chunk keys per token")
    print("  " + "  ".join(c.rjust(w) for c, w in zip(cols, widths)))
    for r in rows:
        print("  " + "  ".join(v.rjust(w) for v, w in zip(r, widths)))


# ---- main --------------------------------------------------------------------------------------------------


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq-len", type=int, nargs="+", default=[128, 512],
                   help="sequence lengths L; one dataset per length on each backend (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=64, help="sequences per batch request, B (default: %(default)s)")
    p.add_argument("--seconds", type=float, default=20.0,
                   help="measured window per backend and length (default: %(default)s)")
    p.add_argument("--warmup", type=float, default=3.0,
                   help="unmeasured load before each window, once the clients are connected (default: %(default)s)")
    p.add_argument("--clients", type=int, default=16,
                   help="concurrent clients, one connection and one request in flight each (default: %(default)s)")
    p.add_argument("--client-procs", type=int, default=2,
                   help="processes the clients are spread over (default: %(default)s)")
    p.add_argument("--client-nice", type=int, default=10,
                   help="niceness of the client processes; 0 for the same priority as the service (default: "
                        "%(default)s)")  # fmt: skip
    p.add_argument("--corpus-mb", type=float, default=12.0,
                   help="text ingested per dataset: the stdlib docstrings repeated whole to at least this many MB "
                        "(default: %(default)s)")  # fmt: skip
    p.add_argument("--chunk-kib", type=int, default=64,
                   help="MASKSERVE_CHUNK_BYTES of both services, in KiB: smaller chunks, more of them to spread "
                        "over the masters (default: %(default)s)")  # fmt: skip
    p.add_argument("--masters", type=int, default=3, help="masters of the local cluster (default: %(default)s)")
    p.add_argument("--service-env", nargs="*", default=[], metavar="KEY=VALUE",
                   help="extra environment for both services, e.g. MASKSERVE_CPU_THREADS=1")
    p.add_argument("--cache", nargs="+", choices=["warm", "cold"], default=["warm", "cold"],
                   help="measure with the services' chunk cache on and filled first (warm), and/or off (cold: every "
                        "row read from Redis) (default: %(default)s)")  # fmt: skip
    p.add_argument("--keep-logs", default=None, metavar="DIR", help="keep the services' logs in this directory")
    args = p.parse_args()
    if shutil.which("redis-server") is None or shutil.which("redis-cli") is None:
        raise SystemExit("redis-server and redis-cli must be on PATH")
    print(f"command: {shlex.join([sys.executable, *sys.argv])}")
    print(f"date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}")
    header(f"one Redis node against a {args.masters}-master cluster", [
        "per backend and L: a dataset ingested through the service, then clients pulling B x L batches for a "
        "measured window",
        "CPU: Redis INFO cpu per node, /proc for the service (process tree) and the client processes",
    ], {"L": args.seq_len, "B": args.batch_size, "seconds": args.seconds, "warmup": args.warmup,
        "clients": f"{args.clients} in {args.client_procs} procs (nice {args.client_nice})",
        "corpus": f"{args.corpus_mb:g} MB", "chunk": f"{args.chunk_kib} KiB", "durable acks": "off",
        "service env": args.service_env or "defaults"})  # fmt: skip

    prefix = dict(kv.partition("=")[::2] for kv in args.service_env).get("MASKSERVE_KEY_PREFIX", "ms")
    docs = repeat_to(stdlib_docs(), min_bytes=int(args.corpus_mb * 1e6))
    _, tokenizer = train_bpe(stdlib_docs())
    print(f"corpus: {len(docs):,} documents, {text_bytes(docs) / 1e6:.1f} MB of text per dataset", flush=True)

    tmp = Path(tempfile.mkdtemp(prefix="maskserve-cluster-bench-"))
    log_dir = Path(args.keep_logs) if args.keep_logs else tmp
    log_dir.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    single = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                               "--appendonly", "no", "--dir", str(tmp)], stdout=subprocess.DEVNULL)  # fmt: skip
    cluster = LocalCluster(tmp / "cluster", masters=args.masters, replicas=0)
    backends: list[Backend] = []
    phases: list[Phase] = []
    stack = ExitStack()
    try:
        LocalCluster._wait(time.monotonic() + 30, lambda: redis.Redis(port=port).ping())
        cluster.start()
        backends = [Backend("one node", "node", f"redis://127.0.0.1:{port}", [port], False),
                    Backend(f"{args.masters}-master cluster", "cluster", cluster.url, cluster.master_ports(), True)]
        version = backends[0].node(port).info("server")["redis_version"]
        print(f"redis-server {version}: one node on {port}; cluster masters on {backends[1].ports}\n", flush=True)
        services = ExitStack()
        stack.callback(services.close)
        for b in backends:
            start_service(b, args, log_dir, services, args.cache[0])
            for L in args.seq_len:
                t0 = time.perf_counter()
                ds = ingest(b, L, tokenizer, docs, prefix)
                print(f"(ingested in {time.perf_counter() - t0:.1f} s)")
                print_dataset(b, ds, args.chunk_kib)
                if ds.info["num_chunks"] < 64:
                    print(f"    warning: only {ds.info['num_chunks']} chunks; raise --corpus-mb or lower --chunk-kib")
        for k, cache in enumerate(args.cache):
            if k:  # the same datasets, served by services started with this cache setting
                services.close()
                for b in backends:
                    start_service(b, args, log_dir, services, cache)
            for i, L in enumerate(args.seq_len):
                for b in backends if i % 2 == 0 else backends[::-1]:
                    if cache == "warm":
                        print(f"(prefill {b.short} L={L}: every sequence served once, {prefill(b, L, args.batch_size):.1f} s)")
                    ph = measure(b, backends, L, args, cache)
                    phases.append(ph)
                    print_phase(ph, args)
    finally:
        stack.close()  # the services first, then their Redis
        for b in backends:
            b.close()
        single.kill()
        single.wait(10)
        cluster.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    print_table(phases)
    print(f"\nload average (1/5/15 min) at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
