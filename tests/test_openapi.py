"""The OpenAPI document tells the truth: it is valid OpenAPI 3.1; every operation declares its errors as
problems, its security and its limits; the table of errors per operation agrees with the code; real error
answers conform (test_openapi_fuzz.py fuzzes the live service against it)."""

from __future__ import annotations

import ast
import inspect
import json
import sys
import textwrap
import typing
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import jsonschema
import pytest
from fastapi.exceptions import RequestValidationError
from openapi_spec_validator import OpenAPIV31SpecValidator
from pydantic import SecretStr

from wire import CONTENT_TYPE
from service.http.app import create_app
from service.core.config import Settings
from service.core.errors import PROBLEM_JSON, TYPE_BASE, ServiceError, ValidationFailed
from service.http.openapi import ERRORS, PUBLIC, operations
from service.core.work import is_heavy

from .conftest import ServerThread

TOKEN = "openapi-s3cret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
NDJSON = {"Content-Type": "application/x-ndjson"}


@pytest.fixture(scope="module")
def guarded_settings(settings: Settings) -> Settings:
    """The shared test settings with a token, and limits small enough that fuzzed requests stay cheap."""
    return settings.model_copy(update={
        "auth_token": SecretStr(TOKEN), "max_batch_size": 64, "max_report_tokens": 1 << 16,
        "max_json_bytes": 64 << 10, "max_body_bytes": 1 << 20, "max_train_bytes": 1 << 20, "max_acks": 100,
    })  # fmt: skip


@pytest.fixture(scope="module")
def doc(guarded_settings: Settings) -> dict[str, Any]:
    return create_app(guarded_settings).openapi()


@pytest.fixture(scope="module")
def guarded(guarded_settings: Settings) -> Iterator[ServerThread]:
    with ServerThread(guarded_settings) as s:
        yield s


def all_errors() -> Iterator[type[ServiceError]]:
    stack = [ServiceError]
    while stack:
        err = stack.pop()
        stack.extend(err.__subclasses__())
        yield err


def problem_types(response: dict[str, Any]) -> list[str]:
    """The problem types a declared error response allows."""
    return response["content"][PROBLEM_JSON]["schema"]["properties"]["type"]["enum"]


# ---------------------------------------------------------------------------
# the document


def test_the_document_is_valid_openapi_3_1(doc):
    assert doc["openapi"].startswith("3.1.")
    OpenAPIV31SpecValidator(doc).validate()
    assert "HTTPValidationError" not in json.dumps(doc)  # FastAPI's {"detail": ...} 422 is gone everywhere


def test_every_operation_declares_its_errors_as_problems(doc):
    for key, op in operations(doc):
        errors = {code: r for code, r in op["responses"].items() if code[0] in "45"}
        assert "500" in errors, key
        for code, response in errors.items():
            assert list(response["content"]) == [PROBLEM_JSON], (key, code)
            schema = response["content"][PROBLEM_JSON]["schema"]
            assert schema["allOf"] == [{"$ref": "#/components/schemas/Problem"}], (key, code)
            assert schema["properties"]["status"] == {"const": int(code)}, (key, code)
            for kind in problem_types(response):
                assert kind.startswith(TYPE_BASE) and kind[len(TYPE_BASE):] in response["description"], (key, code)
    problem = doc["components"]["schemas"]["Problem"]
    assert set(problem["required"]) == {"type", "title", "status", "detail"}


def test_security_is_required_everywhere_but_the_health_probes(doc):
    assert doc["components"]["securitySchemes"]["bearer"] | {"description": ""} == {
        "type": "http", "scheme": "bearer", "description": ""}  # fmt: skip
    for key, op in operations(doc):
        if key in ("GET /healthz", "GET /readyz"):
            assert op["security"] == [] and "401" not in op["responses"], key
        else:
            assert op["security"] == [{"bearer": []}], key
            assert problem_types(op["responses"]["401"]) == [TYPE_BASE + "unauthorized"], key


def test_without_a_token_the_scheme_is_accepted_not_required(settings):
    doc = create_app(settings).openapi()
    for key, op in operations(doc):
        assert "401" not in op["responses"], key
        if key not in PUBLIC:
            assert op["security"] == [{"bearer": []}, {}], key


