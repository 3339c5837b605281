"""Dependency aliases used as type hints in routes.

All are ``async def``: FastAPI runs plain ``def`` dependencies on its thread pool,
a hop per dependency per request on the batch hot path.
"""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import Depends, Request

from .catalog import Catalog
from .config import Settings
from .errors import Unauthorized
from .metrics import Metrics
from .store import Store


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_store(request: Request) -> Store:
    return request.app.state.store


async def get_catalog(request: Request) -> Catalog:
    return request.app.state.catalog


async def get_metrics(request: Request) -> Metrics:
    return request.app.state.metrics


SettingsDep = Annotated[Settings, Depends(get_settings)]
StoreDep = Annotated[Store, Depends(get_store)]
CatalogDep = Annotated[Catalog, Depends(get_catalog)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]


async def require_token(request: Request, settings: SettingsDep) -> None:
    """Bearer-token guard; a no-op when no token is configured."""
    if settings.auth_token is None:
        return
    expected = settings.auth_token.get_secret_value()
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not secrets.compare_digest(given.strip(), expected):
        raise Unauthorized("send 'Authorization: Bearer <token>' with the service's configured token")
