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

from service.http.launch import SERVE_DESCRIPTION, SERVE_HELP, add_serve_args

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
  maskserve masks build wiki --copies 10 --unit whole_word   # static masks, cached in Redis
  maskserve masks report wiki --unit span                     # observed rates, split, leakage
  maskserve jobs create pretrain --dataset wiki --batch-size 64 --epochs 10
  python -m trainer --dataset wiki --job pretrain             # run on each worker machine
  maskserve jobs show pretrain                                 # progress per worker
  maskserve dataset ingest docs notes.txt --split paragraph --holdout 0.05 --holdout-dataset docs-heldout
  maskserve experiment static-vs-dynamic --dataset docs --eval-dataset docs-heldout --out runs/svd
  maskserve experiment mask-rate --dataset docs --eval-dataset docs-heldout --out runs/rate
"""


def _client(args: argparse.Namespace):  # noqa: ANN202 - the client is imported lazily
    from client import Client

    return Client(args.url, token=args.token)


def _print(obj: object) -> None:
    print(json.dumps(obj, indent=2, sort_keys=False))


# ---- data ------------------------------------------------------------------


def cmd_corpus(args: argparse.Namespace) -> int:
    from service.data.corpus import stdlib_docstrings

    out = open(args.out, "w", encoding="utf-8") if args.out != "-" else sys.stdout
    n = 0
    with out if args.out != "-" else open(os.devnull, "w") as _:
        for doc in stdlib_docstrings(max_bytes=int(args.max_mb * 1e6) if args.max_mb else None):
            out.write(json.dumps({"text": doc}, ensure_ascii=False) + "\n")
            n += 1
    print(f"wrote {n} documents to {args.out}", file=sys.stderr)
    return 0


def bootstrap(c, dataset: str, *, seq_len: int, vocab_size: int, kind: str, packing: str, max_mb: float | None,
              holdout: float = 0.0) -> dict:  # fmt: skip
    """Create ``dataset`` from the stdlib docstrings unless it already holds data; with ``holdout``, that
    share of the docstrings (by content hash, see holdout.py) goes to ``{dataset}-heldout`` instead."""
    from client import NotFoundError

    from service.data.corpus import stdlib_docstrings
    from service.data.holdout import held_out

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
    if holdout > 0:
        held = [d for d in docs if held_out({"text": d}, holdout)]
        docs = [d for d in docs if not held_out({"text": d}, holdout)]
        c.delete_dataset(f"{dataset}-heldout", missing_ok=True)
        c.create_dataset(f"{dataset}-heldout", tokenizer=tok, seq_len=seq_len, packing=packing)
        res = c.ingest(f"{dataset}-heldout", held)
        print(f"held out: {res['documents']} documents -> {res['sequences']} sequences in {dataset}-heldout")
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
        elif args.action == "ingest" and args.holdout:
            ingest_with_holdout(c, args)
        elif args.action == "ingest":
            for f in args.files:
                path = Path(f)
                with _progress(path.stat().st_size, path.name) as bar:
                    res = c.ingest_file(args.name, path, split=args.split, on_bytes=bar.update)
                print(f"{path}: {res['documents']} documents, {res['sequences']} sequences, {res['tokens']:,} tokens")
    return 0


def ingest_with_holdout(c, args: argparse.Namespace) -> None:  # noqa: ANN001 - the client is imported lazily
    """Split the files' documents by content hash: ``--holdout`` of them to ``--holdout-dataset`` (created
    like the target when missing: same tokenizer, L, packing), the rest to the target."""
    from client import NotFoundError

    from service.data.holdout import Side

    if not 0 < args.holdout < 1:
        raise SystemExit("maskserve dataset ingest: --holdout takes a fraction in (0, 1)")
    held_name = args.holdout_dataset or f"{args.name}-heldout"
    info = c.dataset(args.name)
    try:
        c.dataset(held_name)
    except NotFoundError:
        tok = c.tokenizer(args.name)
        names = {t["id"]: t["content"] for t in tok.get("added_tokens") or []}
        special = {role: names[i] for role, i in (info.get("special_tokens") or {}).items() if i in names}
        c.create_dataset(held_name, tokenizer=tok, seq_len=info["seq_len"], packing=info["packing"],
                         special_tokens=special or None)  # same roles, same ids
        print(f"created {held_name!r} like {args.name!r} (L={info['seq_len']}, packing {info['packing']})")
    paths = [Path(f) for f in args.files]
    for name, heldout in ((args.name, False), (held_name, True)):
        res = c.ingest(name, Side(paths, args.split, args.holdout, heldout))
        print(f"{name}: {res['documents']} documents, {res['sequences']} sequences, {res['tokens']:,} tokens"
              + (" (held out)" if heldout else ""))


def cmd_tokenizer(args: argparse.Namespace) -> int:
    from service.data.corpus import stdlib_docstrings

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


def _masking_args(sp: argparse.ArgumentParser) -> None:
    g = sp.add_argument_group("masking")
    g.add_argument("--mlm-probability", type=float, default=0.15)
    g.add_argument("--mask-ratio", type=float, default=0.8)
    g.add_argument("--random-ratio", type=float, default=0.1)
    g.add_argument("--unit", default="token", choices=["token", "whole_word", "span"])
    g.add_argument("--count", default="bernoulli", choices=["bernoulli", "exact"])
    g.add_argument("--max-predictions", type=int, default=None)
    g.add_argument("--random-tokens", default="uniform", choices=["uniform", "frequency"])
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--copies", type=int, default=10, help="static masks per sequence (BERT's dupe_factor)")
    g.add_argument("--schedule", default=None, choices=["constant", "linear", "cosine"],
                   help="mask-rate schedule: --mlm-probability moves to --mlm-probability-end (dynamic masks only)")
    g.add_argument("--mlm-probability-end", type=float, default=None, help="the rate the schedule ends at")
    g.add_argument("--schedule-unit", default=None, choices=["epoch", "step"], help="what the schedule counts")
    g.add_argument("--schedule-length", type=int, default=None, help="epochs or steps from start to end rate")


MASKING_KEYS = ("mlm_probability", "mask_ratio", "random_ratio", "unit", "count", "max_predictions", "random_tokens",
                "schedule", "mlm_probability_end", "schedule_unit", "schedule_length")  # fmt: skip


def _masking(args: argparse.Namespace) -> dict:
    return {k: getattr(args, k) for k in MASKING_KEYS if getattr(args, k, None) is not None}


def cmd_masks(args: argparse.Namespace) -> int:
    with _client(args) as c:
        if args.action == "build":
            from tqdm import tqdm

            status = c.build_static_masks(args.name, seed=args.seed, copies=args.copies, max_chunks=1, **_masking(args))
            with tqdm(total=status["chunks"], initial=status["built"], unit="chunk", desc=f"static masks {args.name}",
                      disable=None, leave=False) as bar:  # fmt: skip
                while not status["complete"]:
                    status = c.build_static_masks(args.name, seed=args.seed, copies=args.copies, max_chunks=8,
                                                  **_masking(args))  # fmt: skip
                    bar.update(status["built"] - bar.n)
            _print(status)
        elif args.action == "list":
            _print(c.static_masks(args.name))
        elif args.action == "drop":
            c.drop_static_masks(args.name, args.cache)
            print(f"dropped static-mask cache {args.cache} of {args.name}")
        elif args.action == "report":
            _print(c.masking_report(args.name, seed=args.seed, sequences=args.sequences, epochs=args.epochs,
                                    mode=args.mode, copies=args.copies, **_masking(args)))  # fmt: skip
    return 0


def cmd_jobs(args: argparse.Namespace) -> int:
    with _client(args) as c:
        if args.action == "list":
            for j in c.jobs():
                epochs = j["epochs"] if j["epochs"] is not None else "inf"
                print(f"{j['name']:20} {j['dataset']:16} {j['status']:9} epoch {j['epoch']}/{epochs} "
                      f"next {j['next_batch']}/{j['batches_per_epoch']} acked {j['acked']} leased {j['leased']} "
                      f"redelivered {j['redelivered']} workers {len(j['workers'])} {j['sequences_per_s']:.0f} seq/s")  # fmt: skip
        elif args.action == "show":
            _print(c.job_progress(args.name))
        elif args.action == "create":
            _print(c.create_job(args.name, args.dataset, batch_size=args.batch_size, seed=args.seed,
                                shuffle=not args.no_shuffle, epochs=args.epochs or None, drop_last=args.drop_last,
                                lease_timeout_s=args.lease_timeout, epoch_boundary=args.epoch_boundary,
                                masking={**_masking(args), "mode": args.mode, "copies": args.copies}))  # fmt: skip
        elif args.action == "cancel":
            _print(c.cancel_job(args.name))
        elif args.action == "delete":
            c.delete_job(args.name)
            print(f"deleted job {args.name}")
        elif args.action == "evict":
            n = c.evict_worker(args.name, args.worker)
            print(f"job {args.name}: {n} batches of worker {args.worker} are handed out again")
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
        service = subprocess.Popen([sys.executable, "-m", "service", "serve", "--port", str(port), "--workers", "1"],
                                   env=env, stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        with Client(url) as c:
            c.wait_ready(60)
            print("[2/3] data", flush=True)
            info = bootstrap(c, args.dataset, seq_len=args.seq_len, vocab_size=args.vocab_size, kind="bpe",
                             packing="complete", max_mb=args.max_mb, holdout=0.02)  # fmt: skip
            print(f"      dataset {info['name']!r}: {info['num_sequences']} sequences x L={info['seq_len']}, "
                  f"{info['bytes'] / max(1, info['num_tokens']):.2f} bytes/token in Redis", flush=True)  # fmt: skip
            held = _dataset_or_none(c, f"{args.dataset}-heldout")
        ckpt = data_dir / "checkpoint.pt"
        ckpt.unlink(missing_ok=True)  # a fresh run each time (the data is what is kept)
        print(f"[3/3] trainer: python -m trainer ({args.steps} steps, checkpoint {ckpt})", flush=True)
        cmd = [sys.executable, "-m", "trainer", "--url", url, "--dataset", args.dataset, "--steps", str(args.steps),
               "--batch-size", str(args.batch_size), "--d-model", "128", "--layers", "2", "--heads", "4",
               "--d-ff", "512", "--lr", "1e-3", "--log-every", str(max(1, args.steps // 10)),
               "--checkpoint", str(ckpt)]  # fmt: skip
        if held is not None:
            cmd += ["--eval-dataset", held["name"], "--eval-sequences", "128", "--eval-every", str(args.steps)]
        rc = subprocess.call(cmd)
        if rc == 0 and held is not None:
            _show_predictions(url, str(ckpt), held)
        print(f"done. service log: {log_path}; Redis data: {data_dir / 'redis'} (kept; run again to reuse it)")
        return rc
    finally:
        service.send_signal(signal.SIGINT)
        try:
            service.wait(15)
        except subprocess.TimeoutExpired:
            service.kill()


# ---- experiments ------------------------------------------------------------


def cmd_experiment(args: argparse.Namespace) -> int:
    try:
        from trainer.experiment import run
    except ImportError as exc:
        print(f"maskserve experiment: needs the trainer extra (torch) and matplotlib: {exc}", file=sys.stderr)
        return 1
    with _client(args) as c:
        info = c.dataset(args.dataset)
        c.dataset(args.eval_dataset)  # fails early, with the service's message, when it is missing
    return run(args, info)


def _experiment_args(p: argparse.ArgumentParser) -> None:
    """Options every experiment takes (trainer.experiment reads them)."""
    p.add_argument("--dataset", required=True, help="training dataset")
    p.add_argument("--eval-dataset", required=True, help="held-out dataset (see `maskserve dataset ingest --holdout`)")
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--seeds", default="0,1", help="comma-separated: each seeds init, data order and masks")
    p.add_argument("--out", required=True, help="output directory (resumable: run again to continue)")
    g = p.add_argument_group("model and optimisation (small defaults: the whole run fits 2 CPU cores)")
    g.add_argument("--batch-size", type=int, default=32)
    g.add_argument("--d-model", type=int, default=64)
    g.add_argument("--layers", type=int, default=2)
    g.add_argument("--heads", type=int, default=2)
    g.add_argument("--d-ff", type=int, default=256)
    g.add_argument("--dropout", type=float, default=0.1)
    g.add_argument("--lr", type=float, default=2e-3)
    g.add_argument("--threads", type=int, default=1, help="torch CPU threads (more than the free cores only slows it)")
    g.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    g.add_argument("--eval-sequences", type=int, default=256, help="held-out sequences evaluated each epoch")
    g.add_argument("--unseen-eval", type=int, default=256, help="training sequences evaluated under unseen masks")


def _dataset_or_none(c, name: str) -> dict | None:  # noqa: ANN001 - the client is imported lazily
    from client import NotFoundError

    try:
        return c.dataset(name)
    except NotFoundError:
        return None


def _show_predictions(url: str, checkpoint: str, held: dict, count: int = 3) -> None:
    """The trained model's top guesses for the blanks of a few held-out sequences, next to the truth."""
    from client import Client
    from trainer.evaluate import spread_ids
    from trainer.predict import load_model, top_predictions

    print(f"predictions on held-out text ({held['name']!r}, never trained on):")
    with Client(url) as c:
        for line in top_predictions(load_model(checkpoint), c, held["name"], spread_ids(held["num_sequences"], count)):
            print(line)


