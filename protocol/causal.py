"""Read your writes through any node: a causality token.

Theory of operation
-------------------
Every node's catalog keys carry versions that grow with each write, per
generation.  The token of a write is where its node's catalog stood once
the write was in it: ``node_id:generation:version``.  A node has *seen* a
token when it holds that node's keys at that generation and version or
later (a later generation supersedes: the node restarted after the write).
A client hands the token of its last write to whichever node it asks next,
and that node waits (bounded) until it has seen it, pulling from the
writer meanwhile, before it answers.  Pure: ``seen`` reads a catalog.
"""

from __future__ import annotations

from dataclasses import dataclass

from .catalog import Catalog
from .errors import LocalProtocolError
from .names import validate_node_id

__all__ = ["After", "seen"]

_INT_MAX = 2**63 - 1


@dataclass(frozen=True, slots=True)
class After:
    node_id: str
    generation: int
    version: int

    def text(self) -> str:
        return f"{self.node_id}:{self.generation}:{self.version}"

    @classmethod
    def parse(cls, text: str) -> After:
        """The token in ``text``, or ``LocalProtocolError`` saying what is wrong."""
        parts = text.strip().split(":") if isinstance(text, str) and len(text) <= 200 else []
        if len(parts) != 3 or not all(p.isascii() and p for p in parts):
            raise LocalProtocolError("a causality token is node:generation:version")
        node, gen, ver = parts
        if not (gen.isdigit() and ver.isdigit()) or int(gen) > _INT_MAX or int(ver) > _INT_MAX:
            raise LocalProtocolError("a causality token's generation and version are numbers")
        return cls(validate_node_id(node), int(gen), int(ver))

    @classmethod
    def of(cls, catalog: Catalog) -> After:
        """The token of everything ``catalog``'s own node has written so far."""
        own = catalog.own
        return cls(own.node_id, own.generation, own.max_version)


def seen(catalog: Catalog, after: After) -> bool:
    """Whether ``catalog`` holds ``after``'s node's keys as of that write, or later."""
    st = catalog.nodes.get(after.node_id)
    if st is None:
        return False
    return (st.generation, st.max_version) >= (after.generation, after.version)
