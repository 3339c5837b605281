"""A property-based fuzz of the live service against the OpenAPI document it serves (schemathesis over real
HTTP, a real Redis): no 5xx, and no answer whose status, media type, headers or body the document does not
declare; the same with Redis unreachable."""

from __future__ import annotations

import json
import uuid
from typing import Any

import httpx
import hypothesis
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from service.core.errors import TYPE_BASE

from .conftest import ServerThread
from .test_openapi import AUTH, NDJSON, conforms, doc, guarded, guarded_settings  # noqa: F401 - fixtures

# Examples per operation, per fixed target and generation mode: the whole fuzz stays under a minute on a
# loaded two-core machine. Generation is derandomized, so a run is repeatable; raise these to explore more.
POSITIVE, NEGATIVE = 8, 5
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
          response_headers_conformance]  # fmt: skip
# Repeatable, bounded runs: no example database, no shrinking (a failure names its request; reproduce it with
# curl), no deadline (the machine may be loaded).
HYPOTHESIS: dict[str, Any] = {
    "deadline": None, "derandomize": True, "database": None, "phases": [Phase.explicit, Phase.generate],
    "suppress_health_check": list(HealthCheck),
}  # fmt: skip
# uvicorn (httptools) refuses a request line over 64 KiB itself, with a plain-text 400, before any route runs
REQUEST_LINE_LIMIT = 65_000


def seed(url: str, tokenizer: str, corpus: list[str]) -> dict[str, str]:
    """A dataset with a few documents, an empty one, a job whose epochs wait for acks (so /next answers both
    200 and 204) and a cancelled one (410); their names, by role."""
    tag = uuid.uuid4().hex[:8]
    names = {"dataset": f"ds-{tag}", "empty": f"empty-{tag}", "job": f"job-{tag}", "cancelled": f"cancelled-{tag}"}
    with httpx.Client(base_url=url, headers=AUTH, timeout=60) as h:
        for name in (names["dataset"], names["empty"]):
            resp = h.post("/v1/datasets", json={"name": name, "seq_len": 32, "tokenizer": json.loads(tokenizer)})
            assert resp.status_code == 201, resp.text
        docs = b"".join(json.dumps({"text": t}).encode() + b"\n" for t in corpus[:3])
        assert h.post(f"/v1/datasets/{names['dataset']}/documents", content=docs, headers=NDJSON).status_code == 200
        for job in (names["job"], names["cancelled"]):
            body = {"name": job, "dataset": names["dataset"], "batch_size": 16, "epochs": 2, "epoch_boundary": "ack"}
            assert h.post("/v1/jobs", json=body).status_code == 201
        assert h.post(f"/v1/jobs/{names['cancelled']}/cancel").status_code == 200
    return names


def plan(schema: Any, names: dict[str, str]) -> list[tuple[Any, str | None]]:
    """(operation, fixed {name}) pairs to fuzz: each operation on random names, and those with a {name} also on
    the seeded resources; the ones that change those for good last (cancel, deletes, the resource's own
    delete at the very end)."""
    steps = []
    for result in schema.get_all_operations():
        op = result.ok()
        targets: list[str | None] = [None]
        if op.path.startswith("/v1/jobs/{name}"):
            targets.append(names["job"])
            if op.path.endswith("/next"):
                targets.append(names["cancelled"])
        elif op.path.startswith("/v1/datasets/{name}"):
            targets.append(names["dataset"])
            if not op.path.endswith("/documents"):  # keep the empty dataset empty
                targets.append(names["empty"])
        for target in targets:
            rank = 0
            if target is not None and (op.method.upper() == "DELETE" or op.path.endswith("/cancel")):
                rank = 2 if op.path in ("/v1/jobs/{name}", "/v1/datasets/{name}") else 1
            steps.append((rank, op, target))
    steps.sort(key=lambda step: step[0])
    return [(op, target) for _, op, target in steps]