def test_limits_come_from_the_settings(doc, guarded_settings):
    s = guarded_settings
    size = next(p for p in doc["paths"]["/v1/datasets/{name}/batch"]["get"]["parameters"] if p["name"] == "size")
    assert size["schema"]["maximum"] == s.max_batch_size
    job = doc["components"]["schemas"]["JobCreate"]["properties"]
    assert job["batch_size"]["maximum"] == s.max_batch_size
    # exact integers, not FastAPI's floats (1.8446744073709552e19 would admit 2**64)
    assert job["seed"]["maximum"] == 2**64 - 1 and type(job["seed"]["maximum"]) is int
    create = doc["paths"]["/v1/datasets"]["post"]["requestBody"]
    assert create["content"]["application/json"]["schema"]["properties"]["seq_len"]["maximum"] == s.max_seq_len
    assert str(s.max_tokenizer_bytes) in create["description"]
    ingest = doc["paths"]["/v1/datasets/{name}/documents"]["post"]["requestBody"]
    assert str(s.max_body_bytes) in ingest["description"]
    assert str(s.max_json_bytes) in doc["paths"]["/v1/jobs/{name}/ack"]["post"]["requestBody"]["description"]
    assert str(s.max_report_tokens) in doc["paths"]["/v1/datasets/{name}/masking-report"]["post"]["description"]
    lease = doc["paths"]["/v1/jobs/{name}/next"]["post"]["requestBody"]  # acks travel in the lease request's body
    assert lease["required"] is False and f"At most {s.max_acks} lease ids (MASKSERVE_MAX_ACKS)" in lease["description"]
    assert lease["content"]["application/json"]["schema"]["properties"]["acks"]["maxItems"] == s.max_acks
    assert doc["components"]["schemas"]["Leases"]["properties"]["leases"]["maxItems"] == s.max_acks
    for key, op in operations(doc):
        if "requestBody" in op:
            assert "413" in op["responses"], key


def test_batch_routes_declare_both_representations(doc):
    for path, method in (("/v1/datasets/{name}/batch", "get"), ("/v1/jobs/{name}/next", "post")):
        ok = doc["paths"][path][method]["responses"]["200"]
        assert set(ok["content"]) == {CONTENT_TYPE, "application/json"}
        assert ok["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/Batch"}
        assert {"Maskserve-Dataset", "Maskserve-Epoch", "Maskserve-Batch-Index"} <= set(ok["headers"])


def test_the_error_table_covers_every_operation_and_every_error(doc):
    assert set(ERRORS) == {key for key, _ in operations(doc)}
    declared = {t for _, op in operations(doc) for code, r in op["responses"].items() if code[0] in "45"
                for t in problem_types(r)}  # fmt: skip
    assert {TYPE_BASE + err.type for err in all_errors()} <= declared


# ---------------------------------------------------------------------------
# the table against the code: what each route can raise, by reading it and what it calls


_FRAMEWORK = {"store-unavailable", "validation-failed", "invalid-request", "payload-too-large"}


def test_the_error_table_matches_the_code(guarded_settings, doc):
    """Each operation declares exactly the problems its code raises (followed through the functions it calls
    or hands on, by name and by type hint), plus those the framework adds: validation-failed for constrained
    parameters and bodies, invalid-request and payload-too-large for JSON bodies, store-unavailable wherever
    Redis is reached (that one is checked live, by the fuzz with Redis down), request-timeout for every body,
    overloaded for the heavy operations (the admission limit) and wherever Redis is reached (its pool)."""
    app = create_app(guarded_settings)
    raising = RaiseFinder()
    mismatches = []
    for key, endpoint in endpoints(app).items():
        op = dict(operations(doc))[key]
        found = raising.reach(endpoint)
        declared = {err.type for err in ERRORS[key]}
        framework = set()
        if op.get("requestBody") or any(_constrained(p["schema"]) for p in op.get("parameters", [])):
            framework.add(ValidationFailed.type)
        if "application/json" in op.get("requestBody", {}).get("content", {}):
            framework |= {"invalid-request", "payload-too-large"}
        if op.get("requestBody"):
            framework.add("request-timeout")  # the gatekeeper's pacing of every body
        method, path = key.split(" ", 1)
        if is_heavy(method, path):
            framework.add("overloaded")  # the gatekeeper's admission limit
        for kind in sorted(set(found) - declared):
            mismatches.append(f"{key} raises {kind} (via {' -> '.join(found[kind])}), undeclared")
        for kind in sorted(declared - set(found) - framework - {"store-unavailable", "overloaded"}):
            mismatches.append(f"{key} declares {kind}, which nothing it runs raises")
    assert not mismatches, "\n".join(mismatches)


