"""Process setup: a process that dies with its parent, stopping a child, a free local port."""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys

# set by the process manager for its workers: they watch for its death
SUPERVISOR_ENV = "MASKSERVE_SUPERVISOR_PID"


def die_with_parent() -> bool:
    """Have the kernel send this process SIGTERM when its parent dies (Linux: ``PR_SET_PDEATHSIG``).

    Also fit to run in a child between fork and exec (``preexec_fn``). False where it could not be set."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        return False
    return True


def die_with_supervisor() -> None:
    """In a worker process: exit when the process manager that started it dies (Linux)."""
    supervisor = os.environ.get(SUPERVISOR_ENV)
    if not supervisor or not supervisor.isdigit():
        return
    if not die_with_parent():
        return
    if os.getppid() != int(supervisor):  # it died before the watch was set
        os.kill(os.getpid(), signal.SIGTERM)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (at the time of asking)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_process(proc: subprocess.Popen, timeout: float, sig: int = signal.SIGTERM) -> int:
    """Stop a child process: send it ``sig``, wait up to ``timeout`` seconds for it to exit, then kill it.
    Returns its exit status (a process already gone is only reaped)."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode
