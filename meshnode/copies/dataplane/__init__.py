"""The data plane: a small binary protocol that moves verified chunks between peers.

Theory of operation
-------------------
Weights move on their own TCP port (advertised in the gossiped catalog), not
through HTTP: a plain socket with ``os.sendfile`` on the sender and
``recv_into`` a reused buffer on the receiver moves several GB/s on one core,
where an HTTP client reading a streamed body tops out well under 1 GB/s.

Every integer is big-endian.  One connection carries one handshake, then any
number of sequential requests.

Handshake (proves the cluster secret both ways without sending it)::

    client -> server  b"MNDP" | version u8 (=2) | client nonce (16)
    server -> client  version u8 (=2) | server nonce (16)
    client -> server  HMAC-SHA256(K_c, b"cli" | cn | sn)
    server -> client  u8: 0 accepted | HMAC-SHA256(K_c, b"srv" | cn | sn)
                      (anything else: refused, then close)

The client proves first, with ``K_c``, its first secret: a stranger who
connects learns nothing it could test guesses against offline (in version 1
the server proved first, to anyone).  The server checks the proof against
each secret it accepts with ``hmac.compare_digest`` and answers with its own
proof under the secret that matched, which the client checks, so each side
knows the other holds the secret.  No secrets configured (a single-user
loopback setup) means the empty key.  Rotation: add the new secret to every
node's list, then make it first everywhere, then drop the old one; at every
step each node's first secret is in every other node's list.

Nothing here can be replayed (unlike a signed HTTP peer request, see
``protocol.peerauth``): each connection proves the secret over a server
nonce fresh to it, so the bytes of a recorded handshake prove nothing on
another connection or at another node, and the requests only read chunks
the receiver verifies against the manifest.

A server answers a wrong magic by closing; a wrong version by sending its own
version byte and closing; a client at connection capacity by sending the
single byte 0 ("busy") and closing.  A wrong secret is logged (one line,
rate-limited, never the secret) and closed.

Requests and replies::

    GET_CHUNK  u8 1 | manifest hash (16 raw bytes of the 32-char hex) | chunk index u32
    HAVE       u8 2 | manifest hash (16)
    HAVE_WAIT  u8 3 | manifest hash (16) | version known u32 | wait ms u32
    reply      status u8 | length u64 | body

Status 0 OK (body: the chunk, or a bitfield whose bit i, most significant bit
first, says chunk i is present and verified; for HAVE_WAIT a version u32
first), 1 NOT_FOUND, 2 BAD_REQUEST, 3 BUSY.  A non-OK body is an optional
short UTF-8 reason (at most 256 bytes).  A malformed or unknown request gets
BAD_REQUEST and the connection is closed (a node that predates HAVE_WAIT
answers it so, and the asker falls back to HAVE).

Neighbours in a swarm tell each other of new chunks with HAVE_WAIT: the
holder answers as soon as its chunks differ from the version the asker knows
(at most ``MAX_HAVE_WAIT_S`` later), so a chunk is known around the
neighbourhood within a round trip, and nothing is gossiped to everyone.  A
holder that is still receiving a chunk lists it too, and passes it on as it
arrives (``Arriving``: cut-through, over plain TCP): the last
``HOLD_BYTES`` go out only once it matched its digest here, and a chunk that
fails it is never sent whole (the connection is closed; the receiver asks
another holder, with no strike).  A holder runs at most ``upload_slots``
chunk sends at once; later requests wait their turn, first come first
served.

Limits: connections (``max_connections``), concurrent chunk sends
(``max_concurrent_sends``, beyond which GET_CHUNK answers BUSY), a handshake
timeout, an idle timeout between requests, a timeout to read a whole request,
and a stall timeout on every send and receive (no progress for that long
fails the request).  The client bounds connect plus handshake by
``connect_timeout_s`` and every wait for bytes by ``read_timeout_s``.

The chunk's xxh3-128 is computed as its bytes arrive; the caller writes a
chunk to disk only after ``fetch_chunk`` has returned, that is after the
digest matched.
"""

from .client import DataClient, DataClientStatistics
from .common import (
    HOLD_BYTES,
    MAGIC,
    MAX_HAVE_WAIT_S,
    VERSION,
    Arriving,
    ChunkMismatch,
    ChunkResolver,
    DataPlaneAuthError,
    DataPlaneError,
    NotFound,
    PeerBusy,
    RequestRefused,
    Status,
    SwarmResolver,
)
from .server import DataServer, DataServerStatistics

__all__ = [
    "HOLD_BYTES",
    "MAGIC",
    "MAX_HAVE_WAIT_S",
    "VERSION",
    "Arriving",
    "ChunkMismatch",
    "ChunkResolver",
    "DataClient",
    "DataClientStatistics",
    "DataPlaneAuthError",
    "DataPlaneError",
    "DataServer",
    "DataServerStatistics",
    "NotFound",
    "PeerBusy",
    "RequestRefused",
    "Status",
    "SwarmResolver",
]
