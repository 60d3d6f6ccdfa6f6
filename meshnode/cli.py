"""The ``meshnode`` console script.

``meshnode start`` runs a node (see ``meshnode.config`` and ``meshnode.node``);
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
from collections.abc import Callable
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from meshnode.client import (
    DEFAULT_PEER,
    DEFAULT_TIMEOUT_S,
    ApiClient,
    ApiError,
    ClientError,
    PeerUnreachableError,
    model_path,
    normalize_peer_url,
)

__all__ = ["build_parser", "main", "make_client"]

PROG = "meshnode"
EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 2
EXIT_INTERRUPTED = 130

_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
_LOG_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
_LOG_DATEFMT = "%Y-%m-%dT%H:%M:%S"
# Width for tables when stdout is not a terminal, so names are not folded.
_PIPE_WIDTH = 160

_STATE_STYLES = {
    "alive": "green",
    "suspect": "yellow",
    "dead": "red",
    "left": "dim",
    "online": "green",
    "offline": "red",
    "ready": "green",
    "available": "green",
    "downloading": "yellow",
    "pending": "yellow",
    "registered": "cyan",
    "failed": "red",
    "error": "red",
}

_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "t": 1000**4,
    "tb": 1000**4,
    "ki": 1024,
    "kib": 1024,
    "mi": 1024**2,
    "mib": 1024**2,
    "gi": 1024**3,
    "gib": 1024**3,
    "ti": 1024**4,
    "tib": 1024**4,
}


class UsageError(Exception):
    """A problem with what the user typed that argparse could not see."""


# -- the client factory (tests replace this) ---------------------------------


def make_client(base_url: str, token: str | None, timeout_s: float) -> ApiClient:
    """Build the ``ApiClient`` every client command uses.

    Module-level on purpose: tests swap it for one with an ``httpx.MockTransport``.
    """
    return ApiClient(base_url, token=token, timeout_s=timeout_s)


# -- small value helpers -------------------------------------------------------


def human_bytes(value: Any) -> str:
    """``1536`` -> ``"1.5 KiB"``; anything that is not a number -> ``"-"``."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return "-"
    n = float(value)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{int(n)} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def parse_bytes(text: str) -> int:
    """``"16GiB"``, ``"16G"``, ``"1500000"`` -> bytes (argparse type)."""
    raw = text.strip().lower().replace(" ", "").replace("_", "")
    number = raw.rstrip("kmgtib")
    unit = raw[len(number) :]
    if unit not in _SIZE_UNITS or not number:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (try 16GiB or 17179869184)")
    try:
        value = float(number)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"size must not be negative: {text!r}")
    return int(value * _SIZE_UNITS[unit])


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


def _styled(value: Any) -> Text:
    text = "-" if value is None else str(value)
    return Text(text, style=_STATE_STYLES.get(text.lower(), ""))


def _names(items: Any) -> list[str]:
    """Lists of strings or of dicts (``{"device": ...}``, ``{"node_id": ...}``) -> strings."""
    if not isinstance(items, list):
        return []
    out: list[str] = []
    for item in items:
        if isinstance(item, dict):
            for key in ("device", "model_name", "name", "node_id", "id", "url", "endpoint"):
                if item.get(key) is not None:
                    out.append(str(item[key]))
                    break
            else:
                out.append(json.dumps(item, sort_keys=True))
        else:
            out.append(str(item))
    return out


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _console() -> Console:
    console = Console(file=sys.stdout, highlight=False)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console = Console(file=sys.stdout, highlight=False, width=_PIPE_WIDTH)
    return console


# -- renderers (one per command; each gets the decoded JSON) -------------------


