"""``export``, ``import``, ``ensure`` and ``release``: bundles for clusters the
internet does not reach, and a pod's wait for its weights.

- ``meshnode export MODEL [MODEL...] -o FILE|-`` (or ``--pipeline FILE.yaml``: every model a
  pipeline names) streams one bundle from the peer, which reads its own copy or the nearest
  holder's; ``-o -`` writes it to stdout, so ``meshnode export m -o - | ssh host meshnode import - --to n:disk``
  works.  A FILE is written beside itself and renamed into place once whole.
- ``meshnode import FILE|- --to NODE:TIER`` streams a bundle to NODE (the peer finds its address),
  which verifies it as it lands.
- ``meshnode ensure MODEL --on NODE:TIER [--wait] [--wait-timeout S]`` prints the path of a
  verified copy on NODE, with a lease on it for ``--holder`` (this host's name: a pod's name);
  with ``--wait`` it follows the transfer that makes it.  One line and a non-zero exit when it
  cannot (``NO_SOURCE``, ``NO_SPACE``, ``TIMEOUT``).
- ``meshnode release MODEL --on NODE:TIER`` gives the lease back.

Progress goes to stderr, and only on a terminal.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import re
import socket
import stat
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import urlencode

import h11
import httpx
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

from protocol.bundle import HEADER_MAX_BYTES, BadBundle, BundleParser, Header
from protocol.leases import HOLDER_PATTERN
from protocol.names import parse_device
from protocol.pipeline import InvalidPipeline, parse_pipeline

from ..errors import MeshError
from ..pipelines import load_document
from . import last_write
from .client import (
    AnswerError,
    ApiClient,
    ClientError,
    NotAnApiError,
    PeerUnreachableError,
    check_token,
)
from .client import normalize_peer_url as _normalize
from .commands import _resolve_timeout, _resolve_token, _tls_context, make_client
from .rawhttp import RawResponse, exchange
from .render import (
    EXIT_ERROR,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
    UsageError,
    fail,
    human_bytes,
    stderr_console,
    transfer_error,
)
from .values import positive_float

__all__ = ["add_bundle_commands", "run_bundle_command"]

BLOCK = 1024 * 1024  # bytes read and written at once
POLL_INTERVAL_S = 0.5
ENSURE_ROUNDS_MAX = 1000  # ensure asked again after a copy was made (each its own transfer)
STREAM_READ_TIMEOUT_S = 60.0  # an export that sends nothing for this long is cut
_sleep: Callable[[float], None] = time.sleep  # tests replace the clock and the sleep
_monotonic: Callable[[], float] = time.monotonic
HELP = {
    "export": "write models as one bundle (a tar stream) for a cluster the internet does not reach",
    "import": "load a bundle into a node's device: verified as it lands, registered, spread by the mesh",
    "ensure": "make sure a verified copy is on a node, and print its path (a pod's init container)",
    "release": "give back the lease ensure took on a copy (it may be evicted again)",
}


def add_bundle_commands(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    """The four commands, on the parser's subcommands."""

    def command(name: str) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = sub.add_parser(name, help=HELP[name], description=HELP[name], parents=parents)
        p.set_defaults(handler=run_bundle_command)
        return p

    ex = command("export")
    ex.add_argument("models", nargs="*", metavar="MODEL", help="model names, e.g. owner/model")
    ex.add_argument("--pipeline", metavar="FILE.yaml", help="every model this pipeline (YAML or JSON) names")
    ex.add_argument("-o", "--output", required=True, metavar="FILE|-", help="where the bundle goes; - is stdout")
    im = command("import")
    im.add_argument("source", metavar="FILE|-", help="the bundle; - reads stdin")
    im.add_argument("--to", required=True, metavar="NODE:TIER", help="the device its copies go to, e.g. gpu2:disk")
    en = command("ensure")
    en.add_argument("name", metavar="MODEL", help="model name, e.g. owner/model")
    en.add_argument("--on", required=True, metavar="NODE:TIER", help="the node and tier, e.g. gpu2:disk")
    en.add_argument("--wait", action="store_true",
                    help="follow the copy until it is there (print its path, exit 0) or has failed (exit 1)")
    en.add_argument("--wait-timeout", type=positive_float, metavar="SECONDS",
                    help="with --wait, give up after this long (exit 1, TIMEOUT; the copy goes on)")
    en.add_argument("--lease", type=positive_float, metavar="SECONDS",
                    help="how long the copy is kept from eviction (default 3600); ensure again to renew")
    en.add_argument("--holder", metavar="NAME", help="who holds the lease (default: this host's name, which is the "
                                                     "pod's name in Kubernetes)")
    rl = command("release")
    rl.add_argument("name", metavar="MODEL", help="model name, e.g. owner/model")
    rl.add_argument("--on", required=True, metavar="NODE:TIER", help="the node and tier, e.g. gpu2:disk")
    who = rl.add_mutually_exclusive_group()
    who.add_argument("--holder", metavar="NAME", help="whose lease (default: this host's name)")
    who.add_argument("--all", action="store_true", help="every holder's lease on the copy")


