"""Shared pieces of the benchmarks: machine header, corpus, tokenizer, a service process.

Every benchmark runs the service as a real ``python -m service serve`` process
(a separate interpreter, its own event loop) against a real Redis: the URL given
with ``--redis-url`` (default database 14 of the local server, flushed before
and after), or, with ``--embedded``, the service's own embedded server in a
temporary directory.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from service.core.process import free_port, stop_process  # noqa: E402  (free_port: for the benches)

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/14"
KEY_PREFIX = "ms"  # the service's default MASKSERVE_KEY_PREFIX


# ---- command line ------------------------------------------------------------


def add_service_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("service")
    g.add_argument("--redis-url", default=DEFAULT_REDIS_URL,
                   help="Redis the service uses; its database is FLUSHDB'd before and after (default %(default)s)")
    g.add_argument("--embedded", action="store_true",
                   help="let the service start its embedded server (no REDIS_URL) in a temporary directory")
    g.add_argument("--service-log", default=None,
                   help="keep the service's stdout/stderr in this file (default: a temporary file, shown on failure)")
    g.add_argument("--service-env", nargs="*", default=[], metavar="KEY=VALUE",
                   help="extra environment for the service, e.g. MASKSERVE_CHUNK_BYTES=1040000")
    g.add_argument("--profile", default=None, metavar="FILE.prof",
                   help="run the service under cProfile (event-loop thread only) and print its top functions")
    g.add_argument("--service-root", default=None, metavar="DIR",
                   help="run the service from this checkout (e.g. a worktree at another commit, to compare); "
                        "the benchmark itself and its client stay this checkout's")


# ---- machine header ----------------------------------------------------------


def _version(module: str) -> str:
    try:
        mod = __import__(module)
        return str(getattr(mod, "__version__", "?"))
    except Exception:  # noqa: BLE001 - a missing package is just reported
        return "not installed"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def header(title: str, measures: Sequence[str], settings: dict[str, Any] | None = None) -> None:
    """Print what is measured and on what machine."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    print(f"== {title} ==")
    for line in measures:
        print(f"   {line}")
    print(f"machine: {os.cpu_count()} CPUs ({usable} usable), {_cpu_model()}, {platform.system()} {platform.release()}")
    try:
        load = " ".join(f"{x:.2f}" for x in os.getloadavg())
        print(f"load average (1/5/15 min) at start: {load}")
    except OSError:
        pass
    print(f"python {platform.python_version()} ({sys.executable}); numpy {_version('numpy')}, "
          f"tokenizers {_version('tokenizers')}, redis-py {_version('redis')}, httpx {_version('httpx')}, "
          f"fastapi {_version('fastapi')}, uvicorn {_version('uvicorn')}")
    if settings:
        print("settings: " + ", ".join(f"{k}={v}" for k, v in settings.items()))
    print(flush=True)


# ---- corpus and tokenizer ----------------------------------------------------


_DOCS: list[str] | None = None


def stdlib_docs() -> list[str]:
    """The stdlib docstrings once (about 1.2 MB on CPython 3.11), cached per process."""
    global _DOCS
    if _DOCS is None:
        from service.data.corpus import stdlib_docstrings

        _DOCS = list(stdlib_docstrings())
    return _DOCS


def text_bytes(docs: Sequence[str]) -> int:
    return sum(len(d.encode()) for d in docs)


def repeat_to(docs: Sequence[str], *, min_bytes: int = 0, copies: int = 1) -> list[str]:
    """``docs`` repeated whole, at least ``copies`` times and until ``min_bytes`` of text."""
    one = text_bytes(docs)
    n = max(copies, math.ceil(min_bytes / max(1, one)))
    return list(docs) * n


def train_bpe(docs: Sequence[str], vocab_size: int = 8000):  # noqa: ANN201 - tokenizers.Tokenizer
    """The byte-level BPE of ``service.data.tokenization.train_tokenizer`` on ``docs``.

    Returns ``(tokenizer, tokenizer_json_dict)``; the tokenizer is reloaded from
    its JSON the way the service loads a dataset's tokenizer.
    """
    from service.data.tokenization import load_tokenizer, train_tokenizer

    tok = train_tokenizer(docs, "bpe", vocab_size)
    text = tok.to_str()
    return load_tokenizer(text), json.loads(text)


# ---- Redis -------------------------------------------------------------------


def redis_client(url: str):  # noqa: ANN201 - redis.Redis
    import redis

    return redis.Redis.from_url(url)


def flushdb(url: str) -> None:
    r = redis_client(url)
    try:
        r.flushdb()
    finally:
        r.close()


