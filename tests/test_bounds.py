"""Every integer the service takes has a bound it can hold, declared in its OpenAPI document.

The integer fields are found in the document the live service serves, so a new parameter or body field
(nested ones included) is walked without touching this file: each is sent, alone, past any bound the
code could hold (2**63, 2**64, 10**40 and -10**40) inside an otherwise valid request, and must get a 4xx
problem+json that names it, with nothing stored; sent at its declared maximum, it must not be a 5xx.
"""

from __future__ import annotations

import copy
import itertools
import json
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from service.http.openapi import operations

from .test_errors import snapshot

BEYOND = (2**63, 2**64, 10**40, -(10**40))  # past what any field holds, but 2**63 and 2**64 for seeds
ARRAY = "[]"  # a field path's step into an array's items
MAP = "*"  # ... into an object's additional properties
PROBLEM = "application/problem+json"
_names = itertools.count()


def unique(prefix: str) -> Callable[[], str]:
    return lambda: f"{prefix}-{uuid.uuid4().hex[:6]}-{next(_names)}"


@pytest.fixture
def world(client, bpe_tokenizer, corpus) -> dict[str, Any]:
    """A dataset with documents and a job on it that never runs out of batches."""
    name = unique("bounds")()
    client.create_dataset(name, tokenizer=bpe_tokenizer, seq_len=32)
    client.ingest(name, corpus[:20])
    job = unique("bounds-job")()
    client.create_job(job, name, batch_size=8, epochs=None)
    return {"dataset": name, "job": job, "tokenizer": json.loads(bpe_tokenizer)}


def resolve(doc: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in schema:
        schema = doc["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]]
    return schema


def integer_fields(
    doc: dict[str, Any], schema: Any, path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], dict]]:
    """(field path, integer schema) of every integer a value of ``schema`` may hold, however nested."""
    if not isinstance(schema, dict):
        return
    schema = resolve(doc, schema)
    kinds = schema.get("type")
    if kinds == "integer" or (isinstance(kinds, list) and "integer" in kinds):
        yield path, schema
    for key in ("anyOf", "oneOf", "allOf"):
        for option in schema.get(key, []):
            yield from integer_fields(doc, option, path)
    for name, sub in schema.get("properties", {}).items():
        yield from integer_fields(doc, sub, (*path, name))
    if isinstance(schema.get("items"), dict):
        yield from integer_fields(doc, schema["items"], (*path, ARRAY))
    if isinstance(schema.get("additionalProperties"), dict):
        yield from integer_fields(doc, schema["additionalProperties"], (*path, MAP))


def minimal(doc: dict[str, Any], schema: dict[str, Any], given: dict[str, Any], name: str = "") -> Any:
    """A small valid value of ``schema``: only required members, each from ``given`` (by member name,
    a value or a callable) where it names them."""
    if name in given:
        value = given[name]
        return value() if callable(value) else copy.deepcopy(value)
    schema = resolve(doc, schema)
    for key in ("anyOf", "oneOf"):
        if key in schema:
            return minimal(doc, next(o for o in schema[key] if o.get("type") != "null"), given, name)
    if "enum" in schema:
        return schema["enum"][0]
    if "default" in schema:
        return schema["default"]
    kind = schema.get("type")
    if kind == "object" or "properties" in schema:
        return {k: minimal(doc, schema["properties"][k], given, k) for k in schema.get("required", [])}
    if kind == "array":
        return [minimal(doc, schema["items"], given) for _ in range(schema.get("minItems", 0))]
    if kind == "integer":
        return int(schema.get("minimum", 0))
    if kind == "number":
        return schema.get("minimum", 0)
    if kind == "boolean":
        return False
    return "a"


def put(value: Any, path: tuple[str, ...], leaf: Any) -> Any:
    """``value`` with the member at ``path`` set to ``leaf`` (containers on the way made as needed)."""
    if not path:
        return leaf
    step, rest = path[0], path[1:]
    if step == ARRAY:
        return [put(None, rest, leaf)]
    if step == MAP:
        return {"k": put(None, rest, leaf)}
    out = dict(value or {})
    out[step] = put(out.get(step), rest, leaf)
    return out