def endpoints(app) -> dict[str, Callable]:
    """"METHOD /path" -> the route's function, for every operation of the document (the API document's
    own pages are routes outside it)."""
    from fastapi import routing

    contexts = routing.iter_route_contexts(app.routes) if hasattr(routing, "iter_route_contexts") else None
    pairs = ((c.original_route, c.path_format) for c in contexts) if contexts else ((r, r.path) for r in app.routes)
    return {f"{m} {path}": r.endpoint for r, path in pairs
            if isinstance(r, routing.APIRoute) and r.include_in_schema for m in r.methods}  # fmt: skip


def _constrained(schema: dict[str, Any]) -> bool:
    """Whether a parameter's value can fail validation (more than any string)."""
    return schema.get("type") != "string" or bool(set(schema) - {"type", "title", "description"})


class RaiseFinder:
    """The problem types a function can raise, found by reading its source and, recursively, that of every
    service function it names: called or handed on (to a thread, as a callback). Names resolve through the
    function's globals, its parameters' type hints and annotated locals, ``self``, and otherwise a receiver
    named like a service class (``catalog.runtime`` -> ``Catalog.runtime``)."""

    def __init__(self) -> None:
        self.classes = {
            v.__name__.lower(): v
            for name, mod in list(sys.modules.items()) if name.startswith("service.") and mod is not None
            for v in vars(mod).values() if isinstance(v, type) and v.__module__.startswith("service.")
        }  # fmt: skip
        self.seen: dict[Callable, dict[str, tuple[str, ...]]] = {}

    def reach(self, f: Callable) -> dict[str, tuple[str, ...]]:
        """{problem type: the chain of functions that raises it}."""
        if not inspect.isfunction(f) or not f.__module__.startswith("service."):
            return {}
        f = inspect.unwrap(f)
        if f in self.seen:
            return self.seen[f]
        self.seen[f] = out = {}
        tree = ast.parse(textwrap.dedent(inspect.getsource(f)))
        hints = self._hints(f, tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.Raise) and node.exc is not None:
                exc = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
                kind = _problem_type(self._resolve(f, exc, hints))
                if kind:
                    out.setdefault(kind, (f.__qualname__,))
            elif isinstance(node, (ast.Name, ast.Attribute)) and isinstance(node.ctx, ast.Load):
                target = self._resolve(f, node, hints)
                if inspect.isfunction(target):
                    for kind, chain in self.reach(target).items():
                        out.setdefault(kind, (f.__qualname__, *chain))
        return out

    def _hints(self, f: Callable, tree: ast.AST) -> dict[str, type]:
        try:
            raw = typing.get_type_hints(f, include_extras=True)
        except (NameError, TypeError):
            raw = {}
        hints = {}
        for name, hint in raw.items():
            while typing.get_origin(hint) is typing.Annotated:
                hint = typing.get_args(hint)[0]
            if isinstance(hint, type):
                hints[name] = hint
        for node in ast.walk(tree):  # annotated locals: `jobs: Jobs = request.app.state.jobs`
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(
                node.annotation, ast.Name
            ):
                hint = f.__globals__.get(node.annotation.id)
                if isinstance(hint, type):
                    hints[node.target.id] = hint
        return hints

    def _resolve(self, f: Callable, node: ast.AST, hints: dict[str, type]) -> Any:
        if isinstance(node, ast.Name):
            return f.__globals__.get(node.id)
        if not isinstance(node, ast.Attribute):
            return None
        base = node.value
        if isinstance(base, ast.Name) and base.id in f.__globals__ and base.id not in hints:
            return getattr(f.__globals__[base.id], node.attr, None)
        receiver = base.id if isinstance(base, ast.Name) else base.attr if isinstance(base, ast.Attribute) else None
        if receiver == "self":
            owner = f.__globals__.get(f.__qualname__.split(".")[0])
            return getattr(owner, node.attr, None)
        cls = hints.get(receiver or "") or self.classes.get(receiver or "")
        return getattr(cls, node.attr, None) if cls is not None else None