def redis_version(url: str) -> str:
    r = redis_client(url)
    try:
        info = r.info("server")
        return f"{info.get('redis_version', '?')} ({'valkey ' + info['valkey_version'] if 'valkey_version' in info else 'redis'})"
    finally:
        r.close()


# ---- the service process -----------------------------------------------------


def service_env(args: argparse.Namespace) -> dict[str, str]:
    out = {}
    for kv in args.service_env or []:
        key, sep, value = kv.partition("=")
        if not sep:
            raise SystemExit(f"--service-env wants KEY=VALUE, not {kv!r}")
        out[key] = value
    return out


def start_service(args: argparse.Namespace, env: dict[str, str] | None = None) -> "Service":
    """The service as the common command-line options describe it (not started yet); ``env`` replaces
    ``--service-env``."""
    return Service(redis_url=args.redis_url, embedded=args.embedded, log_file=args.service_log,
                   profile=args.profile, env=service_env(args) if env is None else env,
                   root=args.service_root)  # fmt: skip


class Service:
    """``python -m service serve`` in a subprocess; a context manager.

    ``redis_url`` is the server the service talks to (the embedded one's URL is
    read from the service log once it is up). On exit the service is stopped
    with SIGINT (clean uvicorn shutdown, so ``--profile`` output is written).
    """

    def __init__(self, *, redis_url: str | None, embedded: bool, log_file: str | None = None,
                 profile: str | None = None, env: dict[str, str] | None = None,
                 root: str | Path | None = None) -> None:  # fmt: skip
        self.root = Path(root).resolve() if root else ROOT
        self.embedded = embedded
        self.redis_url = None if embedded else redis_url
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.profile = profile
        self._tmp = Path(tempfile.mkdtemp(prefix="maskserve-bench-"))
        self.log_path = Path(log_file) if log_file else self._tmp / "service.log"
        self._extra_env = env or {}
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60.0) -> "Service":
        from client import Client

        env = {k: v for k, v in os.environ.items() if k != "REDIS_URL" and not k.startswith("MASKSERVE_")}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(self.root), env.get("PYTHONPATH")]))
        if self.embedded:
            env["MASKSERVE_DATA_DIR"] = str(self._tmp / "redis")
        else:
            env["REDIS_URL"] = self.redis_url or DEFAULT_REDIS_URL
        env.update(self._extra_env)
        cmd = [sys.executable]
        if self.profile:
            cmd += ["-m", "cProfile", "-o", str(Path(self.profile).resolve())]
        cmd += ["-m", "service", "serve", "--port", str(self.port), "--log-level", "info",
                "--workers", env.get("MASKSERVE_WORKERS", "1")]  # one process unless asked: figures stay comparable
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, cwd=str(self.root), env=env, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        with Client(self.url, retries=0, timeout=5) as c:
            while not c.ready():
                if self.proc.poll() is not None:
                    raise RuntimeError(f"service exited with {self.proc.returncode}:\n{self.log_tail()}")
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"service not ready after {timeout}s:\n{self.log_tail()}")
                time.sleep(0.1)
        if self.embedded:
            m = re.search(r"embedded Redis at (redis://[^\s,]+)", self.log_path.read_text(errors="replace"))
            if m is None:
                raise RuntimeError(f"could not find the embedded server's URL in the log:\n{self.log_tail()}")
            self.redis_url = m.group(1)
        return self

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self, timeout: float = 30.0) -> None:
        if self.proc is not None:
            stop_process(self.proc, timeout, signal.SIGINT)
        self.proc = None
        if getattr(self, "_log", None) is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> "Service":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
        shutil.rmtree(self._tmp, ignore_errors=True)


class BenchRedis:
    """Flush the benchmark database before and after (not for the embedded server)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.url = None if args.embedded else args.redis_url

    def __enter__(self) -> "BenchRedis":
        if self.url:
            flushdb(self.url)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.url:
            flushdb(self.url)


def print_profile(path: str, top: int = 25) -> None:
    import pstats

    if not Path(path).exists():
        print(f"(no profile written to {path})")
        return
    print(f"\n-- service profile ({path}), event-loop thread, top {top} by own time --")
    st = pstats.Stats(path)
    st.sort_stats("tottime").print_stats(top)
    print(f"-- top {top} by cumulative time --")
    st.sort_stats("cumulative").print_stats(top)


# ---- figures -----------------------------------------------------------------


_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def proc_cpu(pid: int) -> float:
    """CPU seconds (user + system, all threads) of process ``pid``, from /proc (Linux; nan elsewhere)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _TICK
    except (OSError, IndexError, ValueError):
        return float("nan")


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants, from /proc (Linux; just ``[pid]`` elsewhere): a service started with
    ``--workers N`` is a manager process and its workers, and the embedded Redis server a child."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for tid in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{tid}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
        except OSError:
            pass
    return out


