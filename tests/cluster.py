"""A real local Redis Cluster for tests and benchmarks: N masters (+ replicas) on free ports.

Each node is a ``redis-server --cluster-enabled yes`` process (or another
server binary, e.g. the bundled Valkey) with its cluster config and data in a
temporary directory (no RDB; the append-only file only when asked). Slots are assigned
with ``redis-cli --cluster create``; the cluster is ready once every node says
``cluster_state:ok`` and agrees on the same number of known nodes.
"""

from __future__ import annotations

import random
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis


def binaries() -> tuple[str, str] | None:
    """(redis-server, redis-cli) from PATH, or None when either is absent."""
    server, cli = shutil.which("redis-server"), shutil.which("redis-cli")
    return (server, cli) if server and cli else None


def _free_port() -> int:
    """A port whose cluster bus port (+10000) is free too (the server refuses ports above 55535)."""
    while True:
        port = random.randint(20000, 45000)
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + 10000))
            return port
        except OSError:
            continue


@dataclass
class Node:
    port: int
    proc: subprocess.Popen
    directory: Path

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, socket_timeout=10)

    def alive(self) -> bool:
        return self.proc.poll() is None


@dataclass
class LocalCluster:
    """A cluster of ``masters`` masters with ``replicas`` replicas each."""

    root: Path
    masters: int = 3
    replicas: int = 0
    server: str | None = None  # the server binary (default: redis-server from PATH)
    appendonly: bool = False  # the append-only file, fsynced every second
    nodes: list[Node] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"redis://{self.nodes[0].address}"

    def start(self, timeout: float = 60) -> "LocalCluster":
        found = binaries()
        if found is None:
            raise RuntimeError("redis-server and redis-cli are needed for a local cluster")
        server, cli = found
        server = self.server or server
        for i in range(self.masters * (1 + self.replicas)):
            port = _free_port()
            d = self.root / f"node{i}"
            d.mkdir(parents=True)
            proc = subprocess.Popen(
                [server, "--port", str(port), "--bind", "127.0.0.1", "--cluster-enabled", "yes",
                 "--cluster-config-file", str(d / "nodes.conf"), "--cluster-node-timeout", "1000",
                 "--appendonly", "yes" if self.appendonly else "no", "--appendfsync", "everysec", "--save", "",
                 "--dir", str(d), "--daemonize", "no",
                 "--logfile", str(d / "log.txt"), "--cluster-replica-validity-factor", "0",
                 "--repl-diskless-sync-delay", "0"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
            self.nodes.append(Node(port, proc, d))
        deadline = time.monotonic() + timeout
        for node in self.nodes:
            self._wait(deadline, lambda n=node: n.client().ping())
        subprocess.run(
            [cli, "--cluster", "create", *(n.address for n in self.nodes), "--cluster-replicas", str(self.replicas),
             "--cluster-yes"],
            check=True, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, timeout=timeout,
        )  # fmt: skip
        self._wait(deadline, self.ready)
        return self

    def ready(self) -> bool:
        """Every live node reports ``cluster_state:ok`` and knows every node, every slot has a live master, and
        every live replica's link to its master is up."""
        live = [n for n in self.nodes if n.alive()]
        for node in live:
            info = node.client().cluster("info")
            if info.get("cluster_state") != "ok" or int(info.get("cluster_known_nodes", 0)) < len(self.nodes):
                return False
        if len(self.master_ports()) != self.masters:
            return False
        for node in live:  # replicas in sync: a failover then loses nothing written before
            info = node.client().info("replication")
            if info.get("role") == "slave" and info.get("master_link_status") != "up":
                return False
        return True

    def replicas_listed(self) -> bool:
        """Every slot range in ``CLUSTER SLOTS`` lists a replica (what clients learn to read from). Redis 7.0
        leaves out a replica until it has an offset, so a master must have had a write first."""
        live = next(n for n in self.nodes if n.alive())
        ranges = live.client().execute_command("CLUSTER", "SLOTS")
        return bool(ranges) and all(len(r) >= 4 for r in ranges)

    def wait_replicas_listed(self, timeout: float = 30) -> None:
        """Wait for :meth:`replicas_listed` (each master needs to have had a write)."""
        self._wait(time.monotonic() + timeout, self.replicas_listed)

    def master_ports(self) -> list[int]:
        """Ports of the live masters that hold slots, as the first live node sees them."""
        live = next(n for n in self.nodes if n.alive())
        ports = []
        for addr, flags, slots in _nodes(live):
            if "master" in flags and "fail" not in flags and slots:
                ports.append(int(addr.split("@")[0].rsplit(":", 1)[1]))
        return sorted(ports)

    def node(self, port: int) -> Node:
        return next(n for n in self.nodes if n.port == port)

    def replica_of(self, port: int) -> Node | None:
        """A live replica of the master on ``port``."""
        live = next(n for n in self.nodes if n.alive())
        raw = live.client().execute_command("CLUSTER", "NODES").decode()
        ids = {f.split()[0]: f.split()[1] for f in raw.splitlines()}
        master_id = next(i for i, a in ids.items() if a.split("@")[0].endswith(f":{port}"))
        for line in raw.splitlines():
            parts = line.split()
            if parts[3] == master_id and "fail" not in parts[2]:
                rport = int(parts[1].split("@")[0].rsplit(":", 1)[1])
                if self.node(rport).alive():
                    return self.node(rport)
        return None

    def stop(self) -> None:
        for node in self.nodes:
            if node.alive():
                node.proc.kill()
                node.proc.wait(10)

    @staticmethod
    def _wait(deadline: float, check) -> None:  # noqa: ANN001
        delay = 0.01
        while True:
            try:
                if check():
                    return
            except redis.RedisError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the local cluster did not become ready in time")
            time.sleep(delay)
            delay = min(0.2, delay * 2)


def _nodes(node: Node) -> list[tuple[str, str, list[str]]]:
    """(address, flags, slot ranges) of each node in ``CLUSTER NODES`` as ``node`` sees it."""
    raw = node.client().execute_command("CLUSTER", "NODES").decode()
    out = []
    for line in raw.splitlines():
        parts = line.split()
        out.append((parts[1], parts[2], parts[8:]))
    return out
