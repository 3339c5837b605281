"""docker-compose.yml, kept honest: its service, bootstrap and trainer commands
are run here, as written, against a real Redis (Docker itself is not needed)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import redis
import yaml

from client import Client

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


@pytest.mark.slow
def test_compose_commands_run_the_whole_job(redis_url: str, rdb: redis.Redis, tmp_path: Path):
    services = COMPOSE["services"]
    port = free_port()
    env = service_env(REDIS_URL=redis_url)
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
        assert info["num_sequences"] > 100 and info["seq_len"] == 128

        # Bootstrapping again is a no-op: the compose stack can be restarted.
        again = subprocess.run(_local(services["bootstrap"]["command"], port), env=env, cwd=ROOT,
                               capture_output=True, text=True, timeout=60)  # fmt: skip
        assert again.returncode == 0 and "nothing to do" in again.stdout
        with Client(service.url) as c:
            assert c.dataset("stdlib-docs")["num_sequences"] == info["num_sequences"]

        ckpt = tmp_path / "ckpt.pt"
        trainer_cmd = _local(services["trainer"]["command"], port) + ["--steps", "60", "--log-every", "10",
                                                                      "--checkpoint", str(ckpt)]  # fmt: skip
        run = subprocess.run(trainer_cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stdout + run.stderr
        m = re.search(r"loss ([0-9.]+) -> ([0-9.]+)", run.stdout)
        assert m, run.stdout
        first, last = float(m.group(1)), float(m.group(2))
        assert last < first - 0.5, f"MLM loss did not fall: {first} -> {last}"
        assert ckpt.exists()
    finally:
        service.stop()
