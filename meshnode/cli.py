"""The ``meshnode`` console script.

``meshnode start`` runs a node (see ``meshnode.config`` and ``meshnode.daemon``);
every other command talks HTTP to one peer, which answers for the whole mesh.

Exit codes: 0 success; 1 the peer answered with an error or something else
went wrong (one line on stderr); 2 bad usage or the peer could not be reached;
130 interrupted.  Logging is configured here and only here.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console

from meshnode.client import (
    DEFAULT_PEER,
    DEFAULT_TIMEOUT_S,
    AnswerError,
    ApiClient,
    ClientError,
    PeerUnreachableError,
    model_path,
    normalize_peer_url,
)
from meshnode.config import parse_size
from meshnode.render import (
    PROG,
    TRANSFER_FINAL,
    TransferBar,
    as_dict,
    as_number,
    follow_hint,
    human_bytes,
    human_duration,
    name_list,
    render_availability,
    render_info,
    render_list,
    render_nodes,
    render_register,
    render_status,
    render_transfer,
    render_transfer_started,
    render_transfers,
    render_unregister,
    stderr_console,
    stdout_console,
    transfer_error,
    transfer_target,
)

__all__ = ["build_parser", "main", "make_client"]

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 2
EXIT_INTERRUPTED = 130

_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
_LOG_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
_LOG_DATEFMT = "%Y-%m-%dT%H:%M:%S"


# Following a transfer (``--wait``): tests replace the clock and the sleep.
POLL_INTERVAL_S = 0.5
# GET /transfers/{id} on a peer that is not the target may answer 404 until
# gossip brings the transfer there; that long after the POST it means "queued".
NOT_FOUND_GRACE_S = 5.0
_sleep: Callable[[float], None] = time.sleep
_monotonic: Callable[[], float] = time.monotonic


class UsageError(Exception):
    """A problem with what the user typed that argparse could not see."""


# -- the client factory (tests replace this) ---------------------------------


def make_client(base_url: str, token: str | None, timeout_s: float) -> ApiClient:
    """Build the ``ApiClient`` every client command uses.

    Module-level on purpose: tests swap it for one with an ``httpx.MockTransport``.
    """
    return ApiClient(base_url, token=token, timeout_s=timeout_s)


# -- small value helpers -------------------------------------------------------




def parse_bytes(text: str) -> int:
    """``"16GiB"``, ``"16G"``, ``"1500000"`` -> bytes (argparse type)."""
    try:
        return int(parse_size(text))
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive: {text!r}")
    return value


def _log_level(text: str) -> str:
    level = text.strip().upper()
    if level not in _LOG_LEVELS:
        raise argparse.ArgumentTypeError(
            f"unknown log level {text!r} (one of {', '.join(_LOG_LEVELS)})"
        )
    return level










# -- renderers (one per command; each gets the decoded JSON) -------------------






















# -- transfers -----------------------------------------------------------------
































def _print_ndjson(state: dict[str, Any]) -> None:
    print(json.dumps(state, ensure_ascii=False, sort_keys=True), flush=True)


def wait_for_transfer(
    api: ApiClient, first: Any, args: argparse.Namespace, token: str | None
) -> int:
    """Poll ``GET /transfers/{id}`` on the same peer until the transfer is done
    (exit 0) or failed (exit 1), ``--wait-timeout`` passes (1) or Ctrl-C (130).

    A bar on stderr when it is a terminal; with ``--json`` one JSON object per
    answer on stdout, the POST's answer first and the final state last.
    """
    state = as_dict(first)
    tid = state.get("transfer_id")
    if not isinstance(tid, str) or not tid:
        return _fail(
            f"the peer's answer to {args.command} names no transfer_id, so there is nothing "
            "to wait for (try --json)",
            EXIT_ERROR,
            token,
        )
    hint = follow_hint(tid, args)
    where = f"on node {state.get('node_id') or 'its target'}"
    started = _monotonic()
    deadline = None if args.wait_timeout is None else started + args.wait_timeout
    if args.json:
        _print_ndjson(state)
    err_console = stderr_console()
    bar = TransferBar(err_console, state) if not args.json and err_console.is_terminal else None
    try:
        while state.get("status") not in TRANSFER_FINAL:
            if "status" not in state:
                return _fail(
                    f"unexpected answer about transfer {tid}: no status (try `{hint} --json`)",
                    EXIT_ERROR,
                    token,
                )
            now = _monotonic()
            if deadline is not None and now >= deadline:
                return _fail(
                    f"transfer {tid} still {state.get('status')} after --wait-timeout "
                    f"{args.wait_timeout:g}s; it continues {where}: follow it with `{hint}`",
                    EXIT_ERROR,
                    token,
                )
            pause = POLL_INTERVAL_S if deadline is None else min(POLL_INTERVAL_S, deadline - now)
            _sleep(max(0.0, pause))
            try:
                answer = api.get_transfer(tid)
            except AnswerError as exc:
                if (
                    exc.status == 404
                    and exc.code == "TRANSFER_NOT_FOUND"
                    and _monotonic() - started < NOT_FOUND_GRACE_S
                ):
                    continue  # not gossiped to this peer yet: still queued
                raise
            state = as_dict(answer)
            if args.json:
                _print_ndjson(state)
            if bar is not None:
                bar.update(state)
    except KeyboardInterrupt:
        if bar is not None:
            bar.stop()
            bar = None
        print(
            f"{PROG}: stopped waiting; transfer {tid} continues {where}: follow it with `{hint}`",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
    except PeerUnreachableError as exc:
        return _fail(
            f"{exc}; transfer {tid} may continue {where}: `{hint}`", EXIT_UNREACHABLE, token
        )
    except ClientError as exc:
        return _fail(f"{exc} (while following transfer {tid}: `{hint}`)", EXIT_ERROR, token)
    finally:
        if bar is not None:
            bar.stop()

    if state.get("status") == "failed":
        return _fail(
            f"{transfer_error(state)} (transfer {tid}: {transfer_target(state)})", EXIT_ERROR, token
        )
    if not args.json:
        elapsed: Any = None
        start_ms, end_ms = as_number(state.get("started_ms")), as_number(state.get("finished_ms"))
        if start_ms and end_ms and end_ms >= start_ms:
            elapsed = (end_ms - start_ms) / 1000
        took = human_duration(elapsed if elapsed is not None else _monotonic() - started)
        details = [f"{human_bytes(state.get('bytes_total'))} in {took}"]
        sources = name_list(state.get("sources"))
        if sources:
            details.append(f"from {', '.join(sources)}")
        if "chunks_fetched" in state:  # a peer that is not the target may not know
            details.append(
                f"{state.get('chunks_fetched')} chunks fetched, "
                f"{state.get('chunks_resumed', 0)} resumed"
            )
        summary = f"transfer {tid} done: {transfer_target(state)} ({'; '.join(details)})"
        stdout_console().print(summary, soft_wrap=True)
        if state.get("note"):
            stdout_console().print(f"note: {state['note']}", soft_wrap=True)
    return EXIT_OK


# -- client command plumbing ---------------------------------------------------

Call = Callable[[ApiClient, argparse.Namespace], Any]
Render = Callable[[Console, Any, argparse.Namespace], None]


def _requirements(args: argparse.Namespace) -> dict[str, Any]:
    req: dict[str, Any] = {}
    if args.min_memory is not None:
        req["min_memory"] = args.min_memory
    if args.min_vram is not None:
        req["min_vram"] = args.min_vram
    if args.gpu_arch:
        req["gpu_arch"] = args.gpu_arch
    return req


def _tags(text: str | None) -> list[str]:
    if not text:
        return []
    return [t.strip() for t in text.split(",") if t.strip()]


def _call_register(api: ApiClient, args: argparse.Namespace) -> Any:
    return api.register_model(
        args.name,
        model_type=args.type,
        source_url=args.url,
        description=args.desc,
        tags=_tags(args.tags),
        requirements=_requirements(args),
    )


def file_url(path: str) -> str:
    """``--from PATH`` -> ``file:///abs/path``: the path is on the target node, but a
    relative one (or ``~``) is made absolute here, against this shell's directory."""
    if not path.strip():
        raise UsageError("--from: the path is empty")
    return Path(os.path.abspath(os.path.expanduser(path))).as_uri()


