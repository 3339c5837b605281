"""docker-compose.yml, kept honest: its service, bootstrap and trainer commands are run here, as
written, against its Redis command (a real server, password and all); Docker itself is not needed.
docker-compose 1.29 validates the file where it is installed. tests/test_proxy.py runs the proxy's
config, tests/test_images.py checks the Dockerfile and its locks."""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import yaml

from client import Client
from service.store.embedded import find_server_binary

from .conftest import ROOT, ServiceProcess, free_port, service_env

COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
DEPLOY = ROOT / "deploy"
DIGEST = re.compile(r"@sha256:[0-9a-f]{64}$")
SECRETS = {"AUTH_TOKEN": secrets.token_hex(16), "REDIS_PASSWORD": secrets.token_hex(16)}
PROXY_URL = "http://proxy:8080"


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """Compose's variable substitution (``${X}``, ``${X:-default}``, ``${X:?error}``, ``$$``) over a tree."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def one(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        name, op, arg = m.group(1), m.group(2), m.group(3)
        if env.get(name):
            return env[name]
        if op == ":?":
            raise KeyError(f"{name}: {arg}")
        return arg if op == ":-" else ""

    return re.sub(r"\$\$|\$\{(\w+)(?:(:[-?])([^}]*))?\}", one, value)


def _local(cmd: list[str], url: str) -> list[str]:
    """The compose command with the proxy's host name pointed at a service on this machine."""
    out = [c.replace(PROXY_URL, url) for c in cmd]
    if out[0] == "python":
        out[0] = sys.executable
    elif out[0] == "maskserve":
        out[:1] = [sys.executable, "-m", "maskserve"]
    return out


def _trainer_args(cmd: list[str], flag: str) -> str:
    return cmd[cmd.index(flag) + 1]


# ---- the compose file ---------------------------------------------------------


def test_compose_wiring():
    services = COMPOSE["services"]
    assert set(services) == {"redis", "service", "proxy", "bootstrap", "trainer", "prometheus", "grafana"}
    # monitoring is opt-in (`--profile monitoring`); the job's own services run without it
    assert {n for n, s in services.items() if "profiles" in s} == {"prometheus", "grafana"}
    assert all(services[n]["profiles"] == ["monitoring"] for n in ("prometheus", "grafana"))
    assert "./deploy/prometheus.yml:/etc/prometheus/maskserve.yml:ro" in services["prometheus"]["volumes"]
    assert "--config.file=/etc/prometheus/maskserve.yml" in services["prometheus"]["entrypoint"][-1]
    assert "./deploy/grafana/maskserve.json:/etc/grafana/dashboards/maskserve.json:ro" in services["grafana"]["volumes"]
    assert "name" not in COMPOSE  # Compose v2 only: docker-compose 1.29 rejects it
    assert "--appendonly" in services["redis"]["command"] and "redis-data:/data" in services["redis"]["volumes"]
    assert services["service"]["depends_on"]["redis"]["condition"] == "service_healthy"
    assert "/readyz" in " ".join(services["service"]["healthcheck"]["test"])
    assert services["trainer"]["depends_on"]["bootstrap"]["condition"] == "service_completed_successfully"
    assert services["service"]["build"]["target"] == "service" and services["trainer"]["build"]["target"] == "trainer"
    # --scale trainer=N: N workers of one job, not N copies of one stateless stream
    assert "--job" in services["trainer"]["command"]
    # acks confirmed only once fsynced: a Redis with WAITAOF (>= 7.2), and the service insists on it
    tag = services["redis"]["image"].split(":")[1].split("@")[0]
    assert tuple(int(x) for x in tag.split("-")[0].split(".")[:2]) >= (7, 2)
    assert services["service"]["environment"]["MASKSERVE_DURABLE_ACKS"] == "require"
    # as many worker processes as the container has CPUs
    assert int(services["service"]["environment"]["MASKSERVE_WORKERS"]) == services["service"]["cpus"]
    # trainers and bootstrap reach the replicas through the proxy, with the token the service requires
    for name in ("bootstrap", "trainer"):
        assert PROXY_URL in services[name]["command"] and "MASKSERVE_TOKEN" in services[name]["environment"]
    assert services["proxy"]["volumes"] == ["./deploy/nginx.conf:/etc/nginx/maskserve.conf:ro"]
    assert services["proxy"]["entrypoint"][-2:] == ["-c", "/etc/nginx/maskserve.conf"]