def default_holder() -> str:
    """This host's name, as a lease holder (a pod's hostname is its name)."""
    name = socket.gethostname().split(".")[0] or "ensure"
    return name[:128]


def _node_of(device: str, what: str) -> tuple[str, str]:
    try:
        d = parse_device(device)
    except ValueError as e:
        raise UsageError(f"{what}: {e}") from None
    if d.is_web or d.kind not in ("disk", "dram") or d.node_id is None:
        raise UsageError(f"{what}: NODE:disk or NODE:dram, not {device}")
    return d.node_id, d.kind


class _Peer:
    """What every command here needs: the peer's URL, a JSON client, the credentials for a stream."""

    def __init__(self, args: argparse.Namespace) -> None:
        environ = os.environ
        self.token = _resolve_token(args, environ)
        check_token(self.token)
        self.url = _normalize(args.peer or environ.get("MESHNODE_PEER") or "http://127.0.0.1:7420")
        self.timeout_s = _resolve_timeout(args, environ)
        self.verify = _tls_context(args, environ)
        self.client_cert = bool(args.cert or environ.get("MESHNODE_CERT"))

    def api(self, url: str | None = None) -> ApiClient:
        return make_client(url or self.url, self.token, self.timeout_s, self.verify, self.client_cert)

    def stream(self, method: str, target: str, body: Iterable[bytes] | None, timeout_s: float | None, *,
               url: str | None = None, headers: dict[str, str] | None = None,
               send_timeout_s: float | None = None) -> RawResponse:
        """One streamed exchange with the peer (or ``url``); its response, body
        still to read.  ``timeout_s``: each wait for the answer (None: an hour);
        ``send_timeout_s``: each wait while sending (default: ``timeout_s``)."""
        h = {"user-agent": "meshnode-cli", **(headers or {})}
        if self.token:
            h["authorization"] = f"Bearer {self.token}"
        where = url or self.url
        try:
            return exchange(where, method, target, h, body, verify=self.verify, timeout_s=timeout_s or 3600.0,
                            send_timeout_s=send_timeout_s)
        except (ConnectionRefusedError, socket.gaierror, TimeoutError) as e:
            raise PeerUnreachableError(where, str(e) or type(e).__name__) from None
        except (OSError, h11.ProtocolError) as e:
            raise ClientError(f"{method} {target[:80]} to {where} failed: {e}") from None

    def url_of(self, api: ApiClient, node: str) -> str:
        """The API of ``node``: the peer itself, or the address the mesh knows for it."""
        if api.health().get("node_id") == node:
            return self.url
        for n in api.nodes().get("nodes") or []:
            if isinstance(n, dict) and n.get("node_id") == node and isinstance(n.get("address"), str):
                return f"{httpx.URL(self.url).scheme}://{n['address']}"
        raise AnswerError(404, "NODE_NOT_FOUND", f"no node {node!r} is known to the mesh at {self.url}")


