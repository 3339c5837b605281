"""Command line entry point: ``python -m trainer --dataset NAME``."""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys

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
    g = p.add_argument_group("data service")
    g.add_argument("--url", default=os.environ.get("MASKSERVE_URL", "http://127.0.0.1:8000"),
                   help="base URL of the service, or several replicas separated by commas (env MASKSERVE_URL)")
    g.add_argument("--token", default=None,  # read from the environment in main, never shown in --help
                   help="bearer token, if the service requires one (env MASKSERVE_TOKEN)")
    g.add_argument("--dataset", required=True, help="name of the dataset on the service")
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
                        "with --job: epochs of a job this worker creates [default: 1]")
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

    g = p.add_argument_group("evaluation (fixed mask sets: the same tokens to predict in every run)")
    g.add_argument("--eval-dataset", metavar="NAME", default=None,
                   help="held-out dataset (e.g. made by `maskserve dataset ingest --holdout`)")
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

    g = p.add_argument_group("model (ignored with --resume: the checkpoint's model is used)")
    g.add_argument("--d-model", type=int, default=256, help="hidden size")
    g.add_argument("--layers", type=int, default=4, help="transformer layers")
    g.add_argument("--heads", type=int, default=4, help="attention heads")
    g.add_argument("--d-ff", type=int, default=None, help="feed-forward size [default: 4 * d-model]")
    g.add_argument("--dropout", type=float, default=0.1, help="dropout probability")

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

    g = p.add_argument_group("checkpoints")
    g.add_argument("--checkpoint", metavar="PATH", default=None,
                   help="save here at the end (and every --checkpoint-every steps); "
                        "with --resume defaults to the resumed file")
    g.add_argument("--checkpoint-every", type=int, default=0, metavar="N",
                   help="also save every N steps (0: only at the end)")
    g.add_argument("--resume", metavar="PATH", default=None,
                   help="load model, optimizer and step from a checkpoint and continue its data stream")
    return p


EXIT_CANCELLED = 3  # the job was cancelled under the trainer


def _fail(msg: str) -> int:
    print(f"trainer: error: {' '.join(str(msg).split())}", file=sys.stderr)
    return 1


def _pick(explicit, saved, default):
    """The command line wins, then the checkpoint, then the default."""
    if explicit is not None:
        return explicit
    return saved if saved is not None else default


def _masking(args: argparse.Namespace, saved: dict) -> dict:
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
        out[key] = _pick(given, saved_masking.get(key), MASKING_DEFAULTS[key])
    return out


def main(argv: list[str] | None = None) -> int:
    if (sys.argv[1:] if argv is None else argv)[:1] == ["export"]:  # python -m trainer export CHECKPOINT DIR
        from .export import main as export_main

        return export_main((sys.argv[1:] if argv is None else argv)[1:])
    args = build_parser().parse_args(argv)
    # the client reports outages it rides out (and when the service is back) through logging
    logging.basicConfig(level=logging.WARNING, format="trainer: %(message)s", stream=sys.stdout)

    import torch

    from .loop import load_checkpoint, resolve_device

    if args.threads:
        torch.set_num_threads(args.threads)

    ckpt, saved_data, saved_train = None, {}, {}
    if args.resume:
        try:
            ckpt = load_checkpoint(args.resume, map_location="cpu")
        except Exception as exc:
            return _fail(f"cannot read checkpoint {args.resume}: {exc}")
        saved_data, saved_train = ckpt.get("data") or {}, ckpt.get("train_config") or {}
        if saved_data.get("dataset") not in (None, args.dataset):
            return _fail(f"checkpoint {args.resume} was trained on dataset "
                         f"{saved_data['dataset']!r}, not {args.dataset!r}")
        for name in ("seed", "batch_size", "mask_seed", "epochs"):
            given, saved = getattr(args, name), saved_data.get(name)
            if given is not None and saved is not None and given != saved:
                print(f"trainer: warning: --{name.replace('_', '-')} {given} differs from the "
                      f"checkpoint's {saved}; the data stream will not continue exactly", file=sys.stderr)
    try:
        masking = _masking(args, saved_data)
    except ValueError as exc:
        return _fail(str(exc))

    from .evaluate import EVAL_SEED

    if _pick(args.mask_seed, saved_data.get("mask_seed"), _pick(args.seed, saved_data.get("seed"), 0)) == EVAL_SEED:
        return _fail(f"mask seed {EVAL_SEED} is the one evaluation masks are drawn with; pick another")
    if args.eval_every not in (None, "epoch") and not (args.eval_every.isdigit() and int(args.eval_every) > 0):
        return _fail(f"--eval-every takes a number of steps or 'epoch', not {args.eval_every!r}")
    start_step = int(ckpt["step"]) if ckpt else 0
    try:
        device = resolve_device(args.device)
    except RuntimeError as exc:
        return _fail(str(exc))
    from . import distributed

    group = distributed.from_env()
    if group is not None:
        if not args.job:
            return _fail("under torchrun every rank is a worker of a shared job: pass --job NAME")
        if device.type == "cuda":
            device = torch.device("cuda", group.local_rank)
        distributed.init(group, device)
        if not group.leader:  # rank 0 alone logs to files, evaluates and checkpoints
            args.metrics_out = args.eval_dataset = args.checkpoint = None
            args.unseen_eval = 0
        args.worker = args.worker or f"{socket.gethostname()}:{os.getpid()}:rank{group.rank}"
    try:
        return _run(args, group, device, ckpt, saved_data, saved_train, masking, start_step)
    finally:
        distributed.finish()


