"""deploy/nginx.conf, run by the real nginx in front of two real service processes on one Redis.

The file is the repo's own: only the listen port, the resolver's address and the upstream's port
are rewritten for this machine. The two replicas listen on 127.0.0.1 and 127.0.0.2 at one port and
a small DNS server here answers the name ``service`` with both addresses, as Docker's embedded DNS
answers a scaled compose service, so the balancing under test is the file's. The timeout tests
shorten the one timeout they trip, after asserting the repo's value.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import redis

from client import Client

from .conftest import ROOT, ServiceProcess, free_port, service_env

NGINX = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if Path(p).exists()), None)
pytestmark = pytest.mark.skipif(NGINX is None, reason="needs Debian's nginx (apt-get install nginx)")

CONF = (ROOT / "deploy" / "nginx.conf").read_text()
TOKEN = "proxy-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
REPLICA_HOSTS = ("127.0.0.1", "127.0.0.2")
WAIT = 60.0  # generous upper bound on anything the proxy must do by itself


def directive(conf: str, name: str) -> str:
    """The value of the one ``name ...;`` directive in ``conf``."""
    found = re.findall(rf"^\s*{name}\s+([^;]*);", conf, flags=re.M)
    assert len(found) == 1, f"{name}: {found}"
    return found[0].strip()


def _sub(conf: str, pattern: str, repl: str) -> str:
    out, n = re.subn(pattern, repl, conf, flags=re.M)
    assert n == 1, f"{pattern!r} matched {n} times"
    return out


def render(conf: str, *, port: int, dns_port: int, upstream_port: int, **overrides: str) -> str:
    """The repo's file for this machine: where it listens, whom it asks, which port replicas use."""
    out = _sub(conf, r"^(\s*listen\s+)8080;", rf"\g<1>127.0.0.1:{port};")
    out = _sub(out, r"^(\s*resolver\s+)127\.0\.0\.11\b", rf"\g<1>127.0.0.1:{dns_port}")
    out = _sub(out, r"(set \$upstream service:)8000;", rf"\g<1>{upstream_port};")
    for name, value in overrides.items():
        out = _sub(out, rf"^(\s*{name}\s+)[^;]*;", rf"\g<1>{value};")
    return out


# ---- the pieces: Docker's DNS, the replicas, nginx ----------------------------


class DockerDns:
    """A UDP DNS server answering A queries for one name with fixed addresses (and NXDOMAIN for others)."""

    def __init__(self, name: str, addresses: tuple[str, ...]) -> None:
        self.name, self.addresses, self.queries = name, addresses, 0
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.2)  # how often the loop looks at `stopped`
        self.port = self.sock.getsockname()[1]
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stopped.is_set():
            try:
                query, peer = self.sock.recvfrom(512)
            except TimeoutError:
                continue
            self.sock.sendto(self.answer(query), peer)

    def answer(self, query: bytes) -> bytes:
        (ident,) = struct.unpack("!H", query[:2])
        pos, labels = 12, []
        while query[pos]:
            labels.append(query[pos + 1 : pos + 1 + query[pos]].decode())
            pos += 1 + query[pos]
        (qtype,) = struct.unpack("!H", query[pos + 1 : pos + 3])
        question = query[12 : pos + 5]
        known = ".".join(labels).lower() == self.name
        self.queries += known
        records = self.addresses if known and qtype == 1 else ()
        header = struct.pack("!HHHHHH", ident, 0x8180 | (0 if known else 3), 1, len(records), 0, 0)
        answers = b"".join(struct.pack("!HHHIH", 0xC00C, 1, 1, 5, 4) + socket.inet_aton(a) for a in records)
        return header + question + answers

    def close(self) -> None:
        self.stopped.set()
        self.thread.join(5)
        self.sock.close()


class Replica(ServiceProcess):
    """``maskserve serve`` on one loopback address (the CLI reads MASKSERVE_HOST)."""

    def __init__(self, env: dict[str, str], host: str, port: int) -> None:
        super().__init__({**env, "MASKSERVE_HOST": host}, port)
        self.url = f"http://{host}:{port}"

    def requests(self, route: str) -> int:
        """Requests this process counted on ``route``, any status (its own /metrics)."""
        text = httpx.get(f"{self.url}/metrics", headers=AUTH, timeout=30).text
        pattern = rf'^maskserve_requests_total\{{route="{re.escape(route)}",status="\d+"\}} ([0-9.e+]+)$'
        return int(sum(float(v) for v in re.findall(pattern, text, flags=re.M)))


