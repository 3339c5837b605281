"""Ingest throughput of the service vs. the bare ``tokenizers`` batch encode, by format and by parallel jobs.

The corpus is the Python stdlib's docstrings, repeated whole up to ``--target-mb``.
Every figure is measured side by side with its reference in the same run (rows
interleaved per repeat, so load from elsewhere on the machine hits all alike).
Sections (``--sections``, default all):

``packing``  The corpus as NDJSON through ``client.Client.ingest`` into a
             ``python -m service serve`` subprocess on a real Redis, one request per
             repeat, per packing mode; side by side, in this process,
             ``Tokenizer.encode_batch(texts, add_special_tokens=False)`` with the same
             tokenizer, and the service's own in-process pipeline (tokenize + pack +
             chunk, no HTTP, no Redis) to show where the time goes.
``formats``  One stream per format (one ``Client.ingest_file`` request): text NDJSON,
             a Parquet text column, a Parquet ids column (pre-tokenized), ``.jsonl.zst``;
             next to the bare encode of the same texts. The tokenizer runs on one
             thread on both sides (``--tokenizer-threads``: by default
             ``TOKENIZERS_PARALLELISM=false``, encode_batch on the calling thread), and
             with ``--pin`` (the default on 2+ CPUs) the service is pinned to one CPU
             and this process (the client, and the bare reference) to another.
            Targets: text formats >= 0.70 of bare, ids >= 5 M tokens/s per stream.
``jobs``     ``maskserve dataset ingest NAME FILES --jobs N`` as a subprocess, for each
             ``--jobs`` value, on the same ``--job-files`` files: tokens/s and speed-up
             (the service runs ``--workers`` uvicorn workers).
``rss``      Peak RSS of the service's processes while one request ingests a Parquet
             file of ``--rss-mb`` of text, vs. their RSS before and the file's size:
             the body is streamed, never held whole.

Rates are in *text tokens* (the tokenizer's output for the documents); the
service also stores one cls per sequence and, in ``complete``/``doc`` packing,
sep tokens, shown as "stored tokens". For pre-tokenized ids, the ids sent.

    .venv/bin/python bench/ingest.py                       # all sections, packing complete, 8 MB
    .venv/bin/python bench/ingest.py --sections formats --target-mb 4
    .venv/bin/python bench/ingest.py --sections jobs --jobs 1 4 8 16 --workers 8
    .venv/bin/python bench/ingest.py --packing complete doc none --sections packing
    .venv/bin/python bench/ingest.py --embedded --target-mb 4
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from _common import (
    add_service_args,
    BenchRedis,
    header,
    print_profile,
    proc_cpu,
    proc_name,
    proc_status,
    process_tree,
    redis_client,
    redis_cpu,
    redis_version,
    repeat_to,
    ROOT,
    service_env,
    set_affinity,
    start_service,
    stdlib_docs,
    text_bytes,
    train_bpe,
)

PACKINGS = ("complete", "doc", "none")
SECTIONS = ("packing", "formats", "jobs", "rss")
FORMATS = ("ndjson", "parquet-text", "parquet-ids", "jsonl-zst")
FORMAT_LABELS = {
    "ndjson": "text NDJSON (.jsonl)",
    "parquet-text": "Parquet, text column",
    "parquet-ids": "Parquet, ids column (pre-tokenized)",
    "jsonl-zst": "NDJSON, zstd (.jsonl.zst)",
}
TEXT_TARGET = 0.70  # service/bare, text formats
IDS_TARGET = 5e6  # tokens/s per stream, pre-tokenized ids


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS,
                   help="what to measure (default: all of %(choices)s)")
    p.add_argument("--target-mb", type=float, default=8.0, help="corpus size: stdlib docstrings repeated to this many MB of text (default %(default)s)")
    p.add_argument("--packing", nargs="+", default=["complete"], choices=[*PACKINGS, "all"], help="packing mode(s) of the packing section; the other sections use the first (default complete)")
    p.add_argument("--seq-len", type=int, default=512, help="dataset sequence length L (default %(default)s)")
    p.add_argument("--vocab-size", type=int, default=8000, help="BPE vocabulary size (default %(default)s)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs of each measurement; best and median are shown (default %(default)s)")
    p.add_argument("--ingest-batch-mb", type=float, default=1.0, help="text per encode_batch call in the batched reference; the service's default ingest_batch_bytes is 1 MiB (default %(default)s)")
    p.add_argument("--tokenizer-threads", default="serial", metavar="serial|N|all",
                   help="the tokenizer's threads in this process (the bare reference) and the services: serial "
                        "(TOKENIZERS_PARALLELISM=false: encode_batch works on the calling thread, so one stream is "
                        "one thread and concurrent streams tokenize in parallel), N (RAYON_NUM_THREADS=N: one pool "
                        "of N threads per process, shared by its streams) or all (the library's default: a pool "
                        "of all cores) (default %(default)s)")
    g = p.add_argument_group("formats section")
    g.add_argument("--formats", nargs="+", default=list(FORMATS), choices=FORMATS,
                   help="formats to measure (default all)")
    g.add_argument("--ids-min-tokens", type=float, default=10e6,
                   help="the ids file repeats the corpus's token ids up to this many tokens (default %(default).0f)")
    g.add_argument("--pin", action=argparse.BooleanOptionalAction, default=True,
                   help="pin the service to one CPU and this process to another (needs 2 usable CPUs; default on)")
    g = p.add_argument_group("jobs section")
    g.add_argument("--jobs", nargs="+", type=int, default=[1, 2], metavar="N",
                   help="`maskserve dataset ingest --jobs N` values to run, e.g. 1 4 8 16 (default 1 2)")
    g.add_argument("--job-files", type=int, default=8, help="files the corpus is split into (default %(default)s)")
    g.add_argument("--job-format", default="parquet", choices=["parquet", "ndjson"],
                   help="their format (default %(default)s)")
    g.add_argument("--jobs-mb", type=float, default=None,
                   help="MB of text in all the files together (default: --target-mb)")
    g.add_argument("--workers", type=int, default=1,
                   help="uvicorn worker processes of the jobs section's service (MASKSERVE_WORKERS; "
                        "default %(default)s)")
    g = p.add_argument_group("rss section")
    g.add_argument("--rss-mb", type=float, default=64.0,
                   help="MB of text in the Parquet file ingested in one request (default %(default)s)")
    add_service_args(p)
    args = p.parse_args()
    if "all" in args.packing:
        args.packing = list(PACKINGS)
    if any(n < 1 for n in args.jobs):
        p.error("--jobs values must be positive")
    args.jobs_mb = args.jobs_mb or args.target_mb
    return args


@dataclass
class Corpus:
    """The texts every section sends, their tokens, and the tokenizer."""

    docs: list[str]  # one copy of the stdlib docstrings
    texts: list[str]  # the corpus: ``docs`` repeated whole
    nbytes: int  # UTF-8 bytes of ``texts``
    ids: list[list[int]]  # each text's token ids
    tokens: int
    tok: Any  # tokenizers.Tokenizer
    tok_json: dict

    def copy_tokens(self) -> int:
        """Text tokens of one copy of ``docs``."""
        return sum(len(i) for i in self.ids[: len(self.docs)])


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


def load_corpus(args: argparse.Namespace) -> Corpus:
    t0 = time.perf_counter()
    docs = stdlib_docs()
    texts = repeat_to(docs, min_bytes=int(args.target_mb * 1e6))
    nbytes = text_bytes(texts)
    print(f"corpus: {len(docs)} stdlib docstrings ({text_bytes(docs) / 1e6:.2f} MB) x {len(texts) // len(docs)} = "
          f"{len(texts)} documents, {nbytes / 1e6:.2f} MB text ({time.perf_counter() - t0:.1f}s to collect)")  # fmt: skip
    t0 = time.perf_counter()
    tok, tok_json = train_bpe(docs, args.vocab_size)
    print(f"tokenizer: byte-level BPE, vocab {tok.get_vocab_size()}, trained on one copy ({time.perf_counter() - t0:.2f}s)")
    ids = [e.ids for e in tok.encode_batch(texts, add_special_tokens=False)]  # also warms the cache
    tokens = sum(map(len, ids))
    print(f"text tokens: {tokens:,} ({nbytes / tokens:.2f} bytes of text per token)\n")
    return Corpus(docs, texts, nbytes, ids, tokens, tok, tok_json)


def tokenizer_threads(mode: str | None) -> str:
    """Set the tokenizer's threading for this process and the services it starts (they inherit the environment;
    before the tokenizer's pool starts: it reads this once), and say what it is (``mode`` None: only say)."""
    if mode == "serial":
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    elif mode is not None and mode != "all":
        if not mode.isdigit() or int(mode) < 1:
            raise SystemExit(f"--tokenizer-threads: serial, a positive number or all, not {mode!r}")
        os.environ["RAYON_NUM_THREADS"] = mode
    if os.environ.get("TOKENIZERS_PARALLELISM", "").lower() in ("false", "0", "off", "no"):
        return "TOKENIZERS_PARALLELISM=false (encode_batch on the calling thread: 1 per stream)"
    if os.environ.get("RAYON_NUM_THREADS"):
        return f"RAYON_NUM_THREADS={os.environ['RAYON_NUM_THREADS']} (one pool per process, shared by its streams)"
    return "the library's default (a pool of all cores per process)"


