"""The dashboard at /ui: datasets, jobs and their workers (live), and a batch inspector.

Three static files inside the package (``service/http/ui``: plain HTML, CSS and JavaScript, nothing
fetched from elsewhere), so it works offline. The files are open without the bearer token, as the API
document's pages are (they hold no data); the page asks for the token and sends it with every call it
makes, which are calls of the public API, the same any client makes.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

from ...core.errors import NotFound

router = APIRouter(include_in_schema=False)

PAGE = "/ui"
FILES = PAGE + "/"
_FOLDER = Path(__file__).resolve().parent.parent / "ui"
_TYPES = {"app.js": "text/javascript", "style.css": "text/css"}
_HEADERS = {"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"}


@router.get(PAGE)
async def page() -> FileResponse:
    return FileResponse(_FOLDER / "index.html", media_type="text/html", headers=_HEADERS)


@router.get(FILES + "{file}")
async def asset(file: str) -> FileResponse:
    if file not in _TYPES:
        raise NotFound(f"no dashboard file {file!r}")
    return FileResponse(_FOLDER / file, media_type=_TYPES[file], headers=_HEADERS)
