"""Job batches (lease + fetch + mask + encode + ack) against the stateless batch endpoint.

Workers are separate processes pulling from one service process for a fixed
time; the figure is sequences per second across all workers. Reported side
by side in one run:

* stateless ``GET /batch`` (B random sequences) with 1 and with N workers,
* job batches (leased, acked on the next request, the acks confirmed once
  durable where the server can: ``--embedded`` runs Valkey with its AOF and
  WAITAOF) with 1 and with N workers, and their ratio (the target: job >= 80%
  of stateless); once per ``--ack-every`` value (acks sent in groups of N:
  one fsync per group),
* the job with N workers spread over 1 and over 2 service processes,
* job streams sending their consumers' summaries against sending none
  (``--only-summaries``; the target: >= 95%),
* a mixture job over ``--sources`` datasets (the same text split in parts, equal
  weights, each repeating) against a one-source job over the whole, with 1 and
  with N workers, and their ratio (the target: mixture >= 90% of one source).

Run: ``python bench/jobs.py`` (``--help`` for the knobs).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    BenchRedis,
    Service,
    add_service_args,
    header,
    proc_cpu,
    process_tree,
    repeat_to,
    start_service,
    stdlib_docs,
    train_bpe,
)


def _drain(stream, seconds: float, out: mp.Queue) -> None:  # noqa: ANN001
    """Pull from ``stream`` for ``seconds`` (after one warm-up batch); report (sequences, seconds)."""
    n = 0
    next(stream)
    t0 = time.perf_counter()
    for b in stream:
        n += len(b)
        if time.perf_counter() - t0 >= seconds:
            break
    stream.close()
    out.put((n, time.perf_counter() - t0))


def _stateless(url: str, dataset: str, size: int, seconds: float, prefetch: int, worker: int, out: mp.Queue) -> None:
    from client import Client

    with Client(url) as c:
        _drain(c.batches(dataset, batch_size=size, seed=1000 + worker, prefetch=prefetch), seconds, out)


def _job(url: str, job: str, seconds: float, prefetch: int, ack_every: int, worker: int, out: mp.Queue) -> None:
    from client import Client

    with Client(url) as c:
        _drain(c.job(job, worker=f"bench-{worker}", prefetch=prefetch, ack_every=ack_every), seconds, out)


def _job_summaries(url: str, job: str, seconds: float, prefetch: int, stats_every: float | None, worker: int,
                   out: mp.Queue) -> None:  # fmt: skip
    from client import Client

    with Client(url) as c:
        _drain(c.job(job, worker=f"bench-{worker}", prefetch=prefetch, stats_every=stats_every), seconds, out)


def run_workers(target, args_for, workers: int) -> float:  # noqa: ANN001
    ctx = mp.get_context("spawn")
    q: mp.Queue = ctx.Queue()
    procs = [ctx.Process(target=target, args=(*args_for(w), w, q)) for w in range(workers)]
    for p in procs:
        p.start()
    results = [q.get(timeout=600) for _ in procs]
    for p in procs:
        p.join()
    return sum(n / dt for n, dt in results)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--workers", type=int, default=4, help="the N of the multi-worker runs")
    p.add_argument("--seconds", type=float, default=8.0, help="pull time per measurement")
    p.add_argument("--corpus-mb", type=float, default=6.0, help="text ingested (stdlib docstrings, repeated)")
    p.add_argument("--prefetch", type=int, default=2, help="requests in flight per worker, on both paths")
    p.add_argument("--ack-every", type=int, nargs="+", default=[1, 8],
                   help="job streams' ack grouping (acks sent with every N-th lease request); one job row each")
    p.add_argument("--sources", type=int, default=3, help="datasets in the mixture job (0: skip the mixture rows)")
    p.add_argument("--only-mixture", action="store_true", help="run only the mixture rows")
    p.add_argument("--mixture-repeats", type=int, default=5, help="measurements per worker count of the mixture and summaries rows")
    p.add_argument("--only-summaries", action="store_true",
                   help="run only the rows of job streams sending their consumers' summaries against not sending")
    p.add_argument("--summary-every", type=float, default=1.0,
                   help="summaries rows: seconds between a worker's summaries when on [default: 1; clients: 5]")
    add_service_args(p)
    args = p.parse_args()
    header("job batches vs stateless batches", ["sequences/s summed over worker processes"],
           {"B": args.batch_size, "L": args.seq_len, "N": args.workers, "seconds": args.seconds,
            "prefetch": args.prefetch})  # fmt: skip

    from client import Client

    docs = repeat_to(stdlib_docs(), min_bytes=int(args.corpus_mb * 1e6))
    _, tok = train_bpe(docs[:3000])
    with BenchRedis(args), start_service(args) as svc:
        with Client(svc.url, timeout=600) as c:
            c.create_dataset("bench", tokenizer=tok, seq_len=args.seq_len, packing="complete")
            c.ingest("bench", docs)
            info = c.dataset("bench")
            print(f"dataset: {info['num_sequences']} sequences x L={info['seq_len']}")
            ready = c.readiness()
            print(f"durable acks: {ready['durable_acks']} ({ready['durability']})")

            def new_job(tag: str) -> str:
                name = f"bench-{tag}"
                c.create_job(name, "bench", batch_size=args.batch_size, epochs=None, lease_timeout_s=30)
                return name

            if args.only_summaries:
                summary_rows(c, svc, args)
                return
            if args.sources:
                mixture_rows(c, svc, args, docs, tok)
            if args.only_mixture:
                return

            rows = []
            for n in (1, args.workers):
                stateless = run_workers(
                    _stateless, lambda w: (svc.url, "bench", args.batch_size, args.seconds, args.prefetch), n
                )
                for k in args.ack_every:
                    job = new_job(f"w{n}-a{k}")
                    leased = run_workers(_job, lambda w, job=job, k=k: (svc.url, job, args.seconds, args.prefetch, k),
                                         n)  # fmt: skip
                    rows.append((n, k, stateless, leased))
            print(f"\n{'workers':>8} {'ack_every':>9} {'stateless seq/s':>16} {'job seq/s':>10} {'job/stateless':>14}")
            for n, k, s, j in rows:
                verdict = "PASS" if j >= 0.8 * s else "MISS"
                print(f"{n:>8} {k:>9} {s:>16,.0f} {j:>10,.0f} {j / s:>13.0%}  {verdict} (target >= 80%)")

            # scaling: the same job over two service processes
            job = new_job("scale")
            one = run_workers(_job, lambda w: (svc.url, job, args.seconds, args.prefetch, 1), args.workers)
            with Service(redis_url=svc.redis_url, embedded=False) as second:
                urls = [svc.url, second.url]
                two = run_workers(_job, lambda w: (urls[w % 2], job, args.seconds, args.prefetch, 1), args.workers)
            progress = c.job_progress(job)
            print(f"\njob over 1 service process: {one:,.0f} seq/s; over 2: {two:,.0f} seq/s "
                  f"(x{two / one:.2f}); redelivered {progress['redelivered']}, late acks {progress['late_acks']}")  # fmt: skip
            print("(2 CPU cores are shared by the service processes, Redis and the workers: the scaling figure is "
                  "bounded by the cores, not by shared state)")


def _with_cpu(svc: Service, measure) -> tuple[float, float]:  # noqa: ANN001
    """``measure()`` (sequences/s) and the service processes' CPU seconds per second of it."""
    pids = process_tree(svc.proc.pid)
    cpu0, t0 = sum(proc_cpu(p) for p in pids), time.perf_counter()
    rate = measure()
    return rate, (sum(proc_cpu(p) for p in pids) - cpu0) / (time.perf_counter() - t0)