def _answer_error(r: RawResponse) -> AnswerError:
    try:
        err = json.loads(r.read()).get("error") or {}
    except (ValueError, AttributeError, OSError, h11.ProtocolError):
        err = {}
    code, message = err.get("code"), err.get("message")
    code = code if isinstance(code, str) else f"HTTP_{r.status}"
    message = message if isinstance(message, str) else "error"
    return AnswerError(r.status, code, " ".join(message.split())[:300])


def _progress(label: str, total: int | None) -> tuple[Progress | None, Callable[[int], None]]:
    """A bar on stderr when it is a terminal (else nothing), and how to advance it."""
    console = stderr_console()
    if not console.is_terminal:
        return None, lambda n: None
    bar = Progress(TextColumn(label), BarColumn(), DownloadColumn(), TransferSpeedColumn(), console=console,
                   transient=True)
    task = bar.add_task(label, total=total)
    bar.start()
    return bar, lambda n: bar.advance(task, n)


def run_bundle_command(args: argparse.Namespace) -> int:
    try:
        peer = _Peer(args)
        run = {"export": _export, "import": _import, "ensure": _ensure, "release": _release}[args.command]
        return run(peer, args)
    except (UsageError, ValueError) as exc:
        return fail(str(exc), EXIT_USAGE)
    except PeerUnreachableError as exc:
        return fail(str(exc), EXIT_UNREACHABLE, "PEER_UNREACHABLE")
    except AnswerError as exc:
        return fail(str(exc), EXIT_ERROR, exc.code, status=exc.status)
    except NotAnApiError as exc:
        return fail(str(exc), EXIT_USAGE, "NOT_AN_API_PORT")
    except ClientError as exc:
        return fail(str(exc), EXIT_ERROR)
    except httpx.ConnectError as exc:
        return fail(f"cannot reach peer: {exc}", EXIT_UNREACHABLE, "PEER_UNREACHABLE")
    except httpx.HTTPError as exc:
        return fail(f"{args.command} failed: {type(exc).__name__}: {exc}", EXIT_ERROR)
    except OSError as exc:
        return fail(f"{args.command}: {exc.strerror or exc}", EXIT_ERROR)


# -- export ----------------------------------------------------------------------------------


