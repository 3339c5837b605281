"""``maskserve demo``: the service on an embedded Redis, the stdlib docstrings ingested, a short training run."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from pathlib import Path

from .data import bootstrap


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


def demo_parser(sub: argparse._SubParsersAction, conn: argparse.ArgumentParser) -> None:
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