def test_compose_locks_every_service_down():
    services = COMPOSE["services"]
    for name, s in services.items():
        assert s["read_only"] is True and s["cap_drop"] == ["ALL"], name
        assert s["security_opt"] == ["no-new-privileges:true"] and s["tmpfs"], name
        assert s["mem_limit"] and s["cpus"] and s["pids_limit"], name  # honoured by v2 and 1.29 alike
        assert "build" in s or DIGEST.search(s["image"]), f"{name}: image not pinned by digest"
        assert ("ports" in s) == (name in ("proxy", "grafana")), f"{name}: only the proxy and Grafana are published"
    assert services["proxy"]["ports"] == ["${PUBLISH_ADDRESS:-127.0.0.1}:${PUBLISH_PORT:-8000}:8080"]
    assert services["grafana"]["ports"] == ["${GRAFANA_PUBLISH_ADDRESS:-127.0.0.1}:${GRAFANA_PUBLISH_PORT:-3000}:3000"]
    assert services["grafana"]["environment"]["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"  # viewers never edit
    # secrets: required (compose refuses to start without them), never defaulted
    env = interpolate(COMPOSE, SECRETS)["services"]
    pw = SECRETS["REDIS_PASSWORD"]
    assert env["redis"]["command"][-2:] == ["--requirepass", pw]
    assert env["service"]["environment"]["REDIS_URL"] == f"redis://:{pw}@redis:6379/0"
    assert env["service"]["environment"]["MASKSERVE_AUTH_TOKEN"] == SECRETS["AUTH_TOKEN"]
    for missing in SECRETS:
        with pytest.raises(KeyError, match=missing):
            interpolate(COMPOSE, {k: v for k, v in SECRETS.items() if k != missing})
    # Redis sits on an internal network with the replicas alone
    assert COMPOSE["networks"]["data"]["internal"] is True
    assert [n for n, s in services.items() if "data" in s["networks"]] == ["redis", "service"]


def test_env_example_names_every_variable():
    """Every variable compose reads is in deploy/env.example, none of them a setting the service
    would pick up from a .env of its own (MASKSERVE_*, REDIS_URL), and .env itself is never committed."""
    text = (ROOT / "docker-compose.yml").read_text()
    used = set(re.findall(r"\$\{(\w+)", text))
    example = dict(line.split("=", 1) for line in (DEPLOY / "env.example").read_text().splitlines()
                   if line and not line.startswith("#"))  # fmt: skip
    assert used <= set(example), used - set(example)
    assert not [k for k in example if k.startswith("MASKSERVE_") or k == "REDIS_URL"]
    assert all(not example[k] for k in SECRETS)  # to be filled in, never a shared default
    assert ".env" in (ROOT / ".gitignore").read_text().splitlines()


DOCKER_COMPOSE = shutil.which("docker-compose")


@pytest.mark.skipif(DOCKER_COMPOSE is None, reason="needs docker-compose 1.29 (apt-get install docker-compose)")
def test_docker_compose_accepts_the_file(tmp_path: Path):
    """docker-compose (Debian's 1.29) parses, validates and interpolates the file; with the example
    env file as it ships (secrets empty) it refuses."""
    filled = tmp_path / "filled.env"
    filled.write_text("".join(f"{k}={SECRETS.get(k, v)}\n" for k, v in (
        line.split("=", 1) for line in (DEPLOY / "env.example").read_text().splitlines()
        if line and not line.startswith("#"))))  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in SECRETS and not k.startswith("COMPOSE_")}

    def config(env_file: Path, *profiles: str) -> subprocess.CompletedProcess:
        return subprocess.run([DOCKER_COMPOSE, "--env-file", str(env_file), "--project-directory", str(ROOT),
                               "-f", str(ROOT / "docker-compose.yml"),
                               *(a for p in profiles for a in ("--profile", p)), "config"],
                              env=env, capture_output=True, text=True, timeout=120)  # fmt: skip

    ok = config(filled)
    assert ok.returncode == 0, ok.stderr
    services = yaml.safe_load(ok.stdout)["services"]
    assert services["service"]["environment"]["REDIS_URL"] == f"redis://:{SECRETS['REDIS_PASSWORD']}@redis:6379/0"
    assert services["proxy"]["ports"] == ["127.0.0.1:8000:8080/tcp"]
    assert services["trainer"]["depends_on"]["bootstrap"]["condition"] == "service_completed_successfully"
    assert all(s["read_only"] and s["cap_drop"] == ["ALL"] and s["mem_limit"] for s in services.values())
    monitoring = config(filled, "monitoring")
    assert monitoring.returncode == 0, monitoring.stderr
    services = yaml.safe_load(monitoring.stdout)["services"]
    assert services["grafana"]["ports"] == ["127.0.0.1:3000:3000/tcp"]
    assert services["prometheus"]["environment"]["AUTH_TOKEN"] == SECRETS["AUTH_TOKEN"]
    assert all(s["read_only"] and s["cap_drop"] == ["ALL"] and s["mem_limit"] for s in services.values())
    refused = config(DEPLOY / "env.example")
    assert refused.returncode != 0 and "in .env (see deploy/env.example)" in refused.stderr + refused.stdout


