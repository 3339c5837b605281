"""The Grafana dashboard (deploy/grafana/maskserve.json) over the service's own metric names, evaluated by a
real Prometheus (Debian's) running deploy/prometheus.yml against a live service with a running job: every
panel's query answers with a series. docker-compose's profile `monitoring` runs the same two files."""

from __future__ import annotations

import copy
import json
import re
import secrets
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import httpx
import pytest
import yaml

from client import Client

from .conftest import ROOT, free_port, service_env

DASHBOARD = json.loads((ROOT / "deploy" / "grafana" / "maskserve.json").read_text())
PROMETHEUS_CONFIG = yaml.safe_load((ROOT / "deploy" / "prometheus.yml").read_text())
PROMETHEUS = shutil.which("prometheus")
SEQ_LEN = 64


def queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) of every target of every panel, Grafana's variables as a Prometheus sees them
    with "All" chosen."""
    return [(p["title"], t["expr"].replace("$job", ".*")) for p in DASHBOARD["panels"] for t in p.get("targets", [])]


def names_in(expr: str) -> set[str]:
    return set(re.findall(r"\bmaskserve_\w+", expr))


def test_the_dashboard_reads_only_series_the_service_exports(service_url: str, client: Client, bpe_tokenizer,
                                                             corpus):  # fmt: skip
    """Every metric a panel names is one the service exports (a histogram through its _bucket series), and
    every family the service exports has a panel."""
    name = f"mon-{uuid.uuid4().hex[:8]}"
    client.create_dataset(name, tokenizer=bpe_tokenizer, seq_len=SEQ_LEN)
    client.ingest(name, corpus[:50])
    client.build_static_masks(name, seed=1, copies=2)
    client.batch(name, 8, seed=1)
    with client.job(f"{name}-job", worker="w", stats_every=0, create={"dataset": name, "batch_size": 4, "epochs": 1}) as s:
        for _, _ in zip(range(3), s):  # summaries go with the lease requests after the first batch
            pass
    text = httpx.get(f"{service_url}/metrics", timeout=30).text
    exported = set(re.findall(r"^(maskserve_\w+?)(?:\{| )", text, re.M))
    used = set().union(*(names_in(expr) for _, expr in queries()))
    assert used and used <= exported, used - exported
    families = set(re.findall(r"^# TYPE (maskserve_\w+) ", text, re.M)) - set(re.findall(r"(maskserve_\w+_created)", text))
    shown = {re.sub(r"_(bucket|total)$", "", n) for n in used}
    assert {re.sub(r"_total$", "", f) for f in families} <= shown, families - shown
    assert {p["datasource"]["uid"] for p in DASHBOARD["panels"] if "datasource" in p} == {"maskserve-prometheus"}


@pytest.mark.skipif(PROMETHEUS is None, reason="needs Debian's prometheus (apt-get install prometheus)")
def test_prometheus_answers_every_panel_of_the_dashboard(spawn_service, redis_url, rdb, tmp_path: Path,
                                                          bpe_tokenizer, corpus):  # fmt: skip
    token = secrets.token_hex(16)
    svc = spawn_service(service_env(REDIS_URL=redis_url, MASKSERVE_AUTH_TOKEN=token), workers=2)
    # deploy/prometheus.yml as written, but for where the service and the token file are here, and a 1 s scrape
    config = copy.deepcopy(PROMETHEUS_CONFIG)
    scrape = config["scrape_configs"][0]
    assert scrape["authorization"] == {"type": "Bearer", "credentials_file": "/tmp/maskserve-token"}
    assert scrape["dns_sd_configs"][0]["names"] == ["service"] and scrape["dns_sd_configs"][0]["port"] == 8000
    (tmp_path / "token").write_text(token)
    scrape["authorization"]["credentials_file"] = str(tmp_path / "token")
    del scrape["dns_sd_configs"]
    scrape["static_configs"] = [{"targets": [f"127.0.0.1:{svc.port}"]}]
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    log = open(tmp_path / "prometheus.log", "wb")
    prom = subprocess.Popen([PROMETHEUS, f"--config.file={tmp_path / 'prometheus.yml'}",
                             f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address=127.0.0.1:{port}"],
                            stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
    api = f"http://127.0.0.1:{port}/api/v1/query"

    def series(expr: str) -> list:
        try:
            answer = httpx.get(api, params={"query": expr}, timeout=10)
        except httpx.TransportError:  # not listening yet
            return []
        assert answer.status_code in (200, 503), answer.text  # 503: not ready yet; 400 would be a bad query
        return answer.json()["data"]["result"] if answer.status_code == 200 else []

    try:
        with Client(svc.url, token=token) as c:
            name = f"mon-{uuid.uuid4().hex[:8]}"
            c.create_dataset(name, tokenizer=bpe_tokenizer, seq_len=SEQ_LEN)
            c.ingest(name, corpus[:100])
            c.build_static_masks(name, seed=1, copies=2)
            job = f"{name}-job"
            with c.job(job, worker="w1", stats_every=0,
                       create={"dataset": name, "batch_size": 8, "epochs": 1000}) as stream:  # fmt: skip
                batches = iter(stream)
                left = dict((expr, title) for title, expr in queries())
                deadline = time.monotonic() + 180  # a guard against a broken setup only: each turn waits on answers
                i = 0
                while left:
                    # traffic between scrapes, so that every rate() has two samples that differ
                    next(batches)
                    c.batch(name, 8, seed=1, index=i % 4)
                    c.batch(name, 8, seed=1, index=i % 4, mode="static", copies=2)
                    i += 1
                    for expr in [e for e in left if series(e)]:
                        del left[expr]
                    if time.monotonic() > deadline:
                        pytest.fail(f"no series for {sorted(left.values())}; prometheus log:\n"
                                    + (tmp_path / "prometheus.log").read_text()[-3000:])  # fmt: skip
        up = series('up{job="maskserve"}')
        assert [s["value"][1] for s in up] == ["1"]  # scraped with the token, through the config's authorization
    finally:
        prom.terminate()
        prom.wait(30)
        log.close()
