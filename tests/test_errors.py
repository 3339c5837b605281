"""Bad input: an RFC 9457 problem with a stable type, a useful detail, and no change to the store."""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterator

import httpx
import pytest
import redis
from pydantic import SecretStr

import client as ms
from client import Client
from service.core.config import Settings

from .conftest import ServerThread, free_port

PROBLEM = "application/problem+json"
BASE = "urn:maskserve:problem:"
NDJSON = {"Content-Type": "application/x-ndjson"}


# ---------------------------------------------------------------------------
# helpers


def uniq(base: str) -> str:
    return f"{base}-{uuid.uuid4().hex[:8]}"


def ndjson(records) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in records)


def check_problem(resp: httpx.Response, status: int, kind: str, *in_detail: str) -> dict:
    """The response is a problem+json of ``status`` and type ``kind`` whose detail names the problem."""
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].split(";")[0] == PROBLEM
    body = resp.json()
    assert body["type"] == BASE + kind
    assert body["status"] == status
    assert body["title"]
    assert isinstance(body["detail"], str) and body["detail"]
    for text in in_detail:
        assert text in body["detail"], f"{text!r} not in {body['detail']!r}"
    return body


def snapshot(rdb: redis.Redis) -> dict[bytes, bytes]:
    """Every key of the test database with its serialized value."""
    return {k: rdb.dump(k) for k in sorted(rdb.keys("*"))}


def commands(rdb: redis.Redis, name: str) -> int:
    return int(rdb.info("commandstats").get(f"cmdstat_{name}", {}).get("calls", 0))


@pytest.fixture
def http(service_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=service_url, timeout=60) as h:
        yield h


@pytest.fixture
def populated(http: httpx.Client, bpe_tokenizer: str, corpus: list[str]) -> str:
    """A dataset with some data in it (a fresh name: the shared service caches datasets by name)."""
    name = uniq("ds")
    r = http.post("/v1/datasets", json={"name": name, "seq_len": 64, "tokenizer": json.loads(bpe_tokenizer)})
    assert r.status_code == 201, r.text
    r = http.post(f"/v1/datasets/{name}/documents", content=ndjson({"text": t} for t in corpus[:30]), headers=NDJSON)
    assert r.status_code == 200, r.text
    return name


def post_docs(http: httpx.Client, name: str, body, content_type: str = "application/x-ndjson", **params):
    return http.post(f"/v1/datasets/{name}/documents", content=body, headers={"Content-Type": content_type},
                     params=params)  # fmt: skip


# ---------------------------------------------------------------------------
# unknown dataset, unknown route


def test_unknown_dataset(http, rdb):
    for resp in (
        http.get("/v1/datasets/nope"),
        http.get("/v1/datasets/nope/tokenizer"),
        http.get("/v1/datasets/nope/batch", params={"size": 4}),
        post_docs(http, "nope", ndjson([{"text": "hello"}])),
        http.delete("/v1/datasets/nope"),
    ):
        body = check_problem(resp, 404, "dataset-not-found", "nope")
        assert body["dataset"] == "nope"
    assert rdb.keys("*") == []  # the ingest to a missing dataset created nothing


def test_unknown_route_and_method(http):
    check_problem(http.get("/v1/nothing-here"), 404, "not-found")
    check_problem(http.put("/v1/datasets"), 405, "method-not-allowed")


# ---------------------------------------------------------------------------
# malformed documents


def test_malformed_line_after_several_chunks_stores_nothing(http, rdb, populated, corpus):
    before = snapshot(rdb)
    meta_before = http.get(f"/v1/datasets/{populated}").json()
    # more than one tokenizer batch (1 MiB of text) of valid lines: whole chunks are staged before the bad line
    good = ndjson({"text": t} for _ in range(5) for t in corpus)
    bad_line = good.count(b"\n") + 1
    body = good + b'{"text": "unterminated\n' + ndjson({"text": t} for t in corpus[:50])
    sets_before = commands(rdb, "set")
    resp = post_docs(http, populated, body)
    problem = check_problem(resp, 400, "malformed-document", f"line {bad_line}", "JSON")
    assert problem["line"] == bad_line
    assert commands(rdb, "set") - sets_before >= 2, "the valid lines should have staged chunks before the error"
    assert snapshot(rdb) == before  # no staged keys left, counters and chunks untouched
    assert not [k for k in rdb.keys("*") if b"stage" in k]
    assert http.get(f"/v1/datasets/{populated}").json() == meta_before


