"""The same batch load against one Redis node and against a local 3-master cluster.

For each backend: a ``python -m service serve`` process (cluster mode for the
cluster), a dataset of the stdlib docstrings ingested ``--copies`` times, then
``--threads`` threads each pulling ``--requests`` stateless batches of B
sequences of length L. Reported per backend: sequences/s, and per Redis node
the CPU it spent (``INFO cpu``), the commands it ran (``INFO stats``) and the
bytes it sent (``total_net_output_bytes``) over the batch phase, and the
bytes it holds per token (``used_memory`` over tokens ingested).

    .venv/bin/python bench/cluster.py
    .venv/bin/python bench/cluster.py --seq-len 512 --batch-size 32 --requests 200
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from client import Client  # noqa: E402
from service.corpus import stdlib_docstrings  # noqa: E402
from service.tokenization import train_tokenizer  # noqa: E402
from tests.cluster import LocalCluster, _free_port  # noqa: E402
from tests.conftest import ServiceProcess  # noqa: E402


def node_stats(port: int) -> dict[str, float]:
    r = redis.Redis(port=port)
    info = {**r.info("cpu"), **r.info("stats"), **r.info("memory")}
    r.close()
    return {"cpu": info["used_cpu_sys"] + info["used_cpu_user"], "commands": info["total_commands_processed"],
            "out": info["total_net_output_bytes"], "memory": info["used_memory"]}  # fmt: skip


def run(label: str, url: str, ports: list[int], cluster: bool, args: argparse.Namespace, tokenizer: str,
        docs: list[str]) -> None:  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("MASKSERVE_")}
    env.update(REDIS_URL=url, MASKSERVE_REDIS_CLUSTER="1" if cluster else "0", MASKSERVE_DURABLE_ACKS="off")
    svc = ServiceProcess(env).wait_ready(60)
    try:
        with Client(svc.url, retries=2) as c:
            base = {p: node_stats(p)["memory"] for p in ports}
            c.create_dataset("bench", tokenizer=tokenizer, seq_len=args.seq_len)
            tokens = sum(c.ingest("bench", docs)["tokens"] for _ in range(args.copies))
            held = {p: node_stats(p)["memory"] - base[p] for p in ports}
            c.batch("bench", size=args.batch_size)  # warm the caches
            before = {p: node_stats(p) for p in ports}

            def pull() -> None:
                with Client(svc.url, retries=2) as mine:
                    for _ in range(args.requests):
                        mine.batch("bench", size=args.batch_size)

            threads = [threading.Thread(target=pull) for _ in range(args.threads)]
            start = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            elapsed = time.perf_counter() - start
            after = {p: node_stats(p) for p in ports}
            c.delete_dataset("bench")
    finally:
        svc.stop()
    batches = args.threads * args.requests
    print(f"\n{label}: {batches * args.batch_size / elapsed:,.0f} sequences/s ({batches} batches of "
          f"{args.batch_size}x{args.seq_len} in {elapsed:.1f} s), {sum(held.values()) / tokens:.2f} bytes/token held")
    for p in ports:
        d = {k: after[p][k] - before[p][k] for k in ("cpu", "commands", "out")}
        print(f"  node {p}: CPU {d['cpu']:.2f} s ({d['cpu'] / elapsed:.0%}), {d['commands'] / batches:.1f} commands "
              f"and {d['out'] / batches / 1024:.1f} KiB sent per batch, {held[p] / 2**20:.1f} MiB held")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--requests", type=int, default=150, help="batches per thread")
    p.add_argument("--threads", type=int, default=4)
    p.add_argument("--copies", type=int, default=3, help="times the corpus is ingested")
    args = p.parse_args()
    docs = list(stdlib_docstrings(max_bytes=2_000_000))
    tokenizer = train_tokenizer(docs[:2000], "bpe", vocab_size=8000).to_str()
    with tempfile.TemporaryDirectory() as tmp:
        port = _free_port()
        proc = subprocess.Popen(["redis-server", "--port", str(port), "--save", "", "--appendonly", "no"],
                                stdout=subprocess.DEVNULL)  # fmt: skip
        try:
            LocalCluster._wait(time.monotonic() + 30, lambda: redis.Redis(port=port).ping())
            run("one node", f"redis://127.0.0.1:{port}", [port], False, args, tokenizer, docs)
        finally:
            proc.kill()
        cluster = LocalCluster(Path(tmp) / "cluster", masters=3, replicas=0).start()
        try:
            run("3-master cluster", cluster.url, cluster.master_ports(), True, args, tokenizer, docs)
        finally:
            cluster.stop()


if __name__ == "__main__":
    main()
