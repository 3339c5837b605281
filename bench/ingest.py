"""Ingest throughput of the service vs. the bare ``tokenizers`` batch encode.

The corpus is the Python stdlib's docstrings, repeated whole up to ``--target-mb``.
The service (a ``python -m service serve`` subprocess on a real Redis) is fed
the corpus as NDJSON through ``client.Client.ingest``, one request per repeat;
side by side, in this process, the same texts go through
``Tokenizer.encode_batch(texts, add_special_tokens=False)`` with the same
tokenizer, and through the service's own in-process ingest pipeline
(tokenize + pack + chunk, no HTTP, no Redis) to show where the time goes.

Rates are in *text tokens* (the tokenizer's output for the documents, the same
count for every row); the service also stores one cls per sequence and, in
``complete``/``doc`` packing, sep tokens, shown as "stored tokens".

    .venv/bin/python bench/ingest.py                       # packing complete, 8 MB
    .venv/bin/python bench/ingest.py --packing complete doc none
    .venv/bin/python bench/ingest.py --embedded --target-mb 4
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

from _common import (
    add_service_args,
    BenchRedis,
    header,
    print_profile,
    proc_cpu,
    redis_client,
    redis_cpu,
    redis_version,
    repeat_to,
    service_env,
    start_service,
    stdlib_docs,
    text_bytes,
    train_bpe,
)

PACKINGS = ("complete", "doc", "none")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target-mb", type=float, default=8.0, help="corpus size: stdlib docstrings repeated to this many MB of text (default %(default)s)")
    p.add_argument("--packing", nargs="+", default=["complete"], choices=[*PACKINGS, "all"], help="packing mode(s) to measure (default complete)")
    p.add_argument("--seq-len", type=int, default=512, help="dataset sequence length L (default %(default)s)")
    p.add_argument("--vocab-size", type=int, default=8000, help="BPE vocabulary size (default %(default)s)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs of each measurement; best and median are shown (default %(default)s)")
    p.add_argument("--ingest-batch-mb", type=float, default=1.0, help="text per encode_batch call in the batched reference; the service's default ingest_batch_bytes is 1 MiB (default %(default)s)")
    add_service_args(p)
    args = p.parse_args()
    if "all" in args.packing:
        args.packing = list(PACKINGS)
    return args


def _timed(fn, repeats: int) -> list[float]:  # noqa: ANN001
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def _batches(texts: list[str], batch_bytes: int) -> list[list[str]]:
    """Split like the service does: a batch closes once its text reaches ``batch_bytes`` characters."""
    out, cur, size = [], [], 0
    for t in texts:
        cur.append(t)
        size += len(t)
        if size >= batch_bytes:
            out.append(cur)
            cur, size = [], 0
    if cur:
        out.append(cur)
    return out


def _row(label: str, times: list[float], tokens: int, nbytes: int, extra: str = "") -> tuple[str, float]:
    best, med = min(times), statistics.median(times)
    rate = tokens / best
    print(f"  {label:<46} best {best:7.3f}s  median {med:7.3f}s  {rate / 1e6:6.3f} M tokens/s  "
          f"{nbytes / best / 1e6:6.2f} MB/s{extra}", flush=True)  # fmt: skip
    return label, rate


def main() -> int:
    args = parse_args()
    header(
        "maskserve ingest throughput",
        [
            "service: NDJSON through client.Client.ingest into a `python -m service serve` subprocess",
            "         (tokenize + pack + chunk + stage in Redis + commit), wall time of the request",
            "bare:    Tokenizer.encode_batch(texts, add_special_tokens=False) in this process, same texts",
            "rates in text tokens/s (tokens the tokenizer yields for the documents); MB/s of UTF-8 text",
        ],
        {"target_mb": args.target_mb, "packing": " ".join(args.packing), "seq_len": args.seq_len,
         "vocab_size": args.vocab_size, "repeats": args.repeats,
         "redis": "embedded" if args.embedded else args.redis_url,
         "service_env": " ".join(args.service_env) or "-"},  # fmt: skip
    )
    from tokenizers import Tokenizer

    from client import Client
    from service.core.config import Settings
    from service.data.ingest import Pipeline
    from service.data.tokenization import prepare

    t0 = time.perf_counter()
    docs = stdlib_docs()
    corpus = repeat_to(docs, min_bytes=int(args.target_mb * 1e6))
    nbytes = text_bytes(corpus)
    copies = len(corpus) // len(docs)
    print(f"corpus: {len(docs)} stdlib docstrings ({text_bytes(docs) / 1e6:.2f} MB) x {copies} = "
          f"{len(corpus)} documents, {nbytes / 1e6:.2f} MB text ({time.perf_counter() - t0:.1f}s to collect)")  # fmt: skip
    ndjson_bytes = sum(len(json.dumps({"text": d}, ensure_ascii=False).encode()) + 1 for d in corpus)
    t0 = time.perf_counter()
    tok, tok_json = train_bpe(docs, args.vocab_size)
    print(f"tokenizer: byte-level BPE, vocab {tok.get_vocab_size()}, trained on one copy ({time.perf_counter() - t0:.2f}s)")
    text_tokens = sum(len(e.ids) for e in tok.encode_batch(corpus, add_special_tokens=False))  # also warms the cache
    print(f"text tokens: {text_tokens:,} ({nbytes / text_tokens:.2f} bytes of text per token); "
          f"NDJSON body {ndjson_bytes / 1e6:.2f} MB\n")  # fmt: skip

    os.environ.update({k: v for k, v in service_env(args).items() if k.startswith("MASKSERVE_")})
    settings = Settings()  # the in-process pipeline uses the service's settings (and --service-env)
    info = prepare(Tokenizer.from_str(json.dumps(tok_json)))
    groups = _batches(corpus, int(args.ingest_batch_mb * (1 << 20)))

    def bare_all() -> None:
        tok.encode_batch(corpus, add_special_tokens=False)

    def bare_batched() -> None:
        for g in groups:
            tok.encode_batch(g, add_special_tokens=False)

    def ndjson() -> None:
        for d in corpus:
            json.dumps({"text": d}, ensure_ascii=False).encode()

    def pipeline_fn(packing: str):  # noqa: ANN202
        def run() -> None:
            pl = Pipeline(info, packing, args.seq_len, settings.chunk_bytes, settings.chunk_max_sequences)
            for g in groups:
                pl.feed(g)
            pl.finish()

        return run

    # label -> callable; the service rows are added once it runs. Every repeat runs every row
    # once, in this order, so that load from elsewhere on the machine hits all rows alike.
    BARE = "bare encode_batch, all texts in one call"
    local = {
        BARE: bare_all,
        f"bare encode_batch, {len(groups)} calls of ~{args.ingest_batch_mb:g} MiB": bare_batched,
        "client-side NDJSON serialization (json.dumps)": ndjson,
    }
    for p in args.packing:
        try:  # the service's internals move; without them the bare-vs-service comparison still stands
            probe = Pipeline(info, p, args.seq_len, settings.chunk_bytes, settings.chunk_max_sequences)
            probe.feed(corpus[:3])
            probe.finish()
        except Exception as exc:  # noqa: BLE001
            print(f"(in-process Pipeline row skipped for packing={p}: {exc.__class__.__name__}: {exc})")
            continue
        local[f"service Pipeline in-process, packing={p}"] = pipeline_fn(p)
    times: dict[str, list[float]] = {label: [] for label in local}
    service_cpu: dict[str, list[tuple[float, float, float]]] = {}
    last: dict[str, dict] = {}

    with BenchRedis(args), start_service(args) as svc:
        print(f"service {svc.url} pid {svc.pid}, Redis {svc.redis_url} ({redis_version(svc.redis_url)})")
        r = redis_client(svc.redis_url)
        with Client(svc.url, timeout=600) as c:
            for packing in args.packing:
                name = f"bench-ingest-{packing}"
                c.delete_dataset(name, missing_ok=True)
                c.create_dataset(name, tokenizer=tok_json, seq_len=args.seq_len, packing=packing)
                c.ingest(name, docs[:20])  # loads the tokenizer into the service's cache
                times[f"service ingest, packing={packing}"] = []
                service_cpu[packing] = []
            for rep in range(args.repeats):
                print(f"  repeat {rep + 1}/{args.repeats} ...", flush=True)
                for label, fn in local.items():
                    times[label].append(_timed(fn, 1)[0])
                for packing in args.packing:
                    cpu0 = (time.process_time(), proc_cpu(svc.pid), redis_cpu(r))
                    t0 = time.perf_counter()
                    res = c.ingest(f"bench-ingest-{packing}", corpus)
                    times[f"service ingest, packing={packing}"].append(time.perf_counter() - t0)
                    cpu1 = (time.process_time(), proc_cpu(svc.pid), redis_cpu(r))
                    service_cpu[packing].append(tuple(b - a for a, b in zip(cpu0, cpu1)))
                    if res["documents"] != len(corpus):
                        print(f"  !! service counted {res['documents']} documents, sent {len(corpus)}")
                    last[packing] = res
            for packing in args.packing:
                c.delete_dataset(f"bench-ingest-{packing}")
        r.close()

    print("\nresults (text tokens/s and MB/s of text from the best run; every row ran once per repeat, interleaved):")
    bare = len(corpus) and text_tokens / min(times[BARE])
    rates: dict[str, float] = {}
    for label, ts in times.items():
        if label.startswith("service ingest"):
            packing = label.split("=", 1)[1]
            res = last[packing]
            cpu = [sum(x[i] for x in service_cpu[packing]) / len(service_cpu[packing]) for i in range(3)]
            extra = (f"\n      stored {res['tokens']:,} tokens in {res['sequences']:,} sequences, {res['bytes'] / 1e6:.1f} MB of chunks; "
                     f"CPU per run: client {cpu[0]:.2f}s, service {cpu[1]:.2f}s (all threads, "
                     f"{cpu[1] / statistics.fmean(ts):.2f} cores busy), Redis {cpu[2]:.2f}s")  # fmt: skip
        else:
            extra = ""
        rates[label] = _row(label, ts, text_tokens, nbytes, extra)[1]
    paired = {}
    for packing in args.packing:
        ratios = [b / s for b, s in zip(times[BARE], times[f"service ingest, packing={packing}"])]
        paired[packing] = statistics.median(ratios)
    print("\nsummary (best runs, text tokens/s):")
    for label, rate in rates.items():
        print(f"  {label:<46} {rate / 1e6:7.3f} M tokens/s   {rate / bare:5.2f}x bare encode_batch")
    for packing in args.packing:
        rate = rates[f"service ingest, packing={packing}"]
        print(f"ratio service/bare (packing={packing}): {rate / bare:.3f} best vs best, "
              f"{paired[packing]:.3f} median of the per-repeat ratios")  # fmt: skip
    if args.profile:
        print_profile(args.profile)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
