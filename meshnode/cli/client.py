"""A small synchronous client for the public HTTP API that every node serves.

The CLI is its main user, but scripts may use it too::

    with ApiClient("http://127.0.0.1:7420", token="...") as api:
        print(api.list_models()["total_count"])

Errors come in three kinds, all subclasses of ``ClientError`` and all with a
message that is safe to show (it never contains the token):

- ``AnswerError``: the peer answered with an error status; ``status``, ``code``
  and ``message`` come from its ``{"error": {"code", "message"}}`` body.
- ``PeerUnreachableError``: no connection could be made (refused, DNS, connect
  timeout).
- ``ClientError`` itself: anything else (the peer stopped answering, or sent
  something that is not JSON).
"""

from __future__ import annotations

import re
import ssl
from types import TracebackType
from typing import Any
from urllib.parse import quote

import httpx

__all__ = [
    "DEFAULT_PEER",
    "DEFAULT_PORT",
    "DEFAULT_TIMEOUT_S",
    "AnswerError",
    "ApiClient",
    "ClientError",
    "NotAnApiError",
    "PeerUnreachableError",
    "model_path",
    "normalize_peer_url",
    "transfer_path",
]

DEFAULT_PORT = 7420
DEFAULT_PEER = f"http://127.0.0.1:{DEFAULT_PORT}"
DEFAULT_TIMEOUT_S = 10.0
PAGE = 1000  # items asked for at once from a paged list
PAGES_MAX = 1000  # pages read for one command: a million items

# Bounds on what we echo back from a peer: one line, not a novel.
_MESSAGE_CHARS_MAX = 300
_USER_AGENT = "meshnode-cli"
_TOKEN_CHARS = re.compile(r"[A-Za-z0-9._~+/=-]+")  # RFC 6750's b64token


class ClientError(Exception):
    """Something went wrong talking to a peer; ``str(err)`` is one line for people."""


class AnswerError(ClientError):
    """The peer answered with an error status."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{code}: {message} (HTTP {status})")
        self.status = status
        self.code = code
        self.message = message


class NotAnApiError(ClientError):
    """What answered at ``--peer`` is no meshnode API (it closed the connection
    on an HTTP request): the node's data port, say."""


class PeerUnreachableError(ClientError):
    """No connection to the peer could be made."""

    def __init__(self, url: str, reason: str) -> None:
        super().__init__(f"cannot reach peer {url}: {reason}")
        self.url = url
        self.reason = reason


def _one_line(text: str, limit: int = _MESSAGE_CHARS_MAX) -> str:
    text = " ".join(text.split())
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return text


def check_token(token: str | None) -> None:
    """Refuse (``ValueError``) a token that no Authorization header can carry,
    before any request, so that no error about the header can quote it."""
    if token and not _TOKEN_CHARS.fullmatch(token):
        raise ValueError("the API token holds characters a bearer token cannot (letters, digits and -._~+/= only)")


def normalize_peer_url(peer: str) -> str:
    """Turn ``URL``, ``HOST:PORT`` or ``HOST`` into a base URL without a trailing slash.

    A bare ``HOST`` or ``HOST:PORT`` gets ``http://``; a bare ``HOST`` also gets
    the default port.  Raises ``ValueError`` with a readable message otherwise.
    """
    text = peer.strip()
    if not text:
        raise ValueError("peer address is empty")
    if "://" not in text:
        text = "http://" + text
        bare = True
    else:
        bare = False
    try:
        url = httpx.URL(text)
    except (httpx.InvalidURL, ValueError) as exc:
        raise ValueError(f"bad peer address {peer!r}: {exc}") from None
    if url.scheme not in ("http", "https"):
        raise ValueError(f"bad peer address {peer!r}: scheme must be http or https")
    if not url.host:
        raise ValueError(f"bad peer address {peer!r}: no host")
    if url.query or url.fragment:
        raise ValueError(f"bad peer address {peer!r}: no query or fragment allowed")
    if bare and url.port is None:
        url = url.copy_with(port=DEFAULT_PORT)
    return str(url).rstrip("/")


