"""The trainer's command line: its arguments, and how they combine with a resumed checkpoint."""

from __future__ import annotations

import argparse
import os

from client.mixtures import add_mixture_args

DESCRIPTION = """\
Train a small RoBERTa-style encoder with the masked-language-model loss on
batches pulled over HTTP from a maskserve service.

The model is sized from the dataset's info (vocabulary size and sequence
length). Batch k of the stream is a pure function of (seed, k), so --resume
continues exactly where the checkpoint left off. Runs on CUDA when available,
otherwise on the CPU. Every --log-every steps a line shows the loss, the
learning rate, throughput, and how long the loop waited for data versus how
long it computed: a large data-wait share means the service is the bottleneck.
"""

EPILOG = """\
examples:
  # 200 steps against a local service
  python -m trainer --dataset wikitext

  # a longer run on a remote service, checkpointing every 500 steps
  MASKSERVE_URL=http://data-host:8000 MASKSERVE_TOKEN=secret \\
      python -m trainer --dataset wikitext --steps 5000 --batch-size 64 \\
      --checkpoint run.pt --checkpoint-every 500

  # continue that run (same seed, batch size and schedule) up to step 10000
  python -m trainer --dataset wikitext --resume run.pt --steps 10000

  # a quick CPU smoke test with a tiny model
  python -m trainer --dataset wikitext --steps 50 --batch-size 8 \\
      --d-model 64 --layers 2 --heads 2 --device cpu --threads 4

  # one of many workers sharing job "pretrain" (2 epochs if this worker creates it; an existing job's own
  # config otherwise), over two service replicas, until the job ends
  python -m trainer --dataset wikitext --job pretrain --epochs 2 \\
      --url http://data-a:8000,http://data-b:8000

  # write a checkpoint as a Hugging Face model directory (see python -m trainer export --help)
  python -m trainer export run.pt hf-model/

  # data-parallel on 4 GPUs: each rank a worker of job "pretrain", gradients all-reduced
  torchrun --nproc-per-node 4 -m trainer --dataset wikitext --job pretrain --epochs 2

  # static (BERT) masks, 10 copies, evaluated on a held-out dataset every epoch, curves to a CSV
  python -m trainer --dataset wikitext --epochs 40 --mode static --copies 10 \\
      --eval-dataset wikitext-heldout --unseen-eval 256 --metrics-out run.csv

  # a mixture job: 3 parts wiki to 1 part books (books upsampled), until wiki's 2nd epoch ends, with a
  # held-out loss per source and each source's share of the rows trained in the log and the metrics
  python -m trainer --job mix --source wiki=3 --source books=1:repeat --until wiki --epochs 2 \\
      --eval-dataset wiki-heldout --eval-dataset books-heldout --metrics-out mix.csv

  # weights that move over the run (JSON [{"step": 0, "weights": {"wiki": 9, "books": 1}}, ...])
  python -m trainer --job mix2 --source wiki=1:repeat --source books=1:repeat --num-samples 64000 \\
      --curriculum curriculum.json --interpolation linear

  # another worker of an existing job (one dataset or a mixture): no data flags, the job's own config
  python -m trainer --job mix

exit status: 0 done (or the job finished), 1 error, 2 bad arguments, 3 the job was cancelled, 130 interrupted
"""


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the layout of the description and epilog; shows non-empty defaults."""

    def _get_help_string(self, action):
        help = action.help or ""
        if action.default not in (None, False, argparse.SUPPRESS) and action.option_strings \
                and "%(default)" not in help and "[default:" not in help:
            help += " [default: %(default)s]"
        return help



def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m trainer", description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=_HelpFormatter)
    _service_args(p)
    add_mixture_args(p, interpolation_default=None,
                     intro="with --job: a job over several datasets, each drawn by weight (instead of --dataset).\n"
                           "The model is sized from the first source's dataset (every source shares L and the\n"
                           "vocabulary); each row's source is counted, and each one's share is logged.")
    _masking_args(p)
    _evaluation_args(p)
    _model_args(p)
    _optimisation_args(p)
    _checkpoint_args(p)
    return p


def _service_args(p: argparse.ArgumentParser) -> None:
    """The data service, the dataset and the job."""
    g = p.add_argument_group("data service")
    g.add_argument("--url", default=os.environ.get("MASKSERVE_URL", "http://127.0.0.1:8000"),
                   help="base URL of the service, or several replicas separated by commas (env MASKSERVE_URL)")
    g.add_argument("--token", default=None,  # read from the environment in main, never shown in --help
                   help="bearer token, if the service requires one (env MASKSERVE_TOKEN)")
    g.add_argument("--dataset", default=None,
                   help="name of the dataset on the service (optional with --source: the first source's; and with "
                        "--job: an existing job's own)")
    g.add_argument("--batch-size", type=int, default=None, help="sequences per batch [default: 32]")
    g.add_argument("--seed", type=int, default=None,
                   help="seed of the batch stream and of the model init [default: 0]")
    g.add_argument("--mask-seed", type=int, default=None,
                   help="seed of the masks (and of the static cache used), apart from the data order [default: --seed]")
    g.add_argument("--prefetch", type=int, default=4, help="batches fetched ahead in the background")
    g.add_argument("--job", metavar="NAME", default=None,
                   help="attach to a shared job instead of sampling batches: every worker on the job gets "
                        "different batches, each sequence once per epoch, acked after each step; trains until "
                        "the job ends. An existing job's config is used (batch size, seed, epochs, masking): "
                        "flags given explicitly must match it. A missing job is created from the flags")
    g.add_argument("--epochs", type=int, default=None,
                   help="train on every sequence exactly this many times (the run's steps follow from it); "
                        "with --job: epochs of a job this worker creates (of a mixture: with --until, the epochs of "
                        "that source) [default: 1]")
    g.add_argument("--worker", default=None, help="with --job: this worker's name [default: host:pid:random]")
    g.add_argument("--lease-timeout", type=float, default=None,
                   help="with --job: lease timeout (s) of a job this worker creates: a batch not acked by then "
                        "goes to another worker [default: 60]")
    g.add_argument("--max-outage", type=float, default=300.0, metavar="SECONDS",
                   help="with --job: keep retrying (and failing over between the --url replicas) this long when "
                        "the service is unreachable or overloaded, then give up")
    g.add_argument("--ack-every", type=int, default=1, metavar="N",
                   help="with --job: send acks in groups of N (one fsync per group on a service with durable "
                        "acks); should this worker die, up to N-1 trained batches are trained again elsewhere")


def _masking_args(p: argparse.ArgumentParser) -> None:
    """The service's masking options."""
    g = p.add_argument_group("masking (the service's options; a resumed run must keep its checkpoint's)")
    g.add_argument("--mlm-probability", type=float, default=None, help="share of tokens to predict [default: 0.15]")
    g.add_argument("--mode", choices=["dynamic", "static"], default=None,
                   help="a fresh mask every epoch, or copy epoch mod --copies of a static cache, built here when "
                        "missing [default: dynamic]")
    g.add_argument("--copies", type=int, default=None, help="static masks per sequence (BERT's dupe_factor) [default: 10]")
    g.add_argument("--unit", choices=["token", "whole_word", "span"], default=None, help="[default: token]")
    g.add_argument("--count", choices=["bernoulli", "exact"], default=None, help="[default: bernoulli]")
    g.add_argument("--mask-ratio", type=float, default=None, help="selected tokens set to the mask token [default: 0.8]")
    g.add_argument("--random-ratio", type=float, default=None, help="selected tokens set to a random one [default: 0.1]")
    g.add_argument("--random-tokens", choices=["uniform", "frequency"], default=None, help="[default: uniform]")
    g.add_argument("--max-predictions", type=int, default=None, help="cap on tokens to predict per sequence (exact)")
    g.add_argument("--span-p", type=float, default=None,
                   help="--unit span: span lengths in words ~ Geometric(p), clipped to --span-max [default: 0.2]")
    g.add_argument("--span-max", type=int, default=None, help="--unit span: longest span, in words [default: 10]")
    g.add_argument("--schedule", choices=["constant", "linear", "cosine"], default=None,
                   help="mask-rate schedule of the service: --mlm-probability moves to --mlm-probability-end")
    g.add_argument("--mlm-probability-end", type=float, default=None, help="the rate a schedule ends at")
    g.add_argument("--schedule-unit", choices=["epoch", "step"], default=None, help="what a schedule counts")
    g.add_argument("--schedule-length", type=int, default=None, help="epochs or steps of the schedule")