class Nginx:
    """nginx in the foreground with ``conf`` and every path under ``workdir``."""

    def __init__(self, conf: str, port: int, workdir: Path) -> None:
        workdir.mkdir()
        (workdir / "nginx.conf").write_text(conf)
        self.url = f"http://127.0.0.1:{port}"
        self.port = port
        self.log_path = workdir / "nginx.log"
        command = [NGINX, "-p", f"{workdir}/", "-e", "stderr", "-c", str(workdir / "nginx.conf")]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + WAIT
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"nginx did not start:\n{self.log_path.read_text()}") from None
                time.sleep(0.05)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def dns() -> Iterator[DockerDns]:
    server = DockerDns("service", REPLICA_HOSTS)
    yield server
    server.close()


@pytest.fixture(scope="module")
def replicas(redis_url: str) -> Iterator[list[Replica]]:
    env = service_env(REDIS_URL=redis_url, MASKSERVE_AUTH_TOKEN=TOKEN)
    port = free_port()
    procs = [Replica(env, host, port) for host in REPLICA_HOSTS]
    try:
        for p in procs:
            p.wait_ready()
        yield procs
    finally:
        for p in procs:
            p.proc.send_signal(signal.SIGCONT)  # in case a test stopped it and failed before resuming it
            p.stop()


@pytest.fixture
def start_proxy(dns: DockerDns, replicas: list[Replica], tmp_path: Path) -> Iterator:
    """Start nginx with the repo's file rendered for here, plus ``overrides`` of single directives."""
    started: list[Nginx] = []

    def start(error_pages: bool = True, **overrides: str) -> Nginx:
        """``error_pages=False``: nginx as a plain proxy, its own text/html pages instead of the file's."""
        port = free_port()
        conf = render(CONF, port=port, dns_port=dns.port, upstream_port=replicas[0].port, **overrides)
        if not error_pages:
            conf, n = re.subn(r"^\s*error_page\s[^;]*;\n", "", conf, flags=re.M)
            assert n == 4, n
        started.append(Nginx(conf, port, tmp_path / f"nginx{len(started)}"))
        return started[-1]

    yield start
    for proxy in started:
        proxy.stop()


def wait_closed(sock: socket.socket, feed: bytes = b"", every: float = 0.25) -> tuple[bytes, float]:
    """Read until the peer closes (or resets) the connection; meanwhile send ``feed`` one byte per
    ``every`` seconds. Returns what was read and when the connection ended (monotonic)."""
    received, fed = b"", 0
    sock.settimeout(every if feed else WAIT)
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            if fed < len(feed):
                try:
                    sock.sendall(feed[fed : fed + 1])
                except (BrokenPipeError, ConnectionResetError):
                    return received, time.monotonic()
                fed += 1
            continue
        except ConnectionResetError:
            return received, time.monotonic()
        if not chunk:
            return received, time.monotonic()
        received += chunk
    raise AssertionError(f"the proxy kept the connection open for {WAIT}s; read {received[:200]!r}")


# ---- the repo's file -----------------------------------------------------------


def test_repo_file_balances_streams_and_times_out():
    """The values the live tests rely on or shorten, as the repo has them."""
    assert directive(CONF, "resolver") == "127.0.0.11 valid=5s ipv6=off"  # Docker's DNS, asked again every 5 s
    assert directive(CONF, "set") == "$upstream service:8000" and directive(CONF, "proxy_pass") == "http://$upstream"
    assert directive(CONF, "proxy_request_buffering") == "off" and directive(CONF, "proxy_http_version") == "1.1"
    assert directive(CONF, "client_max_body_size") == "0"  # the service's own limits apply
    assert directive(CONF, "proxy_max_temp_file_size") == "0"  # responses never spooled to disk
    assert directive(CONF, "client_header_timeout") == "10s"
    assert directive(CONF, "client_body_timeout") == "60s"
    assert directive(CONF, "send_timeout") == "60s"
    assert directive(CONF, "keepalive_timeout") == "30s"
    assert directive(CONF, "proxy_read_timeout") == "300s"
    assert directive(CONF, "listen") == "8080"


# ---- nginx in front of two replicas ---------------------------------------------