# ---- the stack, run ---------------------------------------------------------------


class ComposeRedis:
    """The compose file's ``redis-server`` command, arguments as written (password included), run by
    the embedded server's binary with this machine's port and directory appended."""

    def __init__(self, command: list[str], data_dir: Path, password: str) -> None:
        assert command[0] == "redis-server"
        data_dir.mkdir()
        self.port = free_port()
        self.proc = subprocess.Popen(
            [find_server_binary(), *command[1:], "--bind", "127.0.0.1", "--port", str(self.port),
             "--dir", str(data_dir), "--logfile", str(data_dir / "server.log")],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        r = redis.Redis(port=self.port, password=password, socket_timeout=2)
        deadline = time.monotonic() + 30
        while True:
            try:
                if r.ping():
                    break
            except (redis.exceptions.ConnectionError, redis.exceptions.BusyLoadingError):
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError((data_dir / "server.log").read_text()) from None
                time.sleep(0.05)
        r.close()

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(20)


@pytest.mark.slow
def test_compose_commands_run_the_whole_job(tmp_path: Path):
    """The compose stack's commands and environments, as written, on the compose Redis command (AOF,
    password; WAITAOF from the embedded Valkey binary). Bootstrap and trainers talk to the service
    directly here, not through the proxy. Two trainer commands stand for ``--scale trainer=2``: they
    share the job, and every sequence is trained once per epoch."""
    services = interpolate(COMPOSE, SECRETS)["services"]
    port = free_port()
    server = ComposeRedis(services["redis"]["command"], tmp_path / "redis", SECRETS["REDIS_PASSWORD"])
    try:
        with pytest.raises(redis.exceptions.AuthenticationError):
            redis.Redis(port=server.port).ping()  # no password, no data
        service_vars = services["service"]["environment"]
        redis_url = service_vars["REDIS_URL"].replace("@redis:6379/", f"@127.0.0.1:{server.port}/")
        env = service_env(**{**service_vars, "REDIS_URL": redis_url})
        serve_cmd = _local(services["service"]["command"], "")
        assert serve_cmd[-4:] == ["--host", "0.0.0.0", "--port", "8000"]
        service = ServiceProcess(env, port, workers=None)  # `maskserve serve` as written, on a free port
        try:
            service.wait_ready()
            assert httpx.get(f"{service.url}/v1/datasets", timeout=30).status_code == 401  # the token is required
            boot_env = service_env(**services["bootstrap"]["environment"])
            boot = subprocess.run(_local(services["bootstrap"]["command"], service.url) + ["--max-mb", "0.4"],
                                  env=boot_env, cwd=ROOT, capture_output=True, text=True, timeout=120)  # fmt: skip
            assert boot.returncode == 0, boot.stdout + boot.stderr
            with Client(service.url, token=SECRETS["AUTH_TOKEN"]) as c:
                info = c.dataset("stdlib-docs")
                assert c.readiness()["durable_acks"] is True
            assert info["num_sequences"] > 100 and info["seq_len"] == 128

            # Bootstrapping again is a no-op: the compose stack can be restarted.
            again = subprocess.run(_local(services["bootstrap"]["command"], service.url), env=boot_env, cwd=ROOT,
                                   capture_output=True, text=True, timeout=60)  # fmt: skip
            assert again.returncode == 0 and "nothing to do" in again.stdout
            with Client(service.url, token=SECRETS["AUTH_TOKEN"]) as c:
                assert c.dataset("stdlib-docs")["num_sequences"] == info["num_sequences"]

            trainer_cmd = _local(services["trainer"]["command"], service.url)
            trainer_env = service_env(**services["trainer"]["environment"])
            job, epochs = _trainer_args(trainer_cmd, "--job"), int(_trainer_args(trainer_cmd, "--epochs"))
            runs = {}
            for k in range(2):  # docker compose up --scale trainer=2
                out = open(tmp_path / f"trainer{k}.txt", "w")
                runs[f"t{k}"] = (out, subprocess.Popen(
                    trainer_cmd + ["--worker", f"t{k}", "--log-every", "5", "--threads", "1"], env=trainer_env,
                    cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, text=True))  # fmt: skip
            for name, (out, proc) in runs.items():
                try:
                    assert proc.wait(300) == 0, (tmp_path / f"trainer{name[1:]}.txt").read_text()
                finally:
                    if proc.poll() is None:
                        proc.kill()
                    out.close()
            logs = {name: (tmp_path / f"trainer{name[1:]}.txt").read_text() for name in runs}

            with Client(service.url, token=SECRETS["AUTH_TOKEN"]) as c:
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
    finally:
        server.stop()