def render_status(console: Console, data: Any, args: argparse.Namespace) -> None:
    data = _dict(data)
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    grid.add_row("node", str(data.get("node_id", "-")))
    grid.add_row("cluster", str(data.get("cluster", "-")))
    nodes = _dict(data.get("nodes"))
    counts = Text()
    for state in ("alive", "suspect", "dead", "left"):
        if counts:
            counts.append("  ")
        counts.append(f"{nodes.get(state, 0)} {state}", style=_STATE_STYLES[state])
    grid.add_row("nodes", Text(f"{nodes.get('total', 0)} total  ").append_text(counts))
    models = _dict(data.get("models"))
    grid.add_row(
        "models",
        f"{models.get('total', 0)} total  {models.get('replicated', 0)} replicated  "
        f"{models.get('single_node', 0)} on a single node",
    )
    for device, info in sorted(_dict(data.get("storage")).items()):
        if isinstance(info, dict) and ("total" in info or "free" in info):
            grid.add_row(
                f"storage {device}",
                f"{human_bytes(info.get('free'))} free of {human_bytes(info.get('total'))} "
                f"({human_bytes(info.get('used'))} used)",
            )
    for extra in ("services", "jobs"):
        section = data.get(extra)
        if isinstance(section, dict) and section:
            grid.add_row(extra, "  ".join(f"{v} {k}" for k, v in section.items()))
        elif isinstance(section, int) and not isinstance(section, bool):
            grid.add_row(extra, str(section))
    console.print(grid)


def render_nodes(console: Console, data: Any, args: argparse.Namespace) -> None:
    data = _dict(data)
    nodes = data.get("nodes") or []
    table = Table(title=f"nodes ({data.get('total_count', len(nodes))})", title_justify="left")
    table.add_column("node", no_wrap=True)
    table.add_column("address", no_wrap=True)
    table.add_column("state")
    table.add_column("models", justify="right")
    table.add_column("gpus", justify="right")
    table.add_column("disk free", justify="right")
    for node in nodes:
        node = _dict(node)
        disk = _dict(_dict(node.get("storage")).get("disk"))
        models = node.get("models")
        gpus = node.get("gpus")
        table.add_row(
            str(node.get("node_id", "-")),
            str(node.get("address", "-")),
            _styled(node.get("state")),
            str(len(models)) if isinstance(models, list) else "-",
            str(len(gpus)) if isinstance(gpus, list) else "-",
            human_bytes(disk.get("free")),
        )
    console.print(table)


def render_list(console: Console, data: Any, args: argparse.Namespace) -> None:
    data = _dict(data)
    models = data.get("models") or []
    table = Table(title=f"models ({data.get('total_count', len(models))})", title_justify="left")
    table.add_column("model", no_wrap=True)
    table.add_column("type")
    table.add_column("size", justify="right")
    table.add_column("locations")
    table.add_column("services", justify="right")
    table.add_column("status")
    for model in models:
        model = _dict(model)
        services = model.get("services")
        table.add_row(
            str(model.get("model_name", "-")),
            str(model.get("model_type", "-")),
            human_bytes(model.get("size")),
            ", ".join(_names(model.get("locations"))) or "-",
            str(len(services)) if isinstance(services, list) else "-",
            _styled(model.get("status")),
        )
    console.print(table)


