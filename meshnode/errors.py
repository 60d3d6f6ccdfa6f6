"""One error vocabulary for the daemon.

Every failure a client, a peer or an operator should hear about is a
``MeshError``: a stable code (``MODEL_NOT_FOUND``, ``NO_SPACE``, ...) and a
message for people.  The API answers it as ``{"error": {"code", "message"}}``
with the status ``STATUS`` gives its code; a transfer records it as its
error; the CLI prints ``CODE: message``.  The store's, the transfers' and the
sources' errors are kinds of it, so one ``except MeshError`` (or one
``ExceptionGroup.split(MeshError)``) finds any of them.
"""

from __future__ import annotations

import enum
from typing import Any

__all__ = ["STATUS", "Code", "MeshError", "first_mesh_error"]


class Code(enum.StrEnum):
    """Every error code the daemon answers with, and its HTTP status.  A code
    is a ``str``, so ``MeshError(Code.NO_SPACE, ...)`` and
    ``MeshError("NO_SPACE", ...)`` are the same error;
    ``tests/unit/test_errors.py`` checks that every code raised anywhere is
    one of these."""

    status: int

    def __new__(cls, value: str, status: int) -> Code:
        obj = str.__new__(cls, value)
        obj._value_ = value
        obj.status = status
        return obj

    # the request is wrong
    INVALID_REQUEST = "INVALID_REQUEST", 400
    INVALID_POLICY = "INVALID_POLICY", 400
    INVALID_JSON = "INVALID_JSON", 400
    INVALID_MODEL_NAME = "INVALID_MODEL_NAME", 400
    INVALID_DEVICE = "INVALID_DEVICE", 400
    SAME_DEVICE = "SAME_DEVICE", 400
    BAD_PEER_MESSAGE = "BAD_PEER_MESSAGE", 400
    UNAUTHORIZED = "UNAUTHORIZED", 401
    PATH_NOT_ALLOWED = "PATH_NOT_ALLOWED", 403
    ENGINE_CONFIG_NOT_ALLOWED = "ENGINE_CONFIG_NOT_ALLOWED", 403
    CROSS_ORIGIN = "CROSS_ORIGIN", 403
    HOST_NOT_ALLOWED = "HOST_NOT_ALLOWED", 421
    WRONG_NODE = "WRONG_NODE", 421
    PRIVATE_SOURCE = "PRIVATE_SOURCE", 403
    NOT_FOUND = "NOT_FOUND", 404
    MODEL_NOT_FOUND = "MODEL_NOT_FOUND", 404
    NODE_NOT_FOUND = "NODE_NOT_FOUND", 404
    COPY_NOT_FOUND = "COPY_NOT_FOUND", 404
    TRANSFER_NOT_FOUND = "TRANSFER_NOT_FOUND", 404
    SOURCE_NOT_FOUND = "SOURCE_NOT_FOUND", 404
    LOCATION_NOT_FOUND = "LOCATION_NOT_FOUND", 404
    METHOD_NOT_ALLOWED = "METHOD_NOT_ALLOWED", 405
    NODE_UNAVAILABLE = "NODE_UNAVAILABLE", 409
    CONTENT_CONFLICT = "CONTENT_CONFLICT", 409
    JOB_ID_TAKEN = "JOB_ID_TAKEN", 409
    TRANSFER_FINISHED = "TRANSFER_FINISHED", 409
    IN_PROGRESS = "IN_PROGRESS", 409  # a copy another import or a transfer is writing
    LEASE_NOT_FOUND = "LEASE_NOT_FOUND", 404
    TOO_MANY_LEASES = "TOO_MANY_LEASES", 429
    TOO_LARGE = "TOO_LARGE", 413
    UNSUPPORTED_MEDIA_TYPE = "UNSUPPORTED_MEDIA_TYPE", 415
    INVALID_PIPELINE = "INVALID_PIPELINE", 422
    JOB_NOT_FOUND = "JOB_NOT_FOUND", 404
    MODEL_NOT_AVAILABLE = "MODEL_NOT_AVAILABLE", 404
    NO_CAPACITY = "NO_CAPACITY", 409
    TOO_MANY_JOBS = "TOO_MANY_JOBS", 429
    RATE_LIMITED = "RATE_LIMITED", 429
    TOO_MANY_MODELS = "TOO_MANY_MODELS", 507
    NOT_SUPPORTED = "NOT_SUPPORTED", 501
    SERVICE_NOT_FOUND = "SERVICE_NOT_FOUND", 404
    UNKNOWN_ENGINE = "UNKNOWN_ENGINE", 400
    INVALID_CONFIG = "INVALID_CONFIG", 400
    PORT_OUT_OF_RANGE = "PORT_OUT_OF_RANGE", 400
    PORT_IN_USE = "PORT_IN_USE", 409
    ENGINE_NOT_ALLOWED = "ENGINE_NOT_ALLOWED", 403
    ENGINE_NOT_FOUND = "ENGINE_NOT_FOUND", 424
    ENGINE_FAILED = "ENGINE_FAILED", 502
    ENGINE_BAD_ANSWER = "ENGINE_BAD_ANSWER", 502
    NO_HEALTHY_SERVICE = "NO_HEALTHY_SERVICE", 503
    TOO_MANY_FILES = "TOO_MANY_FILES", 413
    SOURCE_CHANGED = "SOURCE_CHANGED", 409
    # the mesh cannot do it now, or a peer or source sent something wrong
    PEER_UNREACHABLE = "PEER_UNREACHABLE", 502
    BAD_PEER_ANSWER = "BAD_PEER_ANSWER", 502
    PEER_ERROR = "PEER_ERROR", 502
    STARTING = "STARTING", 503
    NOT_READY = "NOT_READY", 503
    TOO_MANY_CONNECTIONS = "TOO_MANY_CONNECTIONS", 503
    NO_SPACE = "NO_SPACE", 507
    NO_SOURCE = "NO_SOURCE", 503
    UNAVAILABLE = "UNAVAILABLE", 503
    UNHEALTHY = "UNHEALTHY", 503
    BAD_CHUNK = "BAD_CHUNK", 502
    BAD_CONTENT = "BAD_CONTENT", 502
    SOURCE_CORRUPT = "SOURCE_CORRUPT", 502
    INCOMPLETE = "INCOMPLETE", 502
    # our fault, or the disk's
    IO_ERROR = "IO_ERROR", 500
    INTERNAL = "INTERNAL", 500


