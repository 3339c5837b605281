"""Process setup: a worker that dies with its process manager, a free local port."""

from __future__ import annotations

import ctypes
import os
import signal
import socket

# set by the process manager for its workers: they watch for its death
SUPERVISOR_ENV = "MASKSERVE_SUPERVISOR_PID"


def die_with_supervisor() -> None:
    """In a worker process: exit when the process manager that started it dies (Linux)."""
    supervisor = os.environ.get(SUPERVISOR_ENV)
    if not supervisor or not supervisor.isdigit():
        return
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        return
    if os.getppid() != int(supervisor):  # it died before the watch was set
        os.kill(os.getpid(), signal.SIGTERM)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (at the time of asking)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
