"""Transfers: the pure half.

- ``states``: a transfer's states and the moves between them.
- ``sources``: which nodes hold a manifest, and which copy to fetch.
- ``chunkplan``: which chunk to ask which holder for, and what to do when
  one stalls or lies.
- ``claims``: which node fetches an outside source, once per mesh.

The daemon's ``meshnode.copies`` does the I/O: the store, the data plane,
the puller that follows the chunk plan, the intents that survive a restart.
"""

from .states import TRANSITIONS, TransferStatus

__all__ = ["TRANSITIONS", "TransferStatus"]