@pytest.mark.parametrize(
    ("line", "words"),
    [
        (b"not json at all", ["JSON"]),
        (b'["a", "list"]', ["text", "ids"]),
        (b'{"title": "no text"}', ["text", "ids"]),
        (b'{"text": "both", "ids": [1]}', ["text", "ids"]),
        (b'{"text": 42}', ["text", "string"]),
        (b'{"ids": "1 2 3"}', ["ids", "integers"]),
        (b'{"ids": [1, 2.5]}', ["ids", "integers"]),
        (b'{"ids": [1, true]}', ["ids", "integers"]),
    ],
)
def test_malformed_ndjson_lines(line, words, http, rdb, populated):
    before = snapshot(rdb)
    body = ndjson([{"text": "a good first line"}, {"ids": [5, 6, 7]}]) + b"\n" + line + b"\n"
    problem = check_problem(post_docs(http, populated, body), 400, "malformed-document", "line 4", *words)
    assert problem["line"] == 4  # blank lines count
    assert snapshot(rdb) == before


def test_deeply_nested_json_line_is_a_malformed_document(http, rdb, populated):
    before = snapshot(rdb)
    body = ndjson([{"text": "fine"}]) + b"[" * 100_000 + b"\n"
    check_problem(post_docs(http, populated, body), 400, "malformed-document", "line 2")
    assert snapshot(rdb) == before


def test_lone_surrogate_in_text_is_a_malformed_document(http, rdb, populated):
    # valid UTF-8 and valid JSON, but the escape decodes to a lone surrogate: not text a tokenizer can take
    before = snapshot(rdb)
    body = ndjson([{"text": "fine"}]) + b'{"text": "broken \\ud800 surrogate"}\n'
    check_problem(post_docs(http, populated, body), 400, "malformed-document", "line 2")
    assert snapshot(rdb) == before


def test_non_utf8_text(http, rdb, populated):
    before = snapshot(rdb)
    body = ndjson([{"text": "ok"}]) + b'{"text": "caf\xe9"}\n'
    check_problem(post_docs(http, populated, body), 400, "malformed-document", "line 2", "UTF-8")
    check_problem(post_docs(http, populated, b"hello \xff world", "text/plain", split="none"),
                  400, "malformed-document", "body", "UTF-8")  # fmt: skip
    check_problem(post_docs(http, populated, b"good line\nbad \xfe line\n", "text/plain", split="line"),
                  400, "malformed-document", "line 2", "UTF-8")  # fmt: skip
    check_problem(post_docs(http, populated, b"para one\n\npara \xc3 two\n", "text/plain", split="paragraph"),
                  400, "malformed-document", "line 3", "UTF-8")  # fmt: skip
    assert snapshot(rdb) == before


@pytest.mark.parametrize("bad", [2000, 2001, 65535, -1, -70000])
def test_ids_outside_the_vocabulary(bad, http, rdb, populated):
    vocab = http.get(f"/v1/datasets/{populated}").json()["vocab_size"]
    assert vocab == 2000
    before = snapshot(rdb)
    body = ndjson([{"ids": [5, vocab - 1]}, {"text": "fine"}, {"ids": [7, bad, 8]}])
    problem = check_problem(post_docs(http, populated, body), 400, "token-out-of-vocabulary", "line 3", str(bad))
    assert problem["id"] == bad and problem["line"] == 3
    assert snapshot(rdb) == before


@pytest.mark.parametrize("bad", [10**23, -(10**23), 2**63, 2**64 + 5])
def test_huge_ids_are_outside_the_vocabulary(bad, http, rdb, populated):
    before = snapshot(rdb)
    body = ndjson([{"text": "fine"}, {"ids": [5, bad]}])
    check_problem(post_docs(http, populated, body), 400, "token-out-of-vocabulary", "line 2")
    assert snapshot(rdb) == before


# ---------------------------------------------------------------------------
# dataset creation


def create_body(tokenizer: str, **kw) -> dict:
    return {"name": uniq("new"), "seq_len": 64, "tokenizer": json.loads(tokenizer), **kw}


