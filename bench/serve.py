"""Served batch throughput: masked (B, L) batches over HTTP, and what they cost in-process.

One ``python -m service serve`` subprocess on a real Redis holds a dataset of
the stdlib docstrings (packing ``complete``, repeated until it has at least
``--min-batches`` batches' worth of full-length sequences). This process is
the trainer side: it pulls batches through ``client.Client``

* raw: sequential ``Client.batch`` calls, one request in flight,
* prefetch: ``Client.batches(..., prefetch=k)`` (k requests in flight on threads),
* concurrent: ``--concurrency`` threads each making sequential ``Client.batch`` calls,

and reports sequences/s, batches/s, MB/s of response body and p50/p99 request
latency, and the CPU each process (client, service, Redis) spends per batch.
Side by side, the reference: ``service.masking.masking.mask_tokens`` +
``wire.encode`` on arrays of the same shape in this process, the
client's ``decode``, and (when its internals can be driven directly) the
service's own batch path without HTTP, to show what share of a request is
HTTP/ASGI overhead.

    .venv/bin/python bench/serve.py
    .venv/bin/python bench/serve.py --batch-size 32 --seq-len 128 --requests 500 --prefetch 1 4 8
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import threading
import time
from collections.abc import Callable

import numpy as np

from _common import (
    KEY_PREFIX,
    add_service_args,
    batch_path_steps,
    BenchRedis,
    header,
    percentile,
    print_profile,
    proc_cpu,
    redis_client,
    redis_cpu,
    redis_version,
    repeat_to,
    start_service,
    stdlib_docs,
    train_bpe,
)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-size", type=int, default=64, help="B (default %(default)s)")
    p.add_argument("--seq-len", type=int, default=512, help="L (default %(default)s)")
    p.add_argument("--requests", type=int, default=300, help="batches fetched per mode (default %(default)s)")
    p.add_argument("--prefetch", type=int, nargs="+", default=[2, 4], help="k for Client.batches(prefetch=k) (default 2 4)")
    p.add_argument("--concurrency", type=int, default=4, help="threads making sequential Client.batch calls (default %(default)s; 0 skips)")
    p.add_argument("--warmup", type=int, default=10, help="untimed batches before each mode (default %(default)s)")
    p.add_argument("--min-batches", type=int, default=20, help="ingest until the dataset holds B*L*this many tokens (default %(default)s)")
    p.add_argument("--vocab-size", type=int, default=8000, help="BPE vocabulary size (default %(default)s)")
    p.add_argument("--mlm-probability", type=float, default=0.15, help="masking probability p (default %(default)s)")
    p.add_argument("--reference-iters", type=int, default=100, help="in-process builds timed for the reference (default %(default)s)")
    add_service_args(p)
    return p.parse_args()


class CpuMeter:
    """CPU seconds of this process (client), the service process and the Redis server."""

    def __init__(self, service_pid: int, r) -> None:  # noqa: ANN001
        self.pid = service_pid
        self.r = r

    def read(self) -> tuple[float, float, float]:
        return time.process_time(), proc_cpu(self.pid), redis_cpu(self.r)


class Stats:
    def __init__(self) -> None:
        self.latencies: list[float] = []
        self._lock = threading.Lock()

    def add(self, dt: float) -> None:
        with self._lock:
            self.latencies.append(dt)


def _timed_batch(fetch: Callable, stats: Stats) -> Callable:  # noqa: ANN001
    def wrapper(*a, **kw):  # noqa: ANN002, ANN003, ANN202
        t0 = time.perf_counter()
        out = fetch(*a, **kw)
        stats.add(time.perf_counter() - t0)
        return out

    return wrapper


def _report(label: str, wall: float, stats: Stats, n: int, b: int, body: int, rows: list,
            cpu: tuple[tuple[float, float, float], tuple[float, float, float]]) -> None:  # fmt: skip
    lat = stats.latencies
    seqs = n * b / wall
    (c0, s0, r0), (c1, s1, r1) = cpu
    print(f"  {label:<30} {seqs:7,.0f} seq/s {n / wall:6.1f} batches/s {n * body / wall / 1e6:6.1f} MB/s | "
          f"latency p50 {percentile(lat, 50) * 1e3:6.2f} ms p99 {percentile(lat, 99) * 1e3:6.2f} ms | "
          f"CPU ms/batch: client {(c1 - c0) / n * 1e3:5.2f}, service {(s1 - s0) / n * 1e3:5.2f}, "
          f"Redis {(r1 - r0) / n * 1e3:5.2f}; wall {wall / n * 1e3:5.2f} ms/batch", flush=True)  # fmt: skip
    rows.append((label, seqs, percentile(lat, 50), (s1 - s0) / n, (c1 - c0) / n, (r1 - r0) / n))


def main() -> int:
    args = parse_args()
    b, seq_len = args.batch_size, args.seq_len
    header(
        "maskserve served batch throughput",
        [
            f"masked (B={b}, L={seq_len}) batches from a `python -m service serve` subprocess over HTTP (safetensors body),",
            "pulled by client.Client in this process: sequences/s, batches/s, MB/s of body, p50/p99 request latency;",
            "reference: in this process, mask_tokens + wire.encode on arrays of the same shape, the client's decode,",
            "and the service's own batch path (service.batches.batching: Redis fetch, assemble, mask, render) without HTTP",
        ],
        {"batch_size": b, "seq_len": seq_len, "requests": args.requests, "prefetch": " ".join(map(str, args.prefetch)),
         "concurrency": args.concurrency, "warmup": args.warmup, "min_batches": args.min_batches,
         "redis": "embedded" if args.embedded else args.redis_url,
         "service_env": " ".join(args.service_env) or "-"},  # fmt: skip
    )
    import httpx

    from client import Client
    from wire import CONTENT_TYPE, decode

    docs = stdlib_docs()
    tok, tok_json = train_bpe(docs, args.vocab_size)
    per_copy = sum(len(e.ids) for e in tok.encode_batch(docs, add_special_tokens=False))
    want = b * seq_len * args.min_batches
    copies = max(1, math.ceil(want * 1.02 / per_copy))
    corpus = repeat_to(docs, copies=copies)
    name = f"bench-serve-L{seq_len}"
    rows: list = []
    floors: list = []
    with BenchRedis(args), start_service(args) as svc:
        print(f"service {svc.url} pid {svc.pid}; Redis {svc.redis_url} ({redis_version(svc.redis_url)})")
        with Client(svc.url, timeout=600) as c:
            c.delete_dataset(name, missing_ok=True)
            c.create_dataset(name, tokenizer=tok_json, seq_len=seq_len, packing="complete")
            t0 = time.perf_counter()
            c.ingest(name, corpus)
            meta = c.dataset(name)
            nseq, ntok = meta["num_sequences"], meta["num_tokens"]
            full = ntok // seq_len  # complete packing: every sequence but the request's tail is full
            print(f"dataset {name!r}: {copies} copies of the stdlib docstrings -> {nseq:,} sequences "
                  f"({full:,} of full length L={seq_len}), {ntok:,} tokens = {ntok / (b * seq_len):.1f} batches' worth "
                  f"(ingest {time.perf_counter() - t0:.1f}s)")  # fmt: skip

            params = {"size": b, "seed": 1, "index": 0, "mlm_probability": args.mlm_probability}
            raw = httpx.get(f"{svc.url}/v1/datasets/{name}/batch", params=params, headers={"Accept": CONTENT_TYPE})
            body = len(raw.content)
            arrays, _ = decode(raw.content)
            shapes = ", ".join(f"{k} {v.dtype}{tuple(v.shape)}" for k, v in arrays.items())
            print(f"body: {body:,} bytes ({raw.headers.get('content-type')}): {shapes}\n")

            next_index = [1000]

            def indices(n: int) -> range:
                start = next_index[0]
                next_index[0] += n
                return range(start, start + n)

            def warm() -> None:
                for i in indices(args.warmup):
                    c.batch(name, b, seed=1, index=i, mlm_probability=args.mlm_probability)

            rcpu = redis_client(svc.redis_url)
            meter = CpuMeter(svc.pid, rcpu)
            print("over HTTP (client in this process, service in its subprocess; CPU = user+sys per process):")
            # 1. raw sequential Client.batch
            warm()
            stats = Stats()
            cpu0 = meter.read()
            t0 = time.perf_counter()
            for i in indices(args.requests):
                t1 = time.perf_counter()
                batch = c.batch(name, b, seed=1, index=i, mlm_probability=args.mlm_probability)
                stats.add(time.perf_counter() - t1)
                assert batch["input_ids"].shape == (b, seq_len)
            wall = time.perf_counter() - t0
            _report("Client.batch, sequential", wall, stats, args.requests, b, body, rows, (cpu0, meter.read()))

            # 2. Client.batches with prefetch; latency measured by wrapping this client's batch()
            for k in args.prefetch:
                warm()
                stats = Stats()
                original = c.batch
                c.batch = _timed_batch(original, stats)  # type: ignore[method-assign]
                try:
                    start = indices(args.requests).start
                    n = 0
                    cpu0 = meter.read()
                    t0 = time.perf_counter()
                    with c.batches(name, b, seed=1, start=start, steps=args.requests, prefetch=k,
                                   mlm_probability=args.mlm_probability) as stream:  # fmt: skip
                        for batch in stream:
                            n += 1
                    wall = time.perf_counter() - t0
                    cpu1 = meter.read()
                finally:
                    del c.batch  # back to the class's method
                _report(f"Client.batches, prefetch={k}", wall, stats, n, b, body, rows, (cpu0, cpu1))

            # 3. concurrent threads, each sequential Client.batch
            if args.concurrency > 0:
                warm()
                stats = Stats()
                todo = list(indices(args.requests))
                chunks = [todo[t :: args.concurrency] for t in range(args.concurrency)]

                def worker(ids: list[int]) -> None:
                    for i in ids:
                        t1 = time.perf_counter()
                        c.batch(name, b, seed=1, index=i, mlm_probability=args.mlm_probability)
                        stats.add(time.perf_counter() - t1)

                threads = [threading.Thread(target=worker, args=(ch,)) for ch in chunks]
                cpu0 = meter.read()
                t0 = time.perf_counter()
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
                wall = time.perf_counter() - t0
                _report(f"Client.batch, {args.concurrency} threads", wall, stats, args.requests, b, body, rows, (cpu0, meter.read()))

            # floors: the per-request cost of the HTTP stack on tiny responses, same client library
            print("\nper-request floor over HTTP (httpx.Client, sequential; tiny JSON responses):")
            with httpx.Client(base_url=svc.url) as h:
                for label, path in (("GET /healthz (no dependencies)", "/healthz"),
                                    (f"GET /v1/datasets/{name} (deps + HGETALL)", f"/v1/datasets/{name}")):  # fmt: skip
                    for _ in range(args.warmup):
                        h.get(path).raise_for_status()
                    lat = []
                    cpu0 = meter.read()
                    t0 = time.perf_counter()
                    for _ in range(args.requests):
                        t1 = time.perf_counter()
                        h.get(path).raise_for_status()
                        lat.append(time.perf_counter() - t1)
                    wall = time.perf_counter() - t0
                    (c0, s0, r0), (c1, s1, r1) = cpu0, meter.read()
                    n = args.requests
                    print(f"  {label:<44} {n / wall:7.1f} req/s | latency p50 {percentile(lat, 50) * 1e3:5.2f} ms "
                          f"p99 {percentile(lat, 99) * 1e3:5.2f} ms | CPU ms/request: client {(c1 - c0) / n * 1e3:5.2f}, "
                          f"service {(s1 - s0) / n * 1e3:5.2f}, Redis {(r1 - r0) / n * 1e3:5.2f}", flush=True)  # fmt: skip
                    floors.append((label, percentile(lat, 50), (s1 - s0) / n))
            rcpu.close()

            # reference: the same work in this process
            try:
                ref = reference(args, svc.redis_url, name, meta, body)
            except Exception as exc:  # noqa: BLE001 - keep the HTTP figures if the internals moved
                print(f"\nreference skipped: {exc.__class__.__name__}: {exc}")
                ref = None
            c.delete_dataset(name)

    print("\nsummary:")
    for label, seqs, p50, svc_cpu, cli_cpu, red_cpu in rows:
        print(f"  {label:<34} {seqs:9,.0f} seq/s  p50 {p50 * 1e3:6.2f} ms   CPU/batch: service {svc_cpu * 1e3:5.2f} ms, "
              f"client {cli_cpu * 1e3:5.2f} ms, Redis {red_cpu * 1e3:5.2f} ms")  # fmt: skip
    if ref is not None:
        core = ref["mask_tokens"] + ref["encode"]
        print(f"  {'in-process mask_tokens + encode':<34} {b / core:9,.0f} seq/s  {core * 1e3:6.2f} ms per batch (one core)")
        path = ref.get("service path")
        if path:
            print(f"  {'in-process service batch path':<34} {b / path:9,.0f} seq/s  {path * 1e3:6.2f} ms per batch "
                  f"(Redis round trips included)")  # fmt: skip
        seq_p50, svc_cpu = rows[0][2], rows[0][3]
        print(f"sequential request p50 {seq_p50 * 1e3:.2f} ms: mask_tokens + encode {core / seq_p50:.0%}"
              + (f", whole in-process batch path (fetch + assemble + mask + encode) {path / seq_p50:.0%}" if path else "")
              + f", client decode {ref['client decode'] / seq_p50:.0%}; the rest, "
              f"{(seq_p50 - (path or core) - ref['client decode']) / seq_p50:.0%}, is HTTP: uvicorn/Starlette/FastAPI "
              f"(routing, dependencies, query validation, middleware), socket I/O, httpx")  # fmt: skip
        print(f"service CPU per sequential batch {svc_cpu * 1e3:.2f} ms vs {(path or core) * 1e3:.2f} ms in-process; "
              f"HTTP floors (service CPU/request): " + ", ".join(f"{lbl.split(' (')[0]} {cpu * 1e3:.2f} ms" for lbl, _, cpu in floors))  # fmt: skip
    if args.profile:
        print_profile(args.profile)
    return 0


def reference(args: argparse.Namespace, redis_url: str, name: str, meta: dict, body: int) -> dict[str, float]:
    """Median seconds per batch of the in-process steps; prints them.

    Always: ``service.masking.masking.mask_tokens`` and ``wire.encode`` on arrays of
    the served shape (ids drawn from the ordinary vocabulary, every sequence L
    long), and the client's ``decode``. Also, when the service's internal batch
    path (``service.batches.batching``) can be driven directly, that whole path with
    its Redis round trips, minus HTTP.
    """
    from wire import decode, encode
    from service.masking.masking import MaskSpec, Vocab, mask_tokens

    b, seq_len, iters = args.batch_size, args.seq_len, args.reference_iters
    print(f"\nreference, in this process (median of {iters} runs, one (B={b}, L={seq_len}) batch each):")
    special = meta["special_tokens"]
    r = redis_client(redis_url)
    try:
        raw = r.hget(f"{KEY_PREFIX}:ds:{{{name}}}:meta", "all_special_ids")
        all_special = json.loads(raw) if raw else [v for v in special.values() if v is not None]
    finally:
        r.close()
    vocab = Vocab.build(meta["vocab_size"], all_special, special["mask"], special["pad"])
    spec = MaskSpec(args.mlm_probability)
    rng = np.random.default_rng(0)
    ordinary = np.flatnonzero(~vocab.is_special)
    lengths = np.full(b, seq_len, dtype=np.int64)
    steps: dict[str, list[float]] = {"mask_tokens": [], "encode": [], "client decode": []}
    out_len = 0
    for it in range(iters + 5):
        ids = ordinary[rng.integers(0, len(ordinary), size=(b, seq_len))].astype(np.int32)
        seq_ids = np.arange(it * b, (it + 1) * b, dtype=np.int64)
        t0 = time.perf_counter()
        input_ids, labels, attention = mask_tokens(ids, lengths, seq_ids, seed=1, epoch=0, spec=spec, vocab=vocab)
        t1 = time.perf_counter()
        blob = encode({"input_ids": input_ids, "attention_mask": attention, "labels": labels, "sequence_ids": seq_ids},
                      {"dataset": name, "seed": "1", "epoch": "0", "index": str(it), "pad_id": str(vocab.pad_id)})  # fmt: skip
        t2 = time.perf_counter()
        decode(bytearray(blob))
        t3 = time.perf_counter()
        out_len = len(blob)
        if it >= 5:
            steps["mask_tokens"].append(t1 - t0)
            steps["encode"].append(t2 - t1)
            steps["client decode"].append(t3 - t2)
    med = {k: statistics.median(v) for k, v in steps.items()}
    print(f"  {'mask_tokens':<40} {med['mask_tokens'] * 1e3:7.3f} ms")
    print(f"  {'encode (safetensors, ' + format(out_len, ',') + ' B)':<40} {med['encode'] * 1e3:7.3f} ms"
          f"{'' if out_len == body else f'  (served body: {body:,} B)'}")  # fmt: skip
    print(f"  {'client decode':<40} {med['client decode'] * 1e3:7.3f} ms")
    core = med["mask_tokens"] + med["encode"]
    print(f"  {'mask_tokens + encode':<40} {core * 1e3:7.3f} ms  -> {b / core:9,.0f} seq/s on one core")
    try:
        med.update(_service_path(args, redis_url, name))
    except Exception as exc:  # noqa: BLE001 - internals move; the core reference above stands
        print(f"  (service batch path in-process: skipped, {exc.__class__.__name__}: {exc})")
    return med


def _service_path(args: argparse.Namespace, redis_url: str, name: str) -> dict[str, float]:
    """The batch route's own steps (``service.batches.batching``), run in-process on this process's event loop."""
    b = args.batch_size
    steps = batch_path_steps(redis_url, name, b, args.reference_iters, {"mlm_probability": args.mlm_probability},
                             seed=1, first_index=10_000, warmup=5)  # fmt: skip
    med = {k: statistics.median(v) for k, v in steps.items()}
    print("  the service's batch path (service.batches.batching), in-process, no HTTP:")
    for key, v in med.items():
        print(f"    {key:<42} {v * 1e3:7.3f} ms")
    total = sum(med.values())
    print(f"    {'total':<42} {total * 1e3:7.3f} ms  -> {b / total:9,.0f} seq/s on one core")
    return {"service path": total}


if __name__ == "__main__":
    raise SystemExit(main())
