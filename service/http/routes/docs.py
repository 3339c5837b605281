"""The API document's pages: Swagger UI at /docs and ReDoc at /redoc, whole from this service.

Their scripts, stylesheet and icon come from the installed ``fastapi-offline`` package (it ships
Swagger UI's and ReDoc's distribution files) and are served under /docs/assets/, so the pages work
on a machine with no way out. The pages, their assets and /openapi.json are open without the bearer
token (they describe the API and hold no data); Swagger UI's Authorize button takes the token for
the operations the document marks with the ``bearer`` scheme.
"""

from __future__ import annotations

import importlib.util
from functools import lru_cache
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse

from ...core.errors import NotFound

router = APIRouter(include_in_schema=False)

ASSETS = "/docs/assets/"
# The files the pages load, with their media types: nothing else of the package is served.
_FILES = {
    "swagger-ui-bundle.js": "text/javascript",
    "swagger-ui.css": "text/css",
    "redoc.standalone.js": "text/javascript",
    "favicon.png": "image/png",
}
# Added to FastAPI's defaults: no online validator (Swagger UI would fetch a badge from another host)
_SWAGGER_PARAMETERS = {"deepLinking": True, "validatorUrl": None, "displayRequestDuration": True}


@lru_cache(maxsize=1)
def _assets() -> dict[str, Path]:
    """The files of ``_FILES`` the installed package has, found once (without importing it)."""
    spec = importlib.util.find_spec("fastapi_offline")
    if spec is None or not spec.submodule_search_locations:
        return {}
    folder = Path(next(iter(spec.submodule_search_locations))) / "static"
    return {name: folder / name for name in _FILES if (folder / name).is_file()}


def _base(request: Request) -> str:
    return request.scope.get("root_path", "").rstrip("/")


@router.get("/docs")
async def swagger_ui(request: Request) -> HTMLResponse:
    base = _base(request)
    return get_swagger_ui_html(
        openapi_url=f"{base}{request.app.openapi_url}", title=f"{request.app.title} - Swagger UI",
        swagger_js_url=f"{base}{ASSETS}swagger-ui-bundle.js", swagger_css_url=f"{base}{ASSETS}swagger-ui.css",
        swagger_favicon_url=f"{base}{ASSETS}favicon.png", oauth2_redirect_url=None,
        swagger_ui_parameters=_SWAGGER_PARAMETERS,
    )  # fmt: skip


@router.get("/redoc")
async def redoc(request: Request) -> HTMLResponse:
    base = _base(request)
    return get_redoc_html(
        openapi_url=f"{base}{request.app.openapi_url}", title=f"{request.app.title} - ReDoc",
        redoc_js_url=f"{base}{ASSETS}redoc.standalone.js", redoc_favicon_url=f"{base}{ASSETS}favicon.png",
        with_google_fonts=False,
    )  # fmt: skip


@router.get(ASSETS + "{file}")
async def asset(file: str) -> FileResponse:
    path = _assets().get(file) if file in _FILES else None
    if path is None:
        raise NotFound(f"no documentation asset {file!r}")
    return FileResponse(path, media_type=_FILES[file], headers={"Cache-Control": "public, max-age=86400"})
