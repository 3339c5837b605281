"""The ``serve`` command: its arguments and its run (``python -m service serve``, ``maskserve serve``).

Light to import: the settings, the launcher and the app are imported only when the command runs.
"""

from __future__ import annotations

import argparse
import os

SERVE_HELP = "run the service (uvicorn)"
SERVE_DESCRIPTION = (
    "Run the service. With no REDIS_URL it starts an embedded Redis-protocol server whose data (AOF) lives "
    "in --data-dir."
)


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def _default_workers() -> int:
    if os.environ.get("MASKSERVE_WORKERS"):
        return positive(os.environ["MASKSERVE_WORKERS"])
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def add_serve_args(s: argparse.ArgumentParser) -> None:
    """The ``serve`` command's flags, on its (sub)parser."""
    s.add_argument("--host", default=os.environ.get("MASKSERVE_HOST", "127.0.0.1"))
    s.add_argument("--port", type=int, default=int(os.environ.get("MASKSERVE_PORT", "8000")))
    s.add_argument("--redis-url", help="Redis URL (default $REDIS_URL; unset: embedded server)")
    s.add_argument("--data-dir", help="embedded server's data directory (default $MASKSERVE_DATA_DIR or ./maskserve-data)")
    s.add_argument("--workers", type=positive, default=_default_workers(),
                   help="worker processes sharing the port, each with its own event loop, CPU pool and Redis "
                        "connections (default $MASKSERVE_WORKERS or the number of usable cores)")  # fmt: skip
    s.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    s.add_argument("--access-log", action=argparse.BooleanOptionalAction, default=False, help="log every request")
    s.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    import logging

    from ..core.config import Settings
    from .serving import serve

    overrides = {}
    if args.redis_url:
        overrides["redis_url"] = args.redis_url
    if args.data_dir:
        overrides["data_dir"] = args.data_dir
    settings = Settings(**overrides)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    where = settings.redis_url or f"embedded server, data in {settings.data_dir.resolve()}"
    print(f"maskserve: serving on http://{args.host}:{args.port} with {args.workers} worker process(es) "
          f"(Redis: {where})", flush=True)  # fmt: skip
    serve(settings, host=args.host, port=args.port, workers=args.workers, log_level=args.log_level,
          access_log=args.access_log)  # fmt: skip
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m service serve ...``: the service's own launcher (the other commands are ``maskserve``'s)."""
    p = argparse.ArgumentParser(prog="python -m service", description="Run maskserve's data service.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_serve_args(sub.add_parser("serve", help=SERVE_HELP, description=SERVE_DESCRIPTION))
    args = p.parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130
