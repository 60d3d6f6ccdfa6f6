"""HTTP routes: the public JSON API and the msgpack peer route, on one app."""

from __future__ import annotations

from .app import create_app

__all__ = ["create_app"]