def model_path(name: str) -> str:
    """``/models/{name}`` with each segment quoted but the one ``/`` kept.

    Hugging Face repo ids (``owner/name``) route as two path segments, as the
    server expects.  Raises ``ValueError`` for names that cannot be a model
    (more than one ``/``, empty or relative segments); the server judges the rest.
    """
    if not name:
        raise ValueError("model name is empty")
    parts = name.split("/")
    if len(parts) > 2:
        raise ValueError(f"model name {name!r} may contain at most one '/' (owner/name)")
    for part in parts:
        if part in ("", ".", ".."):
            raise ValueError(f"model name {name!r} has an empty or relative segment")
    return "/models/" + "/".join(quote(part, safe="") for part in parts)


def job_path(job_id: str) -> str:
    text = job_id.strip()
    if not text or len(text) > 64 or not all(ch.isalnum() or ch in "-_" for ch in text):
        raise ValueError(f"bad job id {job_id[:40]!r}: letters, digits, '-' and '_'")
    return f"/jobs/{text}"


def transfer_path(transfer_id: str) -> str:
    """``/transfers/{id}`` with the id quoted as one segment; ``ValueError`` when empty."""
    text = transfer_id.strip()
    if not text:
        raise ValueError("transfer id is empty")
    return "/transfers/" + quote(text, safe="")


