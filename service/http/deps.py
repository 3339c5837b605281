"""Dependency aliases used as type hints in routes.

All are ``async def``: FastAPI runs plain ``def`` dependencies on its thread pool,
a hop per dependency per request on the batch hot path.
"""

from __future__ import annotations

import secrets
from collections.abc import Awaitable, Callable
from functools import lru_cache
from typing import Annotated, Any, TypeVar, get_origin

from fastapi import Depends, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError

from ..core.config import Settings
from ..core.errors import Unauthorized
from ..data.catalog import Catalog
from ..jobs.jobs import Jobs
from ..jobs.leasing import Leasing
from ..store.store import Store
from .metrics import Metrics


def _app_state(name: str) -> Callable[[Request], Awaitable[Any]]:
    """A dependency that answers the app's ``state.<name>`` (set up by the app's lifespan)."""

    async def dependency(request: Request) -> Any:
        return getattr(request.app.state, name)

    dependency.__name__ = dependency.__qualname__ = f"get_{name}"
    return dependency


SettingsDep = Annotated[Settings, Depends(_app_state("settings"))]
StoreDep = Annotated[Store, Depends(_app_state("store"))]
CatalogDep = Annotated[Catalog, Depends(_app_state("catalog"))]
MetricsDep = Annotated[Metrics, Depends(_app_state("metrics"))]
JobsDep = Annotated[Jobs, Depends(_app_state("jobs"))]
LeasingDep = Annotated[Leasing, Depends(_app_state("leasing"))]


def check_token(settings: Settings, authorization: bytes) -> Unauthorized | None:
    """The refusal for a request whose ``Authorization`` header (raw bytes) lacks the
    configured bearer token (None when it has it, or when no token is configured)."""
    if settings.auth_token is None:
        return None
    expected = settings.auth_token.get_secret_value().encode()
    scheme, _, given = authorization.partition(b" ")
    given = given.strip()
    if scheme.lower() != b"bearer" or not given or not secrets.compare_digest(given, expected):
        return Unauthorized("send 'Authorization: Bearer <token>' with the service's configured token")
    return None


M = TypeVar("M", bound=BaseModel)


def parse_query(model: type[M], request: Request) -> M:
    """The query string validated into ``model`` by one pydantic call (list fields
    take every repeated value); errors are the usual 422 problems, ``loc`` first
    ``query``. Pair the route with ``openapi_extra=query_docs(model)``.

    The batch routes are the hot path: FastAPI solves each dependency and each
    query field separately, about half a millisecond per request for those
    routes, so they read the query string and the app state themselves.
    """
    lists = _list_fields(model)
    params = request.query_params
    raw = {k: params.getlist(k) if k in lists else v for k, v in params.items()}
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        errors = [{**e, "loc": ("query", *e["loc"])} for e in exc.errors(include_url=False)]
        raise RequestValidationError(errors) from None


@lru_cache(maxsize=None)
def _list_fields(model: type[BaseModel]) -> frozenset[str]:
    return frozenset(name for name, f in model.model_fields.items() if get_origin(f.annotation) is list)


def query_docs(model: type[BaseModel]) -> dict[str, Any]:
    """OpenAPI ``parameters`` for a model read by ``parse_query``."""
    schema = model.model_json_schema()
    props = schema.get("properties", {})
    params = []
    for name, field in model.model_fields.items():
        prop = dict(props.get(name, {}))
        description = prop.pop("description", field.description)
        entry: dict[str, Any] = {"name": name, "in": "query", "required": field.is_required(), "schema": prop}
        if description:
            entry["description"] = description
        params.append(entry)
    return {"parameters": params}
