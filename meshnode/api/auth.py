"""Bearer-token checks, in constant time, for the public and peer routes."""

from __future__ import annotations

import hmac

__all__ = ["check_bearer"]


def check_bearer(header: str | None, accepted: tuple[str, ...]) -> bool:
    """True when no credential is required, or the header carries one of ``accepted``.

    Every accepted value is compared (``hmac.compare_digest``), so the time
    taken does not tell which one, or how much of one, matched.
    """
    if not accepted:
        return True
    if not header or not header.startswith("Bearer "):
        return False
    given = header[len("Bearer ") :].strip().encode()
    ok = False
    for token in accepted:
        ok |= hmac.compare_digest(given, token.encode())
    return ok