class ApiClient:
    """Blocking client for one peer's public API.

    ``transport`` is for tests (``httpx.MockTransport``); everything else is what
    a user would set.
    """

    def __init__(
        self,
        base_url: str,
        *,
        token: str | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        transport: httpx.BaseTransport | None = None,
        verify: ssl.SSLContext | bool = True,
        client_cert: bool = False,
    ) -> None:
        if timeout_s <= 0:
            raise ValueError("timeout must be positive")
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s
        check_token(token)
        # Read your writes: the causality token of the last write this client
        # made (a response's X-Mesh-Token), sent as X-Mesh-After with every
        # request, so that any node answers only once it has seen that write.
        self.last_write: str | None = None
        self._token = token or None
        self._has_token = bool(token)
        self._client_cert = client_cert  # loaded into ``verify``; known here for an error's hint
        headers = {"Accept": "application/json", "User-Agent": _USER_AGENT}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        self._http = httpx.Client(
            base_url=self.base_url,
            headers=headers,
            timeout=httpx.Timeout(timeout_s),
            transport=transport,
            follow_redirects=False,
            verify=verify,
        )

    # -- lifecycle ---------------------------------------------------------

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> ApiClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- core --------------------------------------------------------------

    def request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: dict[str, str] | None = None,
        content: bytes | None = None,
        content_type: str | None = None,
    ) -> Any:
        """Send one request; return the decoded JSON body (``{}`` when empty)."""
        headers = {"X-Mesh-After": self.last_write} if self.last_write else {}
        if content_type:
            headers["content-type"] = content_type
        try:
            response = self._http.request(method, path, json=json, params=params, headers=headers or None,
                                          content=content)
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            raise PeerUnreachableError(self.base_url, _reason(exc, self.timeout_s)) from None
        except httpx.TimeoutException as exc:
            raise ClientError(
                f"peer {self.base_url} did not answer {method} {path} within "
                f"{self.timeout_s:g}s ({type(exc).__name__})"
            ) from None
        except httpx.TransportError as exc:
            if isinstance(exc, httpx.RemoteProtocolError | httpx.ReadError) and self.base_url.startswith("http://"):
                raise NotAnApiError(
                    f"{self.base_url} closed the connection on an HTTP request without answering "
                    f"({type(exc).__name__}): it is not a meshnode API port. Is it the data port (the node's --port "
                    "+ 1)? The API listens on --port (default 7420); or the node stopped meanwhile") from None
            hint = ""
            if self.base_url.startswith("https://") and not self._client_cert and isinstance(
                    exc, httpx.RemoteProtocolError | httpx.ReadError):
                hint = " (a node started with --tls-ca closes connections without a client certificate: --cert, --key)"
            raise ClientError(
                f"request {method} {path} to peer {self.base_url} failed: {_reason(exc, self.timeout_s)}{hint}"
            ) from None
        written = response.headers.get("x-mesh-token")
        if written and len(written) <= 200:
            self.last_write = written
        if response.is_success:
            return self._decode(response, method, path)
        raise self._error(response)

    def _decode(self, response: httpx.Response, method: str, path: str) -> Any:
        if not response.content:
            return {}
        try:
            return response.json()
        except ValueError:
            raise ClientError(
                f"peer {self.base_url} sent a response to {method} {path} that is not JSON "
                f"(HTTP {response.status_code})"
            ) from None

    def _error(self, response: httpx.Response) -> AnswerError:
        status = response.status_code
        code = f"HTTP_{status}"
        message = response.reason_phrase or "error"
        try:
            body = response.json()
        except ValueError:
            body = None
        err = body.get("error") if isinstance(body, dict) else None
        if isinstance(err, dict):
            if isinstance(err.get("code"), str) and err["code"]:
                code = err["code"]
            if isinstance(err.get("message"), str) and err["message"]:
                message = err["message"]
            problems = err.get("problems")
            if isinstance(problems, list) and problems:  # a pipeline's: every one, each with its step
                said = [f"[{p.get('action_id') or 'pipeline'}] {p.get('field')}: {p.get('message')}"
                        for p in problems[:50] if isinstance(p, dict)]
                message = f"{len(problems)} problem{'s' if len(problems) != 1 else ''}: " + "; ".join(said)
        elif isinstance(err, str) and err:
            message = err
        message = _one_line(self._redact(message))
        if status == 401 and not self._has_token:
            message += " (no token given: use --token, --token-file or MESHNODE_TOKEN)"
        return AnswerError(status, _one_line(self._redact(code), 64), message)

    def _redact(self, text: str) -> str:
        """A peer's text with our token, where it stands as a whole word, shown as ``***``
        (a peer should never echo it; ours do not): never a search and replace
        that would mangle words which merely contain the token's letters."""
        if not self._token:
            return text
        return re.sub(rf"(?<![A-Za-z0-9._~+/=-]){re.escape(self._token)}(?![A-Za-z0-9._~+/=-])", "***", text)

    # -- endpoints ---------------------------------------------------------

    def health(self) -> Any:
        return self.request("GET", "/health")

    def status(self) -> Any:
        return self.request("GET", "/status")

    def all_pages(self, path: str, key: str) -> Any:
        """Every item of a paged list (``limit``/``offset``), at most
        ``PAGES_MAX`` pages: the answer as one page holding them all."""
        items: list[Any] = []
        answer: Any = {}
        for _ in range(PAGES_MAX):
            answer = self.request("GET", path, params={"limit": str(PAGE), "offset": str(len(items))})
            page = answer.get(key) if isinstance(answer, dict) else None
            if not isinstance(page, list):
                return answer  # not a paged answer (an older node): as it is
            items += page
            total = answer.get("total_count")
            if not page or not isinstance(total, int) or len(items) >= total:
                break
        if isinstance(answer, dict):
            answer = {k: v for k, v in answer.items() if k not in ("limit", "offset")}
            answer[key] = items
        return answer

    def nodes(self) -> Any:
        return self.all_pages("/nodes", "nodes")

    def list_models(self) -> Any:
        return self.all_pages("/models", "models")

    def get_model(self, name: str) -> Any:
        return self.request("GET", model_path(name))

    def register_model(
        self,
        name: str,
        *,
        model_type: str | None = None,
        source_url: str | None = None,
        description: str | None = None,
        tags: list[str] | None = None,
        requirements: dict[str, Any] | None = None,
    ) -> Any:
        metadata: dict[str, Any] = {}
        if description is not None:
            metadata["description"] = description
        if tags:
            metadata["tags"] = list(tags)
        if requirements:
            metadata["requirements"] = dict(requirements)
        body: dict[str, Any] = {"metadata": metadata}
        if model_type is not None:
            body["model_type"] = model_type
        if source_url is not None:
            body["source_url"] = source_url
        return self.request("POST", model_path(name) + "/register", json=body)

    def pin_model(self, name: str, policy: dict[str, Any] | None) -> Any:
        """Keep ``policy``'s replicas of ``name`` (None: unpin it)."""
        if policy is None:
            return self.request("DELETE", model_path(name) + "/pin")
        return self.request("POST", model_path(name) + "/pin", json=policy)

    def unregister_model(self, name: str, *, purge: bool = False) -> Any:
        params = {"purge": "true"} if purge else None
        return self.request("DELETE", model_path(name), params=params)

    def delete_from(self, name: str, device: str) -> Any:
        """Free one device (gswarm's "remove from one device"): its copy is deleted, the model stays."""
        return self.request("DELETE", model_path(name), params={"device": device})

    def availability(self) -> Any:
        return self.request("GET", "/v2/catalog/availability")

    # -- copies and transfers (each POST answers 202 with a transfer object) --

    def download_model(
        self,
        name: str,
        *,
        target_device: str,
        source: str = "web",
        source_url: str | None = None,
        revision: str | None = None,
        allow_patterns: list[str] | None = None,
        ignore_patterns: list[str] | None = None,
    ) -> Any:
        """Fetch ``name`` onto ``target_device`` from the web (``source_url``, or the
        registered one when None) or from another copy (``source="node:device"``)."""
        body: dict[str, Any] = {"source": source, "target_device": target_device}
        if source_url is not None:
            body["source_url"] = source_url
        for key, value in (("revision", revision), ("allow_patterns", allow_patterns), ("ignore_patterns", ignore_patterns)):
            if value:
                body[key] = value
        return self.request("POST", model_path(name) + "/download", json=body)

    def copy_model(self, name: str, *, to_device: str, from_device: str | None = None) -> Any:
        """Copy ``name`` onto ``to_device`` from ``from_device`` (or any holder)."""
        body: dict[str, Any] = {"to_device": to_device}
        if from_device is not None:
            body = {"from_device": from_device, **body}
        return self.request("POST", model_path(name) + "/copy", json=body)

    def move_model(self, name: str, *, from_device: str, to_device: str) -> Any:
        """Copy ``name`` from ``from_device`` onto ``to_device``, then drop the source."""
        body = {"from_device": from_device, "to_device": to_device}
        return self.request("POST", model_path(name) + "/move", json=body)

    def transfers(self) -> Any:
        return self.all_pages("/transfers", "transfers")

    def get_transfer(self, transfer_id: str) -> Any:
        return self.request("GET", transfer_path(transfer_id))

    def cancel_transfer(self, transfer_id: str) -> Any:
        """Stop a transfer: the node that runs it answers with its state once its partial files are gone."""
        return self.request("DELETE", transfer_path(transfer_id))

    # -- pipelines -------------------------------------------------------------

    def submit_pipeline(self, document: bytes) -> Any:
        """A YAML (or JSON) pipeline, sent as it is: 202 with the job."""
        return self.request("POST", "/jobs/from-yaml", content=document, content_type="application/yaml")

    def jobs(self) -> Any:
        return self.all_pages("/jobs", "jobs")

    def job(self, job_id: str) -> Any:
        return self.request("GET", job_path(job_id))

    def cancel_job(self, job_id: str) -> Any:
        return self.request("POST", job_path(job_id) + "/cancel")

    def placement(self, model: str, device: str) -> Any:
        return self.request("GET", "/placement", params={"model": model, "device": device})


def _reason(exc: httpx.TransportError, timeout_s: float) -> str:
    if isinstance(exc, httpx.ConnectTimeout):
        return f"connection timed out after {timeout_s:g}s"
    text = _one_line(str(exc))
    return text or type(exc).__name__