def render_info(console: Console, data: Any, args: argparse.Namespace) -> None:
    data = _dict(data)
    metadata = _dict(data.get("metadata"))
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column()
    grid.add_row("model", Text(str(data.get("model_name", args.name)), style="bold"))
    grid.add_row("type", str(data.get("model_type", "-")))
    grid.add_row("status", _styled(data.get("status")))
    grid.add_row("size", human_bytes(data.get("size")))
    grid.add_row("source", str(data.get("source_url") or "-"))
    grid.add_row("registered by", str(data.get("registered_by") or "-"))
    grid.add_row("description", str(metadata.get("description") or "-"))
    tags = metadata.get("tags")
    grid.add_row(
        "tags", ", ".join(str(t) for t in tags) if isinstance(tags, list) and tags else "-"
    )
    requirements = _dict(metadata.get("requirements"))
    if requirements:
        parts = []
        for key, value in requirements.items():
            shown = human_bytes(value) if key in ("min_memory", "min_vram") else str(value)
            parts.append(f"{key}={shown}")
        grid.add_row("requirements", "  ".join(parts))
    console.print(grid)

    locations = data.get("locations")
    if isinstance(locations, list) and locations:
        table = Table(title="copies", title_justify="left")
        table.add_column("device", no_wrap=True)
        table.add_column("manifest")
        table.add_column("status")
        for loc in locations:
            if isinstance(loc, dict):
                digest = loc.get("manifest_hash") or loc.get("manifest") or "-"
                table.add_row(
                    str(loc.get("device", "-")), str(digest)[:16], _styled(loc.get("status"))
                )
            else:
                table.add_row(str(loc), "-", Text("-"))
        console.print(table)
    else:
        console.print("copies: none")

    services = data.get("services")
    if isinstance(services, list) and services:
        table = Table(title="services", title_justify="left")
        table.add_column("node", no_wrap=True)
        table.add_column("endpoint")
        table.add_column("status")
        for svc in services:
            if isinstance(svc, dict):
                endpoint = svc.get("url") or svc.get("endpoint") or svc.get("port") or "-"
                table.add_row(
                    str(svc.get("node_id") or svc.get("device") or "-"),
                    str(endpoint),
                    _styled(svc.get("status")),
                )
            else:
                table.add_row(str(svc), "-", Text("-"))
        console.print(table)


def render_register(console: Console, data: Any, args: argparse.Namespace) -> None:
    console.print(f"registered model {args.name!r}")


def render_unregister(console: Console, data: Any, args: argparse.Namespace) -> None:
    suffix = " and purged every copy" if args.purge else ""
    console.print(f"unregistered model {args.name!r}{suffix}")


def render_availability(console: Console, data: Any, args: argparse.Namespace) -> None:
    data = _dict(data)
    nodes = _dict(data.get("nodes"))
    table = Table(
        title=f"availability (catalog: {data.get('total_models', 0)} models)", title_justify="left"
    )
    table.add_column("node", no_wrap=True)
    table.add_column("address", no_wrap=True)
    table.add_column("online")
    table.add_column("models", justify="right")
    table.add_column("pools")
    for key in sorted(nodes):
        node = _dict(nodes[key])
        online = node.get("online")
        models = node.get("models")
        table.add_row(
            str(node.get("node_id", key)),
            str(node.get("address", "-")),
            Text("yes", style="green") if online else Text("no", style="red"),
            str(len(models)) if isinstance(models, list) else "-",
            ", ".join(_names(node.get("pools"))) or "-",
        )
    console.print(table)
    replicated = _names(data.get("replicated_models"))
    single = _names(data.get("single_node_models"))
    console.print(f"replicated ({len(replicated)}): {', '.join(replicated) or '-'}")
    single_line = Text(f"single node ({len(single)}): {', '.join(single) or '-'}")
    if single:
        single_line.stylize("yellow")
    console.print(single_line)


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
    except (UsageError, ValueError) as exc:
        return _fail(str(exc), EXIT_USAGE, token)

    _help, call, render = _COMMANDS[args.command]
    try:
        with make_client(peer, token, timeout_s) as api:
            data = call(api, args)
    except PeerUnreachableError as exc:
        return _fail(str(exc), EXIT_UNREACHABLE, token)
    except (ApiError, ClientError) as exc:
        return _fail(str(exc), EXIT_ERROR, token)

    if args.json:
        print(json.dumps(data, indent=2, ensure_ascii=False))
        return EXIT_OK
    try:
        render(_console(), data, args)
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        return _fail(
            f"unexpected response from peer {peer} for {args.command}: {type(exc).__name__}: {exc}"
            " (try --json)",
            EXIT_ERROR,
            token,
        )
    return EXIT_OK


def run_start(args: argparse.Namespace) -> int:
    from meshnode.node import main_start

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
