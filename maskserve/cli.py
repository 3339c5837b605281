"""``maskserve``: run the service, prepare data, and run the whole job in one go.

Subcommands talk to a running service over HTTP through the thin client
(``--url``, default ``$MASKSERVE_URL`` or http://127.0.0.1:8000), except
``serve``, which runs one, and ``demo``, which runs everything.
"""

from __future__ import annotations

import argparse
import os
import sys

from service.http.launch import SERVE_DESCRIPTION, SERVE_HELP, add_serve_args

from .data import batch_parser, bootstrap_parser, corpus_parser, dataset_parser, tokenizer_parser
from .demo import demo_parser
from .experiment import experiment_parser
from .jobs import jobs_parser
from .masks import masks_parser
from .top import top_parser

EPILOG = """examples:
  maskserve demo                                  # service + embedded Redis + ingest + short training run
  maskserve serve --port 8000                     # embedded Redis under ./maskserve-data
  REDIS_URL=redis://localhost:6379/0 maskserve serve
  maskserve bootstrap --dataset stdlib            # tokenizer + dataset + ingest of the stdlib docstrings
  maskserve corpus -o docs.jsonl                  # write the stdlib docstrings as NDJSON
  maskserve dataset create wiki --tokenizer tokenizer.json --seq-len 512
  maskserve dataset ingest wiki docs.jsonl
  maskserve dataset list
  maskserve dataset ingests                       # ingests running now, on every process
  maskserve batch wiki --size 4 --seed 1
  maskserve masks build wiki --copies 10 --unit whole_word   # static masks, cached in Redis
  maskserve masks report wiki --unit span                     # observed rates, split, leakage
  maskserve jobs create pretrain --dataset wiki --batch-size 64 --epochs 10
  python -m trainer --dataset wiki --job pretrain             # run on each worker machine
  maskserve jobs show pretrain                                 # progress per worker
  maskserve top                                                # jobs and workers, live
  maskserve dataset ingest docs notes.txt --split paragraph --holdout 0.05 --holdout-dataset docs-heldout
  maskserve experiment static-vs-dynamic --dataset docs --eval-dataset docs-heldout --out runs/svd
  maskserve experiment mask-rate --dataset docs --eval-dataset docs-heldout --out runs/rate
"""


def _connection_parser() -> argparse.ArgumentParser:
    """The --url and --token flags every client command takes."""
    conn = argparse.ArgumentParser(add_help=False)
    g = conn.add_argument_group("service")
    g.add_argument("--url", default=os.environ.get("MASKSERVE_URL"), help="service URL (default $MASKSERVE_URL or http://127.0.0.1:8000)")
    g.add_argument("--token", default=os.environ.get("MASKSERVE_TOKEN"), help="bearer token (default $MASKSERVE_TOKEN)")
    return conn


def _serve_parser(sub: argparse._SubParsersAction, conn: argparse.ArgumentParser) -> None:
    add_serve_args(sub.add_parser("serve", help=SERVE_HELP, description=SERVE_DESCRIPTION))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="maskserve", description=__doc__, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    conn = _connection_parser()
    _serve_parser(sub, conn)
    demo_parser(sub, conn)
    bootstrap_parser(sub, conn)
    corpus_parser(sub, conn)
    tokenizer_parser(sub, conn)
    dataset_parser(sub, conn)
    masks_parser(sub, conn)
    jobs_parser(sub, conn)
    experiment_parser(sub, conn)
    batch_parser(sub, conn)
    top_parser(sub, conn)
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
