"""One training run of ``python -m trainer``: connect, build or restore the model, train, report.

:func:`run` goes through the run's seams in order: what it trains on (the dataset, and the job's own config
when it attaches to one), where its schedule ends, the model, the training config, the static masks and the
evaluation sets (:func:`_set_up`); then the training itself and the closing of the data stream
(:func:`_train`); then the summary (:func:`_report`). A step that cannot go on raises :class:`Failed`, which
the command line prints as its error.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from typing import Any

from .args import pick

EXIT_CANCELLED = 3  # the job was cancelled under the trainer


class Failed(Exception):
    """The run cannot go on; the message says why (printed as the trainer's error, exit status 1)."""


def fail(msg: str) -> int:
    print(f"trainer: error: {' '.join(str(msg).split())}", file=sys.stderr)
    return 1


@dataclass
class Data:
    """What the run trains on: the stream's seeds, batch size, epochs and masking (a joined job's own)."""

    dataset: str | None  # a mixture's: its first source (None until the job names it)
    seed: int
    mask_seed: int
    batch_size: int
    epochs: int | None
    masking: dict
    num_sequences: int = 0
    joined: Any = None  # the job attached to (trainer.attach.Joined); None when there is none, or it is created
    sources: list[str] | None = None  # a mixture job's datasets

    @property
    def datasets(self) -> list[str]:
        """What the run trains on: the mixture's sources, or the one dataset."""
        return list(self.sources) if self.sources else [str(self.dataset)]

    def state(self, job: str | None, step: int) -> dict:
        """Where the stream is after ``step`` steps, as checkpoints store it."""
        return {"dataset": self.dataset, "sources": self.sources, "seed": self.seed, "step": step, "job": job,
                "batch_size": self.batch_size, "mlm_probability": self.masking["mlm_probability"],
                "mask_seed": self.mask_seed, "masking": self.masking, "epochs": self.epochs}  # fmt: skip


@dataclass
class Run:
    """A run ready for its first step."""

    args: argparse.Namespace
    group: Any  # trainer.distributed.Group under torchrun, else None
    device: Any  # torch.device
    ckpt: dict | None
    start_step: int
    data: Data
    steps: int  # where the lr schedule ends (first estimate, on a job that trains until it ends)
    until_end: bool  # train until the data ends rather than until `steps`
    horizon: Any  # trainer.attach.JobHorizon moving the schedule's end, or None
    model: Any
    cfg: Any  # trainer.loop.TrainConfig
    runlog: Any  # trainer.runlog.RunLog

    @property
    def rank(self) -> int:
        return self.group.rank if self.group is not None else 0


def run(args: argparse.Namespace, group, device, ckpt, saved_data: dict, saved_train: dict, masking: dict,
        start_step: int) -> int:  # noqa: ANN001 - torch types are imported lazily
    """Connect, build or restore the model, prepare the data and evaluation, train, report."""
    import torch

    data = _data(args, saved_data, masking)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    try:
        from client import Client, MaskserveError
    except ImportError as exc:
        return fail(f"the maskserve client is not importable: {exc}")
    try:
        client = Client(args.url, token=args.token or os.environ.get("MASKSERVE_TOKEN") or None)
    except MaskserveError as exc:
        return fail(f"cannot create a client for {args.url}: {exc}")
    with client:
        try:
            ready = _set_up(client, args, group, device, ckpt, data, saved_train, start_step)
        except Failed as exc:
            return fail(str(exc))
        result = _train(client, ready)
        if isinstance(result, int):
            return result
    return _report(ready, result)


# ---- setup ---------------------------------------------------------------------------------------


def _data(args: argparse.Namespace, saved_data: dict, masking: dict) -> Data:
    """The stream the flags ask for: the command line, else the checkpoint's, else the defaults."""
    seed = pick(args.seed, saved_data.get("seed"), 0)
    first = args.source[0]["dataset"] if args.source else None
    return Data(args.dataset or first, seed=seed, mask_seed=pick(args.mask_seed, saved_data.get("mask_seed"), seed),
                batch_size=pick(args.batch_size, saved_data.get("batch_size"), 32),
                epochs=pick(args.epochs, saved_data.get("epochs"), None), masking=masking)  # fmt: skip


def _set_up(client: Any, args: argparse.Namespace, group, device, ckpt, data: Data, saved_train: dict,
            start_step: int) -> Run:  # noqa: ANN001
    """Everything before the first step, in order; raises :class:`Failed`."""
    from . import distributed
    from .model import describe

    _join(client, args, data)
    info = _dataset(client, args, data)
    eval_every = args.eval_every or ("epoch" if data.epochs else None)
    steps, until_end, horizon = _schedule(args, data.joined, group, start_step, saved_train, epochs=data.epochs,
                                          num_sequences=data.num_sequences, batch_size=data.batch_size)  # fmt: skip
    if steps <= start_step:
        raise Failed(f"checkpoint is at step {start_step}; pass --steps greater than that to continue")
    model = _model(args, ckpt, info, data.seed)
    rank = group.rank if group is not None else 0
    cfg = _train_config(args, saved_train, steps, until_end, device, rank, data.seed)
    if group is not None:  # every rank on one schedule (each estimated it from the job as it read it)
        cfg.steps, cfg.warmup_steps = distributed.largest([cfg.steps, cfg.warmup_steps], device)
    print(_banner(args, info, data, steps, start_step, resumed=bool(ckpt)))
    print(describe(model))
    saved_rows = (ckpt.get("data") or {}).get("source_rows") if ckpt else None
    runlog = _prepare(client, args, data, device, steps, eval_every, start_step, saved_rows)
    return Run(args, group, device, ckpt, start_step, data, steps, until_end, horizon, model, cfg, runlog)


def _dataset(client: Any, args: argparse.Namespace, data: Data) -> dict:
    """The dataset's info, which sizes the model (a mixture's first source: every source shares L and the
    vocabulary); its size goes to ``data`` (a mixture's: its stream's positions)."""
    from client import MaskserveError

    if data.dataset is None:
        raise Failed(f"job {args.job!r} does not exist: name its data with --dataset, or --source once per dataset")
    try:
        info = client.dataset(data.dataset)
    except MaskserveError as exc:
        raise Failed(f"dataset {data.dataset!r} at {args.url}: {exc}") from None
    data.num_sequences = int(info.get("num_sequences") or 0)
    if data.sources and data.joined is not None:
        data.num_sequences = data.joined.sequences_per_epoch
    if data.num_sequences <= 0:
        raise Failed(f"dataset {data.dataset!r} has no sequences")
    return info


def _join(client: Any, args: argparse.Namespace, data: Data) -> None:
    """With --job: attach to the job, whose config (not the flags' defaults) the run then trains with."""
    from client import JobConflict, MaskserveError

    from .attach import attach, describe_conflicts

    try:
        joined = attach(client, args) if args.job else None
        if joined is None and args.source:  # a mixture job is created here: its stream's length sets the schedule
            client.create_job(args.job, **create_request(args, data))
            joined = attach(client, args)
    except JobConflict as exc:
        raise Failed(describe_conflicts(args.job, exc.conflicts) if exc.conflicts else str(exc)) from None
    except (MaskserveError, OSError, ValueError) as exc:
        raise Failed(f"attaching to job {args.job!r} at {args.url} failed: {exc}") from None
    if joined is not None:
        data.dataset, data.sources = joined.dataset, joined.sources
        data.seed, data.mask_seed, data.batch_size, data.epochs = (joined.seed, joined.mask_seed,
                                                                   joined.batch_size, joined.epochs)  # fmt: skip
        data.masking = joined.masking
        data.joined = joined
    elif args.job:
        data.epochs = data.epochs or 1  # of the job this worker creates


def create_request(args: argparse.Namespace, data: Data) -> dict:
    """The config of a job this worker creates: the flags, their defaults where none is given."""
    from client.mixtures import mixture_request

    from .data import masking_options

    request = {"dataset": data.dataset, "batch_size": data.batch_size, "seed": data.seed, "epochs": data.epochs,
               "lease_timeout_s": pick(args.lease_timeout, None, 60.0), "masking": masking_options(data.masking),
               **({"mask_seed": data.mask_seed} if data.mask_seed != data.seed else {})}  # fmt: skip
    if args.source:
        request.update(dataset=None, epochs=data.epochs or 1, **mixture_request(args))
    return request


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
    return pick(args.steps, saved_train.get("steps"), default), False, None


def _model(args: argparse.Namespace, ckpt: dict | None, info: dict, seed: int) -> Any:
    """The checkpoint's model (it must fit the dataset), or a new one sized from the dataset and the flags."""
    import torch

    from .model import EncoderConfig, MaskedLM

    if ckpt:
        model_cfg = EncoderConfig(**ckpt["model_config"])
        if model_cfg.vocab_size != info["vocab_size"] or model_cfg.max_len < info["seq_len"]:
            raise Failed(f"checkpoint model (vocab {model_cfg.vocab_size}, max_len {model_cfg.max_len}) "
                         f"does not fit dataset (vocab {info['vocab_size']}, seq_len {info['seq_len']})")
    else:
        special = info.get("special_tokens") or {}
        try:
            model_cfg = EncoderConfig(
                vocab_size=int(info["vocab_size"]), max_len=int(info["seq_len"]),
                d_model=args.d_model, n_layers=args.layers, n_heads=args.heads,
                d_ff=args.d_ff or 4 * args.d_model, dropout=args.dropout, pad_id=special.get("pad"))
        except ValueError as exc:
            raise Failed(str(exc)) from None
    torch.manual_seed(seed)
    model = MaskedLM(model_cfg)
    if ckpt:
        model.load_state_dict(ckpt["model"])
    return model


def _train_config(args: argparse.Namespace, saved_train: dict, steps: int, until_end: bool, device, rank: int,
                  seed: int) -> Any:  # noqa: ANN001
    from .loop import TrainConfig

    return TrainConfig(
        steps=steps,
        lr=pick(args.lr, saved_train.get("lr"), 5e-4),
        warmup_steps=pick(args.warmup, saved_train.get("warmup_steps"), steps // 10),
        log_every=args.log_every, device=str(device), amp=args.amp,
        checkpoint=(args.checkpoint or args.resume) if rank == 0 else None,
        checkpoint_every=args.checkpoint_every, seed=seed + rank,  # each rank its own dropout stream
        until_data_ends=until_end,
    )


def _banner(args: argparse.Namespace, info: dict, data: Data, steps: int, start_step: int, *, resumed: bool) -> str:
    """The run's first line: the dataset, the stream, the masking, and the job or the checkpoint."""
    seed, mask_seed, epochs, masking = data.seed, data.mask_seed, data.epochs, data.masking
    what = (f"mixture of {', '.join(data.sources)}: {data.num_sequences} positions" if data.sources
            else f"dataset {info.get('name', data.dataset)!r}: {data.num_sequences} sequences")  # fmt: skip
    return (f"{what} of {info['seq_len']} tokens, vocab {info['vocab_size']} | batch {data.batch_size}, seed {seed}"
            + (f", mask seed {mask_seed}" if mask_seed != seed else "")
            + f" | masking {masking['mode']}"
            + (f" ({masking['copies']} copies)" if masking["mode"] == "static" else "")
            + (f" | {epochs} epochs = {steps} steps" if epochs and not args.job else "")
            + (f" | job {args.job!r}: {'its config' if data.joined else 'created from the flags'}, "
               f"{epochs or 'endless'} epochs" if args.job else "")
            + (f" | resuming at step {start_step} from {args.resume}" if resumed else ""))  # fmt: skip


def _prepare(client: Any, args: argparse.Namespace, data: Data, device, steps: int, eval_every: str | None,
             start_step: int, saved_rows: dict | None = None) -> Any:  # noqa: ANN001
    """Build the static masks a static run reads (when missing), fetch the evaluation sets, open the metrics."""
    from client import MaskserveError

    from .data import ensure_static_cache
    from .runlog import RunLog

    try:
        if data.masking["mode"] == "static":
            for name in data.datasets:  # a mixture's rows are masked from each source's own cache
                status = ensure_static_cache(client, name, seed=data.mask_seed, masking=data.masking)
                print(f"static masks{f' of {name}' if data.sources else ''}: cache {status['cache']}, "
                      f"{status['copies']} copies, complete")
        return RunLog.open(client, args, masking=data.masking, device=device, num_sequences=data.num_sequences,
                           batch_size=data.batch_size, steps=steps, eval_every=eval_every, start_step=start_step,
                           datasets=data.datasets, sources=data.sources, source_rows=saved_rows)
    except MaskserveError as exc:
        raise Failed(f"preparing the run at {args.url} failed: {exc}") from None


# ---- training ------------------------------------------------------------------------------------


def _open_stream(client: Any, run: Run) -> Any:
    """The job's stream (creating the job from the flags when it does not exist), or the stateless stream
    from the run's step (capped at its epochs)."""
    from .data import EpochCap, masking_options

    args, data = run.args, run.data
    if args.job:
        create = None if data.joined else create_request(args, data)
        stream = client.job(args.job, create=create, worker=args.worker, prefetch=args.prefetch,
                            max_outage=args.max_outage, ack_every=args.ack_every)  # fmt: skip
        run.runlog.batches_per_epoch = client.job_progress(args.job)["batches_per_epoch"]
        return stream
    options = masking_options(data.masking)
    if data.mask_seed != data.seed:
        options["mask_seed"] = data.mask_seed
    stream = client.batches(str(data.dataset), batch_size=data.batch_size, seed=data.seed, start=run.start_step,
                            steps=run.steps - run.start_step, prefetch=args.prefetch, **options)  # fmt: skip
    if data.epochs:
        stream = EpochCap(stream, run.start_step, data.batch_size, data.epochs * data.num_sequences)
    return stream


def _train(client: Any, run: Run) -> Any:
    """Evaluate at the start, train, evaluate at the end, and close the data stream (a job stream acks the
    last batch only when it was trained). The loop's TrainResult, or the exit status of a run that ended
    otherwise."""
    from client import JobCancelled, JobConflict, MaskserveError

    from .attach import describe_conflicts
    from .loop import train

    args, ckpt = run.args, run.ckpt
    stream = None
    trained = False  # the last batch handed to the loop was trained (so closing a job stream acks it)
    try:
        if run.start_step == 0:
            run.runlog.evaluate(run.model, 0, final=False)
        stream = _open_stream(client, run)
        result = train(run.model, stream, run.cfg, start_step=run.start_step,
                       optimizer_state=ckpt["optimizer"] if ckpt else None,
                       data_state=lambda step: {**run.data.state(args.job, step), **run.runlog.data_state()},
                       rng=ckpt.get("rng") if ckpt and run.rank == 0 else None, on_step=run.runlog.on_step,
                       log=print if run.rank == 0 else None, horizon=run.horizon)  # fmt: skip
        _finish(run, result)
        trained = True
    except JobCancelled:
        print(f"trainer: job {args.job!r} was cancelled; stopping", file=sys.stderr)
        return EXIT_CANCELLED
    except JobConflict as exc:  # created meanwhile by a worker with other flags
        return fail(describe_conflicts(args.job, exc.conflicts) if exc.conflicts else str(exc))
    except MaskserveError as exc:
        return fail(f"data stream from {args.url} failed: {exc}")
    except KeyboardInterrupt:
        print("trainer: interrupted", file=sys.stderr)
        return 130
    finally:
        run.runlog.close()
        trained = _close(stream, ack_current=trained) and trained
    return result if trained else 1


def _finish(run: Run, result: Any) -> None:
    """After the last step: check the ranks stayed in lockstep, and evaluate the final model."""
    from . import distributed

    if run.group is not None:
        synced = distributed.in_sync(run.model, run.device)
        if run.rank == 0:
            print(f"{run.group.world} ranks trained in lockstep; weights identical on every rank: "
                  f"{'yes' if synced else 'NO'}")
    if result.final_step > run.start_step and run.runlog.last_eval != result.final_step:
        run.runlog.evaluate(run.model, result.final_step, final=True)


def _close(stream: Any, *, ack_current: bool) -> bool:
    """Close the data stream; False when a job stream could not deliver its last acks."""
    from client import JobStream, MaskserveError

    if isinstance(stream, JobStream):
        try:
            stream.close(ack_current=ack_current)
        except MaskserveError as exc:
            print(f"trainer: error: could not ack the last batches: {exc}", file=sys.stderr)
            return False
    elif stream is not None:
        stream.close()
    return True


# ---- the end -------------------------------------------------------------------------------------


def _report(run: Run, result: Any) -> int:
    """The run's summary: the job's end, the loss at the start and the end, the throughput."""
    args = run.args
    n = len(result.losses)
    if n == 0 and args.job:
        print(f"job {args.job!r} has no batches left: it is finished")
        return 0
    if args.job and (run.until_end or result.final_step < run.steps):
        print(f"job {args.job!r} is finished: every epoch was handed out and acked")
    if n == 0:
        return fail("no batches were received")
    w = max(1, min(args.log_every, n))
    first, last = sum(result.losses[:w]) / w, sum(result.losses[-w:]) / w
    print(f"done: loss {first:.4f} -> {last:.4f} (mean of first/last {w} steps) | "
          f"{n} steps (now at {result.final_step}) | {result.elapsed:.1f}s | "
          f"{result.sequences_per_sec:.1f} seq/s | data wait {result.data_wait:.2f}s")
    return 0
