"""Command line entry point: ``python -m trainer --dataset NAME``.

The arguments are in :mod:`trainer.args`, the run in :mod:`trainer.run`; here the checkpoint a run resumes
from is read and checked against the flags, and the device and the torchrun ranks are set up.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys

from .args import build_parser, data_flags, pick
from .args import masking as _masking
from .run import EXIT_CANCELLED, Failed, fail, run

__all__ = ["EXIT_CANCELLED", "build_parser", "main"]


def main(argv: list[str] | None = None) -> int:
    if (sys.argv[1:] if argv is None else argv)[:1] == ["export"]:  # python -m trainer export CHECKPOINT DIR
        from .export import main as export_main

        return export_main((sys.argv[1:] if argv is None else argv)[1:])
    args = build_parser().parse_args(argv)
    # the client reports outages it rides out (and when the service is back) through logging
    logging.basicConfig(level=logging.WARNING, format="trainer: %(message)s", stream=sys.stdout)

    import torch

    from . import distributed

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        ckpt, saved_data, saved_train = _resumed(args)
        masking = _checked(args, saved_data)
        group, device = _devices(args)
    except Failed as exc:
        return fail(str(exc))
    start_step = int(ckpt["step"]) if ckpt else 0
    try:
        return run(args, group, device, ckpt, saved_data, saved_train, masking, start_step)
    finally:
        distributed.finish()


def _resumed(args: argparse.Namespace) -> tuple[dict | None, dict, dict]:
    """With --resume: (the checkpoint, its data position, its training config); warns of flags that differ
    from its data stream."""
    from .loop import load_checkpoint

    if not args.resume:
        return None, {}, {}
    try:
        ckpt = load_checkpoint(args.resume, map_location="cpu")
    except Exception as exc:
        raise Failed(f"cannot read checkpoint {args.resume}: {exc}") from None
    saved_data, saved_train = ckpt.get("data") or {}, ckpt.get("train_config") or {}
    if args.dataset is not None and saved_data.get("dataset") not in (None, args.dataset):
        raise Failed(f"checkpoint {args.resume} was trained on dataset "
                     f"{saved_data['dataset']!r}, not {args.dataset!r}")  # fmt: skip
    if args.dataset is None and not args.source:  # the checkpoint names what it trained on
        args.dataset = saved_data.get("dataset")
    for name in ("seed", "batch_size", "mask_seed", "epochs"):
        given, saved = getattr(args, name), saved_data.get(name)
        if given is not None and saved is not None and given != saved:
            print(f"trainer: warning: --{name.replace('_', '-')} {given} differs from the "
                  f"checkpoint's {saved}; the data stream will not continue exactly", file=sys.stderr)
    return ckpt, saved_data, saved_train


def _checked(args: argparse.Namespace, saved_data: dict) -> dict:
    """The run's masking; refuses flags that do not name the data, a resumed run's changed masking, the
    evaluation's mask seed, a bad --eval-every."""
    from .evaluate import EVAL_SEED

    wrong = data_flags(args)
    if wrong:
        raise Failed(wrong)
    if args.eval_dataset and len(set(args.eval_dataset)) != len(args.eval_dataset):
        raise Failed(f"--eval-dataset names a dataset more than once: {args.eval_dataset}")
    try:
        masking = _masking(args, saved_data)
    except ValueError as exc:
        raise Failed(str(exc)) from None
    if pick(args.mask_seed, saved_data.get("mask_seed"), pick(args.seed, saved_data.get("seed"), 0)) == EVAL_SEED:
        raise Failed(f"mask seed {EVAL_SEED} is the one evaluation masks are drawn with; pick another")
    if args.eval_every not in (None, "epoch") and not (args.eval_every.isdigit() and int(args.eval_every) > 0):
        raise Failed(f"--eval-every takes a number of steps or 'epoch', not {args.eval_every!r}")
    return masking


def _devices(args: argparse.Namespace):  # noqa: ANN202 - torch types are imported lazily
    """(the torchrun group or None, this rank's device). Under torchrun every rank is a worker of the job;
    rank 0 alone logs to files, evaluates and checkpoints."""
    import torch

    from . import distributed
    from .loop import resolve_device

    try:
        device = resolve_device(args.device)
    except RuntimeError as exc:
        raise Failed(str(exc)) from None
    group = distributed.from_env()
    if group is None:
        return None, device
    if not args.job:
        raise Failed("under torchrun every rank is a worker of a shared job: pass --job NAME")
    if device.type == "cuda":
        device = torch.device("cuda", group.local_rank)
    distributed.init(group, device)
    if not group.leader:
        args.metrics_out = args.eval_dataset = args.checkpoint = None
        args.unseen_eval = 0
    args.worker = args.worker or f"{socket.gethostname()}:{os.getpid()}:rank{group.rank}"
    return group, device


if __name__ == "__main__":
    code = main()
    from .distributed import from_env

    if from_env() is not None:
        # A rank of a torchrun group: all is written and the process group torn down. Exit without the
        # interpreter's finalization, where gloo's worker threads can still be destroyed and abort the process
        # (SIGABRT, "terminate called without an active exception") after a run that succeeded.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
