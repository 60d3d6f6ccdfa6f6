"""Actions: copy, move, download, delete, routed to the node that runs them."""

from .executors import Executors
from .requests import CopyRequest, DownloadRequest
from .router import Router

__all__ = ["CopyRequest", "DownloadRequest", "Executors", "Router"]
