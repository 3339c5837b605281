"""``maskserve dataset ingest``: files in parallel, committed in the order given, resumable.

Each file (a Parquet file: each run of its row groups, see ``client.corpora``)
is a *unit*. Up to ``--jobs`` units are uploaded at once, each *staged* under
its own key (``commit=false``); the units are then committed one by one in the
order given, so unit i's sequences always follow unit i-1's and the dataset
is the same whatever ``--jobs`` was, on every run and every cluster.

A unit's key is a hash of its absolute path, size, content, row groups and the
options that shape what it becomes (column, text split). Before uploading a
unit the command asks the service for that key: committed units are skipped,
staged ones are only committed. So after a crash or Ctrl-C the same command
goes on where it stopped; nothing is stored twice, nothing is lost (within
``MASKSERVE_INGEST_IDEMPOTENCY_TTL_S`` for committed units and
``MASKSERVE_STAGE_TTL_S`` for staged ones).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: units staged but not yet committed, per upload stream (bounds how long staged data waits for its turn)
WINDOW_PER_JOB = 4


@dataclass(frozen=True)
class Work:
    """A unit of an ingest command: what to upload, and under which key."""

    path: Path
    row_groups: tuple[int, ...] | None
    columnar: bool
    size: int  # bytes of input it stands for, for the progress bar
    options: dict[str, Any]

    def describe(self) -> str:
        if self.row_groups is None:
            return str(self.path)
        return f"{self.path} [row groups {self.row_groups[0]}-{self.row_groups[-1]}]"

    def key(self) -> str:
        """The unit's idempotency key: path, size, content hash, row groups and options."""
        with self.path.open("rb") as f:
            content = hashlib.file_digest(f, "sha256").hexdigest()
        ident = {"path": str(self.path.resolve()), "size": self.path.stat().st_size, "sha256": content,
                 "row_groups": self.row_groups, "options": self.options}  # fmt: skip
        return "file-" + hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:56]


def plan(args: argparse.Namespace) -> list[Work]:
    """The command's units, in the order their sequences will take."""
    from client.corpora import ARROW_SUFFIXES, PARQUET_SUFFIXES, hf_files, parquet_units

    if args.hf:
        if args.files:
            raise SystemExit("maskserve dataset ingest: give files or --hf DIR, not both")
        files = hf_files(Path(args.hf), None if args.split == "none" else args.split)
    else:
        if not args.files:
            raise SystemExit("maskserve dataset ingest: give one or more files, or --hf DIR")
        if args.split not in ("none", "line", "paragraph"):
            raise SystemExit(f"maskserve dataset ingest: --split {args.split!r}: plain text splits by none, line "
                             "or paragraph (a dataset split goes with --hf)")  # fmt: skip
        files = [Path(f) for f in args.files]
    columnar_opts = {"text_column": args.text_column, "ids_column": args.ids_column}
    out: list[Work] = []
    for f in files:
        if not f.is_file():
            raise SystemExit(f"maskserve dataset ingest: {f}: no such file")
        if f.suffix in PARQUET_SUFFIXES:
            import pyarrow.parquet as pq

            meta = pq.ParquetFile(f).metadata
            for u in parquet_units(f):
                groups = u.row_groups if u.row_groups is not None else range(meta.num_row_groups)
                size = sum(meta.row_group(g).total_compressed_size for g in groups) if u.row_groups else f.stat().st_size
                out.append(Work(f, u.row_groups, True, size, columnar_opts))
        elif f.suffix in ARROW_SUFFIXES or args.hf:
            out.append(Work(f, None, True, f.stat().st_size, columnar_opts))
        else:
            if args.text_column or args.ids_column:
                raise SystemExit(f"maskserve dataset ingest: {f}: --text-column/--ids-column apply to Parquet, "
                                 "Arrow and --hf datasets")  # fmt: skip
            out.append(Work(f, None, False, f.stat().st_size, {"split": args.split}))
    return out