def _schedule(args: argparse.Namespace, joined, group, start_step: int, saved_train: dict, *, epochs: int | None,
              num_sequences: int, batch_size: int):  # noqa: ANN001, ANN202
    """(steps, train until the data ends, horizon): where the lr schedule ends, the stopping rule, and what
    moves the schedule's end as the run goes.

    ``--steps`` given: the run stops there and the schedule ends there. On a job with a known length
    otherwise: the run goes on until the job ends; the schedule starts out at the job's batches left
    divided among the torchrun ranks, and each worker then estimates its share as it goes
    (:class:`~trainer.attach.JobHorizon`). Else: ``--epochs`` of the stateless stream, the checkpoint's
    steps, or 200."""
    from .attach import JobHorizon
    from .data import steps_for_epochs

    if args.job and args.steps is None and epochs:
        world = group.world if group is not None else 1
        left = joined.batches_left if joined is not None else None
        if left is None:  # a job this worker creates: all of it
            left = epochs * -(-num_sequences // batch_size)
        per_epoch = joined.batches_per_epoch if joined is not None else -(-num_sequences // batch_size)
        return start_step + max(1, -(-left // world)), True, JobHorizon(per_epoch, epochs, world)
    default = steps_for_epochs(epochs, num_sequences, batch_size) if epochs and not args.job else 200
    return _pick(args.steps, saved_train.get("steps"), default), False, None


def _run(args: argparse.Namespace, group, device, ckpt, saved_data: dict, saved_train: dict, masking: dict,
         start_step: int) -> int:  # noqa: ANN001 - torch types are imported lazily
    """Connect, build or restore the model, prepare the data and evaluation, train, report."""
    import torch

    from . import distributed
    from .loop import TrainConfig, train
    from .model import EncoderConfig, MaskedLM, describe

    seed = _pick(args.seed, saved_data.get("seed"), 0)
    mask_seed = _pick(args.mask_seed, saved_data.get("mask_seed"), seed)
    batch_size = _pick(args.batch_size, saved_data.get("batch_size"), 32)
    epochs = _pick(args.epochs, saved_data.get("epochs"), None)
    eval_every = args.eval_every or ("epoch" if epochs else None)
    rank = group.rank if group is not None else 0
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    try:
        from client import Client, JobCancelled, JobConflict, JobStream, MaskserveError
    except ImportError as exc:
        return _fail(f"the maskserve client is not importable: {exc}")

    try:
        client = Client(args.url, token=args.token or os.environ.get("MASKSERVE_TOKEN") or None)
    except MaskserveError as exc:
        return _fail(f"cannot create a client for {args.url}: {exc}")
    with client:
        try:
            info = client.dataset(args.dataset)
        except MaskserveError as exc:
            return _fail(f"dataset {args.dataset!r} at {args.url}: {exc}")
        num_sequences = int(info.get("num_sequences") or 0)
        if num_sequences <= 0:
            return _fail(f"dataset {args.dataset!r} has no sequences")
        from .attach import attach, describe_conflicts

        joined = None
        try:
            joined = attach(client, args) if args.job else None
        except JobConflict as exc:
            return _fail(describe_conflicts(args.job, exc.conflicts) if exc.conflicts else str(exc))
        except MaskserveError as exc:
            return _fail(f"attaching to job {args.job!r} at {args.url} failed: {exc}")
        if joined is not None:  # the job's config, not the flags' defaults
            seed, mask_seed, batch_size, epochs = joined.seed, joined.mask_seed, joined.batch_size, joined.epochs
            masking = joined.masking
        elif args.job:
            epochs = epochs or 1  # of the job this worker creates
        eval_every = args.eval_every or ("epoch" if epochs else None)
        steps, until_end, horizon = _schedule(args, joined, group, start_step, saved_train, epochs=epochs,
                                              num_sequences=num_sequences, batch_size=batch_size)  # fmt: skip
        if steps <= start_step:
            return _fail(f"checkpoint is at step {start_step}; pass --steps greater than that to continue")

        if ckpt:
            model_cfg = EncoderConfig(**ckpt["model_config"])
            if model_cfg.vocab_size != info["vocab_size"] or model_cfg.max_len < info["seq_len"]:
                return _fail(f"checkpoint model (vocab {model_cfg.vocab_size}, max_len {model_cfg.max_len}) "
                             f"does not fit dataset (vocab {info['vocab_size']}, seq_len {info['seq_len']})")
        else:
            special = info.get("special_tokens") or {}
            try:
                model_cfg = EncoderConfig(
                    vocab_size=int(info["vocab_size"]), max_len=int(info["seq_len"]),
                    d_model=args.d_model, n_layers=args.layers, n_heads=args.heads,
                    d_ff=args.d_ff or 4 * args.d_model, dropout=args.dropout, pad_id=special.get("pad"))
            except ValueError as exc:
                return _fail(str(exc))
        torch.manual_seed(seed)
        model = MaskedLM(model_cfg)
        if ckpt:
            model.load_state_dict(ckpt["model"])

        cfg = TrainConfig(
            steps=steps,
            lr=_pick(args.lr, saved_train.get("lr"), 5e-4),
            warmup_steps=_pick(args.warmup, saved_train.get("warmup_steps"), steps // 10),
            log_every=args.log_every, device=str(device), amp=args.amp,
            checkpoint=(args.checkpoint or args.resume) if rank == 0 else None,
            checkpoint_every=args.checkpoint_every, seed=seed + rank,  # each rank its own dropout stream
            until_data_ends=until_end,
        )
        if group is not None:  # every rank on one schedule (each estimated it from the job as it read it)
            cfg.steps, cfg.warmup_steps = distributed.largest([cfg.steps, cfg.warmup_steps], device)

        def data_state(step: int) -> dict:
            return {"dataset": args.dataset, "seed": seed, "step": step, "job": args.job,
                    "batch_size": batch_size, "mlm_probability": masking["mlm_probability"],
                    "mask_seed": mask_seed, "masking": masking, "epochs": epochs}

        print(f"dataset {info.get('name', args.dataset)!r}: {num_sequences} sequences "
              f"of {info['seq_len']} tokens, vocab {info['vocab_size']} | batch {batch_size}, seed {seed}"
              + (f", mask seed {mask_seed}" if mask_seed != seed else "")
              + f" | masking {masking['mode']}"
              + (f" ({masking['copies']} copies)" if masking["mode"] == "static" else "")
              + (f" | {epochs} epochs = {steps} steps" if epochs and not args.job else "")
              + (f" | job {args.job!r}: {'its config' if joined else 'created from the flags'}, "
                 f"{epochs or 'endless'} epochs" if args.job else "")
              + (f" | resuming at step {start_step} from {args.resume}" if ckpt else ""))
        print(describe(model))

        from .data import EpochCap, ensure_static_cache, masking_options
        from .runlog import RunLog

        try:
            if masking["mode"] == "static":
                status = ensure_static_cache(client, args.dataset, seed=mask_seed, masking=masking)
                print(f"static masks: cache {status['cache']}, {status['copies']} copies, complete")
            runlog = RunLog.open(client, args, masking=masking, device=device, num_sequences=num_sequences,
                                 batch_size=batch_size, steps=steps, eval_every=eval_every, start_step=start_step)
        except MaskserveError as exc:
            return _fail(f"preparing the run at {args.url} failed: {exc}")

        stream = None
        trained = False  # the last batch handed to the loop was trained (so closing a job stream acks it)
        try:
            if start_step == 0:
                runlog.evaluate(model, 0, final=False)
            if args.job:
                create = None if joined else {
                    "dataset": args.dataset, "batch_size": batch_size, "seed": seed, "epochs": epochs,
                    "lease_timeout_s": _pick(args.lease_timeout, None, 60.0), "masking": masking_options(masking),
                    **({"mask_seed": mask_seed} if mask_seed != seed else {})}  # fmt: skip
                stream = client.job(args.job, create=create, worker=args.worker, prefetch=args.prefetch,
                                    max_outage=args.max_outage, ack_every=args.ack_every)
                runlog.batches_per_epoch = client.job_progress(args.job)["batches_per_epoch"]
            else:
                options = masking_options(masking)
                if mask_seed != seed:
                    options["mask_seed"] = mask_seed
                stream = client.batches(args.dataset, batch_size=batch_size, seed=seed, start=start_step,
                                        steps=steps - start_step, prefetch=args.prefetch, **options)
                if epochs:
                    stream = EpochCap(stream, start_step, batch_size, epochs * num_sequences)
            result = train(model, stream, cfg, start_step=start_step,
                           optimizer_state=ckpt["optimizer"] if ckpt else None, data_state=data_state,
                           rng=ckpt.get("rng") if ckpt and rank == 0 else None, on_step=runlog.on_step,
                           log=print if rank == 0 else None, horizon=horizon)
            if group is not None:
                synced = distributed.in_sync(model, device)
                if rank == 0:
                    print(f"{group.world} ranks trained in lockstep; weights identical on every rank: "
                          f"{'yes' if synced else 'NO'}")
            if result.final_step > start_step and runlog.last_eval != result.final_step:
                runlog.evaluate(model, result.final_step, final=True)
            trained = True
        except JobCancelled:
            print(f"trainer: job {args.job!r} was cancelled; stopping", file=sys.stderr)
            return EXIT_CANCELLED
        except JobConflict as exc:  # created meanwhile by a worker with other flags
            return _fail(describe_conflicts(args.job, exc.conflicts) if exc.conflicts else str(exc))
        except MaskserveError as exc:
            return _fail(f"data stream from {args.url} failed: {exc}")
        except KeyboardInterrupt:
            print("trainer: interrupted", file=sys.stderr)
            return 130
        finally:
            runlog.close()
            if isinstance(stream, JobStream):
                try:
                    stream.close(ack_current=trained)
                except MaskserveError as exc:
                    print(f"trainer: error: could not ack the last batches: {exc}", file=sys.stderr)
                    trained = False
            elif stream is not None:
                stream.close()
        if not trained:
            return 1

    n = len(result.losses)
    if n == 0 and args.job:
        print(f"job {args.job!r} has no batches left: it is finished")
        return 0
    if args.job and (until_end or result.final_step < steps):
        print(f"job {args.job!r} is finished: every epoch was handed out and acked")
    if n == 0:
        return _fail("no batches were received")
    w = max(1, min(args.log_every, n))
    first, last = sum(result.losses[:w]) / w, sum(result.losses[-w:]) / w
    print(f"done: loss {first:.4f} -> {last:.4f} (mean of first/last {w} steps) | "
          f"{n} steps (now at {result.final_step}) | {result.elapsed:.1f}s | "
          f"{result.sequences_per_sec:.1f} seq/s | data wait {result.data_wait:.2f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
