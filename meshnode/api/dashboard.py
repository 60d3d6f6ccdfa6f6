"""The API's description and the dashboard, files shipped in the package:
``/openapi.json``, ``/docs``, ``/`` and the pages' own files under ``/ui/``."""

from __future__ import annotations

import functools
import importlib.resources

from quart import Response
from quart_trio import QuartTrio

from .. import __version__
from ..errors import MeshError
from .responses import json_response
from .schemas import openapi_document

__all__ = ["UI_FILES", "add_dashboard_routes"]

UI_FILES = {"index.html": "text/html", "docs.html": "text/html", "app.js": "text/javascript",
            "docs.js": "text/javascript", "style.css": "text/css"}
# The dashboard's pages load only their own files and talk only to this node.
_CSP = "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; frame-ancestors 'none'"


def add_dashboard_routes(app: QuartTrio) -> None:
    @app.get("/openapi.json")
    async def openapi() -> Response:
        return json_response(openapi_document(__version__))

    @app.get("/")
    async def dashboard() -> Response:
        return _page_file("index.html")

    @app.get("/docs")
    async def docs() -> Response:
        return _page_file("docs.html")

    @app.get("/ui/<file>")
    async def ui_file(file: str) -> Response:
        if file not in UI_FILES:
            raise MeshError("NOT_FOUND", f"no file {file[:40]!r} in the dashboard")
        return _page_file(file)


@functools.lru_cache(maxsize=len(UI_FILES))
def _ui_bytes(file: str) -> bytes:
    return (importlib.resources.files("meshnode") / "dashboard" / file).read_bytes()


def _page_file(file: str) -> Response:
    r = Response(_ui_bytes(file), status=200, content_type=f"{UI_FILES[file]}; charset=utf-8")
    r.headers["content-security-policy"] = _CSP
    r.headers["x-content-type-options"] = "nosniff"
    r.headers["cache-control"] = "no-cache"
    return r