def main() -> int:
    args = parse_args()
    threads = tokenizer_threads(args.tokenizer_threads)
    header(
        "maskserve ingest throughput",
        [
            "service: a `python -m service serve` subprocess (tokenize + pack + chunk + stage in Redis + commit),",
            "         wall time of the request(s) as the client sees it",
            "bare:    Tokenizer.encode_batch(texts, add_special_tokens=False) in this process, same texts",
            f"tokenizer threads: {threads}, in this process and in the services",
            "rates in text tokens/s (tokens the tokenizer yields for the documents); MB/s of UTF-8 text",
        ],
        {"sections": " ".join(args.sections), "target_mb": args.target_mb, "packing": " ".join(args.packing),
         "seq_len": args.seq_len, "vocab_size": args.vocab_size, "repeats": args.repeats,
         "redis": "embedded" if args.embedded else args.redis_url,
         "service_env": " ".join(args.service_env) or "-"},  # fmt: skip
    )
    os.environ.update({k: v for k, v in service_env(args).items() if k.startswith("MASKSERVE_")})
    corpus = load_corpus(args)
    tmp = Path(tempfile.mkdtemp(prefix="maskserve-bench-ingest-"))
    try:
        for section in SECTIONS:
            if section in args.sections:
                print(f"\n==== {section} ====", flush=True)
                globals()[f"{section}_section"](args, corpus, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if args.profile:
        print_profile(args.profile)
    return 0


# ---- packing: NDJSON per packing mode, with the in-process pipeline ------------------------


def packing_section(args: argparse.Namespace, cp: Corpus, tmp: Path) -> None:  # noqa: ARG001
    from tokenizers import Tokenizer

    from service.core.config import Settings
    from service.data.ingest import Pipeline
    from service.data.tokenization import prepare

    corpus, tok = cp.texts, cp.tok
    ndjson_bytes = sum(len(json.dumps({"text": d}, ensure_ascii=False).encode()) + 1 for d in corpus)
    print(f"NDJSON body {ndjson_bytes / 1e6:.2f} MB")
    settings = Settings()  # the in-process pipeline uses the service's settings (and --service-env)
    info = prepare(Tokenizer.from_str(json.dumps(cp.tok_json)))
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
    times, service_cpu, last = _packing_runs(args, cp, local)
    _packing_report(args, cp, times, service_cpu, last)


BARE = "bare encode_batch, all texts in one call"


def _packing_runs(args: argparse.Namespace, cp: Corpus, local: dict[str, Any]) -> tuple[dict, dict, dict]:
    from client import Client

    corpus = cp.texts
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
                c.create_dataset(name, tokenizer=cp.tok_json, seq_len=args.seq_len, packing=packing)
                c.ingest(name, cp.docs[:20])  # loads the tokenizer into the service's cache
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
    return times, service_cpu, last


def _packing_report(args: argparse.Namespace, cp: Corpus, times: dict, service_cpu: dict, last: dict) -> None:
    print("\nresults (text tokens/s and MB/s of text from the best run; every row ran once per repeat, interleaved):")
    bare = cp.tokens / min(times[BARE])
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
        rates[label] = _row(label, ts, cp.tokens, cp.nbytes, extra)[1]
    print("\nsummary (best runs, text tokens/s):")
    for label, rate in rates.items():
        print(f"  {label:<46} {rate / 1e6:7.3f} M tokens/s   {rate / bare:5.2f}x bare encode_batch")
    for packing in args.packing:
        rate = rates[f"service ingest, packing={packing}"]
        paired = statistics.median(b / s for b, s in zip(times[BARE], times[f"service ingest, packing={packing}"]))
        print(f"ratio service/bare (packing={packing}): {rate / bare:.3f} best vs best, "
              f"{paired:.3f} median of the per-repeat ratios")  # fmt: skip


# ---- the service's processes: CPU, threads, memory, pinning ----------------------------------


def service_pids(pid: int) -> list[int]:
    """The service's Python processes (a ``--workers`` manager and its workers), not an embedded Redis."""
    return [p for p in process_tree(pid) if not re.search(r"redis|valkey", proc_name(p))]


def tree_cpu(pids: list[int]) -> float:
    return sum(proc_cpu(p) for p in pids)


class Sampler(threading.Thread):
    """Polls the RSS and thread count of some processes while a request runs (peak and first values)."""

    def __init__(self, pids: list[int], interval: float = 0.02) -> None:
        super().__init__(daemon=True)
        self.pids, self.interval = pids, interval
        self.first_rss = self.peak_rss = self.peak_threads = 0
        self._halt = threading.Event()

    def rss(self) -> int:
        return sum(proc_status(p, "VmRSS") for p in self.pids) * 1024

    def sample(self) -> None:
        rss = self.rss()
        self.first_rss = self.first_rss or rss
        self.peak_rss = max(self.peak_rss, rss)
        self.peak_threads = max(self.peak_threads, sum(proc_status(p, "Threads") for p in self.pids))

    def run(self) -> None:
        while not self._halt.wait(self.interval):
            self.sample()

    def __enter__(self) -> "Sampler":
        self.sample()
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._halt.set()
        self.join()
        self.sample()


class Pinning:
    """The service on one CPU, this process (client and bare reference) on another; undone on exit."""

    def __init__(self, enabled: bool) -> None:
        cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
        self.saved = set(cpus)
        self.enabled = enabled and len(cpus) >= 2
        self.mine, self.service = ({cpus[0]}, {cpus[-1]}) if self.enabled else (self.saved, self.saved)

    def describe(self) -> str:
        if not self.enabled:
            return "not pinned (--no-pin, or fewer than 2 usable CPUs)"
        return (f"service pinned to CPU {min(self.service)}, "
                f"this process (client + bare reference) to CPU {min(self.mine)}")

    def apply(self, pids: list[int]) -> None:
        if self.enabled:
            set_affinity(os.getpid(), self.mine)
            for p in pids:
                set_affinity(p, self.service)

    def undo(self) -> None:
        if self.enabled:
            set_affinity(os.getpid(), self.saved)


# ---- formats: one stream per format, next to the bare encode ----------------------------------


@dataclass
class Upload:
    """A file of the corpus in one format, and what ingesting it should give."""

    fmt: str
    path: Path
    kwargs: dict[str, str]  # ingest_file's column options
    documents: int
    tokens: int
    text_bytes: int  # 0 for ids

    @property
    def size(self) -> int:
        return self.path.stat().st_size


def _ndjson_bytes(texts: list[str]) -> bytes:
    return "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts).encode()


def _write_parquet_text(texts: list[str], path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": pa.array(texts, pa.string())}), path)


def _write_parquet_ids(ids: list[list[int]], min_tokens: int, path: Path) -> tuple[int, int]:
    """The corpus's ids (int32 lists), repeated whole up to ``min_tokens``; returns (rows, tokens)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    lengths = np.fromiter(map(len, ids), np.int64, len(ids))
    flat = np.fromiter((i for row in ids for i in row), np.int32, int(lengths.sum()))
    copies = max(1, math.ceil(min_tokens / max(1, len(flat))))
    values, lengths = np.tile(flat, copies), np.tile(lengths, copies)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    assert offsets[-1] < 1 << 31, "--ids-min-tokens too large for int32 list offsets"
    col = pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(values))
    pq.write_table(pa.table({"ids": col}), path)
    return len(lengths), len(values)


_FILE_NAMES = {"ndjson": "corpus.jsonl", "jsonl-zst": "corpus.jsonl.zst", "parquet-text": "corpus.parquet",
               "parquet-ids": "ids.parquet"}  # fmt: skip


def _write_format(fmt: str, texts: list[str], ids: list[list[int]], path: Path, min_tokens: int = 0) -> tuple[int, int]:
    """``texts`` (or, for ids, their ``ids`` repeated up to ``min_tokens``) as a file; returns (documents, tokens)."""
    if fmt == "parquet-ids":
        return _write_parquet_ids(ids, min_tokens, path)
    if fmt == "ndjson":
        path.write_bytes(_ndjson_bytes(texts))
    elif fmt == "jsonl-zst":
        import zstandard

        path.write_bytes(zstandard.ZstdCompressor(level=3).compress(_ndjson_bytes(texts)))
    else:
        _write_parquet_text(texts, path)
    return len(texts), sum(map(len, ids))


def write_uploads(args: argparse.Namespace, cp: Corpus, tmp: Path) -> tuple[dict[str, Upload], dict[str, Upload]]:
    """Each format's file, and a small one of the same format to warm the service's path up with."""
    out, warm = {}, {}
    for fmt in args.formats:
        kwargs = {"parquet-ids": {"ids_column": "ids"}, "parquet-text": {"text_column": "text"}}.get(fmt, {})
        nbytes = 0 if fmt == "parquet-ids" else cp.nbytes
        path = tmp / _FILE_NAMES[fmt]
        docs, tokens = _write_format(fmt, cp.texts, cp.ids, path, int(args.ids_min_tokens))
        out[fmt] = Upload(fmt, path, kwargs, docs, tokens, nbytes)
        path = tmp / f"warm-{_FILE_NAMES[fmt]}"
        docs, tokens = _write_format(fmt, cp.texts[:20], cp.ids[:20], path)
        warm[fmt] = Upload(fmt, path, kwargs, docs, tokens, nbytes)
    for u in out.values():
        print(f"  {FORMAT_LABELS[u.fmt]:<40} {u.path.name:<18} {u.size / 1e6:8.2f} MB, {u.documents:,} documents, "
              f"{u.tokens:,} tokens")  # fmt: skip
    return out, warm


def zst_unavailable(c, cp: Corpus, tmp: Path, seq_len: int) -> str | None:  # noqa: ANN001
    """Why ``.jsonl.zst`` cannot be ingested here (None when it can): a 3-document file must give 3 documents."""
    import zstandard

    path = tmp / "probe.jsonl.zst"
    path.write_bytes(zstandard.ZstdCompressor().compress(_ndjson_bytes(cp.docs[:3])))
    name = "bench-zst-probe"
    c.delete_dataset(name, missing_ok=True)
    c.create_dataset(name, tokenizer=cp.tok_json, seq_len=seq_len)
    try:
        res = c.ingest_file(name, path)
    except Exception as exc:  # noqa: BLE001 - whatever the client or service says is the reason
        return f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ''}"
    finally:
        c.delete_dataset(name, missing_ok=True)
    if res.get("documents") != 3:
        return f"a 3-document .jsonl.zst was stored as {res.get('documents')} document(s) (read as plain text?)"
    return None


def formats_section(args: argparse.Namespace, cp: Corpus, tmp: Path) -> None:
    print("files (one request each, Client.ingest_file):")
    uploads, warm = write_uploads(args, cp, tmp)
    pin = Pinning(args.pin)
    runs: dict[str, list[dict[str, float]]] = {fmt: [] for fmt in uploads}
    bare: list[dict[str, float]] = []
    with BenchRedis(args), start_service(args) as svc:
        try:
            skipped = _formats_runs(args, cp, tmp, svc, uploads, warm, pin, runs, bare)
        finally:
            pin.undo()
    _formats_report(cp, uploads, runs, bare, skipped, pin)


def _formats_runs(args: argparse.Namespace, cp: Corpus, tmp: Path, svc, uploads: dict[str, Upload],  # noqa: ANN001
                  warm: dict[str, Upload], pin: Pinning, runs: dict,
                  bare: list[dict[str, float]]) -> dict[str, str]:  # fmt: skip
    from client import Client

    pids = service_pids(svc.pid)
    print(f"service {svc.url} pid {svc.pid} (1 uvicorn worker), Redis {svc.redis_url} ({redis_version(svc.redis_url)})")
    r = redis_client(svc.redis_url)
    skipped: dict[str, str] = {}
    with Client(svc.url, timeout=600) as c:
        if "jsonl-zst" in uploads and (why := zst_unavailable(c, cp, tmp, args.seq_len)):
            skipped["jsonl-zst"] = why
        for fmt in uploads:
            c.delete_dataset(f"bench-fmt-{fmt}", missing_ok=True)
            c.create_dataset(f"bench-fmt-{fmt}", tokenizer=cp.tok_json, seq_len=args.seq_len, packing=args.packing[0])
            if fmt not in skipped:  # the tokenizer loaded, and the format's path (e.g. pyarrow's pools) warm
                c.ingest_file(f"bench-fmt-{fmt}", warm[fmt].path, **warm[fmt].kwargs)
        for rep in range(args.repeats):
            print(f"  repeat {rep + 1}/{args.repeats} ...", flush=True)
            pin.apply(pids)
            cpu0 = time.process_time()
            dt = _timed(lambda: cp.tok.encode_batch(cp.texts, add_special_tokens=False), 1)[0]
            bare.append({"s": dt, "cpu": time.process_time() - cpu0})
            for fmt, u in uploads.items():
                if fmt in skipped:
                    continue
                pin.apply(pids)
                cpu0, rcpu0 = tree_cpu(pids), redis_cpu(r)
                with Sampler(pids, 0.05) as smp:
                    t0 = time.perf_counter()
                    res = c.ingest_file(f"bench-fmt-{fmt}", u.path, **u.kwargs)
                    dt = time.perf_counter() - t0
                if res["documents"] != u.documents:
                    print(f"  !! {fmt}: service counted {res['documents']} documents, sent {u.documents}")
                runs[fmt].append({"s": dt, "cpu": tree_cpu(pids) - cpu0, "redis": redis_cpu(r) - rcpu0,
                                  "threads": smp.peak_threads, "stored": res["tokens"]})  # fmt: skip
        for fmt in uploads:
            c.delete_dataset(f"bench-fmt-{fmt}", missing_ok=True)
    r.close()
    return skipped


def _verdict(ok: bool) -> str:
    return "MET" if ok else "MISSED"


def _formats_report(cp: Corpus, uploads: dict[str, Upload], runs: dict, bare_runs: list[dict[str, float]],
                    skipped: dict[str, str], pin: Pinning) -> None:  # fmt: skip
    threads = tokenizer_threads(None)
    print(f"\nresults, one stream per format ({pin.describe()}; tokenizer: {threads} on both sides):")
    bare = [x["s"] for x in bare_runs]
    bare_rate, bare_cpu = cp.tokens / min(bare), statistics.fmean(x["cpu"] for x in bare_runs)
    print(f"  {'bare encode_batch, all texts in one call':<44} best {min(bare):7.3f}s  "
          f"median {statistics.median(bare):7.3f}s  "
          f"{bare_rate / 1e6:6.3f} M tokens/s  {cp.nbytes / min(bare) / 1e6:6.2f} MB/s of text")  # fmt: skip
    print(f"      CPU per run {bare_cpu:.2f}s ({cp.tokens / bare_cpu / 1e6:.3f} M tokens per CPU-second)")
    verdicts = []
    for fmt, u in uploads.items():
        label = f"service, {FORMAT_LABELS[fmt]}"
        if fmt in skipped:
            print(f"  {label:<44} not available: {skipped[fmt]}")
            verdicts.append(f"{fmt}: not available")
            continue
        ts = [x["s"] for x in runs[fmt]]
        best = min(ts)
        rate = u.tokens / best
        cpu = statistics.fmean(x["cpu"] for x in runs[fmt])
        print(f"  {label:<44} best {best:7.3f}s  median {statistics.median(ts):7.3f}s  {rate / 1e6:6.3f} M tokens/s  "
              f"{u.size / best / 1e6:6.2f} MB/s of file")  # fmt: skip
        print(f"      service CPU per run {cpu:.2f}s ({u.tokens / cpu / 1e6:.3f} M tokens per CPU-second, "
              f"{cpu / statistics.fmean(ts):.2f} cores busy), up to {max(x['threads'] for x in runs[fmt])} threads; "
              f"Redis CPU {statistics.fmean(x['redis'] for x in runs[fmt]):.2f}s; "
              f"stored {runs[fmt][-1]['stored']:,} tokens per run")  # fmt: skip
        if u.text_bytes:
            paired = statistics.median(b / s for b, s in zip(bare, ts))
            ratio = rate / bare_rate
            print(f"      ratio service/bare {ratio:.3f} best vs best, {paired:.3f} median of per-repeat ratios, "
                  f"{bare_cpu / cpu:.3f} by CPU time (target >= {TEXT_TARGET:.2f}: {_verdict(ratio >= TEXT_TARGET)})")
            verdicts.append(f"{fmt} {ratio:.2f}x bare: {_verdict(ratio >= TEXT_TARGET)}")
        else:
            print(f"      target >= {IDS_TARGET / 1e6:g} M tokens/s per stream: {_verdict(rate >= IDS_TARGET)}")
            verdicts.append(f"{fmt} {rate / 1e6:.2f} M tokens/s: {_verdict(rate >= IDS_TARGET)}")
    print("targets (wall time, best runs): " + "; ".join(verdicts))


# ---- jobs: the CLI's parallel upload -----------------------------------------------------------


def write_job_files(args: argparse.Namespace, cp: Corpus, tmp: Path) -> tuple[list[Path], int, int, int]:
    """The corpus (to ``--jobs-mb``) split into ``--job-files`` files; returns (files, documents, tokens, bytes)."""
    texts = repeat_to(cp.docs, min_bytes=int(args.jobs_mb * 1e6))
    tokens = cp.copy_tokens() * (len(texts) // len(cp.docs))
    per = math.ceil(len(texts) / args.job_files)
    files = []
    for k in range(args.job_files):
        part = texts[k * per : (k + 1) * per]
        if args.job_format == "parquet":
            path = tmp / f"part-{k:03d}.parquet"
            _write_parquet_text(part, path)
        else:
            path = tmp / f"part-{k:03d}.jsonl"
            path.write_bytes(_ndjson_bytes(part))
        files.append(path)
    return files, len(texts), tokens, text_bytes(texts)


def _cli_ingest(url: str, name: str, files: list[Path], jobs: int) -> tuple[float, float, float, str]:
    """``maskserve dataset ingest`` in a subprocess: (wall s, its own reported s, its CPU s, its last line)."""
    env = dict(os.environ, MASKSERVE_URL=url)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "maskserve", "dataset", "ingest", name, *map(str, files),
                           "--jobs", str(jobs)], env=env, cwd=str(ROOT), capture_output=True, text=True)  # fmt: skip
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode:
        raise RuntimeError(f"maskserve dataset ingest --jobs {jobs} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    last = proc.stdout.strip().splitlines()[-1]
    m = re.search(r"tokens in ([0-9.]+)s", last)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return wall, float(m.group(1)) if m else float("nan"), cpu, last


def jobs_section(args: argparse.Namespace, cp: Corpus, tmp: Path) -> None:
    from client import Client

    (tmp / "jobs").mkdir(exist_ok=True)
    files, documents, tokens, nbytes = write_job_files(args, cp, tmp / "jobs")
    size = sum(f.stat().st_size for f in files)
    print(f"{len(files)} {args.job_format} files, {size / 1e6:.2f} MB: {documents:,} documents, "
          f"{tokens:,} text tokens, "
          f"{nbytes / 1e6:.2f} MB of text")  # fmt: skip
    env = {**service_env(args), "MASKSERVE_WORKERS": str(args.workers)}
    runs: dict[int, list[dict[str, float]]] = {n: [] for n in args.jobs}
    with BenchRedis(args), start_service(args, env) as svc, Client(svc.url, timeout=600) as c:
        print(f"service {svc.url} pid {svc.pid} ({args.workers} uvicorn worker(s)), Redis {svc.redis_url}; not pinned")
        c.create_dataset("bench-jobs-warm", tokenizer=cp.tok_json, seq_len=args.seq_len, packing=args.packing[0])
        warm = tmp / ("warm.parquet" if args.job_format == "parquet" else "warm.jsonl")
        _write_format("parquet-text" if args.job_format == "parquet" else "ndjson", cp.docs[:20], [], warm)
        c.ingest_file("bench-jobs-warm", warm, **({"text_column": "text"} if args.job_format == "parquet" else {}))
        c.delete_dataset("bench-jobs-warm")
        for rep in range(args.repeats):
            print(f"  repeat {rep + 1}/{args.repeats} ...", flush=True)
            for n in args.jobs:
                name = f"bench-jobs-j{n}-r{rep}"
                c.create_dataset(name, tokenizer=cp.tok_json, seq_len=args.seq_len, packing=args.packing[0])
                pids = service_pids(svc.pid)
                cpu0 = tree_cpu(pids)
                with Sampler(pids, 0.05) as smp:
                    wall, own, cli_cpu, last = _cli_ingest(svc.url, name, files, n)
                cpu = tree_cpu(service_pids(svc.pid)) - cpu0
                runs[n].append({"s": wall, "own": own, "cli_cpu": cli_cpu, "cpu": cpu,
                                "threads": smp.peak_threads})  # fmt: skip
                if f"{documents:,} documents" not in last:
                    print(f"  !! --jobs {n}: {last!r}, expected {documents:,} documents")
                c.delete_dataset(name)
    _jobs_report(args, runs, tokens)


def _jobs_report(args: argparse.Namespace, runs: dict[int, list[dict[str, float]]], tokens: int) -> None:
    print(f"\nresults, `maskserve dataset ingest --jobs N` ({os.cpu_count()} CPUs here; text tokens/s from the best "
          "run; wall: the subprocess, start-up included; own: the time the command prints):")  # fmt: skip
    base = None
    for n, rs in runs.items():
        best = min(rs, key=lambda x: x["s"])
        rate = tokens / best["s"]
        base = base or rate
        k = len(rs)
        print(f"  --jobs {n:<3} wall best {best['s']:7.3f}s median {statistics.median(x['s'] for x in rs):7.3f}s "
              f"(own {best['own']:.1f}s)  {rate / 1e6:6.3f} M tokens/s  "
              f"speed-up {rate / base:5.2f}x vs --jobs {args.jobs[0]}")  # fmt: skip
        print(f"      CPU per run: CLI {sum(x['cli_cpu'] for x in rs) / k:.2f}s, "
              f"service {sum(x['cpu'] for x in rs) / k:.2f}s "
              f"({sum(x['cpu'] / x['s'] for x in rs) / k:.2f} cores busy), "
              f"up to {max(x['threads'] for x in rs)} threads")  # fmt: skip


# ---- rss: a Parquet file larger than memory should ever need, in one request ---------------------


def _rss_file(cp: Corpus, mb: float, path: Path) -> tuple[int, int, int]:
    """A Parquet text file of ``mb`` MB of text; returns (file bytes, text bytes, text tokens)."""
    texts = repeat_to(cp.docs, min_bytes=int(mb * 1e6))
    _write_parquet_text(texts, path)
    return path.stat().st_size, text_bytes(texts), cp.copy_tokens() * (len(texts) // len(cp.docs))


def rss_section(args: argparse.Namespace, cp: Corpus, tmp: Path) -> None:
    """One service, warmed up; then a file of ``--rss-mb / 8`` and one of ``--rss-mb`` of text, each in one
    request: if the body were held (or its documents piled up), the peak would grow with the file."""
    from client import Client

    files = {mb: (tmp / f"rss-{mb:g}.parquet", *_rss_file(cp, mb, tmp / f"rss-{mb:g}.parquet"))
             for mb in (args.rss_mb / 8, args.rss_mb)}  # fmt: skip
    with BenchRedis(args), start_service(args, service_env(args)) as svc, Client(svc.url, timeout=3600) as c:
        print(f"service {svc.url} pid {svc.pid} (1 uvicorn worker, default limits), Redis {svc.redis_url}")
        name = "bench-rss"
        c.create_dataset(name, tokenizer=cp.tok_json, seq_len=args.seq_len, packing=args.packing[0])
        warm = tmp / "warm-rss.parquet"
        _write_parquet_text(cp.docs[:20], warm)
        c.ingest_file(name, warm, text_column="text")  # the tokenizer loaded, pyarrow's pools up: a warm "before"
        pids = service_pids(svc.pid)
        others = [p for p in process_tree(svc.pid) if p not in pids]
        before = Sampler(pids).rss()
        apart = f"; the embedded Redis apart: {Sampler(others).rss() / (1 << 20):.1f} MiB" if others else ""
        print(f"service RSS (its {len(pids)} Python process(es), sampled every 20 ms) before: "
              f"{before / (1 << 20):.1f} MiB{apart}")
        for path, size, nbytes, tokens in files.values():
            with Sampler(pids, 0.02) as smp:
                t0 = time.perf_counter()
                res = c.ingest_file(name, path, text_column="text")
                dt = time.perf_counter() - t0
            _rss_row(path, size, nbytes, tokens, res, dt, before, smp, Sampler(others).rss() if others else 0)
        c.delete_dataset(name)


def _rss_row(path: Path, size: int, nbytes: int, tokens: int, res: dict, dt: float, before: int, smp: Sampler,
             redis_rss: int) -> None:  # fmt: skip
    mb = 1 << 20
    grow = smp.peak_rss - before
    print(f"  {path.name}: file {size / mb:.1f} MiB, text {nbytes / mb:.1f} MiB; {res['documents']:,} documents, "
          f"{tokens:,} text tokens in {dt:.1f}s ({tokens / dt / 1e6:.3f} M text tokens/s)")  # fmt: skip
    print(f"      peak RSS {smp.peak_rss / mb:.1f} MiB: +{grow / mb:.1f} MiB over before "
          f"({grow / size:.2f}x the file, {grow / nbytes:.2f}x its text); after {smp.rss() / mb:.1f} MiB"
          + (f"; embedded Redis (the stored chunks) {redis_rss / mb:.1f} MiB" if redis_rss else ""))


if __name__ == "__main__":
    raise SystemExit(main())