def _call_download(api: ApiClient, args: argparse.Namespace) -> Any:
    if args.source is not None:
        return api.download_model(args.name, target_device=args.to, source=args.source)
    return api.download_model(
        args.name,
        target_device=args.to,
        source="web",
        source_url=args.source_url,
        revision=args.revision,
        allow_patterns=args.include,
        ignore_patterns=args.exclude,
    )


def _prepare(args: argparse.Namespace) -> None:
    """Checks and conversions that need no peer (raise ``UsageError``)."""
    if getattr(args, "wait_timeout", None) is not None and not getattr(args, "wait", False):
        raise UsageError("--wait-timeout needs --wait")
    if args.command == "download":
        args.source_url = file_url(args.from_path) if args.from_path is not None else args.url
    if args.command == "transfer" and not args.transfer_id.strip():
        raise UsageError("transfer id is empty")


_COMMANDS: dict[str, tuple[str, Call, Render]] = {
    "status": ("the mesh at a glance", lambda api, a: api.status(), render_status),
    "nodes": ("every known node", lambda api, a: api.nodes(), render_nodes),
    "list": ("every registered model", lambda api, a: api.list_models(), render_list),
    "info": (
        "one model: registration, copies, services",
        lambda api, a: api.get_model(a.name),
        render_info,
    ),
    "register": ("register a model in the catalog", _call_register, render_register),
    "unregister": (
        "remove a model from the catalog",
        lambda api, a: api.unregister_model(a.name, purge=a.purge),
        render_unregister,
    ),
    "availability": (
        "which node holds which model (llama-orch's view)",
        lambda api, a: api.availability(),
        render_availability,
    ),
    "download": (
        "fetch a model onto a device from a path, a URL or another copy",
        _call_download,
        render_transfer_started,
    ),
    "copy": (
        "copy a model onto a device (from a given copy or any holder)",
        lambda api, a: api.copy_model(a.name, to_device=a.to, from_device=a.from_device),
        render_transfer_started,
    ),
    "move": (
        "move a model's copy to another device (copy, then drop the source)",
        lambda api, a: api.move_model(a.name, from_device=a.from_device, to_device=a.to),
        render_transfer_started,
    ),
    "transfers": (
        "every transfer the mesh knows of",
        lambda api, a: api.transfers(),
        render_transfers,
    ),
    "transfer": (
        "one transfer: progress, sources, error",
        lambda api, a: api.get_transfer(a.transfer_id),
        render_transfer,
    ),
}


