"""Command line entry point: ``python -m trainer --dataset NAME``."""

from __future__ import annotations

import argparse
import logging
import os
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

  # one of many workers sharing job "pretrain" (2 epochs), over two service replicas
  python -m trainer --dataset wikitext --job pretrain --epochs 2 --steps 100000 \\
      --url http://data-a:8000,http://data-b:8000

  # write a checkpoint as a Hugging Face model directory (see python -m trainer export --help)
  python -m trainer export run.pt hf-model/

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
    g.add_argument("--mlm-probability", type=float, default=None,
                   help="fraction of tokens masked [default: 0.15]")
    g.add_argument("--seed", type=int, default=None,
                   help="seed of the batch stream and of the model init [default: 0]")
    g.add_argument("--prefetch", type=int, default=4, help="batches fetched ahead in the background")
    g.add_argument("--job", metavar="NAME", default=None,
                   help="attach to a shared job (created if missing) instead of sampling batches: every worker "
                        "on the job gets different batches, each sequence once per epoch, acked after each step")
    g.add_argument("--epochs", type=int, default=1, help="with --job: epochs of a job this worker creates [default: 1]")
    g.add_argument("--worker", default=None, help="with --job: this worker's name [default: host:pid:random]")
    g.add_argument("--lease-timeout", type=float, default=60.0,
                   help="with --job: lease timeout (s) of a job this worker creates: a batch not acked by then "
                        "goes to another worker")
    g.add_argument("--max-outage", type=float, default=300.0, metavar="SECONDS",
                   help="with --job: keep retrying (and failing over between the --url replicas) this long when "
                        "the service is unreachable or overloaded, then give up")

    g = p.add_argument_group("model (ignored with --resume: the checkpoint's model is used)")
    g.add_argument("--d-model", type=int, default=256, help="hidden size")
    g.add_argument("--layers", type=int, default=4, help="transformer layers")
    g.add_argument("--heads", type=int, default=4, help="attention heads")
    g.add_argument("--d-ff", type=int, default=None, help="feed-forward size [default: 4 * d-model]")
    g.add_argument("--dropout", type=float, default=0.1, help="dropout probability")

    g = p.add_argument_group("optimisation")
    g.add_argument("--steps", type=int, default=None,
                   help="total steps of the run; the lr decays to 0 there [default: 200, "
                        "or the checkpoint's with --resume]")
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


def main(argv: list[str] | None = None) -> int:
    if (sys.argv[1:] if argv is None else argv)[:1] == ["export"]:  # python -m trainer export CHECKPOINT DIR
        from .export import main as export_main

        return export_main((sys.argv[1:] if argv is None else argv)[1:])
    args = build_parser().parse_args(argv)
    # the client reports outages it rides out (and when the service is back) through logging
    logging.basicConfig(level=logging.WARNING, format="trainer: %(message)s", stream=sys.stdout)

    import torch

    from .loop import TrainConfig, load_checkpoint, resolve_device, train
    from .model import EncoderConfig, MaskedLM, describe

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
        for name in ("seed", "batch_size", "mlm_probability"):
            given, saved = getattr(args, name), saved_data.get(name)
            if given is not None and saved is not None and given != saved:
                print(f"trainer: warning: --{name.replace('_', '-')} {given} differs from the "
                      f"checkpoint's {saved}; the data stream will not continue exactly", file=sys.stderr)

    seed = _pick(args.seed, saved_data.get("seed"), 0)
    batch_size = _pick(args.batch_size, saved_data.get("batch_size"), 32)
    mlm_probability = _pick(args.mlm_probability, saved_data.get("mlm_probability"), 0.15)
    steps = _pick(args.steps, saved_train.get("steps"), 200)
    start_step = int(ckpt["step"]) if ckpt else 0
    if steps <= start_step:
        return _fail(f"checkpoint is at step {start_step}; pass --steps greater than that to continue")
    try:
        device = resolve_device(args.device)
    except RuntimeError as exc:
        return _fail(str(exc))
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    try:
        from client import Client, JobCancelled, JobStream, MaskserveError
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
            checkpoint=args.checkpoint or args.resume, checkpoint_every=args.checkpoint_every, seed=seed,
        )

        def data_state(step: int) -> dict:
            return {"dataset": args.dataset, "seed": seed, "step": step, "job": args.job,
                    "batch_size": batch_size, "mlm_probability": mlm_probability}

        print(f"dataset {info.get('name', args.dataset)!r}: {info.get('num_sequences', '?')} sequences "
              f"of {info['seq_len']} tokens, vocab {info['vocab_size']} | batch {batch_size}, seed {seed}"
              + (f" | resuming at step {start_step} from {args.resume}" if ckpt else ""))
        print(describe(model))

        stream = None
        trained = False  # the last batch handed to the loop was trained (so closing a job stream acks it)
        try:
            if args.job:
                create = {"dataset": args.dataset, "batch_size": batch_size, "seed": seed, "epochs": args.epochs,
                          "lease_timeout_s": args.lease_timeout, "masking": {"mlm_probability": mlm_probability}}
                stream = client.job(args.job, create=create, worker=args.worker, prefetch=args.prefetch,
                                    max_outage=args.max_outage)
            else:
                stream = client.batches(args.dataset, batch_size=batch_size, seed=seed, start=start_step,
                                        steps=steps - start_step, prefetch=args.prefetch,
                                        mlm_probability=mlm_probability)
            result = train(model, stream, cfg, start_step=start_step,
                           optimizer_state=ckpt["optimizer"] if ckpt else None, data_state=data_state)
            trained = True
        except JobCancelled:
            print(f"trainer: job {args.job!r} was cancelled; stopping", file=sys.stderr)
            return EXIT_CANCELLED
        except MaskserveError as exc:
            return _fail(f"data stream from {args.url} failed: {exc}")
        except KeyboardInterrupt:
            print("trainer: interrupted", file=sys.stderr)
            return 130
        finally:
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
    if args.job and result.final_step < steps:
        print(f"job {args.job!r} is finished: every epoch was handed out and acked")
    if n == 0:
        return _fail("no batches were received")
    w = max(1, min(args.log_every, n))
    first, last = sum(result.losses[:w]) / w, sum(result.losses[-w:]) / w
    print(f"done: loss {first:.4f} -> {last:.4f} (mean of first/last {w} steps) | "
          f"{n} steps (now at {result.final_step}) | {result.elapsed:.1f}s | "
          f"{result.sequences_per_sec:.1f} seq/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
