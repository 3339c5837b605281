"""docker-compose.yml, kept honest: its service, bootstrap and trainer commands
are run here, as written, against a real Redis (Docker itself is not needed)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from client import Client
from service.embedded import EmbeddedRedis

from .conftest import ROOT, ServiceProcess, free_port, service_env

COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def _local(cmd: list[str], port: int) -> list[str]:
    """The compose command with the container host names pointed at this machine."""
    out = [c.replace("http://service:8000", f"http://127.0.0.1:{port}") for c in cmd]
    if out[0] == "python":
        out[0] = sys.executable
    elif out[0] == "maskserve":
        out[:1] = [sys.executable, "-m", "service"]
    return out


def _trainer_args(cmd: list[str], flag: str) -> str:
    return cmd[cmd.index(flag) + 1]


def test_compose_wiring():
    services = COMPOSE["services"]
    assert set(services) == {"redis", "service", "bootstrap", "trainer"}
    assert "--appendonly" in services["redis"]["command"] and "redis-data:/data" in services["redis"]["volumes"]
    assert services["service"]["depends_on"]["redis"]["condition"] == "service_healthy"
    assert "/readyz" in " ".join(services["service"]["healthcheck"]["test"])
    assert services["trainer"]["depends_on"]["bootstrap"]["condition"] == "service_completed_successfully"
    assert services["service"]["build"]["target"] == "service" and services["trainer"]["build"]["target"] == "trainer"
    dockerfile = (ROOT / "Dockerfile").read_text()
    service_stage = dockerfile.split("FROM base AS service")[1].split("FROM base AS trainer")[0]
    assert '".[service]"' in service_stage and "trainer]" not in service_stage  # no torch in the service image
    # --scale trainer=N: N workers of one job, not N copies of one stateless stream
    assert "--job" in services["trainer"]["command"]
    # acks confirmed only once fsynced: a Redis with WAITAOF (>= 7.2), and the service insists on it
    major, minor = (int(x) for x in services["redis"]["image"].split(":")[1].split("-")[0].split(".")[:2])
    assert (major, minor) >= (7, 2)
    assert services["service"]["environment"]["MASKSERVE_DURABLE_ACKS"] == "require"


@pytest.mark.slow
def test_compose_commands_run_the_whole_job(tmp_path: Path):
    """The compose stack's commands and service environment, as written, on an AOF-backed server
    (the embedded Valkey, as the compose Redis: WAITAOF). Two trainer commands stand for
    ``--scale trainer=2``: they share the job, and every sequence is trained once per epoch."""
    services = COMPOSE["services"]
    port = free_port()
    with EmbeddedRedis(tmp_path / "redis", appendonly=True) as server:
        env = service_env(**{**services["service"]["environment"], "REDIS_URL": server.url})
        serve_cmd = _local(services["service"]["command"], port)
        assert serve_cmd[-4:] == ["--host", "0.0.0.0", "--port", "8000"]
        service = ServiceProcess(env, port)  # runs `maskserve serve`, on a free port instead of 8000
        try:
            service.wait_ready()
            boot = subprocess.run(_local(services["bootstrap"]["command"], port) + ["--max-mb", "0.4"],
                                  env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)  # fmt: skip
            assert boot.returncode == 0, boot.stdout + boot.stderr
            with Client(service.url) as c:
                info = c.dataset("stdlib-docs")
                assert c._json("GET", "/readyz")["durable_acks"] is True
            assert info["num_sequences"] > 100 and info["seq_len"] == 128

            # Bootstrapping again is a no-op: the compose stack can be restarted.
            again = subprocess.run(_local(services["bootstrap"]["command"], port), env=env, cwd=ROOT,
                                   capture_output=True, text=True, timeout=60)  # fmt: skip
            assert again.returncode == 0 and "nothing to do" in again.stdout
            with Client(service.url) as c:
                assert c.dataset("stdlib-docs")["num_sequences"] == info["num_sequences"]

            trainer_cmd = _local(services["trainer"]["command"], port)
            job, epochs = _trainer_args(trainer_cmd, "--job"), int(_trainer_args(trainer_cmd, "--epochs"))
            runs = {}
            for k in range(2):  # docker compose up --scale trainer=2
                out = open(tmp_path / f"trainer{k}.txt", "w")
                runs[f"t{k}"] = (out, subprocess.Popen(
                    trainer_cmd + ["--worker", f"t{k}", "--log-every", "5", "--threads", "1"], env=env, cwd=ROOT,
                    stdout=out, stderr=subprocess.STDOUT, text=True))  # fmt: skip
            for name, (out, proc) in runs.items():
                try:
                    assert proc.wait(300) == 0, (tmp_path / f"trainer{name[1:]}.txt").read_text()
                finally:
                    if proc.poll() is None:
                        proc.kill()
                    out.close()
            logs = {name: (tmp_path / f"trainer{name[1:]}.txt").read_text() for name in runs}

            with Client(service.url) as c:
                p = c.job_progress(job)
            n, bpe = info["num_sequences"], p["batches_per_epoch"]
            assert p["status"] == "done" and p["epochs"] == epochs
            assert p["acked_per_epoch"] == {str(e): bpe for e in range(epochs)}  # every batch of every epoch, once
            assert sum(p["workers"][w]["acked_sequences"] for w in runs) == epochs * n  # every sequence, per epoch
            for name, text in logs.items():
                steps = int(text.split("steps (now at ")[1].split(")")[0])
                assert steps == p["workers"][name]["acked"] > 0, text  # each trained exactly what it acked
                m = re.search(r"loss ([0-9.]+) -> ([0-9.]+)", text)
                assert m and float(m.group(2)) < float(m.group(1)), f"MLM loss did not fall:\n{text}"
        finally:
            service.stop()