def _resolve_token(
    args: argparse.Namespace, environ: dict[str, str] | os._Environ[str]
) -> str | None:
    if args.token:
        return str(args.token).strip() or None
    path = args.token_file
    if not path and not environ.get("MESHNODE_TOKEN"):
        path = environ.get("MESHNODE_TOKEN_FILE")
    if path:
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except OSError as exc:
            raise UsageError(f"cannot read token file {path}: {exc.strerror or exc}") from None
        # A file may hold a comma- or newline-separated list (the server's
        # rotation format); a client sends the first.
        tokens = [t.strip() for t in text.replace("\n", ",").split(",") if t.strip()]
        if not tokens:
            raise UsageError(f"token file {path} is empty")
        return tokens[0]
    return environ.get("MESHNODE_TOKEN", "").strip() or None


def _resolve_timeout(args: argparse.Namespace, environ: dict[str, str] | os._Environ[str]) -> float:
    if args.timeout is not None:
        return float(args.timeout)
    text = environ.get("MESHNODE_TIMEOUT")
    if not text:
        return DEFAULT_TIMEOUT_S
    try:
        return _positive_float(text)
    except argparse.ArgumentTypeError as exc:
        raise UsageError(f"MESHNODE_TIMEOUT: {exc}") from None


def _redact(text: str, secret: str | None) -> str:
    if secret:
        text = text.replace(secret, "***")
    return text


def _fail(message: str, code: int, secret: str | None = None) -> int:
    print(f"{PROG}: error: {_redact(message, secret)}", file=sys.stderr)
    return code