def pipeline_models(path: str) -> list[str]:
    """Every model a pipeline names, in its order, once."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise UsageError(f"--pipeline {path}: {e.strerror or e}") from None
    try:
        pipe = parse_pipeline(load_document(data))
    except MeshError as e:
        raise UsageError(f"--pipeline {path}: {e.message}") from None
    except InvalidPipeline as e:
        raise UsageError(f"--pipeline {path}: {e}") from None
    names = list(dict.fromkeys(a.model_name for a in pipe.actions if a.model_name is not None))
    if not names:
        raise UsageError(f"--pipeline {path}: it names no model")
    return names


def _export(peer: _Peer, args: argparse.Namespace) -> int:
    models = list(args.models) + (pipeline_models(args.pipeline) if args.pipeline else [])
    if not models:
        raise UsageError("name the models to export, or give --pipeline FILE.yaml")
    to_stdout = args.output == "-"
    if to_stdout and sys.stdout.isatty():
        raise UsageError("not writing a bundle to a terminal: -o FILE, or pipe it (-o - | ...)")
    target = "/bundles?" + urlencode([("model", m) for m in dict.fromkeys(models)])
    with ExitStack() as stack:
        r = peer.stream("GET", target, None, max(STREAM_READ_TIMEOUT_S, peer.timeout_s))
        stack.callback(r.close)
        if r.status != 200:
            raise _answer_error(r)
        total = int(r.headers.get("content-length", "0")) or None
        part = None
        if to_stdout:
            out: BinaryIO = sys.stdout.buffer
            _wide_pipe(out)
        else:
            final = Path(args.output)
            part = final.with_name(f".{final.name}.part")
            out = stack.enter_context(open(part, "wb"))
        bar, advance = _progress("export", total)
        if bar is not None:
            stack.callback(bar.stop)
        written = 0
        try:
            for block in r.body:
                out.write(block)
                written += len(block)
                advance(len(block))
            out.flush()
        except (OSError, h11.ProtocolError) as e:
            if part is not None:
                part.unlink(missing_ok=True)
            if isinstance(e, BrokenPipeError):
                raise
            raise ClientError(f"the export stopped after {written} of {total} bytes ({e}); the peer's log says "
                              "why") from None
        if total is not None and written != total:
            if part is not None:
                part.unlink(missing_ok=True)
            raise ClientError(f"the export stopped after {written} of {total} bytes; the peer's log says why")
        if part is not None:
            out.close()
            os.replace(part, args.output)
    names = r.headers.get("x-bundle-models", ",".join(models))
    where = "stdout" if to_stdout else args.output
    if args.json:
        print(json.dumps({"models": names.split(","), "bytes": written, "output": where}), file=sys.stderr)
    else:
        print(f"exported {names} ({human_bytes(written)}) to {where}", file=sys.stderr)
    return EXIT_OK


# -- import ----------------------------------------------------------------------------------


def _wide_pipe(f: BinaryIO) -> None:
    """A pipe on ``f`` holds a megabyte, not 64 KiB: fewer wake-ups between
    ``export -o -`` and ``import -`` (Linux; elsewhere, or for a file, nothing)."""
    try:
        if stat.S_ISFIFO(os.fstat(f.fileno()).st_mode):
            fcntl.fcntl(f.fileno(), getattr(fcntl, "F_SETPIPE_SZ", 1031), BLOCK)
    except (OSError, ValueError, AttributeError):
        pass


def _blocks(first: bytes, src: BinaryIO, advance: Callable[[int], None]) -> Iterator[bytes]:
    if first:
        advance(len(first))
        yield first
    while block := src.read(BLOCK):
        advance(len(block))
        yield block


def _header_entry(src: BinaryIO) -> bytes:
    """The bundle's first bytes, up to and including its header entry (or as far as
    they go when they are no bundle: the node says what is wrong with them)."""
    parser = BundleParser()
    got = bytearray()
    while len(got) <= HEADER_MAX_BYTES + BLOCK:
        block = src.read(64 * 1024)
        if not block:
            break
        got += block
        try:
            if any(isinstance(ev, Header) for ev in parser.feed(block)):
                break
        except BadBundle:
            break
    return bytes(got)


def _import(peer: _Peer, args: argparse.Namespace) -> int:
    node, _tier = _node_of(args.to, "--to")
    with peer.api() as api:
        url = peer.url_of(api, node)
    with ExitStack() as stack:
        if args.source == "-":
            src: BinaryIO = sys.stdin.buffer
            _wide_pipe(src)
            total = None
        else:
            src = stack.enter_context(open(args.source, "rb"))
            total = os.fstat(src.fileno()).st_size
        headers = {"content-type": "application/x-tar"}
        first = _header_entry(src)
        target = "/bundles?" + urlencode({"to": args.to})
        # Asked first with the header alone: a refusal (CONTENT_CONFLICT, IN_PROGRESS, a damaged
        # header) comes before gigabytes are sent.
        r = peer.stream("POST", target + "&check=true", [first], peer.timeout_s, url=url, headers=headers)
        stack.callback(r.close)
        if r.status >= 300:
            raise _answer_error(r)
        r.read()
        bar, advance = _progress("import", total)
        if bar is not None:
            stack.callback(bar.stop)
        # The node answers once every byte is verified and fsynced: no read timeout after the
        # body (an hour); but a node that reads nothing of it for a minute has stalled.
        r = peer.stream("POST", target, _blocks(first, src, advance), None, url=url, headers=headers,
                        send_timeout_s=max(STREAM_READ_TIMEOUT_S, peer.timeout_s))
        stack.callback(r.close)
        if r.status >= 300:
            raise _answer_error(r)
        out = json.loads(r.read())
        written = r.headers.get("x-mesh-token")
        if written:
            last_write.save(written)
    if args.json:
        print(json.dumps(out, indent=2))
        return EXIT_OK
    for m in out.get("models") or []:
        resumed = f", {m['chunks_resumed']} chunks kept from an earlier try" if m.get("chunks_resumed") else ""
        print(f"{m['status']}: {m['model_name']} on {m['device']} ({m['files']} files, "
              f"{human_bytes(m['size'])}{resumed})")
    return EXIT_OK


# -- ensure and release ----------------------------------------------------------------------


def _ensure(peer: _Peer, args: argparse.Namespace) -> int:
    if args.wait_timeout is not None and not args.wait:
        raise UsageError("--wait-timeout needs --wait")
    node, _tier = _node_of(args.on, "--on")
    holder = args.holder or default_holder()
    if not re.fullmatch(HOLDER_PATTERN, holder):
        raise UsageError(f"--holder {holder[:60]!r}: letters, digits and . _ : - (at most 128)")
    body: dict[str, Any] = {"model": args.name, "device": args.on, "holder": holder}
    if args.lease is not None:
        body["lease_s"] = args.lease
    started = _monotonic()
    deadline = None if args.wait_timeout is None else started + args.wait_timeout
    with peer.api() as first:
        url = peer.url_of(first, node)
    with peer.api(url) as api:
        for round_ in range(ENSURE_ROUNDS_MAX):
            if round_ >= 2:  # a copy made, yet not handed out (checked again after a change): not in a busy loop
                _sleep(POLL_INTERVAL_S)
                if deadline is not None and _monotonic() >= deadline:
                    return fail(f"TIMEOUT: the copy of {args.name} on {args.on} was not handed out within "
                                f"--wait-timeout {args.wait_timeout:g}s", EXIT_ERROR, "TIMEOUT")
            out = api.request("POST", "/ensure", json=body)
            if out.get("status") == "ready":
                if args.json:
                    print(json.dumps(out, indent=2))
                else:
                    print(out["path"])
                return EXIT_OK
            tid = out.get("transfer_id")
            if not args.wait:
                return fail(f"NOT_READY: the copy of {args.name} on {args.on} is being made ({out.get('why')}; "
                            f"transfer {tid}): add --wait to wait for it", EXIT_ERROR, "NOT_READY",
                            transfer_id=tid)
            try:
                state = _follow(api, str(tid), deadline)
            except KeyboardInterrupt:
                print(f"stopped waiting; the copy goes on (transfer {tid})", file=sys.stderr)
                return EXIT_INTERRUPTED
            if state is None:
                return fail(f"TIMEOUT: the copy of {args.name} on {args.on} was not there after --wait-timeout "
                            f"{args.wait_timeout:g}s; it goes on (transfer {tid})", EXIT_ERROR, "TIMEOUT",
                            transfer_id=tid)
            if state.get("status") == "failed":
                err = state.get("error")
                code = err.get("code") if isinstance(err, dict) else None
                return fail(transfer_error(state), EXIT_ERROR, code, transfer_id=tid)
    return fail(f"the copy of {args.name} on {args.on} was made {ENSURE_ROUNDS_MAX} times and never handed out; "
                "the node's log says why", EXIT_ERROR)


def _follow(api: ApiClient, tid: str, deadline: float | None) -> dict[str, Any] | None:
    """The transfer once it ended; None at the deadline."""
    while True:
        try:
            state = api.request("GET", f"/transfers/{tid}")
        except AnswerError as e:
            if e.code != "TRANSFER_NOT_FOUND":
                raise
            state = {}
        if state.get("status") in ("done", "failed"):
            return dict(state)
        now = _monotonic()
        if deadline is not None and now >= deadline:
            return None
        _sleep(POLL_INTERVAL_S if deadline is None else max(0.0, min(POLL_INTERVAL_S, deadline - now)))


def _release(peer: _Peer, args: argparse.Namespace) -> int:
    node, _tier = _node_of(args.on, "--on")
    params = {"model": args.name, "device": args.on}
    if not args.all:
        params["holder"] = args.holder or default_holder()
    with peer.api() as first:
        url = peer.url_of(first, node)
    with peer.api(url) as api:
        out = api.request("DELETE", "/leases", params=params)
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        left = f"; still held by {', '.join(out['held_by'])}" if out.get("held_by") else ""
        print(f"released {out['model_name']} on {out['device']} ({', '.join(out['released'])}){left}")
    return EXIT_OK
