"""The ``jobs`` commands: create, list, show, cancel, delete shared jobs, and evict a worker."""

from __future__ import annotations

import argparse

from client.mixtures import add_mixture_args, mixture_request

from .common import add_actions, add_masking_args, connect, masking, print_json


def cmd_jobs(args: argparse.Namespace) -> int:
    with connect(args) as c:
        if args.action == "list":
            for j in c.jobs():
                epochs = j["epochs"] if j["epochs"] is not None else "inf"
                reads = "+".join(s["dataset"] for s in j["sources"]) if j.get("sources") else j["dataset"]
                print(f"{j['name']:20} {reads:16} {j['status']:9} epoch {j['epoch']}/{epochs} "
                      f"next {j['next_batch']}/{j['batches_per_epoch']} acked {j['acked']} leased {j['leased']} "
                      f"redelivered {j['redelivered']} workers {len(j['workers'])} {j['sequences_per_s']:.0f} seq/s")  # fmt: skip
        elif args.action == "show":
            print_json(c.job_progress(args.name))
        elif args.action == "create":
            print_json(c.create_job(args.name, args.dataset, batch_size=args.batch_size, seed=args.seed,
                                    shuffle=not args.no_shuffle, epochs=args.epochs or None, drop_last=args.drop_last,
                                    lease_timeout_s=args.lease_timeout, epoch_boundary=args.epoch_boundary,
                                    masking={**masking(args), "mode": args.mode, "copies": args.copies},
                                    **mixture_args(args)))  # fmt: skip
        elif args.action == "cancel":
            print_json(c.cancel_job(args.name))
        elif args.action == "delete":
            c.delete_job(args.name)
            print(f"deleted job {args.name}")
        elif args.action == "evict":
            n = c.evict_worker(args.name, args.worker)
            print(f"job {args.name}: {n} batches of worker {args.worker} are handed out again")
    return 0


def mixture_args(args: argparse.Namespace) -> dict:
    """The mixture keywords of ``create_job`` from the command line (none without ``--source``)."""
    if not args.source:
        if args.dataset is None:
            raise SystemExit("maskserve jobs create: give --dataset, or --source once per dataset of a mixture")
        return {}
    try:
        return {"interpolation": args.interpolation, **mixture_request(args)}
    except (OSError, ValueError) as exc:
        raise SystemExit(f"maskserve jobs create: --curriculum: {exc}") from None


def jobs_parser(sub: argparse._SubParsersAction, conn: argparse.ArgumentParser) -> None:
    jb = sub.add_parser("jobs", help="shared jobs: create, list, show progress, cancel, delete, evict a worker")
    jsub = jb.add_subparsers(dest="action", required=True, metavar="ACTION")
    add_actions(
        jsub, conn, ("list", "all jobs, one line each", ()), ("show", "one job's progress, per worker", ("name",)),
        ("cancel", "stop handing out batches", ("name",)), ("delete", "delete a job and its state", ("name",)),
        ("evict", "a worker known to be gone: hand its leased batches out again now, not at expiry", ("name", "worker")),
    )  # fmt: skip
    jc = jsub.add_parser("create", parents=[conn], help="create a job (attaching when it exists with this config)")
    jc.add_argument("name")
    jc.add_argument("--dataset", default=None, help="the dataset the job reads (or --source, once per dataset)")
    jc.add_argument("--batch-size", type=int, default=32)
    jc.add_argument("--epochs", type=int, default=1, help="0 runs until cancelled")
    jc.add_argument("--no-shuffle", action="store_true")
    jc.add_argument("--drop-last", action="store_true")
    jc.add_argument("--lease-timeout", type=float, default=60.0, help="seconds before an unacked batch is re-delivered")
    jc.add_argument("--epoch-boundary", default="handout", choices=["handout", "ack"])
    jc.add_argument("--mode", default="dynamic", choices=["dynamic", "static"])
    add_masking_args(jc)
    add_mixture_args(jc)
    jb.set_defaults(func=cmd_jobs)