def fuzz(
    url: str, op: Any, target: str | None, mode: Any, examples: int, checks: list, statuses: dict[str, set[int]],
    fill: dict[str, dict[str, Any]] | None = None,
) -> list[str]:  # fmt: skip
    """Fuzz one operation; the failures found, described. ``fill``: members put into the generated JSON
    bodies of an operation ("METHOD /path"), valid ones, so that requests get past the first check."""
    key = f"{op.method.upper()} {op.path}"
    strategy = op.as_strategy(mode, path_parameters={"name": target} if target else None)
    members = (fill or {}).get(key)
    if members and mode == schemathesis.GenerationMode.POSITIVE:
        strategy = strategy.map(lambda case: _filled(case, members))

    @hypothesis.settings(max_examples=examples, **HYPOTHESIS)
    @given(case=strategy)
    def run(case: Any) -> None:
        resp = case.call(base_url=url, headers=AUTH, timeout=60)
        if resp.status_code == 400 and len(resp.request.url) - len(url) > REQUEST_LINE_LIMIT:
            assert resp.text == "Invalid HTTP request received."
            return
        statuses.setdefault(key, set()).add(resp.status_code)
        case.validate_response(resp, checks=checks, headers=AUTH)

    try:
        run()
    except hypothesis.errors.Unsatisfiable:  # nothing about the operation can be made invalid (no inputs)
        assert mode == schemathesis.GenerationMode.NEGATIVE, key
    except (Exception, BaseExceptionGroup) as exc:  # noqa: BLE001 - every failure is reported at the end
        return [f"{key} on {target or 'generated names'} ({mode.value}):\n{str(exc)[:3000]}"]
    return []


def _filled(case: Any, members: dict[str, Any]) -> Any:
    if isinstance(case.body, dict):
        case.body.update(members)
    return case


@pytest.mark.slow
def test_fuzz_the_live_service_against_its_document(guarded, rdb, bpe_tokenizer, corpus):
    names = seed(guarded.url, bpe_tokenizer, corpus)
    with httpx.Client(base_url=guarded.url, headers=AUTH, timeout=60) as h:
        schema = schemathesis.openapi.from_dict(h.get("/openapi.json").json())
    fill = {"POST /v1/jobs": {"dataset": names["dataset"]},
            "POST /v1/datasets": {"tokenizer": json.loads(bpe_tokenizer)}}  # fmt: skip
    failures: list[str] = []
    statuses: dict[str, set[int]] = {}
    for op, target in plan(schema, names):
        for mode, examples in ((schemathesis.GenerationMode.POSITIVE, POSITIVE),
                               (schemathesis.GenerationMode.NEGATIVE, NEGATIVE)):  # fmt: skip
            failures += fuzz(guarded.url, op, target, mode, examples, CHECKS, statuses, fill)
    assert not failures, "\n\n".join(failures)
    # it got past the 404s: batches served and leased, a job created and one finished, the empty dataset refused
    assert 200 in statuses["GET /v1/datasets/{name}/batch"], statuses
    assert 409 in statuses["GET /v1/datasets/{name}/batch"], statuses
    assert {200, 204, 410} <= statuses["POST /v1/jobs/{name}/next"], statuses
    assert 201 in statuses["POST /v1/jobs"], statuses
    assert 201 in statuses["POST /v1/datasets"], statuses
    assert 200 in statuses["POST /v1/datasets/{name}/documents"], statuses


def no_internal_error(ctx: Any, response: Any, case: Any) -> None:
    assert response.status_code != 500, f"500: {response.text[:300]}"


@pytest.mark.slow
def test_fuzz_with_redis_unreachable(guarded_settings):
    """Every answer with the store down is declared: each operation that reaches Redis lists 503
    store-unavailable, and nothing fails unexpectedly."""
    settings = guarded_settings.model_copy(update={"redis_url": "redis://127.0.0.1:1/0"})
    statuses: dict[str, set[int]] = {}
    failures: list[str] = []
    checks = [no_internal_error, *CHECKS[1:]]
    with ServerThread(settings) as s:
        with httpx.Client(base_url=s.url, headers=AUTH, timeout=60) as h:
            schema = schemathesis.openapi.from_dict(h.get("/openapi.json").json())
        for result in schema.get_all_operations():
            failures += fuzz(s.url, result.ok(), None, schemathesis.GenerationMode.POSITIVE, 4, checks, statuses)
    assert not failures, "\n\n".join(failures)
    for key in ("GET /readyz", "GET /v1/datasets", "GET /v1/datasets/{name}", "POST /v1/jobs/{name}/next"):
        assert statuses[key] == {503}, (key, statuses)


def test_a_huge_min_frequency_is_a_validation_problem_not_a_crash(guarded, doc):
    """The tokenizer trainers take min_frequency as an unsigned 64-bit count; a larger one failed inside them."""
    with httpx.Client(base_url=guarded.url, headers=AUTH, timeout=60) as h:
        resp = h.post("/v1/tokenizers/train", params={"min_frequency": 10**23}, content=b"a b c\n",
                      headers={"Content-Type": "text/plain"})  # fmt: skip
    assert resp.status_code == 422 and resp.json()["type"] == TYPE_BASE + "validation-failed", resp.text
    conforms(doc, "POST /v1/tokenizers/train", resp)
