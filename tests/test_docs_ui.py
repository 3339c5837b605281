"""The API document's pages, /docs (Swagger UI) and /redoc: served whole from this service, with no other
host to reach, open without the bearer token (as /openapi.json, which they load), while the data routes
still need it."""

from __future__ import annotations

import re
from collections.abc import Iterator
from urllib.parse import urljoin, urlparse

import httpx
import pytest
from pydantic import SecretStr

from .conftest import ServerThread

TOKEN = "d0cs-t0ken"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
CONTENT_TYPES = {".js": "javascript", ".css": "text/css", ".png": "image/png", ".json": "application/json"}


@pytest.fixture(scope="module")
def guarded(settings) -> Iterator[str]:
    with ServerThread(settings.model_copy(update={"auth_token": SecretStr(TOKEN)})) as s:
        yield s.url


def references(html: str) -> list[str]:
    """Every URL a page names: src and href attributes, the spec's url in Swagger UI's setup, ReDoc's
    spec-url."""
    found = re.findall(r"""(?:src|href|spec-url)\s*=\s*["']([^"']+)["']""", html)
    found += re.findall(r"""\burl\s*:\s*["']([^"']+)["']""", html)
    return found


@pytest.mark.parametrize(
    "page, assets", [("/docs", {".js", ".css", ".png", ".json"}), ("/redoc", {".js", ".png", ".json"})]
)
def test_the_pages_open_without_the_token_and_load_only_this_services_files(guarded, page, assets):
    with httpx.Client(base_url=guarded, timeout=30) as h:
        r = h.get(page)
        assert r.status_code == 200, r.text[:300]
        assert r.headers["content-type"].startswith("text/html")
        html = r.text
        urls = references(html)
        paths = [urlparse(u).path for u in urls]
        assert {p[p.rfind("."):] for p in paths} >= assets, urls  # the script, the style, the icon, the spec
        for url in urls:
            target = urlparse(urljoin(guarded + page, url))
            assert (target.scheme, target.netloc) == ("http", urlparse(guarded).netloc), f"{page} loads {url}"
            got = h.get(target.path)  # no token
            assert got.status_code == 200, (url, got.status_code, got.text[:200])
            suffix = target.path[target.path.rfind("."):]
            assert CONTENT_TYPES[suffix] in got.headers["content-type"], (url, got.headers["content-type"])
            assert len(got.content) > 0
            if suffix == ".css":  # nothing fetched from elsewhere through the stylesheet either
                assert not re.search(r"url\(\s*['\"]?(https?:)?//", got.text), url
        # no other host anywhere in the page: no CDN, no web fonts, no online validator badge
        assert not re.search(r"(https?:)?//[A-Za-z0-9.-]+\.[a-z]{2,}", html), re.findall(r"https?://[^\s'\"]+", html)


def test_swagger_ui_takes_the_bearer_token(guarded):
    """The page loads /openapi.json, which declares the bearer scheme on the guarded operations: Swagger UI's
    Authorize button then asks for the token and sends it as ``Authorization: Bearer``."""
    with httpx.Client(base_url=guarded, timeout=30) as h:
        html = h.get("/docs").text
        assert "/openapi.json" in references(html)
        assert re.search(r'"validatorUrl"\s*:\s*null', html)  # Swagger UI would ask an online validator otherwise
        doc = h.get("/openapi.json").json()
    assert doc["components"]["securitySchemes"]["bearer"] == {**doc["components"]["securitySchemes"]["bearer"],
                                                             "type": "http", "scheme": "bearer"}  # fmt: skip
    assert doc["paths"]["/v1/datasets"]["get"]["security"] == [{"bearer": []}]
    assert doc["paths"]["/healthz"]["get"]["security"] == []


def test_the_data_routes_still_need_the_token(guarded):
    with httpx.Client(base_url=guarded, timeout=30) as h:
        for method, path in (("GET", "/v1/datasets"), ("GET", "/metrics"), ("POST", "/v1/jobs"),
                             ("GET", "/docsx"), ("GET", "/docs/other"), ("GET", "/v1/datasets/x/batch")):  # fmt: skip
            r = h.request(method, path)
            assert r.status_code == 401, (method, path, r.status_code)
            assert r.headers["content-type"].startswith("application/problem+json")
        assert h.get("/v1/datasets", headers=AUTH).status_code == 200


@pytest.mark.parametrize(
    "asset", ["nope.js", "..%2F..%2Fpyproject.toml", "%2E%2E", "swagger-ui.css.map", "__init__.py"]
)
def test_only_the_pages_own_assets_are_served(guarded, asset):
    with httpx.Client(base_url=guarded, timeout=30) as h:
        r = h.get(f"/docs/assets/{asset}")
        assert r.status_code == 404, (asset, r.status_code, r.text[:200])
        assert r.headers["content-type"].startswith("application/problem+json")