# ---- parser ----------------------------------------------------------------


def _connection_parser() -> argparse.ArgumentParser:
    """The --url and --token flags every client command takes."""
    conn = argparse.ArgumentParser(add_help=False)
    g = conn.add_argument_group("service")
    g.add_argument("--url", default=os.environ.get("MASKSERVE_URL"), help="service URL (default $MASKSERVE_URL or http://127.0.0.1:8000)")
    g.add_argument("--token", default=os.environ.get("MASKSERVE_TOKEN"), help="bearer token (default $MASKSERVE_TOKEN)")
    return conn


def _serve_parser(sub: argparse._SubParsersAction, conn: argparse.ArgumentParser) -> None:
    add_serve_args(sub.add_parser("serve", help=SERVE_HELP, description=SERVE_DESCRIPTION))


def _demo_parser(sub: argparse._SubParsersAction, conn: argparse.ArgumentParser) -> None:
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


def _bootstrap_parser(sub: argparse._SubParsersAction, conn: argparse.ArgumentParser) -> None:
    b = sub.add_parser("bootstrap", parents=[conn], help="create a dataset from the stdlib docstrings (idempotent)")
    b.add_argument("--dataset", default="stdlib-docs")
    b.add_argument("--seq-len", type=int, default=128)
    b.add_argument("--vocab-size", type=int, default=8000)
    b.add_argument("--kind", default="bpe", choices=["bpe", "wordpiece", "unigram"])
    b.add_argument("--packing", default="complete", choices=["complete", "doc", "none"])
    b.add_argument("--max-mb", type=float, default=None)
    b.add_argument("--wait", type=float, default=60.0, help="seconds to wait for the service to be ready")
    b.set_defaults(func=cmd_bootstrap)


