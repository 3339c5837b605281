"""Redis bytes per stored token, for several sequence lengths and packing modes.

For each (L, packing) a fresh dataset is created in a ``python -m service serve``
subprocess and the stdlib docstrings (repeated to at least ``--min-tokens``
tokens) are ingested through the client. Then, straight from Redis:

* the sum of ``MEMORY USAGE key SAMPLES 0`` over every key of the dataset (its own
  slot's ``ms:ds:{name}:*`` and its chunk blobs ``ms:c:{<group>}:<uid>:<id>`` in the
  chunk groups' slots; service/store/keys.py has the layout), split into chunk keys and the rest,
* the ``INFO memory`` ``used_memory`` delta from before the dataset was created
  to after the ingest,

each divided by the dataset's stored tokens (``num_tokens``, cls/sep included)
and compared with the raw id width (2 bytes for uint16 ids, 4 for uint32).
The target is at most 1.25x the raw id bytes.

    .venv/bin/python bench/storage.py
    .venv/bin/python bench/storage.py --seq-len 128 512 2048 --packing complete doc none
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np

from _common import (
    KEY_PREFIX,
    add_service_args,
    BenchRedis,
    header,
    print_profile,
    redis_client,
    redis_version,
    repeat_to,
    start_service,
    stdlib_docs,
    train_bpe,
)

TARGET = 1.25


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq-len", type=int, nargs="+", default=[128, 512], help="sequence lengths L (default 128 512)")
    p.add_argument("--packing", nargs="+", default=["complete", "doc"], choices=["complete", "doc", "none"], help="packing modes (default complete doc)")
    p.add_argument("--min-tokens", type=int, default=1_000_000, help="ingest at least this many text tokens (default %(default)s)")
    p.add_argument("--requests", type=int, default=1, help="split the corpus into this many ingest requests (default %(default)s)")
    p.add_argument("--vocab-size", type=int, default=8000, help="BPE vocabulary size; > 65536 gives uint32 ids (default %(default)s)")
    add_service_args(p)
    return p.parse_args()


def _used_memory(r) -> int:  # noqa: ANN001
    return int(r.info("memory")["used_memory"])


def _settle(r, timeout: float = 10.0) -> tuple[int, int]:  # noqa: ANN001
    """Wait for used_memory to settle; returns (first reading, settled reading).

    UNLINKed values are freed by a background thread, and right after a large
    ingest used_memory is transiently higher (the server trims client buffers
    from its cron); so poll until lazyfree is done and two readings 1 s apart agree.
    """
    deadline = time.monotonic() + timeout
    first = _used_memory(r)
    last = None
    while time.monotonic() < deadline:
        info = r.info("memory")
        now = int(info["used_memory"])
        if int(info.get("lazyfree_pending_objects", 0)) == 0 and now == last:
            return first, now
        last = now
        time.sleep(1.0)
    return first, _used_memory(r)


def _key_usage(r, name: str) -> tuple[dict[str, tuple[int, int]], list[tuple[int, int]]]:  # noqa: ANN001
    """({category: (keys, MEMORY USAGE bytes)}, [(STRLEN, MEMORY USAGE) per chunk blob]) of one dataset.

    The dataset's keys are those of its own slot, ``ms:ds:{name}:*``, and its chunk blobs, which live in
    the chunk groups' slots (``ms:c:{<tag>}:<uid>:<chunk id>``, see service/store/keys.py): the committed ones
    are named by the dataset's chunk table (``:chunk_ids``); a SCAN for the uid finds any others (staged
    chunks an ingest left behind).
    """
    from service.store.keys import Keys

    keys_of = Keys(KEY_PREFIX)
    meta = {k.decode(): v.decode() for k, v in r.hgetall(keys_of.ds(name, "meta")).items()}
    uid, groups = meta["uid"], int(meta["chunk_groups"])
    committed = {keys_of.chunk(uid, groups, int(i)).encode()
                 for i in np.frombuffer(r.get(keys_of.ds(name, "chunk_ids")) or b"", dtype="<u8")}  # fmt: skip
    own = list(r.scan_iter(match=f"{KEY_PREFIX}:ds:{{{name}}}:*", count=1000))
    chunks = set(r.scan_iter(match=f"{KEY_PREFIX}:c:*:{uid}:*", count=1000)) | committed
    keys = own + sorted(chunks)
    pipe = r.pipeline(transaction=False)
    for k in keys:
        pipe.memory_usage(k, samples=0)
        pipe.strlen(k) if k in chunks else pipe.type(k)
    replies = pipe.execute()
    out: dict[str, list[int]] = {}
    blobs: list[tuple[int, int]] = []
    own_prefix = keys_of.ds(name, "").encode()
    for k, usage, extra in zip(keys, replies[0::2], replies[1::2]):
        if k in committed:
            cat = "chunk blobs"
            blobs.append((int(extra), int(usage or 0)))
        elif k in chunks:
            cat = "chunk masks" if b":sm:" in k else "staged chunks (left over)"
        else:
            part = k[len(own_prefix):].decode()
            cat = {"chunks": "chunk table", "chunk_ids": "chunk table"}.get(part, part)
        acc = out.setdefault(cat, [0, 0])
        acc[0] += 1
        acc[1] += int(usage or 0)
    return {k: (v[0], v[1]) for k, v in out.items()}, sorted(blobs, reverse=True)


def main() -> int:
    args = parse_args()
    header(
        "maskserve storage: Redis bytes per stored token",
        [
            "MEMORY USAGE (SAMPLES 0) summed over ms:ds:{name}:* and the chunk keys ms:c:*:<uid>:*,",
            "and INFO used_memory delta,",
            "divided by the dataset's stored tokens (num_tokens, cls/sep included);",
            f"compared with the raw id bytes/token (2 for uint16, 4 for uint32); target <= {TARGET}x",
        ],
        {"seq_len": " ".join(map(str, args.seq_len)), "packing": " ".join(args.packing), "min_tokens": args.min_tokens,
         "requests": args.requests, "vocab_size": args.vocab_size,
         "redis": "embedded" if args.embedded else args.redis_url,
         "service_env": " ".join(args.service_env) or "-"},  # fmt: skip
    )
    from client import Client

    docs = stdlib_docs()
    tok, tok_json = train_bpe(docs, args.vocab_size)
    per_copy = sum(len(e.ids) for e in tok.encode_batch(docs, add_special_tokens=False))
    copies = max(1, math.ceil(args.min_tokens / per_copy))
    corpus = repeat_to(docs, copies=copies)
    parts = [corpus[i :: args.requests] for i in range(args.requests)] if args.requests > 1 else [corpus]
    print(f"corpus: {len(docs)} stdlib docstrings x {copies} = {len(corpus)} documents, "
          f"{per_copy * copies:,} text tokens, in {len(parts)} ingest request(s); "
          f"tokenizer: byte-level BPE, vocab {tok.get_vocab_size()}\n")  # fmt: skip

    rows = []
    with BenchRedis(args), start_service(args) as svc:
        r = redis_client(svc.redis_url)
        cfg = r.config_get("maxmemory*") | r.config_get("activedefrag")
        info = r.info("memory")
        print(f"service {svc.url}; Redis {svc.redis_url} ({redis_version(svc.redis_url)}), "
              f"allocator {info.get('mem_allocator')}, {cfg}\n")  # fmt: skip
        with Client(svc.url, timeout=600) as c:
            for seq_len in args.seq_len:
                for packing in args.packing:
                    name = f"bench-storage-L{seq_len}-{packing}"
                    c.delete_dataset(name, missing_ok=True)
                    _, before = _settle(r)
                    c.create_dataset(name, tokenizer=tok_json, seq_len=seq_len, packing=packing)
                    t0 = time.perf_counter()
                    for part in parts:
                        c.ingest(name, part)
                    dt = time.perf_counter() - t0
                    peak, after = _settle(r)
                    meta = c.dataset(name)
                    usage, blobs = _key_usage(r, name)
                    rows.append((seq_len, packing, meta, usage, blobs, (peak - before, after - before), dt))
                    c.delete_dataset(name)
        r.close()

    for seq_len, packing, meta, usage, blobs, (peak, delta), dt in rows:
        ntok, nseq, nchunks = meta["num_tokens"], meta["num_sequences"], meta["num_chunks"]
        raw = 2 if meta["id_dtype"].endswith("2") else 4
        total = sum(b for _, b in usage.values())
        chunk_keys, chunk_mem = usage.get("chunk blobs", (0, 0))
        payload = meta["bytes"]
        print(f"-- L={seq_len} packing={packing}: {ntok:,} stored tokens in {nseq:,} sequences "
              f"({ntok / max(1, nseq):.1f} tokens/sequence), {nchunks} chunks, ids {meta['id_dtype']} "
              f"(ingest {dt:.1f}s)")  # fmt: skip
        print(f"   raw id bytes/token                       {raw:6.3f}")
        print(f"   chunk payload (blob bytes)   {payload:>13,} B  {payload / ntok:6.3f} B/token  {payload / ntok / raw:5.3f}x raw")
        print(f"   MEMORY USAGE, chunk keys     {chunk_mem:>13,} B  {chunk_mem / ntok:6.3f} B/token  {chunk_mem / ntok / raw:5.3f}x raw"
              f"  ({chunk_keys} keys, {chunk_mem / max(1, payload):.3f}x payload)")  # fmt: skip
        print(f"   MEMORY USAGE, all keys       {total:>13,} B  {total / ntok:6.3f} B/token  {total / ntok / raw:5.3f}x raw"
              f"  ({sum(n for n, _ in usage.values())} keys)")  # fmt: skip
        print(f"   INFO used_memory delta       {delta:>13,} B  {delta / ntok:6.3f} B/token  {delta / ntok / raw:5.3f}x raw"
              f"  (settled; {peak:,} B right after the ingest)")  # fmt: skip
        others = ", ".join(f"{k} {b:,} B ({n} key{'s' if n > 1 else ''})" for k, (n, b) in sorted(usage.items()) if k != "chunk blobs")
        print(f"   other keys: {others}")
        shown = ", ".join(f"{n:,} B -> {u:,} B ({u / n:.3f}x)" for n, u in blobs[:4])
        print(f"   chunk blobs, STRLEN -> MEMORY USAGE (largest {min(4, len(blobs))} of {len(blobs)}): {shown}")

    print(f"\nsummary: bytes/token (ratio to raw ids; target <= {TARGET}x)")
    print(f"  {'L':>5} {'packing':<9} {'tokens':>11} {'raw':>5} {'payload':>15} {'MEMORY USAGE':>15} {'used_memory Δ':>15}")
    for seq_len, packing, meta, usage, _, (_, delta), _ in rows:
        ntok = meta["num_tokens"]
        raw = 2 if meta["id_dtype"].endswith("2") else 4
        total = sum(b for _, b in usage.values())

        def cell(b: float) -> str:
            return f"{b / ntok:5.3f} ({b / ntok / raw:4.2f}x)"

        flag = "" if total / ntok / raw <= TARGET else "  > target"
        print(f"  {seq_len:>5} {packing:<9} {ntok:>11,} {raw:>5} {cell(meta['bytes']):>15} {cell(total):>15} {cell(delta):>15}{flag}")
    if args.profile:
        print_profile(args.profile)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