class Ingest:
    """Runs a plan: uploads on ``jobs`` threads, commits in order on the calling thread."""

    def __init__(self, c, name: str, works: list[Work], jobs: int, bar) -> None:  # noqa: ANN001
        self.c, self.name, self.works, self.jobs, self.bar = c, name, works, jobs, bar
        self.totals = {"documents": 0, "sequences": 0, "tokens": 0, "skipped": 0, "new_tokens": 0}
        self._lock = threading.Lock()

    def stage(self, w: Work) -> tuple[str, str, dict[str, Any]]:
        """Upload one unit, staged (or find it staged or committed already): (key, state, result)."""
        from client.corpora import Column, Unit, unit_batches

        key = w.key()
        known = self.c.ingest_state(self.name, key)
        if known is not None:
            self._progress(w.size)
            return key, known["state"], known["result"]
        if w.columnar:
            column = Column.of(w.options["text_column"], w.options["ids_column"])
            unit = Unit(w.path, "parquet" if w.path.suffix in (".parquet", ".pq") else "arrow", w.row_groups)
            res = self.c.ingest_table(self.name, lambda: unit_batches(unit, column), text_column=None if column.ids
                                      else column.name, ids_column=column.name if column.ids else None,
                                      idempotency_key=key, commit=False)  # fmt: skip
            self._progress(w.size)
        else:
            res = self.c.ingest_file(self.name, w.path, split=w.options["split"], idempotency_key=key,
                                     commit=False, on_bytes=self._progress)  # fmt: skip
        return key, "committed" if res.get("committed", True) else "staged", res

    def _progress(self, n: int) -> None:
        with self._lock:
            self.bar.update(n)

    def run(self) -> dict[str, int]:
        pending: deque[tuple[Work, Future]] = deque()
        todo = iter(self.works)
        window = self.jobs * WINDOW_PER_JOB
        with ThreadPoolExecutor(self.jobs, thread_name_prefix="ingest") as pool:
            for w in todo:
                pending.append((w, pool.submit(self.stage, w)))
                if len(pending) >= window:
                    break
            while pending:
                w, fut = pending.popleft()
                key, state, res = fut.result()
                if state == "staged":
                    res = self.c.commit_ingest(self.name, key)
                self._count(w, res, skipped=state == "committed" or res.get("duplicate", False))
                nxt = next(todo, None)
                if nxt is not None:
                    pending.append((nxt, pool.submit(self.stage, nxt)))
        return self.totals

    def _count(self, w: Work, res: dict[str, Any], skipped: bool) -> None:
        t = self.totals
        how = "committed before" if skipped else f"sequences from {res['first_sequence_id']:,}"
        self.bar.write(f"{w.describe()}: {res['documents']:,} documents, {res['sequences']:,} sequences, "
                       f"{res['tokens']:,} tokens ({how})", file=sys.stdout)  # fmt: skip
        sys.stdout.flush()
        if skipped:
            t["skipped"] += 1
        else:
            t["new_tokens"] += res["tokens"]
        for k in ("documents", "sequences", "tokens"):
            t[k] += res[k]
        self.bar.set_postfix_str(f"{t['documents']:,} documents, {t['tokens']:,} tokens", refresh=False)


def cmd_ingest(c, args: argparse.Namespace) -> None:  # noqa: ANN001 - the client is imported lazily
    """``maskserve dataset ingest`` without --holdout."""
    from .common import progress

    if args.jobs < 1:
        raise SystemExit("maskserve dataset ingest: --jobs takes a positive number")
    works = plan(args)
    t0 = time.perf_counter()
    with progress(sum(w.size for w in works), f"ingest {args.name}") as bar:
        try:
            totals = Ingest(c, args.name, works, args.jobs, bar).run()
        except KeyboardInterrupt:
            bar.close()
            print("\ninterrupted: what was committed stays; run the same command again to ingest the rest",
                  file=sys.stderr)  # fmt: skip
            sys.stderr.flush()
            os._exit(130)  # upload threads would otherwise run on to their end
    dt = time.perf_counter() - t0
    skipped = f" ({totals['skipped']} of {len(works)} units committed before: skipped)" if totals["skipped"] else ""
    print(f"{args.name}: {totals['documents']:,} documents, {totals['sequences']:,} sequences, "
          f"{totals['tokens']:,} tokens in {dt:.1f}s ({totals['new_tokens'] / max(dt, 1e-9):,.0f} tokens/s){skipped}")