def _corpus_parser(sub: argparse._SubParsersAction, conn: argparse.ArgumentParser) -> None:
    c = sub.add_parser("corpus", help="write the stdlib docstrings as NDJSON")
    c.add_argument("-o", "--out", default="-")
    c.add_argument("--max-mb", type=float, default=None)
    c.set_defaults(func=cmd_corpus)


def _tokenizer_parser(sub: argparse._SubParsersAction, conn: argparse.ArgumentParser) -> None:
    t = sub.add_parser("tokenizer", parents=[conn], help="train a tokenizer (on the service) and save its tokenizer.json")
    t.add_argument("--corpus", default="stdlib", help="'stdlib' or an NDJSON file of {\"text\": ...}")
    t.add_argument("--kind", default="bpe", choices=["bpe", "wordpiece", "unigram"])
    t.add_argument("--vocab-size", type=int, default=8000)
    t.add_argument("--min-frequency", type=int, default=2)
    t.add_argument("-o", "--out", default="tokenizer.json")
    t.set_defaults(func=cmd_tokenizer)


def _dataset_parser(sub: argparse._SubParsersAction, conn: argparse.ArgumentParser) -> None:
    ds = sub.add_parser("dataset", help="create, ingest into, list, show, delete datasets")
    dsub = ds.add_subparsers(dest="action", required=True, metavar="ACTION")
    dsub.add_parser("list", parents=[conn], help="all datasets")
    dsub.add_parser("show", parents=[conn], help="one dataset's details").add_argument("name")
    dsub.add_parser("delete", parents=[conn], help="delete a dataset and all its keys").add_argument("name")
    cr = dsub.add_parser("create", parents=[conn], help="create a dataset")
    cr.add_argument("name")
    cr.add_argument("--tokenizer", required=True, help="path to a tokenizer.json")
    cr.add_argument("--seq-len", type=int, required=True)
    cr.add_argument("--packing", default="complete", choices=["complete", "doc", "none"])
    cr.add_argument("--special", nargs="*", metavar="ROLE=TOKEN", help="e.g. mask=<mask> pad=<pad>")
    ing = dsub.add_parser("ingest", parents=[conn], help="stream files (.jsonl/.ndjson as NDJSON, else plain text)")
    ing.add_argument("name")
    ing.add_argument("files", nargs="+")
    ing.add_argument("--split", default="none", choices=["none", "line", "paragraph"], help="plain text: document boundaries")
    ing.add_argument("--holdout", type=float, default=0.0, metavar="FRACTION",
                     help="send this share of the documents (chosen by a hash of each document) to --holdout-dataset")
    ing.add_argument("--holdout-dataset", default=None, metavar="NAME",
                     help="where held-out documents go, created like NAME if missing [default: NAME-heldout]")
    ds.set_defaults(func=cmd_dataset)