def proc_status(pid: int, field: str) -> int:
    """An integer field of /proc/PID/status (``VmRSS`` in kB, ``Threads``); 0 when the process is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def proc_name(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return "?"


def set_affinity(pid: int, cpus: set[int]) -> None:
    """Pin every thread of process ``pid`` (threads it starts later inherit their creator's CPUs)."""
    try:
        tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        tids = [pid]
    for tid in tids:
        try:
            os.sched_setaffinity(tid, cpus)
        except OSError:  # a thread that ended meanwhile
            pass


def redis_cpu(r) -> float:  # noqa: ANN001
    """CPU seconds the Redis server has used (INFO cpu, user + system)."""
    info = r.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank-interpolated percentile (q in 0..100) of a non-empty sequence."""
    xs = sorted(values)
    if not xs:
        return float("nan")
    pos = (len(xs) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def human(n: float, unit: str = "") -> str:
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.2f} {suffix}{unit}"
    return f"{n:.0f} {unit}".rstrip()


# the steps of ``batch_path_steps``, in order
BATCH_PATH_STEPS = ("open_dataset", "Redis fetch", "assemble + mask/apply", "outputs + encode")


def batch_path_steps(redis_url: str, name: str, b: int, iters: int, options: dict[str, Any], *, seed: int = 0,
                     first_index: int = 900_000, warmup: int = 3,
                     chunk_cache_bytes: int | None = None) -> dict[str, list[float]]:  # fmt: skip
    """Seconds per step of the batch route's own path (``service.batches.batching``), run
    in-process on this process's event loop, the way the route runs it: the
    dataset opened from the counters last seen and the fetch checking them.
    ``chunk_cache_bytes``: the row cache (None: the service's default size);
    with it, warm-up first serves every row (every static copy) once."""
    import asyncio

    import redis.asyncio as aioredis

    from service.batches.batching import open_dataset, outputs, prepare_batch, render
    from service.data.catalog import Catalog
    from service.batches.permute import stream_ids
    from service.http.routes.batches import BatchQuery
    from service.store.store import Store

    if chunk_cache_bytes is None:
        from service.core.config import Settings

        chunk_cache_bytes = Settings().chunk_cache_bytes

    async def run() -> dict[str, list[float]]:
        nonlocal warmup
        r = aioredis.from_url(redis_url)
        try:
            store = Store(r, KEY_PREFIX, chunk_cache_bytes=chunk_cache_bytes)
            catalog = Catalog(store)
            q = BatchQuery(size=b, seed=seed, **options)
            spec = q.spec()
            fetch, spent = store._read, [0.0]  # every batch read goes through it (the row cache, then Redis)

            async def timed_fetch(*a: Any, **kw: Any) -> Any:
                t = time.perf_counter()
                try:
                    return await fetch(*a, **kw)
                finally:
                    spent[0] += time.perf_counter() - t

            store._read = timed_fetch  # type: ignore[method-assign]
            steps: dict[str, list[float]] = {k: [] for k in BATCH_PATH_STEPS}
            if chunk_cache_bytes:
                # consecutive batches of one more epoch than it takes for every row (and with static masks, every
                # copy: copy = epoch mod K) to have been served once, so the figures are a warm cache's
                counters = await store.counters(name)
                epochs = 1 + (q.copies if q.mode == "static" else 1)
                warmup += epochs * -(-counters[1] // b) if counters else 0
            for it in range(iters + warmup):
                t0 = time.perf_counter()
                known = catalog.known(name)
                ds = await open_dataset(catalog, name, known)
                t1 = time.perf_counter()
                index = first_index + it
                seq_ids, epochs = stream_ids(seed, index, b, ds.num_sequences)
                spent[0] = 0.0
                compute = await prepare_batch(catalog, ds, seq_ids, seed=seed, epoch=int(epochs[0]), params=q,
                                              spec=spec, checked=known is not None)  # fmt: skip
                m = compute()  # on the event loop here; the route runs it on the CPU pool above a size
                t2 = time.perf_counter()
                render(outputs(m, seq_ids, q, ds.rt.vocab.pad_id), {"dataset": name, "index": index}, False, 1 << 18)
                t3 = time.perf_counter()
                if it >= warmup:
                    for key, dt in zip(steps, (t1 - t0, spent[0], t2 - t1 - spent[0], t3 - t2)):
                        steps[key].append(dt)
            return steps
        finally:
            await r.aclose()

    return asyncio.run(run())