class Operation:
    """One operation of the document, as a valid request to the world's resources."""

    def __init__(self, doc: dict[str, Any], key: str, op: dict[str, Any], world: dict[str, Any]) -> None:
        self.doc, self.key, self.op = doc, key, op
        self.method, self.template = key.split(" ", 1)
        resource = world["job"] if self.template.startswith("/v1/jobs/") else world["dataset"]
        # what members of these names hold in a valid request (the rest: the schema's minimal values)
        self.given: dict[str, Any] = {
            "name": unique("bounds-new"), "dataset": world["dataset"], "tokenizer": world["tokenizer"], "ids": [0],
            "sequences": 1, "worker": "w1", "cache": "0" * 16,
        }  # fmt: skip
        self.path_values = {"name": resource, "worker": "w1", "cache": "0" * 16}
        body = op.get("requestBody", {}).get("content", {})
        self.body_schema = body.get("application/json", {}).get("schema")
        self.text_body = self.body_schema is None and ("text/plain" in body)

    def fields(self) -> Iterator[tuple[str, tuple[str, ...], dict]]:
        """(where, field path, schema) of each integer: in a parameter, or in the JSON body."""
        for p in self.op.get("parameters", []):
            for path, schema in integer_fields(self.doc, p["schema"]):
                yield p["in"], (p["name"], *path), schema
        if self.body_schema is not None:
            for path, schema in integer_fields(self.doc, self.body_schema):
                yield "body", path, schema

    def send(
        self, h: httpx.Client, where: str | None = None, field: tuple[str, ...] = (), value: Any = None
    ) -> httpx.Response:
        """The valid request, with ``field`` (a parameter's or the body's) set to ``value`` when given."""
        params, headers, path_values = {}, {}, dict(self.path_values)
        for p in self.op.get("parameters", []):
            if where == p["in"] and field[0] == p["name"]:
                leaf = put(None, field[1:], value)
                target = {"path": path_values, "query": params, "header": headers}[p["in"]]
                target[p["name"]] = leaf if not isinstance(leaf, (list, dict)) else leaf
            elif p.get("required") and p["in"] == "query":
                params[p["name"]] = minimal(self.doc, p["schema"], self.given, p["name"])
        url = self.template.format(**path_values)
        kw: dict[str, Any] = {"params": params, "headers": {k: str(v) for k, v in headers.items()}}
        if self.body_schema is not None:
            body = minimal(self.doc, self.body_schema, self.given)
            if self.key == "POST /v1/jobs":  # a job names a dataset or sources: one of two, which no member says
                body["dataset"] = self.given["dataset"]
            kw["json"] = put(body, field, value) if where == "body" else body
        elif self.text_body:
            kw["content"] = b"a few words of text to train on\n\nand a second paragraph of them\n"
            kw["headers"]["content-type"] = "text/plain"
        return h.request(self.method, url, **kw)


def expected_loc(where: str, field: tuple[str, ...]) -> list[Any]:
    return [where, *(0 if step == ARRAY else "k" if step == MAP else step for step in field)]


def names_field(problem: dict[str, Any], where: str, field: tuple[str, ...]) -> bool:
    """A validation problem whose errors include one at ``field`` (or inside it)."""
    loc = expected_loc(where, field)
    return any(e["loc"][: len(loc)] == loc for e in problem.get("errors", []))


@pytest.fixture
def walk(service_url, world) -> Iterator[tuple[httpx.Client, list[tuple[Operation, str, tuple[str, ...], dict]]]]:
    with httpx.Client(base_url=service_url, timeout=120) as h:
        doc = h.get("/openapi.json").json()
        fields = []
        for key, op in operations(doc):
            operation = Operation(doc, key, op, world)
            fields.extend((operation, where, path, schema) for where, path, schema in operation.fields())
        yield h, fields


