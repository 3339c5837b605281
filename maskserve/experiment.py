"""``maskserve experiment``: train and compare masking strategies and data mixtures (the runs live in
trainer.experiment and trainer.mixexp; the mixture experiment's corpora are prepared here)."""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
from pathlib import Path

from .common import connect

#: the mixture experiment's corpora: name -> (Debian package, the reStructuredText sources it installs)
CORPORA = {
    "python": ("python3.11-doc", Path("/usr/share/doc/python3.11/html/_sources")),
    "linux": ("linux-doc-6.1", Path("/usr/share/doc/linux-doc-6.1/html/_sources")),
}


def cmd_experiment(args: argparse.Namespace) -> int:
    if args.experiment == "mixture":
        return cmd_mixture(args)
    try:
        from trainer.experiment import run
    except ImportError as exc:
        print(f"maskserve experiment: needs the trainer extra (torch) and matplotlib: {exc}", file=sys.stderr)
        return 1
    with connect(args) as c:
        info = c.dataset(args.dataset)
        c.dataset(args.eval_dataset)  # fails early, with the service's message, when it is missing
    return run(args, info)


def cmd_mixture(args: argparse.Namespace) -> int:
    """Prepare the two corpora's datasets (once), then train and compare the mixtures."""
    try:
        from trainer.mixexp import run
    except ImportError as exc:
        print(f"maskserve experiment: needs the trainer extra (torch) and matplotlib: {exc}", file=sys.stderr)
        return 1
    try:
        weights = [float(w) for w in str(args.start).split("/")]
    except ValueError:
        weights = []
    if len(weights) != 2 or min(weights) <= 0 or args.steps < 1 or args.eval_every < 1:
        raise SystemExit("maskserve experiment mixture: --start takes PY/LINUX weights > 0 (e.g. 90/10); --steps "
                         "and --eval-every a number of steps > 0")  # fmt: skip
    dirs = {"python": Path(args.python_docs), "linux": Path(args.linux_docs)}
    for name, path in dirs.items():
        if not path.is_dir():
            package = CORPORA[name][0]
            raise SystemExit(f"maskserve experiment mixture: the {name} docs are missing ({path} is not a "
                             f"directory): install Debian's {package} (apt-get install {package}), or pass "
                             f"--{name}-docs DIR")  # fmt: skip
    with connect(args) as c:
        infos = prepare(c, args, dirs)
    return run(args, infos)


def corpus_slice(root: Path, max_mb: float | None) -> list[str]:
    """The ``.rst.txt`` files under ``root`` (one document each), in an order set by a hash of each path (a
    spread over the whole tree, the same on every machine), up to ``max_mb`` MB."""
    files = sorted(root.rglob("*.rst.txt"), key=lambda f: hashlib.blake2b(str(f.relative_to(root)).encode(),
                                                                           digest_size=8).digest())  # fmt: skip
    docs, size = [], 0
    for f in files:
        text = f.read_text(encoding="utf-8", errors="replace").strip()
        if not text:
            continue
        if max_mb and size + len(text.encode()) > max_mb * 1e6 and docs:
            break
        docs.append(text)
        size += len(text.encode())
    return docs


def prepare(c, args: argparse.Namespace, dirs: dict[str, Path]) -> dict[str, dict]:  # noqa: ANN001
    """``{prefix}-python`` and ``{prefix}-linux``, each with its ``-heldout`` (documents split by a hash of their
    content), over one tokenizer trained by the service on both training sides; reused when all four hold data.
    Returns each dataset's info by name."""
    from client import NotFoundError

    from service.data.holdout import held_out

    names = [f"{args.prefix}-{k}{side}" for k in dirs for side in ("", "-heldout")]
    try:
        infos = {n: c.dataset(n) for n in names}
        if all(i["num_sequences"] > 0 for i in infos.values()):
            print(f"datasets {', '.join(names)} exist; reused (delete them to rebuild)")
            return infos
    except NotFoundError:
        pass
    t0 = time.perf_counter()
    sides = {}
    for key, root in dirs.items():
        docs = corpus_slice(root, args.max_mb)
        held = [d for d in docs if held_out({"text": d}, args.holdout)]
        sides[key] = ([d for d in docs if not held_out({"text": d}, args.holdout)], held)
        print(f"corpus {key}: {len(docs)} files from {root}, {sum(len(d.encode()) for d in docs) / 1e6:.1f} MB; "
              f"{len(held)} held out")  # fmt: skip
    tok = c.train_tokenizer([d for train, _ in sides.values() for d in train], vocab_size=args.vocab_size)
    print(f"tokenizer: bpe, vocab {args.vocab_size}, trained by the service on both ({time.perf_counter() - t0:.1f}s)")
    for key, (train, held) in sides.items():
        for name, docs in ((f"{args.prefix}-{key}", train), (f"{args.prefix}-{key}-heldout", held)):
            c.delete_dataset(name, missing_ok=True)
            c.create_dataset(name, tokenizer=tok, seq_len=args.seq_len)
            res = c.ingest(name, docs)
            print(f"{name}: {res['documents']} documents -> {res['sequences']} sequences, {res['tokens']:,} tokens")
    return {n: c.dataset(n) for n in names}


