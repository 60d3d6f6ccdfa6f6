"""The ``meshnode`` argument parser: ``start`` and every client command."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from .. import __version__
from ..config import add_start_arguments
from .bundles import add_bundle_commands
from .client import DEFAULT_PEER, DEFAULT_TIMEOUT_S
from .commands import COMMANDS, run_client_command, run_start
from .jobs import run_example
from .render import PROG
from .values import LOG_LEVELS, log_level, parse_bytes, positive_float, positive_int, replica_count

__all__ = ["build_parser", "client_defaults"]

_Client = Callable[[str], argparse.ArgumentParser]  # a client command's parser, added by its name
_NAME_HELP = "model name, e.g. owner/model"
_DEVICE_HELP = "a device as NODE:DEVICE, e.g. gpu2:disk or gpu2:dram"


def _logging_parent() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument(
        "--log-level",
        type=log_level,
        default=argparse.SUPPRESS,
        metavar="LEVEL",
        help=f"one of {', '.join(LOG_LEVELS)} (env MESHNODE_LOG_LEVEL, default INFO)",
    )
    p.add_argument(
        "--log-format",
        choices=("text", "json"),
        default=argparse.SUPPRESS,
        help="text lines, or one JSON object a line for log pipelines (env MESHNODE_LOG_FORMAT, default text)",
    )
    return p


def _client_parent() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("peer")
    # SUPPRESS: the flags work before the verb and after it, and a value given
    # before it is not overwritten by the subcommand's default (see client_defaults).
    g.add_argument(
        "--peer",
        default=argparse.SUPPRESS,
        metavar="URL",
        help=f"peer to ask: URL or HOST:PORT (env MESHNODE_PEER, default {DEFAULT_PEER})",
    )
    tok = g.add_mutually_exclusive_group()
    tok.add_argument("--token", default=argparse.SUPPRESS, metavar="TOKEN", help="API bearer token (env MESHNODE_TOKEN)")
    tok.add_argument(
        "--token-file",
        default=argparse.SUPPRESS,
        metavar="PATH",
        help="read the API token from a file (env MESHNODE_TOKEN_FILE)",
    )
    g.add_argument(
        "--timeout",
        type=positive_float,
        default=argparse.SUPPRESS,
        metavar="SECONDS",
        help=f"HTTP timeout (env MESHNODE_TIMEOUT, default {DEFAULT_TIMEOUT_S:g})",
    )
    g.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                   help="print the raw JSON response, and errors as {\"error\": {\"code\", \"message\"}} on stderr (for scripts)")
    g.add_argument("--cacert", default=argparse.SUPPRESS, metavar="PEM",
                   help="CA bundle to verify an https peer with (env MESHNODE_CACERT; default: the system's)")
    g.add_argument("--cert", default=argparse.SUPPRESS, metavar="PEM",
                   help="client certificate, for a node started with --tls-ca (env MESHNODE_CERT)")
    g.add_argument("--key", default=argparse.SUPPRESS, metavar="PEM",
                   help="the client certificate's private key (env MESHNODE_KEY; default: in --cert)")
    return p


_CLIENT_DEFAULTS = {"peer": None, "token": None, "token_file": None, "timeout": None, "json": False,
                    "cacert": None, "cert": None, "key": None}


def client_defaults(args: argparse.Namespace) -> str | None:
    """Fill in the peer flags not given before or after the verb; a problem
    argparse cannot see across the two places (both --token and
    --token-file), or None."""
    for name, default in _CLIENT_DEFAULTS.items():
        if not hasattr(args, name):
            setattr(args, name, default)
    if args.token is not None and args.token_file is not None:
        return "argument --token-file: not allowed with argument --token"
    return None


def build_parser() -> argparse.ArgumentParser:
    logging_parent = _logging_parent()
    client_parent = _client_parent()
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="A peer-to-peer mesh of nodes that keeps ML model weights where a GPU "
        "cluster needs them. `start` runs a node; every other command asks one peer.",
        parents=[logging_parent, client_parent],
        # Whole flag names only before the verb: its own flags (`--to`) must not
        # be read as an abbreviation of ours (`--token`).
        allow_abbrev=False,
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    start = sub.add_parser("start", help="run a node in the foreground", parents=[logging_parent])
    add_start_arguments(start)
    start.set_defaults(handler=run_start)

    def client(name: str) -> argparse.ArgumentParser:
        help_text = COMMANDS[name][0]
        p = sub.add_parser(
            name, help=help_text, description=help_text, parents=[logging_parent, client_parent]
        )
        p.set_defaults(handler=run_client_command)
        return p

    _model_commands(client)
    _transfer_commands(client)
    _job_commands(client, sub, logging_parent)
    _serving_commands(client)
    add_bundle_commands(sub, [logging_parent, client_parent])  # export, import, ensure, release
    return parser


def _model_commands(client: _Client) -> None:
    """The cluster and its models: status, nodes, list, info, register, unregister, delete, pin, unpin, availability."""
    client("status")
    client("nodes").add_argument("--verbose", "-v", action="store_true",
                                 help="each node's generation, labels, last change, storage and GPUs (gswarm's form)")
    client("list").add_argument("--verbose", "-v", action="store_true",
                                help="each model's copies and services in full (gswarm's form)")
    client("info").add_argument("name", metavar="NAME", help="model name, e.g. owner/model")

    reg = client("register")
    reg.add_argument("name", metavar="NAME", help="model name, e.g. owner/model")
    reg.add_argument("--type", metavar="T", help="model type, e.g. llm, diffusion")
    reg.add_argument("--url", metavar="URL", help="where the weights come from")
    reg.add_argument("--desc", "--description", dest="desc", metavar="D", help="description")
    reg.add_argument("--tags", metavar="A,B", help="comma-separated tags")
    reg.add_argument(
        "--min-memory", type=parse_bytes, metavar="BYTES", help="host memory needed (e.g. 32GiB)"
    )
    reg.add_argument(
        "--min-vram", type=parse_bytes, metavar="BYTES", help="GPU memory needed (e.g. 16GiB)"
    )
    reg.add_argument("--gpu-arch", metavar="ARCH", help="GPU architecture needed, e.g. sm_80, or several: sm_80,sm_90")

    unreg = client("unregister")
    unreg.add_argument("name", metavar="NAME", help="model name, e.g. owner/model")
    unreg.add_argument("--purge", action="store_true",
                       help="also delete every copy on every node (a node that is down does it when back)")
    unreg.add_argument("--force", action="store_true",
                       help="stop every service of the model first, then unregister it with --purge (gswarm's form)")

    dele = client("delete")
    dele.add_argument("name", metavar="NAME", help="model name, e.g. owner/model")
    dele.add_argument("--on", required=True, metavar="NODE:DEVICE", help="the device to free, e.g. gpu2:disk")

    pin = client("pin")
    pin.add_argument("name", metavar="NAME", help="model name, e.g. owner/model")
    pin.add_argument("--replicas", required=True, type=replica_count, metavar="N",
                     help="keep at least N copies (-1: one on every eligible node)")
    pin.add_argument("--max", type=replica_count, metavar="M",
                     help="and at most M (-1: every eligible node; default: N); nodes that join fill up to M")
    pin.add_argument("--tier", choices=("disk", "dram"), default="disk", help="where the copies live (default disk)")
    pin.add_argument("--labels", metavar="KEY=VALUE,...", help="only on nodes started with all these --labels")
    pin.add_argument("--spread", metavar="LABEL", help="spread the copies over this label's values, e.g. zone")
    unpin = client("unpin")
    unpin.add_argument("name", metavar="NAME", help="model name, e.g. owner/model")

    client("availability")


def _transfer_commands(client: _Client) -> None:
    """Copies moved: download, copy, move (each with the waiting flags), transfers, transfer."""
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
            type=positive_float,
            metavar="SECONDS",
            help="with --wait, give up waiting after this long (exit 1; the transfer goes on)",
        )
        g.add_argument(
            "-q", "--quiet",
            action="store_true",
            help="print only the transfer id, for scripts: id=$(meshnode copy ... -q)",
        )

    dl = client("download")
    dl.add_argument("name", metavar="NAME", help=_NAME_HELP)
    dl.add_argument("--to", required=True, metavar="NODE:DEVICE", help=f"target: {_DEVICE_HELP}")
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
        help="source URL, sent as is: https://..., hf://owner/name, s3://bucket/prefix (default: the URL the "
        "model was registered with; an owner/name model with none is a Hugging Face repo)",
    )
    dl.add_argument("--revision", metavar="REV", help="Hugging Face branch, tag or commit (default main)")
    dl.add_argument("--include", action="append", metavar="GLOB", help="only files matching (repeatable)")
    dl.add_argument("--exclude", action="append", metavar="GLOB", help="skip files matching (repeatable)")
    waiting(dl)

    cp = client("copy")
    cp.add_argument("name", metavar="NAME", help=_NAME_HELP)
    cp.add_argument("--to", required=True, metavar="NODE:DEVICE", help=f"target: {_DEVICE_HELP}")
    cp.add_argument(
        "--from",
        dest="from_device",
        metavar="NODE:DEVICE",
        help="copy from this copy (default: any node that holds one)",
    )
    waiting(cp)

    mv = client("move")
    mv.add_argument("name", metavar="NAME", help=_NAME_HELP)
    mv.add_argument(
        "--from", dest="from_device", required=True, metavar="NODE:DEVICE", help="source copy"
    )
    mv.add_argument("--to", required=True, metavar="NODE:DEVICE", help=f"target: {_DEVICE_HELP}")
    waiting(mv)

    client("transfers")
    tr = client("transfer")
    tr.add_argument("transfer_id", metavar="ID", help="transfer id, as download/copy/move print it")
    tr.add_argument("--cancel", action="store_true",
                    help="stop it (on the node that runs it): it fails CANCELLED and its partial files are removed")


def _job_commands(client: _Client, sub: argparse._SubParsersAction[argparse.ArgumentParser], logging_parent: argparse.ArgumentParser) -> None:
    """Pipelines: job, jobs, job-status, example, job-cancel."""
    job = client("job")
    job.add_argument("target", nargs="+", metavar="FILE | ID | cancel ID | example [NAME]",
                     help="a YAML or JSON pipeline to run, a job id to show, cancel ID, or example [NAME] "
                     "(deployment, multi-model, distributed-70b, migration) to print one")
    job.add_argument("--wait", action="store_true",
                     help="follow the job: a line per step as it changes, the table at the end; "
                     "exit 0 when it completed, 1 when it failed or was cancelled")
    client("jobs").add_argument("--status", choices=("pending", "running", "completed", "failed", "cancelled"),
                                help="only the jobs in this state (gswarm's form)")
    js = client("job-status")
    js.add_argument("job_id", metavar="ID", help="job id, as `meshnode job FILE` prints it")
    js.add_argument("--verbose", "-v", action="store_true",
                    help="every part of every step: its node, tries, transfer and progress (gswarm's form)")
    ex = sub.add_parser("example", help="write gswarm's four example pipelines as YAML files",
                        parents=[logging_parent])
    ex.add_argument("--output", required=True, metavar="DIR", help="the directory to write them to")
    ex.add_argument("--force", action="store_true", help="replace files that exist")
    ex.set_defaults(handler=run_example)
    client("job-cancel").add_argument("job_id", metavar="ID", help="job id, as `meshnode job FILE` prints it")


def _serving_commands(client: _Client) -> None:
    """Engines: serve, services, ps, top, stop-serve, placement."""
    sv = client("serve")
    sv.add_argument("name", metavar="MODEL", help=_NAME_HELP)
    sv.add_argument("--on", required=True, metavar="NODE:GPU[,NODE:GPU]", help="the GPUs, e.g. gpu1:gpu0 (one node)")
    sv.add_argument("--port", type=int, metavar="PORT", help="the engine's port (default: one of the node's range)")
    sv.add_argument("--engine", choices=("vllm", "llama.cpp", "sglang", "tgi", "command"),
                    help="default: llama.cpp for a .gguf model, else vllm")
    sv.add_argument("--command", dest="command_line", metavar="'PROG ARGS'", help="with --engine command: the program and its arguments "
                    "({model_dir}, {port}, {host}, {model_name}, {gpus} are filled in)")
    sv.add_argument("--arg", action="append", metavar="ARG", help="an argument passed to the engine (repeatable)")
    sv.add_argument("--health-path", metavar="PATH", help="the engine's liveness path (default /health; an engine "
                    "that answers 404 there is ready once /v1/models lists the model)")
    sv.add_argument("--wait", action="store_true", help="wait until it is healthy (exit 0) or has failed (exit 1, "
                    "with its log's end)")
    client("services")
    client("ps")
    top = client("top")
    top.add_argument("--interval", type=positive_float, default=2.0, metavar="SECONDS",
                     help="seconds between frames (default 2)")
    top.add_argument("--count", type=positive_int, default=None, metavar="N",
                     help="stop after N frames (default: until Ctrl-C)")
    ss = client("stop-serve")
    ss.add_argument("name", metavar="MODEL", help=_NAME_HELP)
    ss.add_argument("--on", required=True, metavar="NODE", help="the node whose engines of MODEL stop")
    ss.add_argument("--port", type=int, metavar="PORT", help="only the one on this port")
    place = client("placement")
    place.add_argument("name", metavar="MODEL", help="model name")
    place.add_argument("--device", default="disk", choices=("disk", "dram", "gpu"), help="the tier (default disk)")
