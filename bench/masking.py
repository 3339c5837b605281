"""Masking throughput: maskserve's deterministic masker vs. the Hugging Face collator, side by side.

Everything below runs in ONE invocation, on the same real data (the stdlib
docstrings, tokenized with a byte-level BPE trained by
``service.data.tokenization.train_tokenizer`` and packed ``complete`` into
full-length sequences), for B x L (default 256 x 512) and again at a short
length (default L=128). Figures are sequences/s, medians over ``--repeats``
repeats after warm-up; every repeat runs every case of its group once, in
turn, so load from elsewhere on the machine hits all cases alike.

References (this process):
   (1)  transformers.DataCollatorForLanguageModeling(tok, mlm_probability=0.15) fed B
        {"input_ids": list[int]} (the HF Trainer path); (1b) the same with
        "special_tokens_mask" lists (what run_mlm.py's tokenization returns), for information
   (2)  the same collator fed B pre-made tensors: (2a) [{"input_ids": tensor}],
        (2b) [tensor, ...] (stacked by the collator); the faster one is "(2)" in the ratios
   (3)  its vectorized core, collator.torch_mask_tokens(tensor, special_tokens_mask=precomputed)
   (4)  one-call vectorized numpy masker (np.random.Generator, no determinism)
   (5)  HTTP floor: a tiny uvicorn app (subprocess) returning a fixed, pre-encoded safetensors
        body of the served shape, fetched by client.Client.batch (httpx + wire.decode)
maskserve:
   (6)  service.masking.masking.mask_batch, unit=token, count=bernoulli (hash-based, deterministic)
   (7)  unit=whole_word   (8) unit=span (word starts from the real packed text)   (9) token, exact
   (10) service.masking.static.apply on pre-fetched static records (K=10 copies via encode_chunk)
   (11) end to end: a `python -m service serve` subprocess on Redis, client.Client in this
        process: dynamic token, dynamic whole_word and static, sequential and Client.batches(prefetch);
        the service's chunk cache is warmed first (every row and static copy served once), as a
        dataset smaller than MASKSERVE_CHUNK_CACHE_BYTES is after its first K epochs

    .venv/bin/python bench/masking.py
    .venv/bin/python bench/masking.py --quick
    .venv/bin/python bench/masking.py --py-spy 8            # where the service spends its time
    .venv/bin/python bench/masking.py --profile /tmp/svc.prof  # cProfile over the service (slows it)
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402

from _common import (  # noqa: E402
    Service,
    batch_path_steps,
    flushdb,
    free_port,
    header,
    print_profile,
    proc_cpu,
    redis_client,
    redis_cpu,
    redis_version,
    repeat_to,
    stdlib_docs,
    train_bpe,
)
from service.core.process import stop_process  # noqa: E402

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/11"
COPIES = 10  # static masks per sequence


# ---- command line ------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-size", type=int, default=None, help="B (default 256; 64 with --quick)")
    p.add_argument("--seq-len", type=int, default=None, help="L (default 512; 256 with --quick)")
    p.add_argument("--short-seq-len", type=int, default=None, help="the second length measured (default 128; 64 with --quick; 0 skips)")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per case; the median is reported (default 7; 2 with --quick)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls per case before the repeats (default 3; 1 with --quick)")
    p.add_argument("--min-time", type=float, default=None, help="seconds one repeat of one case lasts at least (default 0.3; 0.03 with --quick)")
    p.add_argument("--vocab-size", type=int, default=8000, help="BPE vocabulary size (default %(default)s)")
    p.add_argument("--mlm-probability", type=float, default=0.15, help="p (default %(default)s)")
    p.add_argument("--prefetch", type=int, default=4, help="k of Client.batches(prefetch=k) (default %(default)s)")
    p.add_argument("--min-batches", type=int, default=None, help="the served datasets hold at least this many B's worth of full sequences (default 8; 4 with --quick)")
    p.add_argument("--torch-threads", type=int, default=1,
                   help="torch.set_num_threads for the HF references (default 1, as in DataLoader workers; 0 leaves torch's default)")
    p.add_argument("--quick", action="store_true", help="a fast sanity pass: small B and L, few short repeats")
    p.add_argument("--no-e2e", action="store_true", help="skip the service (and the HTTP floor): in-process figures only")
    g = p.add_argument_group("service")
    g.add_argument("--redis-url", default=DEFAULT_REDIS_URL, help="Redis for the service; FLUSHDB'd before and after (default %(default)s)")
    g.add_argument("--service-log", default=None, help="keep the service's log in this file")
    g.add_argument("--profile", default=None, metavar="FILE.prof",
                   help="run the service under cProfile and print its top functions (slows the end-to-end figures)")
    g.add_argument("--py-spy", type=float, default=0.0, metavar="SECONDS",
                   help="after the measurements, sample the service with py-spy for this long while this process "
                        "pulls sequential dynamic batches, and print where its time goes (needs py-spy)")
    a = p.parse_args()
    q = a.quick
    for name, full, quick in (("batch_size", 256, 64), ("seq_len", 512, 256), ("short_seq_len", 128, 64),
                              ("repeats", 7, 2), ("warmup", 3, 1), ("min_time", 0.3, 0.03), ("min_batches", 8, 4)):  # fmt: skip
        if getattr(a, name) is None:
            setattr(a, name, quick if q else full)
    return a


# ---- timing ------------------------------------------------------------------


class Case:
    """One measured thing: ``call(k, prepared)`` does batch ``k``; ``prepare(k)`` (untimed) readies its input."""

    def __init__(self, key: str, label: str, length: int, b: int, call: Callable[[int, Any], Any],
                 prepare: Callable[[int], Any] | None = None, meter: "CpuMeter | None" = None) -> None:  # fmt: skip
        self.key, self.label, self.length, self.b = key, label, length, b
        self.call, self.prepare, self.meter = call, prepare, meter
        self.k = 0
        self.n = 1
        self.rates: list[float] = []
        self.cpu = np.zeros(3)  # client, service, Redis seconds over all timed batches
        self.batches = 0

    def _one(self) -> float:
        arg = self.prepare(self.k) if self.prepare else None
        t0 = time.perf_counter()
        self.call(self.k, arg)
        dt = time.perf_counter() - t0
        self.k += 1
        return dt

    def calibrate(self, warmup: int, min_time: float) -> None:
        times = [self._one() for _ in range(max(1, warmup))]
        est = statistics.median(times[1:] if len(times) > 2 else times)
        self.n = max(1, min(100_000, math.ceil(min_time / max(est, 1e-7))))

    def run(self) -> None:
        c0 = self.meter.read() if self.meter else None
        total = sum(self._one() for _ in range(self.n))
        if c0 is not None:
            self.cpu += self.meter.read() - c0
            self.batches += self.n
        self.rates.append(self.n * self.b / total)

    @property
    def rate(self) -> float:
        return statistics.median(self.rates) if self.rates else float("nan")


class StreamCase(Case):
    """``Client.batches(prefetch=k)``: one stream of ``n`` batches per repeat, wall time of the whole stream."""

    def __init__(self, key: str, label: str, length: int, b: int, stream: Callable[[int, int], Any],
                 prefetch: int, meter: "CpuMeter | None" = None) -> None:  # fmt: skip
        super().__init__(key, label, length, b, lambda k, a: None, meter=meter)
        self.stream, self.prefetch = stream, prefetch

    def _stream(self, n: int) -> float:
        t0 = time.perf_counter()
        got = 0
        with self.stream(self.k, n) as it:
            for batch in it:
                got += 1
                assert len(batch) == self.b
        dt = time.perf_counter() - t0
        assert got == n, (got, n)
        self.k += n
        return dt

    def calibrate(self, warmup: int, min_time: float) -> None:
        n0 = max(2 * self.prefetch, warmup)
        est = self._stream(n0) / n0
        self.n = max(3 * self.prefetch, math.ceil(min_time / max(est, 1e-7)))

    def run(self) -> None:
        c0 = self.meter.read() if self.meter else None
        dt = self._stream(self.n)
        if c0 is not None:
            self.cpu += self.meter.read() - c0
            self.batches += self.n
        self.rates.append(self.n * self.b / dt)


def run_group(title: str, cases: list[Case], args: argparse.Namespace) -> None:
    print(f"{title}: calibrating {len(cases)} cases ...", end="", flush=True)
    t0 = time.perf_counter()
    for c in cases:
        c.calibrate(args.warmup, args.min_time)
    for r in range(args.repeats):
        for c in cases:
            c.run()
        print(f" {r + 1}", end="", flush=True)
    print(f"  ({time.perf_counter() - t0:.0f}s)", flush=True)


class CpuMeter:
    """CPU seconds (user + sys) of this process (all threads), the service process and Redis."""

    def __init__(self, service_pid: int, r) -> None:  # noqa: ANN001
        self.pid, self.r = service_pid, r

    def read(self) -> np.ndarray:
        return np.array([time.process_time(), proc_cpu(self.pid), redis_cpu(self.r)])


# ---- data --------------------------------------------------------------------


class Data:
    """Real packed sequences of one length L and the fixed batches drawn from them."""

    def __init__(self, info, enc: tuple[np.ndarray, np.ndarray, np.ndarray], length: int, b: int,  # noqa: ANN001
                 n_batches: int = 4, seed: int = 0) -> None:  # fmt: skip
        from service.data.packing import Packer

        ids, ws, doc_lengths = enc
        per_copy = len(ids) + len(doc_lengths)  # + one sep per document
        copies = max(1, math.ceil(2 * b * (length - 1) / per_copy))
        if copies > 1:
            ids, ws, doc_lengths = np.tile(ids, copies), np.tile(ws, copies), np.tile(doc_lengths, copies)
        packer = Packer("complete", length, info.special_ids["cls"], info.special_ids["sep"])
        seqs = packer.feed(ids, ws, doc_lengths)  # all full length (the short tail is never flushed)
        self.pool_ids = np.stack([s[0] for s in seqs]).astype(np.int32)
        self.pool_ws = np.stack([s[1] for s in seqs])
        self.length, self.b = length, b
        rng = np.random.default_rng(seed)
        self.rows = [np.sort(rng.choice(len(seqs), size=b, replace=len(seqs) < b)) for _ in range(n_batches)]
        self.ids = [self.pool_ids[r] for r in self.rows]  # (B, L) int32
        self.ws = [self.pool_ws[r] for r in self.rows]  # (B, L) bool, word starts of the real text
        self.seq_ids = [r.astype(np.int64) for r in self.rows]
        self.lengths = np.full(b, length, dtype=np.int64)
        self.words_per_seq = float(self.pool_ws.sum(axis=1).mean())

    def pick(self, k: int) -> int:
        return k % len(self.ids)


def hf_tokenizer(tok_json: dict):  # noqa: ANN201
    """A real transformers tokenizer over the trained byte-level BPE (RoBERTa's special tokens)."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer.from_str(json.dumps(tok_json))
    return PreTrainedTokenizerFast(tokenizer_object=raw, mask_token="<mask>", pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", cls_token="<s>", sep_token="</s>", unk_token="<unk>")  # fmt: skip


# ---- in-process cases ----------------------------------------------------------


def inprocess_cases(d: Data, hf, info, vocab, args: argparse.Namespace) -> list[Case]:  # noqa: ANN001
    import torch
    from transformers import DataCollatorForLanguageModeling

    from service.masking.masking import MaskSpec, mask_batch
    from service.masking.static import apply, encode_chunk, pair_dtype

    b, L, p = d.b, d.length, args.mlm_probability
    tag = f"L{L}"
    collator = DataCollatorForLanguageModeling(hf, mlm_probability=p)
    special_ids = sorted(hf.all_special_ids)

    # inputs, built once, untimed
    lists = [[{"input_ids": row.tolist()} for row in x] for x in d.ids]
    lists_stm = [[{"input_ids": row.tolist(),
                   "special_tokens_mask": hf.get_special_tokens_mask(row.tolist(), already_has_special_tokens=True)}
                  for row in x] for x in d.ids]  # fmt: skip
    tensors = [torch.from_numpy(x.astype(np.int64)) for x in d.ids]
    row_dicts = [[{"input_ids": t} for t in x.unbind(0)] for x in tensors]
    row_tensors = [list(x.unbind(0)) for x in tensors]
    stms = [torch.from_numpy(np.isin(x, special_ids)) for x in d.ids]

    def hf_out_ok(out: dict) -> None:
        assert out["input_ids"].shape == (b, L) and out["labels"].shape == (b, L)

    # numpy floor: plain Generator draws, 80/10/10, random ids from the ordinary vocabulary
    gen = np.random.default_rng(1)
    is_special, ordinary, mask_id = vocab.is_special, vocab.ordinary_ids, vocab.mask_id

    def numpy_mask(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        sel = gen.random(ids.shape, dtype=np.float32) < p
        sel &= ~is_special[ids]
        labels = np.where(sel, ids, np.int32(-100))
        kind = gen.random(ids.shape, dtype=np.float32)
        out = ids.copy()
        out[sel & (kind < 0.8)] = mask_id
        rnd = sel & (kind >= 0.8) & (kind < 0.9)
        out[rnd] = ordinary[gen.integers(0, len(ordinary), int(rnd.sum()))]
        return out, labels

    specs = {
        "token": MaskSpec(p),
        "whole_word": MaskSpec(p, unit="whole_word"),
        "span": MaskSpec(p, unit="span"),
        "exact": MaskSpec(p, count="exact"),
    }

    def masker(spec: MaskSpec, words: bool) -> Callable[[int, Any], Any]:
        def call(k: int, _: Any) -> Any:
            j = d.pick(k)
            return mask_batch(d.ids[j], d.lengths, d.seq_ids[j], seed=0, epoch=k, spec=spec, vocab=vocab,
                              word_start=d.ws[j] if words else None)  # fmt: skip

        return call

    # static: K copies of each batch's sequences encoded as the cache stores them, sliced per row
    width = pair_dtype(info.id_dtype).itemsize
    records: list[list[tuple[np.ndarray, bytes]]] = []  # [batch][copy] -> (sizes, records joined)
    for j in range(len(d.ids)):
        copies = [mask_batch(d.ids[j], d.lengths, d.seq_ids[j], seed=0, epoch=c, spec=specs["token"], vocab=vocab)
                  for c in range(COPIES)]  # fmt: skip
        blob = encode_chunk(copies, info.id_dtype)
        table = np.frombuffer(blob, dtype="<u4", count=2 * b * COPIES, offset=4).reshape(b * COPIES, 2)
        per_copy = []  # per copy: (record sizes, records joined), as the service's fetch returns them
        for c in range(COPIES):
            rows = [blob[int(table[i * COPIES + c, 0]): int(table[i * COPIES + c, 0]) + int(table[i * COPIES + c, 1]) * width]
                    for i in range(b)]  # fmt: skip
            per_copy.append((table[c::COPIES, 1].astype(np.int64), b"".join(rows)))
        m = apply(d.ids[j], d.lengths, *per_copy[3], info.id_dtype, vocab.pad_id, vocab.is_special)
        assert (m.input_ids == copies[3].input_ids).all() and (m.labels == copies[3].labels).all(), "static != dynamic"
        records.append(per_copy)

    def static_call(k: int, _: Any) -> Any:
        j = d.pick(k)
        return apply(d.ids[j], d.lengths, *records[j][k % COPIES], info.id_dtype, vocab.pad_id, vocab.is_special)

    return [
        Case(f"1@{tag}", "HF collator, [{'input_ids': list[int]}]", L, b,
             lambda k, _: hf_out_ok(collator(lists[d.pick(k)]))),
        Case(f"1b@{tag}", "HF collator, + special_tokens_mask lists", L, b,
             lambda k, _: hf_out_ok(collator(lists_stm[d.pick(k)]))),
        Case(f"2a@{tag}", "HF collator, [{'input_ids': tensor}]", L, b,
             lambda k, _: hf_out_ok(collator(row_dicts[d.pick(k)]))),
        Case(f"2b@{tag}", "HF collator, [tensor] (stacked)", L, b,
             lambda k, _: hf_out_ok(collator(row_tensors[d.pick(k)]))),
        Case(f"3@{tag}", "HF torch_mask_tokens(tensor, stm)", L, b,
             lambda k, x: collator.torch_mask_tokens(x, special_tokens_mask=stms[d.pick(k)]),
             prepare=lambda k: tensors[d.pick(k)].clone()),
        Case(f"4@{tag}", "numpy Generator one-call masker", L, b, lambda k, _: numpy_mask(d.ids[d.pick(k)])),
        Case(f"6@{tag}", "mask_batch token bernoulli", L, b, masker(specs["token"], False)),
        Case(f"7@{tag}", "mask_batch whole_word", L, b, masker(specs["whole_word"], True)),
        Case(f"8@{tag}", "mask_batch span", L, b, masker(specs["span"], True)),
        Case(f"9@{tag}", "mask_batch token exact", L, b, masker(specs["exact"], False)),
        Case(f"10@{tag}", "static.apply (pre-fetched records)", L, b, static_call),
    ]  # fmt: skip


# ---- the HTTP floor: a tiny uvicorn app serving fixed bodies -------------------------


_TINY_APP = r'''
import sys, uvicorn
bodies = {}
for spec in sys.argv[2:]:
    name, path = spec.split("=", 1)
    bodies[name] = open(path, "rb").read()
heads = {n: [(b"content-type", b"application/vnd.safetensors"), (b"content-length", str(len(v)).encode())]
         for n, v in bodies.items()}
async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            msg = await receive()
            if msg["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif msg["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] != "http":
        return
    parts = scope["path"].split("/")  # /v1/datasets/{name}/batch
    name = parts[3] if len(parts) > 3 else ""
    if name not in bodies:
        await send({"type": "http.response.start", "status": 404, "headers": [(b"content-length", b"0")]})
        await send({"type": "http.response.body", "body": b""})
        return
    await send({"type": "http.response.start", "status": 200, "headers": heads[name]})
    await send({"type": "http.response.body", "body": bodies[name]})
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning", access_log=False)
'''


class TinyServer:
    """The fixed-body app in a subprocess (same uvicorn defaults as the service: uvloop, httptools)."""

    def __init__(self, bodies: dict[str, bytes]) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="maskserve-bench-tiny-"))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        specs = []
        for name, body in bodies.items():
            path = self.tmp / f"{name}.safetensors"
            path.write_bytes(body)
            specs.append(f"{name}={path}")
        (self.tmp / "app.py").write_text(_TINY_APP)
        self.proc = subprocess.Popen([sys.executable, str(self.tmp / "app.py"), str(self.port), *specs],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
        import httpx

        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{self.url}/v1/datasets/{next(iter(bodies))}/batch", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"tiny server did not start: {self.proc.stderr.read().decode() if self.proc.stderr else ''}")
            time.sleep(0.05)

    def close(self) -> None:
        import shutil

        stop_process(self.proc, 10)
        shutil.rmtree(self.tmp, ignore_errors=True)


# ---- the service's batch path in this process (no HTTP) ---------------------------------


def service_path(redis_url: str, name: str, b: int, iters: int, options: dict[str, Any]) -> dict[str, float]:
    """Median ms per batch of the batch route's steps (service.batches.batching), run on this process's event loop."""
    steps = batch_path_steps(redis_url, name, b, iters, options)
    return {k: statistics.median(v) * 1e3 for k, v in steps.items()}


# ---- py-spy ---------------------------------------------------------------------


def py_spy(pid: int, seconds: float, drive: Callable[[], None]) -> None:
    """Sample the service with py-spy while ``drive()`` keeps it busy; print leaf and inclusive shares."""
    exe = Path(sys.executable).with_name("py-spy")
    exe = exe if exe.exists() else Path("py-spy")
    out = Path(tempfile.mkdtemp(prefix="maskserve-bench-spy-")) / "stacks.txt"
    rate = 250
    proc = subprocess.Popen([str(exe), "record", "--pid", str(pid), "--duration", str(max(1, round(seconds))),
                             "--rate", str(rate), "--format", "raw", "--threads", "--nonblocking", "--output", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
    time.sleep(0.5)
    while proc.poll() is None:
        drive()
    log = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
    if proc.returncode != 0 or not out.exists():
        print(f"py-spy failed (rc {proc.returncode}): {log.strip()[-500:]}")
        return
    leaf: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    total = 0
    for line in out.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = stack.split(";")
        if frames[0].startswith("thread ("):
            name = frames.pop(0).partition(": ")[2] or "?"
            threads["event loop (MainThread)" if name == "MainThread" else "worker threads" if "AnyIO" in name or "worker" in name.lower() else name] += n
        if not frames:
            continue
        frames = [_frame(f) for f in frames]
        leaf[frames[-1]] += n
        for f in set(frames):
            incl[f] += n
    if not total:
        print("py-spy: no samples")
        return
    expect = rate * max(1, round(seconds))
    print(f"\n-- py-spy on the service (pid {pid}), {total} non-idle samples at {rate} Hz over {round(seconds)}s "
          f"(~{total / expect:.0%} of one core busy, all threads) during sequential dynamic token requests --")  # fmt: skip
    print("  by thread: " + ", ".join(f"{name} {n / total:.0%}" for name, n in threads.most_common()))
    print("  own time (leaf frames; uvloop's C work shows as Runner.run):")
    for f, n in leaf.most_common(18):
        print(f"    {n / total:6.1%}  {f}")
    print("  inclusive (selected frames):")
    keys = ("get_batch", "masked (", "mask_batch", "assemble", "apply (", "render", "encode (", "fetch (",
            "run_sync", "_read_response", "execute_command", "parse_response", "read_response", "__call__ (h11",
            "data_received", "on_response_complete", "serialize_response", "solve_dependencies", "run_endpoint_function",
            "limit_and_measure", "send (", "write")  # fmt: skip
    shown = [(f, n) for f, n in incl.most_common() if any(k in f for k in keys)]
    for f, n in shown[:22]:
        print(f"    {n / total:6.1%}  {f}")


def _frame(f: str) -> str:
    """'func (path/to/file.py:123)' -> 'func (file.py)'."""
    name, _, where = f.partition(" (")
    where = where.rstrip(")")
    path = where.rsplit(":", 1)[0]
    parts = Path(path).parts
    short = "/".join(parts[-2:]) if len(parts) >= 2 else path
    return f"{name} ({short})"


# ---- main -------------------------------------------------------------------------


def main() -> int:
    args = parse_args()
    b, L, Ls = args.batch_size, args.seq_len, args.short_seq_len
    lengths = [L] + ([Ls] if Ls and Ls != L else [])
    import torch
    import transformers

    if args.torch_threads > 0:
        torch.set_num_threads(args.torch_threads)
    header(
        "maskserve masking throughput vs. the Hugging Face MLM collator",
        [line.rstrip() for line in __doc__.split("References (this process):")[1].split("\n    .venv")[0].splitlines() if line.strip()],
        {"batch_size": b, "seq_len": " ".join(map(str, lengths)), "repeats": args.repeats, "warmup": args.warmup,
         "min_time": args.min_time, "vocab_size": args.vocab_size, "mlm_probability": args.mlm_probability,
         "prefetch": args.prefetch, "redis": args.redis_url, "quick": args.quick},  # fmt: skip
    )
    print(f"also: transformers {transformers.__version__}, torch {torch.__version__} "
          f"({torch.get_num_threads()} intra-op threads for the HF references), "
          f"Redis server {redis_version(args.redis_url) if not args.no_e2e else '-'}", flush=True)

    from service.masking.masking import Vocab
    from service.data.tokenization import encode_texts, load_tokenizer, prepare
    from service.core.tuning import tune_allocator

    print(f"service.core.tuning.tune_allocator(): {tune_allocator()}")
    t0 = time.perf_counter()
    docs = stdlib_docs()
    tok, tok_json = train_bpe(docs, args.vocab_size)
    info = prepare(load_tokenizer(json.dumps(tok_json)))
    hf = hf_tokenizer(tok_json)
    vocab = Vocab.build(info.vocab_size, list(info.all_special_ids), info.special_ids["mask"], info.special_ids["pad"])
    assert sorted(hf.all_special_ids) == sorted(info.all_special_ids), (hf.all_special_ids, info.all_special_ids)
    enc = encode_texts(info, docs)
    print(f"corpus: {len(docs)} stdlib docstrings, {len(enc[0]):,} tokens per copy; tokenizer: byte-level BPE "
          f"vocab {info.vocab_size} (HF: {type(hf).__name__}, len {len(hf)}, mask {hf.mask_token_id}, pad "
          f"{hf.pad_token_id}, specials {sorted(hf.all_special_ids)}) ({time.perf_counter() - t0:.1f}s)")  # fmt: skip
    data = {n: Data(info, enc, n, b) for n in lengths}
    for n, d in data.items():
        print(f"  L={n}: pool of {len(d.pool_ids):,} full-length packed sequences, {d.words_per_seq:.0f} words/sequence; "
              f"{len(d.ids)} fixed batches of B={b} cycled")  # fmt: skip
    print(flush=True)

    cases: dict[str, Case] = {}
    for n in lengths:
        group = inprocess_cases(data[n], hf, info, vocab, args)
        run_group(f"in-process, L={n}", group, args)
        cases.update({c.key: c for c in group})

    e2e_extra: dict[int, dict[str, float]] = {}
    if not args.no_e2e:
        run_e2e(args, data, tok_json, vocab, info, cases, e2e_extra)

    report(args, lengths, cases, e2e_extra)
    if args.profile and not args.no_e2e:
        print_profile(args.profile)
    return 0


def run_e2e(args: argparse.Namespace, data: dict[int, Data], tok_json: dict, vocab, info,  # noqa: ANN001
            cases: dict[str, Case], extra: dict[int, dict[str, float]]) -> None:  # fmt: skip
    from client import Client
    from wire import encode
    from service.masking.masking import MaskSpec, mask_batch

    b, lengths, k = args.batch_size, list(data), args.prefetch
    docs = stdlib_docs()
    tokens_per_copy = sum(len(e.ids) + 1 for e in info.tokenizer.encode_batch(docs, add_special_tokens=False))

    # (5) bodies of the served shape, from a real masked batch
    bodies = {}
    for n in lengths:
        d = data[n]
        m = mask_batch(d.ids[0], d.lengths, d.seq_ids[0], seed=0, epoch=0, spec=MaskSpec(args.mlm_probability), vocab=vocab)
        bodies[f"L{n}"] = encode({"input_ids": m.input_ids, "attention_mask": m.attention_mask, "labels": m.labels,
                                  "sequence_ids": d.seq_ids[0]},
                                 {"dataset": f"L{n}", "seed": "0", "epoch": "0", "index": "0", "pad_id": str(vocab.pad_id),
                                  "mode": "dynamic"})  # fmt: skip

    flushdb(args.redis_url)
    svc = Service(redis_url=args.redis_url, embedded=False, log_file=args.service_log, profile=args.profile)
    tiny = None
    try:
        svc.start()
        tiny = TinyServer(bodies)
        if args.profile:
            print("\nnote: the service runs under cProfile (--profile): its end-to-end figures are slowed by it")
        print(f"\nservice {svc.url} pid {svc.pid} (REDIS_URL={args.redis_url}){' under cProfile' if args.profile else ''}; "
              f"HTTP floor app {tiny.url} pid {tiny.proc.pid}", flush=True)  # fmt: skip
        rcpu = redis_client(args.redis_url)
        meter = CpuMeter(svc.pid, rcpu)
        with Client(svc.url, timeout=600) as c, Client(tiny.url, timeout=600) as ct:
            names = {}
            for n in lengths:
                name = f"bench-masking-L{n}"
                names[n] = name
                copies = max(1, math.ceil(args.min_batches * b * (n - 1) * 1.02 / tokens_per_copy))
                c.create_dataset(name, tokenizer=tok_json, seq_len=n, packing="complete")
                t0 = time.perf_counter()
                c.ingest(name, repeat_to(docs, copies=copies))
                t1 = time.perf_counter()
                meta = c.dataset(name)
                st = c.build_static_masks(name, seed=0, copies=COPIES, mlm_probability=args.mlm_probability)
                t2 = time.perf_counter()
                full = meta["num_tokens"] // n
                probe = c.batch(name, b, seed=0, index=0, mlm_probability=args.mlm_probability)
                assert probe["input_ids"].shape == (b, n), probe["input_ids"].shape
                print(f"  {name}: {copies} copies of the docstrings -> {meta['num_sequences']:,} sequences "
                      f"(~{full:,} full = {full / b:.1f} B's worth), ingest {t1 - t0:.1f}s; static cache "
                      f"{st['cache']} K={COPIES} complete={st['complete']} {st['bytes'] / 1e6:.1f} MB "
                      f"({st['bytes_per_token']:.2f} B/token), built in {t2 - t1:.1f}s; served body "
                      f"{len(bodies[f'L{n}']):,} B, floor body {len(bodies[f'L{n}']):,} B", flush=True)  # fmt: skip
                # the service's chunk cache warm before anything is timed: every row and every static copy
                # (copy = epoch mod K) served once, by K + 1 epochs of consecutive static batches
                t3 = time.perf_counter()
                warm = (COPIES + 1) * -(-meta["num_sequences"] // b)
                for index in range(warm):
                    c.batch(name, b, seed=0, index=index, mode="static", copies=COPIES,
                            mlm_probability=args.mlm_probability)  # fmt: skip
                print(f"  {name}: chunk cache warmed by {warm} static batches in {time.perf_counter() - t3:.1f}s",
                      flush=True)  # fmt: skip

            for n in lengths:
                name, tag = names[n], f"L{n}"
                group: list[Case] = []
                base = itertools.count(1)

                def seq_case(key: str, label: str, client: Client, dsname: str, opts: dict[str, Any],
                             meter_: CpuMeter | None) -> Case:  # fmt: skip
                    off = next(base) * 1_000_000

                    def call(i: int, _: Any) -> None:
                        batch = client.batch(dsname, b, seed=0, index=off + i, **opts)
                        assert len(batch) == b

                    return Case(key, label, n, b, call, meter=meter_)

                def stream_case(key: str, label: str, client: Client, dsname: str, opts: dict[str, Any],
                                meter_: CpuMeter | None) -> Case:  # fmt: skip
                    off = next(base) * 1_000_000
                    return StreamCase(key, label, n, b, lambda i, steps: client.batches(
                        dsname, b, seed=0, start=off + i, steps=steps, prefetch=k, **opts), k, meter=meter_)  # fmt: skip

                dyn = {"mlm_probability": args.mlm_probability}
                ww = {**dyn, "unit": "whole_word"}
                static = {**dyn, "mode": "static", "copies": COPIES}
                group += [
                    seq_case(f"5s@{tag}", "HTTP floor, sequential", ct, tag, {}, None),
                    stream_case(f"5p@{tag}", f"HTTP floor, prefetch={k}", ct, tag, {}, None),
                    seq_case(f"11ts@{tag}", "e2e dynamic token, sequential", c, name, dyn, meter),
                    stream_case(f"11tp@{tag}", f"e2e dynamic token, prefetch={k}", c, name, dyn, meter),
                    seq_case(f"11ws@{tag}", "e2e dynamic whole_word, sequential", c, name, ww, meter),
                    stream_case(f"11wp@{tag}", f"e2e dynamic whole_word, prefetch={k}", c, name, ww, meter),
                    seq_case(f"11ss@{tag}", "e2e static, sequential", c, name, static, meter),
                    stream_case(f"11sp@{tag}", f"e2e static, prefetch={k}", c, name, static, meter),
                ]  # fmt: skip
                run_group(f"end to end, L={n}", group, args)
                cases.update({x.key: x for x in group})

            # where a sequential dynamic batch goes: the service's path without HTTP, in this process
            iters = 5 if args.quick else 30
            for n in lengths:
                for label, opts in (("token", {}), ("whole_word", {"unit": "whole_word"}),
                                    ("static", {"mode": "static", "copies": COPIES})):  # fmt: skip
                    try:
                        parts = service_path(args.redis_url, names[n], b, iters, {"mlm_probability": args.mlm_probability, **opts})
                    except Exception as exc:  # noqa: BLE001 - internals move; the HTTP figures stand
                        print(f"  (service path in-process, L={n} {label}: skipped, {exc.__class__.__name__}: {exc})")
                        continue
                    extra.setdefault(n, {}).update({f"{label}:{p}": v for p, v in parts.items()})

            if args.py_spy > 0:
                i = [5_000_000]

                def drive() -> None:
                    c.batch(names[lengths[0]], b, seed=0, index=i[0], mlm_probability=args.mlm_probability)
                    i[0] += 1

                py_spy(svc.pid, args.py_spy, drive)
            for name in names.values():
                c.delete_dataset(name, missing_ok=True)
        rcpu.close()
    finally:
        if tiny is not None:
            tiny.close()
        svc.stop()
        flushdb(args.redis_url)


# ---- report -----------------------------------------------------------------------


def report(args: argparse.Namespace, lengths: list[int], cases: dict[str, Case], extra: dict[int, dict[str, float]]) -> None:
    b = args.batch_size
    print(f"\nresults: sequences/s, median of {args.repeats} repeats (min..max), B={b}; CPU columns: ms per batch "
          f"(user+sys) of this process (client, all threads), the service process, and the Redis server (INFO cpu: "
          f"server-wide, so other clients of that server count too)")  # fmt: skip
    print(f"  {'#':<6} {'what':<42} {'L':>4} {'seq/s':>10} {'min..max':>19} {'ms/batch':>9} {'calls':>6}   "
          f"{'client':>6} {'service':>7} {'Redis':>6}")  # fmt: skip
    for c in cases.values():
        ms = b / c.rate * 1e3
        cpu = ""
        if c.batches:
            cl, sv, rd = c.cpu / c.batches * 1e3
            cpu = f"{cl:6.2f} {sv:7.2f} {rd:6.2f}"
        key = c.key.split("@")[0]
        print(f"  ({key + ')':<5} {c.label:<42} {c.length:>4} {c.rate:10,.0f} {min(c.rates):9,.0f}..{max(c.rates):<9,.0f}"
              f" {ms:9.3f} {c.n:6d}   {cpu}")  # fmt: skip

    def get(key: str) -> float:
        c = cases.get(key)
        return c.rate if c is not None else float("nan")

    rows: list[tuple[str, float, float]] = []  # label, value, target (value >= target passes)
    for n in lengths:
        t = f"L{n}"
        r6 = get(f"6@{t}")
        r2 = max(get(f"2a@{t}"), get(f"2b@{t}"))
        rows += [
            (f"L={n}  (6)/(3)   mask_batch token vs torch_mask_tokens", r6 / get(f"3@{t}"), 2.0),
            (f"L={n}  (6)/(1)   mask_batch token vs HF collator on lists", r6 / get(f"1@{t}"), 20.0),
            (f"L={n}  (7)/(6)   whole_word vs token (within 3x)", get(f"7@{t}") / r6, 1 / 3),
            (f"L={n}  (8)/(6)   span vs token (within 3x)", get(f"8@{t}") / r6, 1 / 3),
            (f"L={n}  (10)/(6)  static.apply vs mask_batch token", get(f"10@{t}") / r6, 1.0),
        ]
        if f"11ts@{t}" in cases:
            for mode, s in (("sequential", "s"), (f"prefetch={args.prefetch}", "p")):
                rows.append((f"L={n}  e2e static / e2e dynamic token, {mode}", get(f"11s{s}@{t}") / get(f"11t{s}@{t}"), 1.0))
            for mode, s in (("sequential", "s"), (f"prefetch={args.prefetch}", "p")):
                rows.append((f"L={n}  (11) e2e dynamic token {mode} / (2)", get(f"11t{s}@{t}") / r2, 3.0))
    print("\nratios (targets; (2) = the faster of 2a and 2b):")
    for label, value, target in rows:
        verdict = "n/a " if math.isnan(value) else ("PASS" if value >= target else "MISS")
        print(f"  {label:<60} {value:8.2f}   target >= {target:<5.2f} {verdict}")

    if not extra:
        return
    print("\nwhere a sequential end-to-end batch goes (ms per batch; service path = service.batches.batching run in this process, no HTTP):")
    for n in lengths:
        t = f"L{n}"
        parts = extra.get(n, {})
        floor = b / get(f"5s@{t}") * 1e3
        for label, key in (("token", "11ts"), ("whole_word", "11ws"), ("static", "11ss")):
            e2e = b / get(f"{key}@{t}") * 1e3
            path = {p.split(":", 1)[1]: v for p, v in parts.items() if p.startswith(label + ":")}
            total = sum(path.values())
            c = cases.get(f"{key}@{t}")
            cpu = c.cpu / c.batches * 1e3 if c is not None and c.batches else np.full(3, float("nan"))
            detail = ", ".join(f"{k} {v:.2f}" for k, v in path.items())
            print(f"  L={n} {label:<10} e2e {e2e:7.2f} = HTTP floor {floor:6.2f} + service path {total:6.2f} "
                  f"[{detail}] + rest {e2e - floor - total:6.2f}; CPU: client {cpu[0]:.2f}, service {cpu[1]:.2f}, "
                  f"Redis {cpu[2]:.2f}")  # fmt: skip
        hf2 = b / max(get(f"2a@{t}"), get(f"2b@{t}")) * 1e3
        print(f"  L={n} for scale: HF collator (2) {hf2:.2f} ms/batch, mask_batch token (6) {b / get(f'6@{t}') * 1e3:.2f}, "
              f"static.apply (10) {b / get(f'10@{t}') * 1e3:.2f}")  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