def _problem_type(obj: Any) -> str | None:
    if obj is RequestValidationError:
        return ValidationFailed.type
    return obj.type if isinstance(obj, type) and issubclass(obj, ServiceError) else None


# ---------------------------------------------------------------------------
# real answers against the document


def conforms(doc: dict[str, Any], key: str, resp: httpx.Response) -> None:
    """The answer is one ``key``'s operation declares: status, media type and body."""
    op = dict(operations(doc))[key]
    declared = op["responses"].get(str(resp.status_code))
    assert declared is not None, f"{key} answered an undeclared {resp.status_code}: {resp.text[:300]}"
    media_type = resp.headers.get("content-type", "").split(";")[0]
    assert media_type in declared.get("content", {}), f"{key} {resp.status_code} answered {media_type}"
    schema = declared["content"][media_type].get("schema")
    if schema is not None:
        jsonschema.validate(resp.json(), {**schema, "components": doc["components"]})


def test_the_service_serves_the_completed_document(guarded, doc):
    with httpx.Client(base_url=guarded.url, timeout=30) as h:
        # the document is open (the /docs page loads it before anyone can authorize; it holds no data)
        assert h.get("/openapi.json").json() == json.loads(json.dumps(doc))
        assert h.get("/openapi.json", headers=AUTH).json() == json.loads(json.dumps(doc))


def test_real_errors_conform_to_the_document(guarded, doc, rdb, bpe_tokenizer, guarded_settings):
    name = f"ds-{uuid.uuid4().hex[:8]}"
    tokenizer = json.loads(bpe_tokenizer)
    with httpx.Client(base_url=guarded.url, headers=AUTH, timeout=60) as h:
        assert h.post("/v1/datasets", json={"name": name, "seq_len": 32, "tokenizer": tokenizer}).status_code == 201
        samples = [
            ("GET /v1/datasets/{name}", h.get("/v1/datasets/no-such"), 404, "dataset-not-found"),
            ("GET /v1/jobs/{name}", h.get("/v1/jobs/no-such"), 404, "job-not-found"),
            ("GET /v1/datasets/{name}/batch", h.get(f"/v1/datasets/{name}/batch", params={"size": 0}), 422,
             "validation-failed"),
            ("GET /v1/datasets/{name}/batch", h.get(f"/v1/datasets/{name}/batch", params={"size": 65}), 422,
             "limit-exceeded"),
            ("GET /v1/datasets/{name}/batch", h.get(f"/v1/datasets/{name}/batch"), 409, "dataset-empty"),
            ("GET /v1/datasets/{name}/batch", h.get(f"/v1/datasets/{name}/batch", headers={"Accept": "text/html"}),
             406, "not-acceptable"),
            ("POST /v1/jobs", h.post("/v1/jobs", content=b"[" * (guarded_settings.max_json_bytes + 1),
                                     headers={"Content-Type": "application/json"}), 413, "payload-too-large"),
            ("POST /v1/jobs/{name}/ack", h.post("/v1/jobs/x/ack", content=b"\xff", headers={
                "Content-Type": "application/json"}), 400, "invalid-request"),
            ("POST /v1/jobs/{name}/next", h.post("/v1/jobs/x/next", json={
                "acks": ["0:0:0:x:y"] * (guarded_settings.max_acks + 1)}), 422, "limit-exceeded"),
            ("POST /v1/jobs/{name}/next", h.post("/v1/jobs/x/next", content=b"{"), 400, "invalid-request"),
            ("POST /v1/datasets", h.post("/v1/datasets", json={"name": name, "seq_len": 32, "tokenizer": tokenizer}),
             409, "dataset-exists"),
            ("POST /v1/datasets/{name}/documents", h.post(f"/v1/datasets/{name}/documents", content=b"<p>",
                                                          headers={"Content-Type": "text/html"}), 415,
             "unsupported-media-type"),
            ("POST /v1/datasets/{name}/documents", h.post(f"/v1/datasets/{name}/documents", content=b"{\n",
                                                          headers=NDJSON), 400, "malformed-document"),
            ("GET /v1/datasets", h.get("/v1/datasets", headers={"Authorization": "Bearer wrong"}), 401,
             "unauthorized"),
        ]  # fmt: skip
        for key, resp, status, kind in samples:
            assert resp.status_code == status, (key, resp.text)
            assert resp.json()["type"] == TYPE_BASE + kind, (key, resp.text)
            conforms(doc, key, resp)