def test_requests_spread_over_both_replicas(start_proxy, replicas, dns):
    proxy = start_proxy()
    route, n = "/v1/datasets", 40
    before = [r.requests(route) for r in replicas]
    with httpx.Client(base_url=proxy.url, headers=AUTH, timeout=60) as http:
        for _ in range(n):
            assert http.get(route).status_code == 200
        # the service's own answers pass through untouched: a problem+json 401 without the token
        refused = http.get(route, headers={"Authorization": ""})
    counted = [r.requests(route) - b for r, b in zip(replicas, before)]
    assert sum(counted) == n and min(counted) > 0, counted
    assert dns.queries > 0  # the replicas were found through DNS, as in Docker
    assert refused.status_code == 401 and refused.headers["content-type"] == "application/problem+json"
    assert refused.json()["type"] == "urn:maskserve:problem:unauthorized"


def test_ingest_and_large_batch_pass_through(start_proxy, replicas, rdb: redis.Redis, bpe_tokenizer, corpus):
    proxy = start_proxy()
    docs = corpus * 4
    assert sum(len(json.dumps({"text": d})) for d in docs) > 4 * 256 * 1024  # 4 x client_body_buffer_size
    with Client(proxy.url, token=TOKEN, retries=0) as c:
        c.create_dataset("via-proxy", tokenizer=bpe_tokenizer, seq_len=64)
        res = c.ingest("via-proxy", iter(docs))  # a generator: sent chunked, as it comes
    assert res["documents"] == len(docs)
    with Client(replicas[1].url, token=TOKEN) as c:
        info = c.dataset("via-proxy")
    assert info["num_sequences"] == res["sequences"] > 1000

    # a batch much larger than the proxy's 1 MiB of response buffers, byte for byte what a replica sends
    params = {"size": 4096, "seed": 7, "format": "json"}
    direct = httpx.get(f"{replicas[0].url}/v1/datasets/via-proxy/batch", params=params, headers=AUTH, timeout=120)
    proxied = httpx.get(f"{proxy.url}/v1/datasets/via-proxy/batch", params=params, headers=AUTH, timeout=120)
    assert direct.status_code == proxied.status_code == 200
    print(len(proxied.content), info)
    assert len(proxied.content) > 2 << 20 and proxied.content == direct.content


def test_stalled_replicas_answered_by_proxy(start_proxy, replicas):
    assert directive(CONF, "proxy_read_timeout") == "300s"
    proxy = start_proxy(proxy_read_timeout="2s")
    for r in replicas:
        r.proc.send_signal(signal.SIGSTOP)  # alive, accepting connections, answering nothing
    try:
        start = time.monotonic()
        stalled = httpx.get(f"{proxy.url}/v1/datasets", headers=AUTH, timeout=WAIT)
        elapsed = time.monotonic() - start
    finally:
        for r in replicas:
            r.proc.send_signal(signal.SIGCONT)
    assert stalled.status_code == 504 and stalled.headers["content-type"] == "application/problem+json"
    assert stalled.json()["type"] == "urn:maskserve:problem:gateway-timeout" and "retry-after" in stalled.headers
    assert elapsed >= 2 * 2 - 0.5  # a GET is tried on the next replica before the proxy gives up
    assert httpx.get(f"{proxy.url}/v1/datasets", headers=AUTH, timeout=WAIT).status_code == 200


def test_client_trickling_its_header_is_cut_off(start_proxy):
    assert directive(CONF, "client_header_timeout") == "10s"
    proxy = start_proxy(client_header_timeout="2s")
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=WAIT) as sock:
        start = time.monotonic()
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: maskserve\r\nX-Slow: ")
        received, ended = wait_closed(sock, feed=b"a" * 10_000)  # a byte every quarter second, never done
    assert ended - start >= 2 - 0.25, "closed before the header timeout"
    assert b"200 OK" not in received


def test_client_stalling_its_body_is_cut_off_and_nothing_is_stored(
    start_proxy, replicas, rdb: redis.Redis, bpe_tokenizer, corpus
):
    assert directive(CONF, "client_body_timeout") == "60s"
    proxy = start_proxy(client_body_timeout="2s")
    with Client(proxy.url, token=TOKEN, retries=0) as c:
        c.create_dataset("stalled", tokenizer=bpe_tokenizer, seq_len=64)
    route = "/v1/datasets/{name}/documents"
    before = sum(r.requests(route) for r in replicas)
    part = "".join(json.dumps({"text": d}) + "\n" for d in corpus[:20]).encode()
    head = (f"POST /v1/datasets/stalled/documents HTTP/1.1\r\nHost: maskserve\r\nAuthorization: Bearer {TOKEN}\r\n"
            f"Content-Type: application/x-ndjson\r\nContent-Length: {len(part) + 1_000_000}\r\n\r\n")  # fmt: skip
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=WAIT) as sock:
        start = time.monotonic()
        sock.sendall(head.encode() + part)  # then nothing more
        received, ended = wait_closed(sock)
    assert ended - start >= 2 - 0.25, "closed before the body timeout"
    assert not received.startswith(b"HTTP/1.1 2")
    # the body was on its way to a replica before it was complete (not buffered by the proxy), and the
    # replica, once the proxy hung up, stored nothing of it
    deadline = time.monotonic() + WAIT
    while sum(r.requests(route) for r in replicas) == before:
        assert time.monotonic() < deadline, "no replica saw the streamed request end"
        time.sleep(0.05)
    with Client(replicas[0].url, token=TOKEN) as c:
        assert c.dataset("stalled")["num_sequences"] == 0


