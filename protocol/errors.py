"""Error types shared by the pure protocol layer.

h11's split: a ``LocalProtocolError`` means *we* asked for something the
protocol forbids (a bug or a bad user input on this node); a
``RemoteProtocolError`` means a *peer* sent something we cannot accept.  The
I/O layer logs and counts a remote error and drops the message; it never lets
one crash the node.
"""

from __future__ import annotations

__all__ = ["InvalidName", "LocalProtocolError", "ProtocolError", "RemoteProtocolError"]


class ProtocolError(Exception):
    """Base class for every error raised by ``protocol``."""


class LocalProtocolError(ProtocolError):
    """This node tried to do something the protocol forbids."""


class RemoteProtocolError(ProtocolError):
    """A peer sent a message we cannot accept (malformed, oversized, wrong version...)."""


class InvalidName(LocalProtocolError, ValueError):
    """A model, node or device name does not follow the naming rules."""