def _experiment_args(p: argparse.ArgumentParser) -> None:
    """Options every masking experiment takes (trainer.experiment reads them)."""
    p.add_argument("--dataset", required=True, help="training dataset")
    p.add_argument("--eval-dataset", required=True, help="held-out dataset (see `maskserve dataset ingest --holdout`)")
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--seeds", default="0,1", help="comma-separated: each seeds init, data order and masks")
    p.add_argument("--out", required=True, help="output directory (resumable: run again to continue)")
    _model_args(p)


def _model_args(p: argparse.ArgumentParser) -> None:
    """The model, the optimiser and the device (the same for every run of an experiment)."""
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
    g.add_argument("--eval-sequences", type=int, default=256, help="held-out sequences evaluated each time")


def _mixture_args(p: argparse.ArgumentParser) -> None:
    """The mixture experiment: its corpora, their datasets, the runs."""
    g = p.add_argument_group("corpora and datasets (built once, reused while all four hold data)")
    g.add_argument("--python-docs", default=str(CORPORA["python"][1]), metavar="DIR",
                   help="the Python docs' .rst.txt sources (Debian: python3.11-doc)")
    g.add_argument("--linux-docs", default=str(CORPORA["linux"][1]), metavar="DIR",
                   help="the Linux kernel docs' .rst.txt sources (Debian: linux-doc-6.1)")
    g.add_argument("--max-mb", type=float, default=1.0,
                   help="MB of each corpus used (files spread over its tree; 0: all of it)")
    g.add_argument("--holdout", type=float, default=0.1, help="share of each corpus' files held out")
    g.add_argument("--prefix", default="mix", help="datasets PREFIX-python, PREFIX-linux and their -heldout")
    g.add_argument("--seq-len", type=int, default=128)
    g.add_argument("--vocab-size", type=int, default=4000, help="of the BPE tokenizer trained on both corpora")
    r = p.add_argument_group("runs")
    r.add_argument("--steps", type=int, default=600, help="steps of each run (the same for both)")
    r.add_argument("--eval-every", type=int, default=50, help="steps between held-out evaluations")
    r.add_argument("--start", default="90/10", metavar="PY/LINUX",
                   help="the curriculum's python/linux weights at step 0 (it moves linearly to the reverse)")
    r.add_argument("--seeds", default="0", help="comma-separated: each seeds init, data order and masks")
    r.add_argument("--out", required=True, help="output directory (run again: finished runs are skipped)")
    _model_args(p)


def experiment_parser(sub: argparse._SubParsersAction, conn: argparse.ArgumentParser) -> None:
    ex = sub.add_parser("experiment", help="train and compare masking strategies, with curves")
    exsub = ex.add_subparsers(dest="experiment", required=True, metavar="EXPERIMENT")
    sd = exsub.add_parser(
        "static-vs-dynamic", parents=[conn], help="static (BERT) vs dynamic (RoBERTa) masks: curves and a summary",
        description="For each seed, train the same model from the same init on the same data order with static "
        "masks (K cached copies) and with dynamic ones; evaluate every epoch on held-out data and on training "
        "sequences under unseen masks; write curves.csv, curves.png and summary.md. Run again to resume.",
    )  # fmt: skip
    _experiment_args(sd)
    sd.add_argument("--unseen-eval", type=int, default=256, help="training sequences evaluated under unseen masks")
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
    mr.add_argument("--unseen-eval", type=int, default=256, help="training sequences evaluated under unseen masks")
    mr.add_argument("--low", type=float, default=0.15, help="the baseline rate, and the evaluation's")
    mr.add_argument("--high", type=float, default=0.30)
    mr.add_argument("--schedule", default="linear", choices=["linear", "cosine"], help="how high moves to low")
    mx = exsub.add_parser(
        "mixture", parents=[conn], help="a fixed 50/50 mixture of two corpora vs a curriculum from 90/10 to 10/90",
        description="Two real offline corpora, the Python docs (python3.11-doc) and the Linux kernel docs "
        "(linux-doc-6.1): one tokenizer trained on both by the service, a dataset and a held-out dataset per "
        "corpus. Then, per seed, two runs of the same model, steps and data seed on mixture jobs: a fixed 50/50 "
        "mixture, and a curriculum moving linearly from 90/10 (python/linux) to 10/90 over the run; each "
        "evaluated on both held-out sets along the way. Writes curves.csv, curves.png and summary.md.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )  # fmt: skip
    _mixture_args(mx)
    ex.set_defaults(func=cmd_experiment)