def test_the_walk_finds_the_integers_of_every_route(walk):
    """The walk sees what it should (so that it cannot pass by finding nothing)."""
    _, fields = walk
    found = {(op.key, where, ".".join(path)) for op, where, path, _ in fields}
    for known in [
        ("GET /v1/datasets/{name}/batch", "query", "epoch"), ("GET /v1/datasets/{name}/batch", "query", "seed"),
        ("POST /v1/datasets/{name}/sequences", "body", "ids.[]"), ("POST /v1/jobs", "body", "masking.copies"),
        ("POST /v1/jobs/{name}/next", "query", "seq"), ("POST /v1/datasets", "body", "seq_len"),
        ("POST /v1/tokenizers/train", "query", "min_frequency"),
        ("POST /v1/datasets/{name}/static-masks", "body", "max_chunks"),
    ]:  # fmt: skip
        assert known in found, known
    assert len(found) > 40


def test_every_integer_declares_bounds_a_64_bit_integer_holds(walk):
    _, fields = walk
    wrong = []
    for op, where, path, schema in fields:
        label = f"{op.key} {where} {'.'.join(path)}"
        bounds = schema.get("minimum"), schema.get("maximum")
        if not all(isinstance(b, int) for b in bounds) or not -(2**63) <= bounds[0] <= bounds[1] <= 2**64 - 1:
            wrong.append(f"{label} declares no integer bounds within 64 bits: {schema}")
    assert not wrong, "\n".join(wrong)


def test_every_valid_request_of_the_walk_is_served(walk):
    """The requests the walk varies are valid as they stand: a refusal below comes from the varied field."""
    h, fields = walk
    for op in {op.key: op for op, *_ in fields}.values():
        r = op.send(h)
        assert r.status_code < 300, f"{op.key}: {r.status_code} {r.text[:300]}"


def declared(schema: dict[str, Any], value: int) -> bool:
    """``value`` is within the bounds ``schema`` declares (an undeclared bound holds nothing)."""
    return "minimum" in schema and "maximum" in schema and schema["minimum"] <= value <= schema["maximum"]


def test_large_integers_are_problems_past_their_declared_bounds(walk, rdb):
    """2**63 and 2**64 are within a seed's bounds (uint64): there they must be served; past a field's
    declared bounds every value is a 4xx problem naming the field, and nothing is stored."""
    h, fields = walk
    wrong, refused = [], 0
    for op, where, path, schema in fields:
        for value in BEYOND:
            label = f"{op.key} {where} {'.'.join(path)}={value}"
            before = snapshot(rdb)
            try:
                r = op.send(h, where, path, value)
            except httpx.TransportError as exc:  # e.g. the connection a failed request left behind
                wrong.append(f"{label}: {exc!r}")
                continue
            if r.status_code >= 500:
                wrong.append(f"{label}: {r.status_code} {r.text[:200]}")
            if declared(schema, value) or r.status_code >= 500:
                continue
            refused += 1
            problem = r.json() if r.headers["content-type"].split(";")[0] == PROBLEM else {}
            if not 400 <= r.status_code < 500 or problem.get("status") != r.status_code:
                wrong.append(f"{label}: {r.status_code} {r.text[:200]}")
            elif problem["type"].endswith(":validation-failed") and not names_field(problem, where, path):
                wrong.append(f"{label}: the problem names another field: {problem}")
            if snapshot(rdb) != before:
                wrong.append(f"{label}: a refused request changed the store")
    assert not wrong, "\n".join(wrong)
    assert refused > 3 * len(fields)


def test_integers_at_their_declared_bounds_are_no_server_error(walk):
    """The declared bounds are what the code holds: a request at either is served or refused, never a 5xx."""
    h, fields = walk
    wrong = []
    for op, where, path, schema in fields:
        for value in (schema.get("maximum"), schema.get("minimum")):
            if value is None:
                continue  # reported by the declaration test
            r = op.send(h, where, path, value)
            label = f"{op.key} {where} {'.'.join(path)}={value}"
            if r.status_code >= 500 or (r.status_code >= 400 and not r.headers["content-type"].startswith(PROBLEM)):
                wrong.append(f"{label}: {r.status_code} {r.text[:200]}")
    assert not wrong, "\n".join(wrong)