def _evaluation_args(p: argparse.ArgumentParser) -> None:
    """Fixed evaluation sets and the metrics file."""
    g = p.add_argument_group("evaluation (fixed mask sets: the same tokens to predict in every run)")
    g.add_argument("--eval-dataset", metavar="NAME", action="append", default=None,
                   help="held-out dataset (e.g. made by `maskserve dataset ingest --holdout`); repeat it for one "
                        "held-out loss per dataset (e.g. one per source of a mixture), each its own split "
                        "'heldout:NAME' in the metrics (one alone: 'heldout')")
    g.add_argument("--eval-sequences", type=int, default=512, help="held-out sequences evaluated")
    g.add_argument("--eval-mlm-probability", type=float, default=None,
                   help="share of tokens predicted in the evaluation sets (the same for runs that train at "
                        "different rates) [default: --mlm-probability]")
    g.add_argument("--unseen-eval", type=int, default=0, metavar="N",
                   help="also evaluate N training sequences under masks no run trains on (0: off)")
    g.add_argument("--eval-every", default=None, metavar="STEPS|epoch",
                   help="evaluate every N steps, or at the end of each epoch [default: epoch with --epochs, "
                        "else only at the end]")
    g.add_argument("--metrics-out", metavar="FILE", default=None,
                   help="write step, epoch, split, loss, accuracy, tokens, lr per step and evaluation "
                        "(CSV, or JSON lines for .jsonl)")