STATUS: dict[str, int] = {c.value: c.status for c in Code}


class MeshError(Exception):
    """An error with a stable ``code`` and a one-line ``message``.

    ``status`` is the HTTP status the API answers with: ``STATUS[code]``
    (500 for a code it does not list), or the one given, for an error a
    peer answered with that we pass on as it was.
    """

    def __init__(self, code: str, message: str, *, status: int | None = None,
                 details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self._status = status
        self.details = details or {}  # more fields of the error object (a pipeline's problems)

    @property
    def status(self) -> int:
        return self._status if self._status is not None else STATUS.get(self.code, 500)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.code!r}, {self.message!r})"


def first_of(e: BaseException, condition: Any) -> BaseException | None:
    """The first exception in ``e`` that ``condition`` (a type, a tuple of
    types, or a predicate, as ``ExceptionGroup.split`` takes) matches,
    looking inside exception groups (trio wraps errors in them)."""
    if not isinstance(e, BaseExceptionGroup):
        if isinstance(condition, type | tuple):
            return e if isinstance(e, condition) else None
        return e if condition(e) else None
    found: BaseException | None = e.split(condition)[0]
    while isinstance(found, BaseExceptionGroup):
        found = found.exceptions[0]
    return found


def only(e: BaseException, kinds: type[BaseException] | tuple[type[BaseException], ...]) -> bool:
    """Whether ``e`` is of ``kinds``, or a group of nothing else."""
    if isinstance(e, BaseExceptionGroup):
        return e.split(kinds)[1] is None
    return isinstance(e, kinds)


def first_mesh_error(e: BaseException) -> MeshError | None:
    """The first ``MeshError`` in ``e``, looking inside exception groups."""
    found = first_of(e, MeshError)
    return found if isinstance(found, MeshError) else None