def summary_rows(c, svc: Service, args: argparse.Namespace) -> None:  # noqa: ANN001
    """Job streams sending their consumers' summaries (every ``--summary-every`` s) against sending none."""
    print(f"\n{'workers':>8} {'repeat':>6} {'no summaries seq/s':>19} {'summaries seq/s':>16} {'on/off':>7}")
    for n in (1, args.workers):
        off, on = f"bench-nosum-w{n}", f"bench-sum-w{n}"
        for name in (off, on):
            c.create_job(name, "bench", batch_size=args.batch_size, epochs=None, lease_timeout_s=30)
        ratios = []
        for r in range(args.mixture_repeats):  # interleaved: load from elsewhere hits both alike
            a = run_workers(_job_summaries, lambda w: (svc.url, off, args.seconds, args.prefetch, None), n)
            b = run_workers(_job_summaries, lambda w: (svc.url, on, args.seconds, args.prefetch, args.summary_every),
                            n)  # fmt: skip
            ratios.append(b / a)
            print(f"{n:>8} {r + 1:>6} {a:>19,.0f} {b:>16,.0f} {b / a:>7.0%}")
        median = sorted(ratios)[len(ratios) // 2]
        flagged = c.job_progress(on)
        reporting = sum("data_wait_share" in w for w in flagged["workers"].values())
        verdict = "PASS" if median >= 0.95 else "MISS"
        print(f"{n:>8} {'median':>6} {'':>19} {'':>16} {median:>7.0%}  {verdict} (target >= 95%); "
              f"{reporting} workers reported, input-bound: {flagged['input_bound_workers']}")


def mixture_rows(c, svc: Service, args: argparse.Namespace, docs: list[str], tok: str) -> None:  # noqa: ANN001
    """A mixture job over ``args.sources`` parts of the corpus against a one-source job over all of it."""
    url = svc.url
    parts = []
    for i in range(args.sources):
        name = f"bench-part{i}"
        c.create_dataset(name, tokenizer=tok, seq_len=args.seq_len, packing="complete")
        c.ingest(name, docs[i :: args.sources])
        parts.append(name)
    sizes = [c.dataset(name)["num_sequences"] for name in parts]
    print(f"\nmixture: {args.sources} sources of {', '.join(map(str, sizes))} sequences, equal weights, repeating")
    print(f"{'workers':>8} {'repeat':>6} {'one source seq/s':>17} {'mixture seq/s':>14} {'mixture/one':>12}")
    for n in (1, args.workers):
        single, mixed = f"bench-single-w{n}", f"bench-mix-w{n}"
        c.create_job(single, "bench", batch_size=args.batch_size, epochs=None, lease_timeout_s=30)
        c.create_job(mixed, sources=[{"dataset": name, "weight": 1, "repeat": True} for name in parts],
                     num_samples=10**10, batch_size=args.batch_size, lease_timeout_s=30)  # fmt: skip
        ratios = []
        for r in range(args.mixture_repeats):  # interleaved: load from elsewhere hits both alike
            one, one_cpu = _with_cpu(svc, lambda: run_workers(_job, lambda w: (url, single, args.seconds,
                                                                                 args.prefetch, 1), n))  # fmt: skip
            mix, mix_cpu = _with_cpu(svc, lambda: run_workers(_job, lambda w: (url, mixed, args.seconds,
                                                                                 args.prefetch, 1), n))  # fmt: skip
            ratios.append(mix / one)
            print(f"{n:>8} {r + 1:>6} {one:>17,.0f} {mix:>14,.0f} {mix / one:>11.0%}   service CPU per sequence: "
                  f"one source {one_cpu / one * 1e6:.1f} us, mixture {mix_cpu / mix * 1e6:.1f} us")  # fmt: skip
        median = sorted(ratios)[len(ratios) // 2]
        shares = ", ".join(f"{s['dataset']} {s['share']:.3f}" for s in c.job_progress(mixed)["sources"])
        verdict = "PASS" if median >= 0.9 else "MISS"
        print(f"{n:>8} {'median':>6} {'':>17} {'':>14} {median:>11.0%}  {verdict} (target >= 90%)  shares: {shares}")


if __name__ == "__main__":
    main()
