"""``maskserve``: run the service, prepare data, and run the whole job in one go.

Subcommands talk to a running service over HTTP through the thin client
(``--url``, default ``$MASKSERVE_URL`` or http://127.0.0.1:8000), except
``serve``, which runs one, and ``demo``, which runs everything.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

EPILOG = """examples:
  maskserve demo                                  # service + embedded Redis + ingest + short training run
  maskserve serve --port 8000                     # embedded Redis under ./maskserve-data
  REDIS_URL=redis://localhost:6379/0 maskserve serve
  maskserve bootstrap --dataset stdlib            # tokenizer + dataset + ingest of the stdlib docstrings
  maskserve corpus -o docs.jsonl                  # write the stdlib docstrings as NDJSON
  maskserve dataset create wiki --tokenizer tokenizer.json --seq-len 512
  maskserve dataset ingest wiki docs.jsonl
  maskserve dataset list
  maskserve batch wiki --size 4 --seed 1
"""


def _client(args: argparse.Namespace):  # noqa: ANN202 - the client is imported lazily
    from client import Client

    return Client(args.url, token=args.token)


def _print(obj: object) -> None:
    print(json.dumps(obj, indent=2, sort_keys=False))


# ---- serve -----------------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> int:
    import logging

    import uvicorn

    from .app import create_app
    from .config import Settings

    overrides = {}
    if args.redis_url:
        overrides["redis_url"] = args.redis_url
    if args.data_dir:
        overrides["data_dir"] = args.data_dir
    settings = Settings(**overrides)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    where = settings.redis_url or f"embedded server, data in {settings.data_dir.resolve()}"
    print(f"maskserve: serving on http://{args.host}:{args.port} (Redis: {where})", flush=True)
    uvicorn.run(create_app(settings), host=args.host, port=args.port, log_level=args.log_level,
                access_log=args.access_log)  # fmt: skip
    return 0


# ---- data ------------------------------------------------------------------


def cmd_corpus(args: argparse.Namespace) -> int:
    from .corpus import stdlib_docstrings

    out = open(args.out, "w", encoding="utf-8") if args.out != "-" else sys.stdout
    n = 0
    with out if args.out != "-" else open(os.devnull, "w") as _:
        for doc in stdlib_docstrings(max_bytes=int(args.max_mb * 1e6) if args.max_mb else None):
            out.write(json.dumps({"text": doc}, ensure_ascii=False) + "\n")
            n += 1
    print(f"wrote {n} documents to {args.out}", file=sys.stderr)
    return 0


def bootstrap(c, dataset: str, *, seq_len: int, vocab_size: int, kind: str, packing: str, max_mb: float | None) -> dict:
    """Create ``dataset`` from the stdlib docstrings unless it already holds data."""
    from client import NotFoundError

    from .corpus import stdlib_docstrings

    try:
        info = c.dataset(dataset)
        if info["num_sequences"] > 0:
            print(f"dataset {dataset!r} exists with {info['num_sequences']} sequences; nothing to do")
            return info
        c.delete_dataset(dataset)
    except NotFoundError:
        pass
    t0 = time.perf_counter()
    docs = list(stdlib_docstrings(max_bytes=int(max_mb * 1e6) if max_mb else None))
    nbytes = sum(len(d.encode()) for d in docs)
    print(f"corpus: {len(docs)} stdlib docstrings, {nbytes / 1e6:.1f} MB ({time.perf_counter() - t0:.1f}s)")
    t0 = time.perf_counter()
    tok = c.train_tokenizer(docs, kind=kind, vocab_size=vocab_size)
    print(f"tokenizer: {kind}, vocab {vocab_size}, trained by the service ({time.perf_counter() - t0:.1f}s)")
    c.create_dataset(dataset, tokenizer=tok, seq_len=seq_len, packing=packing)
    t0 = time.perf_counter()
    with _progress(nbytes, f"ingest {dataset}") as bar:
        res = c.ingest(dataset, docs, on_bytes=bar.update)
    dt = time.perf_counter() - t0
    print(f"ingest: {res['documents']} documents -> {res['sequences']} sequences, {res['tokens']:,} tokens, "
          f"{res['bytes']:,} bytes in Redis ({res['tokens'] / dt:,.0f} tokens/s)")  # fmt: skip
    return c.dataset(dataset)


def _progress(total: int, desc: str):  # noqa: ANN202
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, desc=desc, disable=None, leave=False)


def cmd_bootstrap(args: argparse.Namespace) -> int:
    with _client(args) as c:
        c.wait_ready(args.wait)
        bootstrap(c, args.dataset, seq_len=args.seq_len, vocab_size=args.vocab_size, kind=args.kind,
                  packing=args.packing, max_mb=args.max_mb)  # fmt: skip
    return 0


def cmd_dataset(args: argparse.Namespace) -> int:
    with _client(args) as c:
        if args.action == "list":
            for d in c.datasets():
                print(f"{d['name']:24} L={d['seq_len']:<5} {d['packing']:9} vocab={d['vocab_size']:<7} "
                      f"sequences={d['num_sequences']:<9} tokens={d['num_tokens']:<11} bytes={d['bytes']}")  # fmt: skip
        elif args.action == "show":
            _print(c.dataset(args.name))
        elif args.action == "delete":
            c.delete_dataset(args.name)
            print(f"deleted {args.name}")
        elif args.action == "create":
            special = dict(kv.split("=", 1) for kv in args.special or [])
            _print(c.create_dataset(args.name, tokenizer=Path(args.tokenizer), seq_len=args.seq_len,
                                    packing=args.packing, special_tokens=special or None))  # fmt: skip
        elif args.action == "ingest":
            for f in args.files:
                path = Path(f)
                with _progress(path.stat().st_size, path.name) as bar:
                    res = c.ingest_file(args.name, path, split=args.split, on_bytes=bar.update)
                print(f"{path}: {res['documents']} documents, {res['sequences']} sequences, {res['tokens']:,} tokens")
    return 0


def cmd_tokenizer(args: argparse.Namespace) -> int:
    from .corpus import stdlib_docstrings

    if args.corpus == "stdlib":
        texts = list(stdlib_docstrings())
    else:
        texts = [json.loads(line)["text"] for line in open(args.corpus, encoding="utf-8") if line.strip()]
    with _client(args) as c:
        tok = c.train_tokenizer(texts, kind=args.kind, vocab_size=args.vocab_size, min_frequency=args.min_frequency)
    Path(args.out).write_text(json.dumps(tok))
    print(f"wrote {args.out}")
    return 0


def cmd_batch(args: argparse.Namespace) -> int:
    with _client(args) as c:
        b = c.batch(args.name, args.size, seed=args.seed, index=args.index, mlm_probability=args.mlm_probability)
    ids, labels = b["input_ids"], b["labels"]
    print(f"batch {tuple(ids.shape)} seed={b.seed} epoch={b.epoch} index={b.index}; "
          f"{int((labels != -100).sum())} of {int(b['attention_mask'].sum())} real tokens to predict")  # fmt: skip
    for row in range(min(len(ids), args.show)):
        print(f"  seq {int(b['sequence_ids'][row])}: {ids[row, :16].tolist()} ...")
    return 0


# ---- demo ------------------------------------------------------------------


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cmd_demo(args: argparse.Namespace) -> int:
    from client import Client

    port = args.port or _free_port()
    url = f"http://127.0.0.1:{port}"
    data_dir = Path(args.data_dir).resolve()
    log_path = data_dir / "service.log"
    data_dir.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    env["MASKSERVE_DATA_DIR"] = str(data_dir / "redis")
    print(f"[1/3] service: {url} (embedded Redis, data in {data_dir / 'redis'}, log {log_path})", flush=True)
    with open(log_path, "ab") as log:
        service = subprocess.Popen([sys.executable, "-m", "service", "serve", "--port", str(port)],
                                   env=env, stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        with Client(url) as c:
            c.wait_ready(60)
            print("[2/3] data", flush=True)
            info = bootstrap(c, args.dataset, seq_len=args.seq_len, vocab_size=args.vocab_size, kind="bpe",
                             packing="complete", max_mb=args.max_mb)  # fmt: skip
            print(f"      dataset {info['name']!r}: {info['num_sequences']} sequences x L={info['seq_len']}, "
                  f"{info['bytes'] / max(1, info['num_tokens']):.2f} bytes/token in Redis", flush=True)  # fmt: skip
        ckpt = data_dir / "checkpoint.pt"
        print(f"[3/3] trainer: python -m trainer ({args.steps} steps, checkpoint {ckpt})", flush=True)
        cmd = [sys.executable, "-m", "trainer", "--url", url, "--dataset", args.dataset, "--steps", str(args.steps),
               "--batch-size", str(args.batch_size), "--d-model", "128", "--layers", "2", "--heads", "4",
               "--d-ff", "512", "--lr", "1e-3", "--log-every", str(max(1, args.steps // 10)),
               "--checkpoint", str(ckpt)]  # fmt: skip
        rc = subprocess.call(cmd)
        print(f"done. service log: {log_path}; Redis data: {data_dir / 'redis'} (kept; run again to reuse it)")
        return rc
    finally:
        service.send_signal(signal.SIGINT)
        try:
            service.wait(15)
        except subprocess.TimeoutExpired:
            service.kill()


# ---- parser ----------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="maskserve", description=__doc__, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def remote(sp: argparse.ArgumentParser) -> argparse.ArgumentParser:
        sp.add_argument("--url", default=os.environ.get("MASKSERVE_URL"), help="service URL (default $MASKSERVE_URL or http://127.0.0.1:8000)")
        sp.add_argument("--token", default=os.environ.get("MASKSERVE_TOKEN"), help="bearer token (default $MASKSERVE_TOKEN)")
        return sp

    s = sub.add_parser("serve", help="run the service (uvicorn)", description="Run the service. With no REDIS_URL it starts an embedded Redis-protocol server whose data (AOF) lives in --data-dir.")
    s.add_argument("--host", default=os.environ.get("MASKSERVE_HOST", "127.0.0.1"))
    s.add_argument("--port", type=int, default=int(os.environ.get("MASKSERVE_PORT", "8000")))
    s.add_argument("--redis-url", help="Redis URL (default $REDIS_URL; unset: embedded server)")
    s.add_argument("--data-dir", help="embedded server's data directory (default $MASKSERVE_DATA_DIR or ./maskserve-data)")
    s.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    s.add_argument("--access-log", action=argparse.BooleanOptionalAction, default=False, help="log every request")
    s.set_defaults(func=cmd_serve)

    d = sub.add_parser("demo", help="service + embedded Redis + ingest + a short training run", description="Run the whole job on this machine: start the service on an embedded Redis, ingest the Python stdlib's docstrings, and train a small RoBERTa-style model on masked batches pulled over HTTP.")
    d.add_argument("--steps", type=int, default=300)
    d.add_argument("--batch-size", type=int, default=32)
    d.add_argument("--seq-len", type=int, default=128)
    d.add_argument("--vocab-size", type=int, default=8000)
    d.add_argument("--max-mb", type=float, default=None, help="cap on corpus size")
    d.add_argument("--dataset", default="stdlib-docs")
    d.add_argument("--data-dir", default="maskserve-data/demo")
    d.add_argument("--port", type=int, default=0, help="service port (default: a free one)")
    d.set_defaults(func=cmd_demo)

    b = remote(sub.add_parser("bootstrap", help="create a dataset from the stdlib docstrings (idempotent)"))
    b.add_argument("--dataset", default="stdlib-docs")
    b.add_argument("--seq-len", type=int, default=128)
    b.add_argument("--vocab-size", type=int, default=8000)
    b.add_argument("--kind", default="bpe", choices=["bpe", "wordpiece", "unigram"])
    b.add_argument("--packing", default="complete", choices=["complete", "doc", "none"])
    b.add_argument("--max-mb", type=float, default=None)
    b.add_argument("--wait", type=float, default=60.0, help="seconds to wait for the service to be ready")
    b.set_defaults(func=cmd_bootstrap)

    c = sub.add_parser("corpus", help="write the stdlib docstrings as NDJSON")
    c.add_argument("-o", "--out", default="-")
    c.add_argument("--max-mb", type=float, default=None)
    c.set_defaults(func=cmd_corpus)

    t = remote(sub.add_parser("tokenizer", help="train a tokenizer (on the service) and save its tokenizer.json"))
    t.add_argument("--corpus", default="stdlib", help="'stdlib' or an NDJSON file of {\"text\": ...}")
    t.add_argument("--kind", default="bpe", choices=["bpe", "wordpiece", "unigram"])
    t.add_argument("--vocab-size", type=int, default=8000)
    t.add_argument("--min-frequency", type=int, default=2)
    t.add_argument("-o", "--out", default="tokenizer.json")
    t.set_defaults(func=cmd_tokenizer)

    ds = remote(sub.add_parser("dataset", help="create, ingest into, list, show, delete datasets"))
    dsub = ds.add_subparsers(dest="action", required=True, metavar="ACTION")
    dsub.add_parser("list", help="all datasets")
    dsub.add_parser("show", help="one dataset's details").add_argument("name")
    dsub.add_parser("delete", help="delete a dataset and all its keys").add_argument("name")
    cr = dsub.add_parser("create", help="create a dataset")
    cr.add_argument("name")
    cr.add_argument("--tokenizer", required=True, help="path to a tokenizer.json")
    cr.add_argument("--seq-len", type=int, required=True)
    cr.add_argument("--packing", default="complete", choices=["complete", "doc", "none"])
    cr.add_argument("--special", nargs="*", metavar="ROLE=TOKEN", help="e.g. mask=<mask> pad=<pad>")
    ing = dsub.add_parser("ingest", help="stream files (.jsonl/.ndjson as NDJSON, else plain text)")
    ing.add_argument("name")
    ing.add_argument("files", nargs="+")
    ing.add_argument("--split", default="none", choices=["none", "line", "paragraph"], help="plain text: document boundaries")
    ds.set_defaults(func=cmd_dataset)

    bt = remote(sub.add_parser("batch", help="fetch one masked batch and summarize it"))
    bt.add_argument("name")
    bt.add_argument("--size", type=int, default=4)
    bt.add_argument("--seed", type=int, default=None)
    bt.add_argument("--index", type=int, default=0)
    bt.add_argument("--mlm-probability", type=float, default=0.15)
    bt.add_argument("--show", type=int, default=4, help="rows to print")
    bt.set_defaults(func=cmd_batch)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # noqa: BLE001 - the client's errors end the command with one line
        from client import MaskserveError

        if isinstance(exc, MaskserveError):
            print(f"maskserve {args.command}: error: {exc}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