# ---- job streams through the proxy: piggybacked acks, the proxy's own error pages ----------


class _Wire(httpx.BaseTransport):
    """Real HTTP; records how many acks each answered lease request (query or body) or /ack carried and the
    verdicts the service gave, and sets ``answered[status]`` when an answer with that status comes back."""

    def __init__(self) -> None:
        self.inner = httpx.HTTPTransport()
        self.carried: list[int] = []
        self.verdicts: list[str] = []
        self.calls = 0
        self.statuses: list[int] = []
        self.lock = threading.Lock()
        self.answered: dict[int, threading.Event] = {s: threading.Event() for s in (414, 502)}

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        resp = self.inner.handle_request(request)
        with self.lock:
            self.calls += 1
            self.statuses.append(resp.status_code)
            route = request.url.path.rsplit("/", 1)[-1]
            if route == "next" and (resp.status_code < 300 or resp.status_code == 410):
                sent = request.url.params.get_list("ack")
                sent += json.loads(request.content)["acks"] if request.content else []
                self.carried.append(len(sent))
                if resp.status_code == 410:  # the job ended: the verdicts are in the problem
                    self.verdicts += json.loads(resp.read())["acks"]
                else:
                    self.verdicts += [v for v in resp.headers.get("maskserve-acks", "").split(",") if v]
            elif route == "ack" and resp.status_code == 200:
                self.carried.append(len(json.loads(request.content)["leases"]))
                self.verdicts += json.loads(resp.read())["results"]
        if resp.status_code in self.answered:
            self.answered[resp.status_code].set()
        return resp


def _job_dataset(c: Client, corpus: list[str], bpe_tokenizer: str) -> tuple[str, int]:
    name = f"acks-{time.monotonic_ns()}"
    c.create_dataset(name, tokenizer=bpe_tokenizer, seq_len=64)
    c.ingest(name, corpus)
    return name, c.dataset(name)["num_sequences"]


def test_a_stream_sending_256_acks_at_once_goes_on_through_the_proxy(
    start_proxy, replicas, rdb: redis.Redis, bpe_tokenizer, corpus
):
    """A worker holding 256 acks (its ``ack_every``; the same pile an outage leaves) sends them with one lease
    request: through the repo's proxy the stream goes on, and every batch is counted acked exactly once."""
    from client._jobs import MAX_PIGGYBACK

    assert MAX_PIGGYBACK >= 256
    proxy = start_proxy()
    with Client(replicas[0].url, token=TOKEN) as direct:
        name, n = _job_dataset(direct, corpus, bpe_tokenizer)
        batches = 2 * 256 + 40
        assert n >= batches
        job = f"job-{name}"
        direct.create_job(job, name, batch_size=1, epochs=1, seed=3)
    wire = _Wire()
    with Client(proxy.url, token=TOKEN, transport=wire) as c:
        with c.job(job, prefetch=2, ack_every=256, ack_delay=1e9, max_outage=WAIT) as stream:
            for i, _ in enumerate(stream):
                if i + 1 == batches:
                    break
        progress = c.job_progress(job)
    assert max(wire.carried) == 256, wire.carried  # 256 pending acks went in one request
    assert 414 not in wire.statuses
    assert stream.acked == batches and not stream.rejected
    assert len(wire.verdicts) == sum(wire.carried) and set(wire.verdicts) == {"acked"}  # none twice
    assert progress["acked"] == batches