def _model_args(p: argparse.ArgumentParser) -> None:
    """The model's size (a resumed run keeps its checkpoint's)."""
    g = p.add_argument_group("model (ignored with --resume: the checkpoint's model is used)")
    g.add_argument("--d-model", type=int, default=256, help="hidden size")
    g.add_argument("--layers", type=int, default=4, help="transformer layers")
    g.add_argument("--heads", type=int, default=4, help="attention heads")
    g.add_argument("--d-ff", type=int, default=None, help="feed-forward size [default: 4 * d-model]")
    g.add_argument("--dropout", type=float, default=0.1, help="dropout probability")


def _optimisation_args(p: argparse.ArgumentParser) -> None:
    """The optimiser, its schedule, the device and logging."""
    g = p.add_argument_group("optimisation")
    g.add_argument("--steps", type=int, default=None,
                   help="total steps of the run; the lr decays to 0 there [default: 200, "
                        "or the checkpoint's with --resume; with --job: run until the job ends, the lr "
                        "decaying over this worker's estimated share of the job's batches]")
    g.add_argument("--lr", type=float, default=None, help="peak learning rate [default: 5e-4]")
    g.add_argument("--warmup", type=int, default=None,
                   help="linear warmup steps [default: 10%% of --steps]")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    g.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True,
                   help="bf16 autocast on CUDA (no effect on the CPU)")
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads (torch.set_num_threads)")
    g.add_argument("--log-every", type=int, default=10, help="steps per log line")


def _checkpoint_args(p: argparse.ArgumentParser) -> None:
    """Checkpoints and resuming."""
    g = p.add_argument_group("checkpoints")
    g.add_argument("--checkpoint", metavar="PATH", default=None,
                   help="save here at the end (and every --checkpoint-every steps); "
                        "with --resume defaults to the resumed file")
    g.add_argument("--checkpoint-every", type=int, default=0, metavar="N",
                   help="also save every N steps (0: only at the end)")
    g.add_argument("--resume", metavar="PATH", default=None,
                   help="load model, optimizer and step from a checkpoint and continue its data stream")


def data_flags(args: argparse.Namespace) -> str | None:
    """What is wrong with the flags that name the data (None: nothing). A mixture is a job's (--job); without
    a job the dataset must be named; the mixture's other flags go with --source or an existing mixture job."""
    mixture = [f for f, v in (("--num-samples", args.num_samples), ("--until", args.until),
                              ("--curriculum", args.curriculum), ("--interpolation", args.interpolation),
                              ("--mixture-block", args.mixture_block)) if v is not None]  # fmt: skip
    if args.source and not args.job:
        return "--source trains on a mixture job: pass --job NAME (created from the flags when it does not exist)"
    if mixture and not args.job:
        return f"{', '.join(mixture)} describe a mixture job: pass --job NAME and --source once per dataset"
    if args.source and args.dataset is not None and args.dataset != args.source[0]["dataset"]:
        return (f"--dataset {args.dataset} is not the first --source ({args.source[0]['dataset']}): with --source "
                "leave --dataset out")
    if args.dataset is None and not args.source and not args.job:
        return "name the data: --dataset NAME, or --job NAME (an existing job, or --source once per dataset)"
    return None


def pick(explicit, saved, default):  # noqa: ANN001, ANN201 - any value
    """The command line wins, then the checkpoint, then the default."""
    if explicit is not None:
        return explicit
    return saved if saved is not None else default


def masking(args: argparse.Namespace, saved: dict) -> dict:
    """The run's masking: the command line, else the checkpoint's, else the service's defaults.

    A resumed run continues its masks: changing any option against the checkpoint is refused
    (ValueError), since the stream would no longer be the one the run trained on.
    """
    from .data import MASKING_DEFAULTS, MASKING_KEYS

    saved_masking = dict(saved.get("masking") or {})
    if not saved_masking and saved.get("mlm_probability") is not None:  # checkpoints from before the options
        saved_masking = {"mlm_probability": saved["mlm_probability"]}
    out = {}
    for key in MASKING_KEYS:
        given = getattr(args, key)
        if given is not None and key in saved_masking and saved_masking[key] != given:
            raise ValueError(f"--{key.replace('_', '-')} {given} differs from the checkpoint's {saved_masking[key]}: "
                             "a resumed run keeps its masking (start a new run to change it)")
        out[key] = pick(given, saved_masking.get(key), MASKING_DEFAULTS[key])
    return out