def test_seq_len_limits(http, rdb, settings, bpe_tokenizer):
    resp = http.post("/v1/datasets", json=create_body(bpe_tokenizer, seq_len=settings.max_seq_len + 1))
    problem = check_problem(resp, 422, "limit-exceeded", str(settings.max_seq_len + 1), str(settings.max_seq_len))
    assert problem["limit"] == settings.max_seq_len
    check_problem(http.post("/v1/datasets", json=create_body(bpe_tokenizer, seq_len=7)), 422, "validation-failed",
                  "seq_len")  # fmt: skip
    check_problem(http.post("/v1/datasets", json=create_body(bpe_tokenizer, seq_len="long")), 422,
                  "validation-failed", "seq_len")  # fmt: skip
    assert rdb.keys("*") == []
    assert http.get("/v1/datasets").json() == {"datasets": []}
    # the limit itself is fine
    assert http.post("/v1/datasets", json=create_body(bpe_tokenizer, seq_len=settings.max_seq_len)).status_code == 201
    assert http.post("/v1/datasets", json=create_body(bpe_tokenizer, seq_len=8)).status_code == 201


@pytest.mark.parametrize(
    ("body", "status", "kind", "words"),
    [
        ({"tokenizer": "garbage"}, 422, "validation-failed", ["tokenizer"]),
        ({"tokenizer": {"hello": "world"}}, 400, "invalid-tokenizer", ["tokenizer"]),
        ({"tokenizer": {"version": "1.0", "model": {"type": "NoSuchModel"}}}, 400, "invalid-tokenizer", ["tokenizer"]),
        ({"tokenizer": None}, 422, "validation-failed", ["tokenizer"]),
        ({"packing": "sentences"}, 422, "validation-failed", ["packing"]),
        ({"name": "bad name!"}, 422, "validation-failed", ["name"]),
        ({"name": ""}, 422, "validation-failed", ["name"]),
        ({"special_tokens": {"bos": "<s>"}}, 422, "validation-failed", ["special_tokens"]),
    ],
)
def test_invalid_create_requests(body, status, kind, words, http, rdb, bpe_tokenizer):
    payload = {**create_body(bpe_tokenizer), **body}
    check_problem(http.post("/v1/datasets", json=payload), status, kind, *words)
    assert rdb.keys("*") == []


def test_create_body_that_is_not_json(http, rdb):
    resp = http.post("/v1/datasets", content=b"{ this is not json", headers={"Content-Type": "application/json"})
    check_problem(resp, 422, "validation-failed")
    assert rdb.keys("*") == []


def test_create_existing_dataset(http, rdb, populated, wordpiece_tokenizer):
    before = snapshot(rdb)
    resp = http.post("/v1/datasets", json={"name": populated, "seq_len": 32, "tokenizer": json.loads(wordpiece_tokenizer)})
    problem = check_problem(resp, 409, "dataset-exists", populated)
    assert problem["dataset"] == populated
    assert snapshot(rdb) == before


# ---------------------------------------------------------------------------
# ingest requests


@pytest.mark.parametrize("content_type", ["application/json", "text/csv", "multipart/form-data", None])
def test_ingest_wrong_content_type(content_type, service_url, rdb, populated):
    before = snapshot(rdb)
    headers = {"Content-Type": content_type} if content_type else {}
    resp = httpx.post(f"{service_url}/v1/datasets/{populated}/documents", content=b'{"text": "hi"}\n', headers=headers)
    check_problem(resp, 415, "unsupported-media-type", *([content_type] if content_type else []))
    assert snapshot(rdb) == before


def test_ingest_bad_parameters(http, rdb, populated):
    before = snapshot(rdb)
    check_problem(post_docs(http, populated, b"some text", "text/plain", split="words"), 422, "validation-failed",
                  "split")  # fmt: skip
    resp = http.post(f"/v1/datasets/{populated}/documents", content=b'{"text": "hi"}\n',
                     headers={**NDJSON, "Idempotency-Key": "k" * 129})  # fmt: skip
    check_problem(resp, 422, "validation-failed", "idempotency")
    assert snapshot(rdb) == before