def run_client_command(args: argparse.Namespace) -> int:
    """Run one HTTP command against ``--peer``; return the exit code."""
    environ = os.environ
    token: str | None = None
    try:
        token = _resolve_token(args, environ)
        peer = normalize_peer_url(args.peer or environ.get("MESHNODE_PEER") or DEFAULT_PEER)
        timeout_s = _resolve_timeout(args, environ)
        if getattr(args, "name", None) is not None:
            model_path(args.name)  # reject impossible names before any I/O
        _prepare(args)
    except (UsageError, ValueError) as exc:
        return _fail(str(exc), EXIT_USAGE, token)

    _help, call, render = _COMMANDS[args.command]
    try:
        with make_client(peer, token, timeout_s) as api:
            data = call(api, args)
            if getattr(args, "wait", False):
                return wait_for_transfer(api, data, args, token)
    except PeerUnreachableError as exc:
        return _fail(str(exc), EXIT_UNREACHABLE, token)
    except (AnswerError, ClientError) as exc:
        return _fail(str(exc), EXIT_ERROR, token)

    if args.json:
        print(json.dumps(data, indent=2, ensure_ascii=False))
        return EXIT_OK
    try:
        render(stdout_console(), data, args)
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        return _fail(
            f"unexpected response from peer {peer} for {args.command}: {type(exc).__name__}: {exc}"
            " (try --json)",
            EXIT_ERROR,
            token,
        )
    return EXIT_OK


def run_start(args: argparse.Namespace) -> int:
    from meshnode.daemon import main_start

    return main_start(args)


# -- parser --------------------------------------------------------------------


def _logging_parent() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument(
        "--log-level",
        type=_log_level,
        default=argparse.SUPPRESS,
        metavar="LEVEL",
        help=f"one of {', '.join(_LOG_LEVELS)} (env MESHNODE_LOG_LEVEL, default INFO)",
    )
    return p


def _client_parent() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("peer")
    g.add_argument(
        "--peer",
        metavar="URL",
        help=f"peer to ask: URL or HOST:PORT (env MESHNODE_PEER, default {DEFAULT_PEER})",
    )
    tok = g.add_mutually_exclusive_group()
    tok.add_argument("--token", metavar="TOKEN", help="API bearer token (env MESHNODE_TOKEN)")
    tok.add_argument(
        "--token-file",
        metavar="PATH",
        help="read the API token from a file (env MESHNODE_TOKEN_FILE)",
    )
    g.add_argument(
        "--timeout",
        type=_positive_float,
        metavar="SECONDS",
        help=f"HTTP timeout (env MESHNODE_TIMEOUT, default {DEFAULT_TIMEOUT_S:g})",
    )
    g.add_argument("--json", action="store_true", help="print the raw JSON response (for scripts)")
    return p


