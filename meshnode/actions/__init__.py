"""Actions: copy, move, download, delete, routed to the node that runs them."""

from .executors import Executors
from .router import Router

__all__ = ["Executors", "Router"]