def _masks_parser(sub: argparse._SubParsersAction, conn: argparse.ArgumentParser) -> None:
    mk = sub.add_parser("masks", help="static-mask caches and the masking report")
    msub = mk.add_subparsers(dest="action", required=True, metavar="ACTION")
    mb = msub.add_parser("build", parents=[conn], help="build a static-mask cache (K masks per sequence), with progress; idempotent")
    mb.add_argument("name")
    _masking_args(mb)
    msub.add_parser("list", parents=[conn], help="a dataset's static-mask caches").add_argument("name")
    md = msub.add_parser("drop", parents=[conn], help="drop one static-mask cache")
    md.add_argument("name")
    md.add_argument("cache")
    mr = msub.add_parser("report", parents=[conn], help="mask N sequences for several epochs and measure rates, split, leakage")
    mr.add_argument("name")
    mr.add_argument("--mode", default="dynamic", choices=["dynamic", "static"])
    mr.add_argument("--sequences", type=int, default=256)
    mr.add_argument("--epochs", type=int, default=None)
    _masking_args(mr)
    mk.set_defaults(func=cmd_masks)


def _jobs_parser(sub: argparse._SubParsersAction, conn: argparse.ArgumentParser) -> None:
    jb = sub.add_parser("jobs", help="shared jobs: create, list, show progress, cancel, delete, evict a worker")
    jsub = jb.add_subparsers(dest="action", required=True, metavar="ACTION")
    jsub.add_parser("list", parents=[conn], help="all jobs, one line each")
    jsub.add_parser("show", parents=[conn], help="one job's progress, per worker").add_argument("name")
    jsub.add_parser("cancel", parents=[conn], help="stop handing out batches").add_argument("name")
    jsub.add_parser("delete", parents=[conn], help="delete a job and its state").add_argument("name")
    je = jsub.add_parser("evict", parents=[conn],
                         help="a worker known to be gone: hand its leased batches out again now, not at expiry")
    je.add_argument("name")
    je.add_argument("worker")
    jc = jsub.add_parser("create", parents=[conn], help="create a job (attaching when it exists with this config)")
    jc.add_argument("name")
    jc.add_argument("--dataset", required=True)
    jc.add_argument("--batch-size", type=int, default=32)
    jc.add_argument("--epochs", type=int, default=1, help="0 runs until cancelled")
    jc.add_argument("--no-shuffle", action="store_true")
    jc.add_argument("--drop-last", action="store_true")
    jc.add_argument("--lease-timeout", type=float, default=60.0, help="seconds before an unacked batch is re-delivered")
    jc.add_argument("--epoch-boundary", default="handout", choices=["handout", "ack"])
    jc.add_argument("--mode", default="dynamic", choices=["dynamic", "static"])
    _masking_args(jc)
    jb.set_defaults(func=cmd_jobs)


