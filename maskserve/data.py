"""The data commands: ``corpus``, ``bootstrap``, ``tokenizer``, ``dataset`` and ``batch``."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from .common import add_actions, connect, print_json, progress


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
    with progress(nbytes, f"ingest {dataset}") as bar:
        res = c.ingest(dataset, docs, on_bytes=bar.update)
    dt = time.perf_counter() - t0
    print(f"ingest: {res['documents']} documents -> {res['sequences']} sequences, {res['tokens']:,} tokens, "
          f"{res['bytes']:,} bytes in Redis ({res['tokens'] / dt:,.0f} tokens/s)")  # fmt: skip
    return c.dataset(dataset)


def cmd_bootstrap(args: argparse.Namespace) -> int:
    with connect(args) as c:
        c.wait_ready(args.wait)
        bootstrap(c, args.dataset, seq_len=args.seq_len, vocab_size=args.vocab_size, kind=args.kind,
                  packing=args.packing, max_mb=args.max_mb)  # fmt: skip
    return 0


def cmd_dataset(args: argparse.Namespace) -> int:
    with connect(args) as c:
        if args.action == "list":
            for d in c.datasets():
                print(f"{d['name']:24} L={d['seq_len']:<5} {d['packing']:9} vocab={d['vocab_size']:<7} "
                      f"sequences={d['num_sequences']:<9} tokens={d['num_tokens']:<11} bytes={d['bytes']}")  # fmt: skip
        elif args.action == "show":
            print_json(c.dataset(args.name))
        elif args.action == "ingests":
            print_running_ingests(c.running_ingests())
        elif args.action == "delete":
            c.delete_dataset(args.name)
            print(f"deleted {args.name}")
        elif args.action == "create":
            special = dict(kv.split("=", 1) for kv in args.special or [])
            print_json(c.create_dataset(args.name, tokenizer=Path(args.tokenizer), seq_len=args.seq_len,
                                        packing=args.packing, special_tokens=special or None))  # fmt: skip
        elif args.action == "ingest" and args.holdout:
            ingest_with_holdout(c, args)
        elif args.action == "ingest":
            from .ingest import cmd_ingest

            cmd_ingest(c, args)
    return 0


def print_running_ingests(ingests: list[dict]) -> None:
    """One line per ingest running now: dataset, what arrived of its body, documents and tokens so far."""
    if not ingests:
        print("no ingest running")
    for g in ingests:
        running = max(g["updated"] - g["started"], 1e-3)
        of = f" of {g['content_length']:,}" if g["content_length"] else ""
        print(f"{g['dataset']:24} {g['bytes_received']:,}{of} bytes received ({g['bytes_received'] / running / 1e6:.1f} "
              f"MB/s), {g['documents']:,} documents, {g['tokens']:,} tokens, running {running:.0f}s"
              f"{'  key ' + g['key'] if g['key'] else ''}")  # fmt: skip


def ingest_with_holdout(c, args: argparse.Namespace) -> None:  # noqa: ANN001 - the client is imported lazily
    """Split the files' documents by content hash: ``--holdout`` of them to ``--holdout-dataset`` (created
    like the target when missing: same tokenizer, L, packing), the rest to the target."""
    from client import NotFoundError

    from service.data.holdout import Side

    if not 0 < args.holdout < 1:
        raise SystemExit("maskserve dataset ingest: --holdout takes a fraction in (0, 1)")
    if args.hf or args.text_column or args.ids_column or any(
        Path(f).suffix in (".parquet", ".pq", ".arrow", ".feather", ".gz", ".zst", ".bz2", ".xz") for f in args.files
    ):
        raise SystemExit("maskserve dataset ingest: --holdout splits uncompressed NDJSON and text files")
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
    with connect(args) as c:
        tok = c.train_tokenizer(texts, kind=args.kind, vocab_size=args.vocab_size, min_frequency=args.min_frequency)
    Path(args.out).write_text(json.dumps(tok))
    print(f"wrote {args.out}")
    return 0


def cmd_batch(args: argparse.Namespace) -> int:
    options = {"mlm_probability": args.mlm_probability, "mask_ratio": args.mask_ratio,
               "random_ratio": args.random_ratio, "unit": args.unit, "count": args.count, "mode": args.mode,
               "copies": args.copies if args.mode == "static" else None}  # fmt: skip
    with connect(args) as c:
        b = c.batch(args.name, args.size, seed=args.seed, index=args.index, **options)
        info = c.dataset(args.name)
        tokenizer = c.tokenizer(args.name)
    ids, labels = b["input_ids"], b["labels"]
    print(f"batch {tuple(ids.shape)} seed={b.seed} epoch={b.epoch} index={b.index}; "
          f"{int((labels != -100).sum())} of {int(b['attention_mask'].sum())} real tokens to predict")  # fmt: skip
    from .showbatch import Inspector

    colour = args.color == "always" or (args.color == "auto" and sys.stdout.isatty())
    view = Inspector(tokenizer, info["special_tokens"].get("mask"), colour=colour)
    print(view.legend())
    for row in range(min(len(ids), args.show)):
        length = int(b["attention_mask"][row].sum())
        shown = length if args.width <= 0 else min(length, args.width)
        more = f" ... (+{length - shown} tokens)" if shown < length else ""
        print(f"seq {int(b['sequence_ids'][row])}: {view.row(ids[row, :shown], labels[row, :shown])}{more}")
    return 0


def bootstrap_parser(sub: argparse._SubParsersAction, conn: argparse.ArgumentParser) -> None:
    b = sub.add_parser("bootstrap", parents=[conn], help="create a dataset from the stdlib docstrings (idempotent)")
    b.add_argument("--dataset", default="stdlib-docs")
    b.add_argument("--seq-len", type=int, default=128)
    b.add_argument("--vocab-size", type=int, default=8000)
    b.add_argument("--kind", default="bpe", choices=["bpe", "wordpiece", "unigram"])
    b.add_argument("--packing", default="complete", choices=["complete", "doc", "none"])
    b.add_argument("--max-mb", type=float, default=None)
    b.add_argument("--wait", type=float, default=60.0, help="seconds to wait for the service to be ready")
    b.set_defaults(func=cmd_bootstrap)


def corpus_parser(sub: argparse._SubParsersAction, conn: argparse.ArgumentParser) -> None:
    c = sub.add_parser("corpus", help="write the stdlib docstrings as NDJSON")
    c.add_argument("-o", "--out", default="-")
    c.add_argument("--max-mb", type=float, default=None)
    c.set_defaults(func=cmd_corpus)


def tokenizer_parser(sub: argparse._SubParsersAction, conn: argparse.ArgumentParser) -> None:
    t = sub.add_parser("tokenizer", parents=[conn], help="train a tokenizer (on the service) and save its tokenizer.json")
    t.add_argument("--corpus", default="stdlib", help="'stdlib' or an NDJSON file of {\"text\": ...}")
    t.add_argument("--kind", default="bpe", choices=["bpe", "wordpiece", "unigram"])
    t.add_argument("--vocab-size", type=int, default=8000)
    t.add_argument("--min-frequency", type=int, default=2)
    t.add_argument("-o", "--out", default="tokenizer.json")
    t.set_defaults(func=cmd_tokenizer)


def dataset_parser(sub: argparse._SubParsersAction, conn: argparse.ArgumentParser) -> None:
    ds = sub.add_parser("dataset", help="create, ingest into, list, show, delete datasets")
    dsub = ds.add_subparsers(dest="action", required=True, metavar="ACTION")
    add_actions(dsub, conn, ("list", "all datasets", ()), ("show", "one dataset's details", ("name",)),
                ("ingests", "the ingests running now, on every process of the service", ()),
                ("delete", "delete a dataset and all its keys", ("name",)))  # fmt: skip
    cr = dsub.add_parser("create", parents=[conn], help="create a dataset")
    cr.add_argument("name")
    cr.add_argument("--tokenizer", required=True, metavar="PATH",
                    help="a tokenizer.json, or a directory saved by transformers' save_pretrained (its tokenizer.json, "
                         "else vocab.txt, else vocab.json + merges.txt; special tokens from its config)")
    cr.add_argument("--seq-len", type=int, required=True)
    cr.add_argument("--packing", default="complete", choices=["complete", "doc", "none"])
    cr.add_argument("--special", nargs="*", metavar="ROLE=TOKEN",
                    help="e.g. mask=<mask> pad=<pad> (these win over a directory's own)")
    ing = dsub.add_parser(
        "ingest", parents=[conn], help="stream corpus files into a dataset (in parallel, resumable)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Stream corpus files into dataset NAME.\n\n"
        "Formats, by extension: .jsonl/.ndjson/.json (NDJSON: {\"text\": ...} or {\"ids\": [...]} per line),\n"
        ".parquet/.pq and .arrow/.feather (one column: --text-column or --ids-column), anything else plain\n"
        "text (--split). Compressed files go by their inner suffix (docs.jsonl.gz, c4.json.gz, notes.txt.zst):\n"
        ".gz/.zst are sent compressed, .bz2/.xz decoded on the way. --hf DIR reads a Hugging Face dataset\n"
        "saved with save_to_disk (or its cached Arrow files).\n\n"
        "Order: sequence ids follow the files in the order given (a Parquet file: its row groups in order),\n"
        "whatever --jobs is, so a re-run or another cluster builds the same dataset.\n\n"
        "Resumable: each file (or run of row groups) is committed under a key made of its path, size and\n"
        "content hash; running the same command again after a crash or Ctrl-C skips what was committed.",
    )  # fmt: skip
    ing.add_argument("name")
    ing.add_argument("files", nargs="*", metavar="FILE")
    ing.add_argument("--hf", metavar="DIR", help="a Hugging Face dataset directory (save_to_disk, or cached Arrow files)")
    ing.add_argument("--split", default="none", metavar="SPLIT",
                     help="plain text: document boundaries, none|line|paragraph [default: none]; with --hf: the "
                     "dataset split [default: train]")  # fmt: skip
    ing.add_argument("--text-column", default=None, metavar="COLUMN",
                     help="Parquet/Arrow/--hf: the column of texts [default: text]")
    ing.add_argument("--ids-column", default=None, metavar="COLUMN",
                     help="Parquet/Arrow/--hf: a column of pre-tokenized token id lists, instead of text")
    ing.add_argument("-j", "--jobs", type=int, default=1, metavar="N",
                     help="files (or row-group runs) uploaded at once; commits stay in order [default: 1]")
    ing.add_argument("--holdout", type=float, default=0.0, metavar="FRACTION",
                     help="send this share of the documents (chosen by a hash of each document) to --holdout-dataset")
    ing.add_argument("--holdout-dataset", default=None, metavar="NAME",
                     help="where held-out documents go, created like NAME if missing [default: NAME-heldout]")
    ds.set_defaults(func=cmd_dataset)


def batch_parser(sub: argparse._SubParsersAction, conn: argparse.ArgumentParser) -> None:
    bt = sub.add_parser(
        "batch", parents=[conn], help="fetch one masked batch and show it decoded, masked positions marked",
        description="Fetch one masked batch and print its rows as tokens, each selected position marked: "
        "[orig>MASK] masked, [orig>new] replaced by a random token, [=orig] selected but kept (coloured on a "
        "terminal). A random token that happens to be the original shows as kept, as the model sees it.",
    )  # fmt: skip
    bt.add_argument("name", help="the dataset")
    bt.add_argument("--size", type=int, default=4, help="sequences in the batch [default: 4]")
    bt.add_argument("--seed", type=int, default=None, help="the stream's seed [default: the service's]")
    bt.add_argument("--index", type=int, default=0, help="which batch of the stream [default: 0]")
    g = bt.add_argument_group("masking")
    g.add_argument("--mlm-probability", type=float, default=0.15)
    g.add_argument("--mask-ratio", type=float, default=None, help="share of selected tokens masked [default: 0.8]")
    g.add_argument("--random-ratio", type=float, default=None,
                   help="share of selected tokens replaced by a random one [default: 0.1]")
    g.add_argument("--unit", default=None, choices=["token", "whole_word", "span"], help="[default: token]")
    g.add_argument("--count", default=None, choices=["bernoulli", "exact"], help="[default: bernoulli]")
    g.add_argument("--mode", default=None, choices=["dynamic", "static"], help="[default: dynamic]")
    g.add_argument("--copies", type=int, default=10, help="static masks per sequence, with --mode static")
    o = bt.add_argument_group("output")
    o.add_argument("--show", type=int, default=4, help="rows to print [default: 4]")
    o.add_argument("--width", type=int, default=48, help="tokens per row to print, 0 for all [default: 48]")
    o.add_argument("--color", default="auto", choices=["auto", "always", "never"],
                   help="ANSI colours: on a terminal (auto), always, or plain markers only [default: auto]")
    bt.set_defaults(func=cmd_batch)