def test_body_over_the_limit_stores_nothing(http, rdb, settings, populated):
    before = snapshot(rdb)
    line = json.dumps({"ids": list(range(5, 1500))}).encode() + b"\n"
    body = line * (settings.max_body_bytes // len(line) + 20)
    assert len(body) > settings.max_body_bytes
    sets_before = commands(rdb, "set")
    problem = check_problem(post_docs(http, populated, body), 413, "payload-too-large", str(settings.max_body_bytes))
    assert problem["limit"] == settings.max_body_bytes
    assert commands(rdb, "set") - sets_before >= 2, "chunks should have been staged before the limit was hit"
    assert snapshot(rdb) == before


# ---------------------------------------------------------------------------
# batches


def test_batch_size_limits(http, rdb, settings, populated):
    before = snapshot(rdb)
    problem = check_problem(http.get(f"/v1/datasets/{populated}/batch", params={"size": 0}), 422, "validation-failed",
                            "size")  # fmt: skip
    assert [e["loc"] for e in problem["errors"]] == [["query", "size"]]
    too_big = settings.max_batch_size + 1
    problem = check_problem(http.get(f"/v1/datasets/{populated}/batch", params={"size": too_big}), 422,
                            "limit-exceeded", str(too_big), str(settings.max_batch_size))  # fmt: skip
    assert problem["limit"] == settings.max_batch_size
    assert http.get(f"/v1/datasets/{populated}/batch", params={"size": settings.max_batch_size}).status_code == 200
    assert snapshot(rdb) == before


@pytest.mark.parametrize(
    ("params", "words"),
    [
        ({"mlm_probability": 1.5}, ["mlm_probability"]),
        ({"mask_ratio": 0.8, "random_ratio": 0.5}, ["ratio"]),
        ({"seed": -1}, ["seed"]),
        ({"index": -3}, ["index"]),
        ({"format": "xml"}, ["format"]),
    ],
)
def test_batch_bad_parameters(params, words, http, populated):
    resp = http.get(f"/v1/datasets/{populated}/batch", params={"size": 4, **params})
    check_problem(resp, 422, "validation-failed", *words)


def test_batch_not_acceptable(http, populated):
    resp = http.get(f"/v1/datasets/{populated}/batch", params={"size": 4}, headers={"Accept": "text/html"})
    check_problem(resp, 406, "not-acceptable", "text/html")


@pytest.mark.parametrize(
    ("accept", "served"),
    [
        ("application/json;q=0, */*", "application/vnd.safetensors"),  # JSON explicitly refused
        ("application/vnd.safetensors;q=0.5, application/json", "application/json"),
        ("application/json, application/vnd.safetensors", "application/vnd.safetensors"),  # a tie: the default
        ("application/*;q=0.9, application/vnd.safetensors;q=0.1", "application/json"),
        ("text/html, application/json;q=0.2", "application/json"),
        ("application/json;q=0", None),
        ("application/vnd.safetensors;q=0, application/json;q=0", None),
    ],
)
def test_batch_accept_q_values(http, populated, accept: str, served: str | None):
    resp = http.get(f"/v1/datasets/{populated}/batch", params={"size": 2, "seed": 1}, headers={"Accept": accept})
    if served is None:
        check_problem(resp, 406, "not-acceptable")
    else:
        assert resp.status_code == 200 and resp.headers["content-type"].startswith(served), (accept, resp.headers)


def test_head_answers_like_get_and_405_says_what_is_allowed(http, populated):
    for path in ("/healthz", "/readyz", f"/v1/datasets/{populated}", "/v1/datasets"):
        got, head = http.get(path), http.head(path)
        assert head.status_code == got.status_code == 200 and head.content == b""
        assert head.headers["content-type"] == got.headers["content-type"]
        assert int(head.headers["content-length"]) == len(got.content)
    resp = http.delete("/healthz")
    check_problem(resp, 405, "method-not-allowed")
    assert "GET" in resp.headers["allow"]
    resp = http.put(f"/v1/datasets/{populated}/documents", content=b"")
    check_problem(resp, 405, "method-not-allowed")
    assert resp.headers["allow"] == "POST"



def _methods_by_path(settings: Settings) -> dict[str, set[str]]:
    """Every path template of the app with the methods its routes take (HEAD wherever GET is: the
    gatekeeper answers HEAD with the GET route)."""
    from service.http.app import create_app

    try:
        from fastapi.routing import iter_route_contexts  # FastAPI that nests included routers
    except ImportError:  # one whose app.routes lists every route

        def iter_route_contexts(routes):  # noqa: ANN001, ANN202
            return iter(routes)

    out: dict[str, set[str]] = {}
    for route in iter_route_contexts(create_app(settings).routes):
        methods = getattr(route, "methods", None)
        if methods:
            out.setdefault(route.path, set()).update(methods)
    for methods in out.values():
        if "GET" in methods:
            methods.add("HEAD")
    return out


def test_405_lists_every_method_the_path_takes(http, settings):
    """RFC 9110 15.5.6: a 405's Allow names every method of the path, on every path of the app."""
    by_path = _methods_by_path(settings)
    assert {"GET", "HEAD", "POST"} <= by_path["/v1/datasets"] and {"GET", "DELETE"} <= by_path["/v1/jobs/{name}"]
    tried, wrong = 0, []
    for template, allowed in sorted(by_path.items()):
        path = re.sub(r"\{[^}]+\}", "x1", template)
        for method in sorted({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"} - allowed):
            resp = http.request(method, path)
            assert resp.status_code == 405, (method, path, resp.status_code, resp.text[:200])
            if method != "HEAD":
                check_problem(resp, 405, "method-not-allowed")
            listed = {m.strip() for m in resp.headers.get("allow", "").split(",") if m.strip()}
            if listed != allowed:
                wrong.append(f"{method} {template}: Allow {sorted(listed)}, takes {sorted(allowed)}")
            tried += 1
    assert not wrong, "\n".join(wrong)
    assert tried > 3 * len(by_path)

def test_batch_on_empty_dataset(http, rdb, bpe_tokenizer):
    name = uniq("empty")
    assert http.post("/v1/datasets", json={**create_body(bpe_tokenizer), "name": name}).status_code == 201
    before = snapshot(rdb)
    problem = check_problem(http.get(f"/v1/datasets/{name}/batch", params={"size": 4}), 409, "dataset-empty", name)
    assert problem["dataset"] == name
    # an ingest of no documents commits nothing, and the dataset stays empty
    r = post_docs(http, name, b"\n\n")
    assert r.status_code == 200 and r.json()["sequences"] == 0
    check_problem(http.get(f"/v1/datasets/{name}/batch", params={"size": 4}), 409, "dataset-empty")
    assert snapshot(rdb).keys() == before.keys()


# ---------------------------------------------------------------------------
# Redis unreachable, bearer token


@pytest.fixture(scope="module")
def no_redis() -> Iterator[str]:
    with ServerThread(Settings(redis_url="redis://127.0.0.1:1/0")) as s:
        yield s.url


def test_redis_unreachable_is_503(no_redis, bpe_tokenizer):
    with httpx.Client(base_url=no_redis, timeout=30) as h:
        for resp in (
            h.get("/readyz"),
            h.get("/v1/datasets"),
            h.get("/v1/datasets/x"),
            h.post("/v1/datasets", json=create_body(bpe_tokenizer)),
            h.post("/v1/datasets/x/documents", content=b'{"text": "hi"}\n', headers=NDJSON),
            h.get("/v1/datasets/x/batch", params={"size": 2}),
            h.delete("/v1/datasets/x"),
        ):
            check_problem(resp, 503, "store-unavailable", "Redis")
        assert h.get("/healthz").status_code == 200


@pytest.fixture(scope="module")
def guarded(settings: Settings) -> Iterator[str]:
    with ServerThread(settings.model_copy(update={"auth_token": SecretStr("s3cret")})) as s:
        yield s.url


def test_bearer_token(guarded, rdb, bpe_tokenizer):
    body = create_body(bpe_tokenizer)
    routes = [
        ("GET", "/v1/datasets", {}),
        ("GET", "/v1/datasets/x", {}),
        ("POST", "/v1/datasets", {"json": body}),
        ("POST", "/v1/datasets/x/documents", {"content": b'{"text": "hi"}\n', "headers": NDJSON}),
        ("GET", "/v1/datasets/x/batch", {}),
        ("POST", "/v1/jobs/x/next", {}),
        ("DELETE", "/v1/datasets/x", {}),
        ("GET", "/metrics", {}),
        ("GET", "/no/such/route", {}),  # unknown paths do not reveal themselves without the token
    ]
    with httpx.Client(base_url=guarded, timeout=30) as h:
        for auth in (None, "Bearer wrong", "Bearer s3cret2", "Basic s3cret", "s3cret"):
            for method, path, kw in routes:
                headers = {**kw.get("headers", {}), **({"Authorization": auth} if auth else {})}
                resp = h.request(method, path, **{**kw, "headers": headers})
                check_problem(resp, 401, "unauthorized", "Bearer")
                assert resp.headers["www-authenticate"].startswith("Bearer")
        assert rdb.keys("*") == []
        assert h.get("/healthz").status_code == 200
        assert h.get("/readyz").status_code == 200
        assert h.get("/openapi.json").status_code == 200  # the API document and its pages: tests/test_docs_ui.py
        ok = {"Authorization": "Bearer s3cret"}
        assert h.get("/openapi.json", headers=ok).status_code == 200
        assert h.get("/no/such/route", headers=ok).status_code == 404
        assert h.get("/v1/datasets", headers=ok).json() == {"datasets": []}
        assert h.post("/v1/datasets", json=body, headers=ok).status_code == 201
        assert h.get("/metrics", headers=ok).status_code == 200


def test_batch_routes_document_their_query_parameters(http):
    """The batch routes read their query strings themselves; the schema still lists every parameter."""
    from service.http.routes.batches import BatchQuery
    from service.http.routes.jobs import NextQuery

    paths = http.get("/openapi.json").json()["paths"]
    for path, method, model in (("/v1/datasets/{name}/batch", "get", BatchQuery), ("/v1/jobs/{name}/next", "post", NextQuery)):
        params = paths[path][method]["parameters"]
        assert {p["name"] for p in params if p["in"] == "query"} == set(model.model_fields), path
        assert [p["name"] for p in params if p["in"] == "path"] == ["name"], path
        size = next((p for p in params if p["name"] == "size"), None)
        assert size is None or (size["schema"]["minimum"] == 1 and size["description"])


# ---------------------------------------------------------------------------
# the client's typed errors


def test_client_not_found(client):
    with pytest.raises(ms.NotFoundError) as err:
        client.dataset("missing")
    assert err.value.status == 404 and err.value.type == BASE + "dataset-not-found" and "missing" in err.value.detail
    assert err.value.extra["dataset"] == "missing"
    with pytest.raises(ms.NotFoundError) as err:
        client.batch("missing", 4)  # the streamed (binary) path reads the problem too
    assert err.value.type == BASE + "dataset-not-found"
    with pytest.raises(ms.NotFoundError):
        client.delete_dataset("missing")
    client.delete_dataset("missing", missing_ok=True)
    with pytest.raises(ms.NotFoundError) as err:
        client.ingest("missing", ["text"])
    assert err.value.type == BASE + "dataset-not-found"


def test_client_bad_request(client, populated, settings):
    with pytest.raises(ms.BadRequestError) as err:
        client.ingest(populated, [{"text": "fine"}, {"title": "no text"}])
    assert err.value.status == 400 and err.value.type == BASE + "malformed-document"
    assert "line 2" in err.value.detail and err.value.extra["line"] == 2
    with pytest.raises(ms.BadRequestError) as err:
        client.ingest(populated, [[1, 2, 99999]])
    assert err.value.type == BASE + "token-out-of-vocabulary" and "99999" in err.value.detail
    with pytest.raises(ms.BadRequestError) as err:
        client.batch(populated, 0)
    assert err.value.status == 422 and err.value.type == BASE + "validation-failed"
    with pytest.raises(ms.BadRequestError) as err:
        client.batch(populated, settings.max_batch_size + 1)
    assert err.value.type == BASE + "limit-exceeded"
    with pytest.raises(ms.BadRequestError) as err:
        client.create_dataset(uniq("tok"), tokenizer={"not": "a tokenizer"}, seq_len=64)
    assert err.value.type == BASE + "invalid-tokenizer" and err.value.detail


def test_client_conflict(client, populated, bpe_tokenizer):
    with pytest.raises(ms.ConflictError) as err:
        client.create_dataset(populated, tokenizer=bpe_tokenizer, seq_len=64)
    assert err.value.status == 409 and err.value.type == BASE + "dataset-exists" and populated in err.value.detail
    empty = uniq("empty")
    client.create_dataset(empty, tokenizer=bpe_tokenizer, seq_len=64)
    with pytest.raises(ms.ConflictError) as err:
        client.batch(empty, 4)
    assert err.value.type == BASE + "dataset-empty" and empty in err.value.detail


def test_client_payload_too_large(client, rdb, populated, settings):
    before = snapshot(rdb)
    doc = list(range(5, 1500))
    n = settings.max_body_bytes // len(json.dumps({"ids": doc})) + 20
    with pytest.raises(ms.PayloadTooLargeError) as err:
        client.ingest(populated, [doc] * n)
    assert err.value.status == 413 and err.value.type == BASE + "payload-too-large"
    assert str(settings.max_body_bytes) in err.value.detail
    assert snapshot(rdb) == before


def _rewrite(header: str, value: str):
    def hook(request: httpx.Request) -> None:
        request.headers[header] = value

    return hook


def test_client_unsupported_media_type(service_url, populated):
    # the client always sends the right types; an httpx client handed to it rewrites them on the way out
    http = httpx.Client(base_url=service_url, event_hooks={"request": [_rewrite("Content-Type", "application/json")]})
    with Client(service_url, retries=0, http=http) as c, pytest.raises(ms.UnsupportedMediaTypeError) as err:
        c.ingest(populated, ["some text"])
    assert err.value.status == 415 and err.value.type == BASE + "unsupported-media-type" and err.value.detail
    http = httpx.Client(base_url=service_url, event_hooks={"request": [_rewrite("Accept", "text/html")]})
    with Client(service_url, retries=0, http=http) as c, pytest.raises(ms.UnsupportedMediaTypeError) as err:
        c.batch(populated, 4)
    assert err.value.status == 406 and err.value.type == BASE + "not-acceptable" and "text/html" in err.value.detail


def test_client_service_unavailable(no_redis):
    with Client(no_redis, retries=0) as c:
        with pytest.raises(ms.ServiceUnavailableError) as err:
            c.datasets()
        assert err.value.status == 503 and err.value.type == BASE + "store-unavailable" and "Redis" in err.value.detail
        assert c.health() is True
        assert c.ready() is False


def test_client_authentication(guarded):
    for token in (None, "wrong"):
        with Client(guarded, token=token, retries=0) as c, pytest.raises(ms.AuthenticationError) as err:
            c.datasets()
        assert err.value.status == 401 and err.value.type == BASE + "unauthorized" and err.value.detail
    with Client(guarded, token="s3cret", retries=0) as c:
        assert isinstance(c.datasets(), list)


def test_client_transport_error():
    with Client(f"http://127.0.0.1:{free_port()}", retries=0, timeout=5) as c:
        with pytest.raises(ms.TransportError):
            c.datasets()
        with pytest.raises(ms.TransportError):
            c.batch("any", 4)
        assert c.health() is False



def test_token_check_compares_raw_header_bytes():
    """The token is compared as bytes (a UTF-8 token works), the scheme case-insensitively."""
    from service.core.config import Settings as S
    from service.http.deps import check_token

    settings = S(auth_token=SecretStr("pässwörd"))
    assert check_token(settings, b"Bearer " + "pässwörd".encode()) is None
    assert check_token(settings, b"bearer  " + "pässwörd".encode() + b" ") is None
    for header in (b"", b"Bearer", b"Bearer p\xe4ssw\xf6rd", b"Basic " + "pässwörd".encode(), "pässwörd".encode()):
        refusal = check_token(settings, header)
        assert refusal is not None and refusal.status == 401, header
    assert check_token(S(), b"") is None  # no token configured: open


def test_an_empty_token_is_refused_at_start_up(monkeypatch):
    """MASKSERVE_AUTH_TOKEN="" would accept a bare 'Authorization: Bearer': the service refuses to start."""
    from pydantic import ValidationError

    from service.core.config import Settings as S

    for blank in ("", "   "):
        with pytest.raises(ValidationError, match="empty bearer token"):
            S(auth_token=SecretStr(blank))
        monkeypatch.setenv("MASKSERVE_AUTH_TOKEN", blank)
        with pytest.raises(ValidationError, match="empty bearer token"):
            S()
    monkeypatch.delenv("MASKSERVE_AUTH_TOKEN")
    assert S().auth_token is None


# ---- JSON bodies are bounded while they arrive, however they are framed ----------------------


def _chunked(total: int, piece: int = 16 << 10, fill: bytes = b" "):
    def gen():
        sent = 0
        while sent < total:
            n = min(piece, total - sent)
            sent += n
            yield fill * n
    return gen()


def test_chunked_json_bodies_are_bounded_per_route(settings, rdb, bpe_tokenizer):
    """A chunked body has no Content-Length: it is counted as it arrives and refused once past its route's
    limit (tokenizer uploads to POST /v1/datasets get the larger one), with a 413 problem, storing nothing."""
    small = settings.model_copy(update={"max_json_bytes": 4096, "max_tokenizer_bytes": 256 << 10})
    with ServerThread(small) as server, httpx.Client(base_url=server.url, timeout=60) as http:
        r = http.post("/v1/jobs/anything/ack", content=_chunked(8 << 20), headers={"Content-Type": "application/json"})
        check_problem(r, 413, "payload-too-large", "4096")
        r = http.post("/v1/jobs", content=_chunked(8 << 20), headers={"Content-Type": "application/json"})
        check_problem(r, 413, "payload-too-large", "4096")
        r = http.post("/v1/datasets", content=_chunked(8 << 20), headers={"Content-Type": "application/json"})
        check_problem(r, 413, "payload-too-large", str(256 << 10))
        # a real tokenizer.json above the JSON limit but below the tokenizer limit still goes through, chunked
        body = json.dumps({"name": "chunky", "seq_len": 64, "tokenizer": json.loads(bpe_tokenizer)}).encode()
        assert 4096 < len(body) < 256 << 10
        r = http.post("/v1/datasets", content=iter([body[i : i + 1000] for i in range(0, len(body), 1000)]),
                      headers={"Content-Type": "application/json"})  # fmt: skip
        assert r.status_code == 201, r.text
        assert [k for k in rdb.keys("*") if b"chunky" not in k and b"datasets" not in k] == []


def test_a_panicking_tokenizer_is_a_problem_not_a_crash(client, rdb, service_url):
    """A normalizer whose regex hits the regex engine's retry limit makes the tokenizers library panic (a
    BaseException): the ingest answers a 422 problem, stores nothing, and the service keeps serving."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers

    vocab = {"[UNK]": 0, "a": 1, "x": 2, "[CLS]": 3, "[SEP]": 4, "[PAD]": 5, "[MASK]": 6}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Replace(Regex("(a+)+$"), "x")  # catastrophic backtracking
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    client.create_dataset("panics", tokenizer=tok.to_str(), seq_len=16, packing="doc")
    with httpx.Client(base_url=service_url, timeout=60) as http:
        r = http.post("/v1/datasets/panics/documents", content=json.dumps({"text": "a" * 40 + "b"}) + "\n",
                      headers=NDJSON)  # fmt: skip
        check_problem(r, 422, "tokenizer-failed", "tokenizer")
        assert http.get("/healthz").status_code == 200
    assert client.dataset("panics")["num_sequences"] == 0
    client.ingest("panics", ["a a x"])  # input it can handle still goes in
    assert client.dataset("panics")["num_sequences"] == 1


def test_a_tokenizer_with_sparse_ids_is_refused(service_url, rdb):
    """Ids index per-token tables: a 6-token vocabulary using id 70000 is refused at creation (not accepted,
    then failing every ingest with memory scaling with the largest id)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, "[CLS]": 1, "[SEP]": 2, "[PAD]": 3, "[MASK]": 4, "hello": 70000}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    with httpx.Client(base_url=service_url, timeout=60) as http:
        r = http.post("/v1/datasets", json={"name": "sparse", "seq_len": 16, "tokenizer": json.loads(tok.to_str())})
        check_problem(r, 400, "invalid-tokenizer", "dense", "70000")
    assert rdb.keys("*") == []


def test_pretokenized_ids_may_not_hold_special_tokens(http, rdb, populated, bpe_tokenizer):
    """The service places cls/sep itself and takes pad and mask for padding and masks: such ids inside a
    pre-tokenized document are refused (400, nothing stored); unk stays an ordinary token."""
    specials = http.get(f"/v1/datasets/{populated}").json()["special_tokens"]
    before = snapshot(rdb)
    for role in ("cls", "sep", "pad", "mask"):
        body = ndjson([{"ids": [5, 6, 7]}, {"ids": [5, specials[role], 7]}])
        problem = check_problem(post_docs(http, populated, body), 400, "malformed-document", "special token", "line 2")
        assert problem["id"] == specials[role]
    assert snapshot(rdb) == before
    if specials.get("unk") is not None:
        assert post_docs(http, populated, ndjson([{"ids": [5, specials["unk"], 7]}])).status_code == 200


def test_masking_report_work_is_bounded(rdb, populated, settings):
    """sequences x epochs x L above MASKSERVE_MAX_REPORT_TOKENS is refused before any masking."""
    limit = 100_000
    with ServerThread(settings.model_copy(update={"max_report_tokens": limit})) as server, \
            httpx.Client(base_url=server.url, timeout=60) as http:  # fmt: skip
        n = http.get(f"/v1/datasets/{populated}").json()["num_sequences"]
        epochs = limit // (n * 64) + 1
        r = http.post(f"/v1/datasets/{populated}/masking-report", json={"sequences": n, "epochs": epochs})
        problem = check_problem(r, 422, "limit-exceeded", str(limit))
        assert problem["limit"] == limit
        ok = http.post(f"/v1/datasets/{populated}/masking-report", json={"sequences": n, "epochs": epochs - 1})
        assert ok.status_code == 200 and ok.json()["epochs"] == epochs - 1