def build_parser() -> argparse.ArgumentParser:
    logging_parent = _logging_parent()
    client_parent = _client_parent()
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="A peer-to-peer mesh of nodes that keeps ML model weights where a GPU "
        "cluster needs them. `start` runs a node; every other command asks one peer.",
        parents=[logging_parent],
    )
    try:
        from meshnode import __version__ as version
    except ImportError:  # pragma: no cover - the package always has one
        version = "unknown"
    parser.add_argument("--version", action="version", version=f"{PROG} {version}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    start = sub.add_parser("start", help="run a node in the foreground", parents=[logging_parent])
    try:
        from meshnode.config import add_start_arguments
    except ImportError:
        pass
    else:
        add_start_arguments(start)
    start.set_defaults(handler=run_start)

    def client(name: str) -> argparse.ArgumentParser:
        help_text = _COMMANDS[name][0]
        p = sub.add_parser(
            name, help=help_text, description=help_text, parents=[logging_parent, client_parent]
        )
        p.set_defaults(handler=run_client_command)
        return p

    client("status")
    client("nodes")
    client("list")
    client("info").add_argument("name", metavar="NAME", help="model name, e.g. owner/model")

    reg = client("register")
    reg.add_argument("name", metavar="NAME", help="model name, e.g. owner/model")
    reg.add_argument("--type", required=True, metavar="T", help="model type, e.g. llm, diffusion")
    reg.add_argument("--url", required=True, metavar="URL", help="where the weights come from")
    reg.add_argument(
        "--desc", "--description", dest="desc", required=True, metavar="D", help="description"
    )
    reg.add_argument("--tags", metavar="A,B", help="comma-separated tags")
    reg.add_argument(
        "--min-memory", type=parse_bytes, metavar="BYTES", help="host memory needed (e.g. 32GiB)"
    )
    reg.add_argument(
        "--min-vram", type=parse_bytes, metavar="BYTES", help="GPU memory needed (e.g. 16GiB)"
    )
    reg.add_argument("--gpu-arch", metavar="ARCH", help="GPU architecture needed, e.g. sm_80")

    unreg = client("unregister")
    unreg.add_argument("name", metavar="NAME", help="model name, e.g. owner/model")
    unreg.add_argument("--purge", action="store_true", help="also delete every copy")

    client("availability")

    def waiting(p: argparse.ArgumentParser) -> None:
        g = p.add_argument_group("waiting")
        g.add_argument(
            "--wait",
            action="store_true",
            help="follow the transfer until it is done (exit 0) or failed (exit 1): a progress "
            "bar on stderr, or with --json one JSON object per poll on stdout (the last is final)",
        )
        g.add_argument(
            "--wait-timeout",
            type=_positive_float,
            metavar="SECONDS",
            help="with --wait, give up waiting after this long (exit 1; the transfer goes on)",
        )

    name_help = "model name, e.g. owner/model"
    device_help = "a device as NODE:DEVICE, e.g. gpu2:disk or gpu2:dram"

    dl = client("download")
    dl.add_argument("name", metavar="NAME", help=name_help)
    dl.add_argument("--to", required=True, metavar="NODE:DEVICE", help=f"target: {device_help}")
    src = dl.add_mutually_exclusive_group()
    src.add_argument(
        "--from",
        dest="from_path",
        metavar="PATH",
        help="a file or directory ON THE TARGET NODE, sent as file:///abs/path; a relative "
        "path (or ~) is made absolute here, against this shell's working directory",
    )
    src.add_argument(
        "--source", metavar="NODE:DEVICE", help="fetch from this node's copy instead of the web"
    )
    src.add_argument(
        "--url",
        metavar="URL",
        help="source URL, sent as is: https://..., hf://owner/name (default: the URL the "
        "model was registered with; an owner/name model with none is a Hugging Face repo)",
    )
    dl.add_argument("--revision", metavar="REV", help="Hugging Face branch, tag or commit (default main)")
    dl.add_argument("--include", action="append", metavar="GLOB", help="only files matching (repeatable)")
    dl.add_argument("--exclude", action="append", metavar="GLOB", help="skip files matching (repeatable)")
    waiting(dl)

    cp = client("copy")
    cp.add_argument("name", metavar="NAME", help=name_help)
    cp.add_argument("--to", required=True, metavar="NODE:DEVICE", help=f"target: {device_help}")
    cp.add_argument(
        "--from",
        dest="from_device",
        metavar="NODE:DEVICE",
        help="copy from this copy (default: any node that holds one)",
    )
    waiting(cp)

    mv = client("move")
    mv.add_argument("name", metavar="NAME", help=name_help)
    mv.add_argument(
        "--from", dest="from_device", required=True, metavar="NODE:DEVICE", help="source copy"
    )
    mv.add_argument("--to", required=True, metavar="NODE:DEVICE", help=f"target: {device_help}")
    waiting(mv)

    client("transfers")
    client("transfer").add_argument(
        "transfer_id", metavar="ID", help="transfer id, as download/copy/move print it"
    )
    return parser


# -- entry point ---------------------------------------------------------------


def configure_logging(level_name: str) -> None:
    level = getattr(logging, level_name)
    logging.basicConfig(level=level, format=_LOG_FORMAT, datefmt=_LOG_DATEFMT)
    # httpx logs every request at INFO; a CLI's stderr is for one-line errors.
    if level > logging.DEBUG:
        for name in ("httpx", "httpcore"):
            logging.getLogger(name).setLevel(logging.WARNING)


def _exit_code(code: object) -> int:
    if code is None:
        return EXIT_OK
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return EXIT_ERROR


def main(argv: list[str] | None = None) -> int:
    """Run the ``meshnode`` command line; return the process exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version and usage errors
        return _exit_code(exc.code)

    level = getattr(args, "log_level", None) or os.environ.get("MESHNODE_LOG_LEVEL") or "INFO"
    try:
        level = _log_level(level)
    except argparse.ArgumentTypeError as exc:
        return _fail(f"MESHNODE_LOG_LEVEL: {exc}", EXIT_USAGE)
    configure_logging(level)

    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return handler(args)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # `meshnode list | head`: the reader left; say nothing more, and keep
        # Python from complaining again when it flushes stdout at exit.
        _silence_stdout()
        return EXIT_ERROR


def _silence_stdout() -> None:
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # not a real file (tests, embedding)
        pass