@pytest.mark.parametrize("pages", ["repo", "html"])
def test_the_proxys_own_refusals_reach_the_client_as_typed_errors(start_proxy, replicas, pages):
    """nginx refuses a request line or headers past its buffers itself, before any location. The repo's file
    answers them as problems (414, and 431 for nginx's own 494); a proxy without those pages sends nginx's
    text/html ones. Either way the client raises a typed error that carries the status, once (sending the
    same request again cannot help), never a parsing error."""
    from client import BadRequestError, RequestTooLargeError

    proxy = start_proxy(error_pages=pages == "repo")
    wire = _Wire()
    with Client(proxy.url, token=TOKEN, transport=wire, retries=3, backoff=0) as c:
        with pytest.raises(RequestTooLargeError) as long_line:
            c.dataset("x" * 9000)
    assert wire.calls == 1 and long_line.value.status == 414
    wire = _Wire()
    with Client(proxy.url, token="t" * 9000, transport=wire, retries=3, backoff=0) as c:
        with pytest.raises(BadRequestError if pages == "html" else RequestTooLargeError) as big_headers:
            c.dataset("x")
    assert wire.calls == 1
    if pages == "repo":
        assert long_line.value.type == "urn:maskserve:problem:uri-too-long"
        assert (big_headers.value.status, big_headers.value.type) == (431, "urn:maskserve:problem:header-too-large")
    else:  # nginx's pages: the status, and the page's title as the detail
        assert (long_line.value.type, long_line.value.detail) == ("about:blank", "414 Request-URI Too Large")
        assert big_headers.value.status == 400 and big_headers.value.type == "about:blank"
        assert big_headers.value.detail == "400 Request Header Or Cookie Too Large"


@pytest.mark.parametrize("pages", ["repo", "html"])
def test_no_replica_is_a_gateway_error_retried_where_the_request_may_be_sent_again(start_proxy, replicas, pages):
    """With no replica up, nginx answers 502 (a problem with the repo's file, text/html without it): a typed
    GatewayError carrying the status, retried for an idempotent call, not for one that is not."""
    from client import GatewayError

    proxy = start_proxy(set=f"$upstream service:{free_port()}", error_pages=pages == "repo")
    wire = _Wire()
    with Client(proxy.url, token=TOKEN, transport=wire, retries=2, backoff=0) as c:
        with pytest.raises(GatewayError) as listing:
            c.datasets()
        assert wire.calls == 3
        with pytest.raises(GatewayError) as created:
            c.create_dataset("never", tokenizer={"model": {}}, seq_len=16)
        assert wire.calls == 4
    for err in (listing.value, created.value):
        assert err.status == 502
        if pages == "repo":
            assert err.type == "urn:maskserve:problem:bad-gateway" and err.retry_after == 1
        else:
            assert (err.type, err.detail) == ("about:blank", "502 Bad Gateway")


def test_a_stream_rides_out_a_proxy_with_no_replica_and_acks_everything_once(
    start_proxy, replicas, redis_url: str, rdb: redis.Redis, bpe_tokenizer, corpus
):
    """The service becomes reachable through the proxy only after the worker's lease requests got nginx's
    text/html 502: the stream waits it out and goes on, every batch counted acked exactly once."""
    port = free_port()
    proxy = start_proxy(set=f"$upstream service:{port}", error_pages=False)
    with Client(replicas[0].url, token=TOKEN) as direct:
        name, n = _job_dataset(direct, corpus[:100], bpe_tokenizer)
        job = f"job-{name}"
        direct.create_job(job, name, batch_size=8, epochs=1, seed=1)
        batches = -(-n // 8)
    wire = _Wire()
    late = None
    try:
        with Client(proxy.url, token=TOKEN, transport=wire, backoff=0.05, max_backoff=0.2) as c:
            with c.job(job, prefetch=2, ack_every=4, ack_delay=1e9, max_outage=WAIT) as stream:
                with ThreadPoolExecutor(1) as pool:
                    consumed = pool.submit(lambda: [(bt.epoch, bt.index) for bt in stream])
                    assert wire.answered[502].wait(WAIT)  # the lease requests meet the proxy's error page
                    late = Replica(service_env(REDIS_URL=redis_url, MASKSERVE_AUTH_TOKEN=TOKEN),
                                   "127.0.0.1", port).wait_ready()
                    seen = consumed.result(WAIT)
            progress = c.job_progress(job)
    finally:
        if late is not None:
            late.stop()
    assert sorted(seen) == [(0, i) for i in range(batches)]
    assert stream.acked == batches and not stream.rejected
    assert len(wire.verdicts) == sum(wire.carried) == batches and set(wire.verdicts) == {"acked"}
    assert progress["status"] == "done" and progress["acked"] == batches