def _experiment_parser(sub: argparse._SubParsersAction, conn: argparse.ArgumentParser) -> None:
    ex = sub.add_parser("experiment", help="train and compare masking strategies, with curves")
    exsub = ex.add_subparsers(dest="experiment", required=True, metavar="EXPERIMENT")
    sd = exsub.add_parser(
        "static-vs-dynamic", parents=[conn], help="static (BERT) vs dynamic (RoBERTa) masks: curves and a summary",
        description="For each seed, train the same model from the same init on the same data order with static "
        "masks (K cached copies) and with dynamic ones; evaluate every epoch on held-out data and on training "
        "sequences under unseen masks; write curves.csv, curves.png and summary.md. Run again to resume.",
    )  # fmt: skip
    _experiment_args(sd)
    sd.add_argument("--copies", type=int, default=10, help="static masks per sequence (BERT's dupe_factor)")
    sd.add_argument("--mlm-probability", type=float, default=0.15)
    mr = exsub.add_parser(
        "mask-rate", parents=[conn], help="constant low vs constant high vs a high-to-low schedule of the mask rate",
        description="For each seed, train the same model from the same init on the same data order at a constant "
        "low mask rate, a constant high one, and one that moves from high to low over the run (the service's "
        "mask-rate schedule); evaluate all at the low rate every epoch; write curves.csv, curves.png and "
        "summary.md. Run again to resume.",
    )  # fmt: skip
    _experiment_args(mr)
    mr.add_argument("--low", type=float, default=0.15, help="the baseline rate, and the evaluation's")
    mr.add_argument("--high", type=float, default=0.30)
    mr.add_argument("--schedule", default="linear", choices=["linear", "cosine"], help="how high moves to low")
    ex.set_defaults(func=cmd_experiment)


def _batch_parser(sub: argparse._SubParsersAction, conn: argparse.ArgumentParser) -> None:
    bt = sub.add_parser("batch", parents=[conn], help="fetch one masked batch and summarize it")
    bt.add_argument("name")
    bt.add_argument("--size", type=int, default=4)
    bt.add_argument("--seed", type=int, default=None)
    bt.add_argument("--index", type=int, default=0)
    bt.add_argument("--mlm-probability", type=float, default=0.15)
    bt.add_argument("--show", type=int, default=4, help="rows to print")
    bt.set_defaults(func=cmd_batch)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="maskserve", description=__doc__, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    conn = _connection_parser()
    _serve_parser(sub, conn)
    _demo_parser(sub, conn)
    _bootstrap_parser(sub, conn)
    _corpus_parser(sub, conn)
    _tokenizer_parser(sub, conn)
    _dataset_parser(sub, conn)
    _masks_parser(sub, conn)
    _jobs_parser(sub, conn)
    _experiment_parser(sub, conn)
    _batch_parser(sub, conn)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # e.g. piped into `head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as exc:  # noqa: BLE001 - the client's errors end the command with one line
        from client import MaskserveError

        if isinstance(exc, MaskserveError):
            print(f"maskserve {args.command}: error: {exc}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
