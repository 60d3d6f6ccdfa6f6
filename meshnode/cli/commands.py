"""The client commands: what each asks the peer, and how its answer is shown.

``COMMANDS`` maps a command name to its help line, its call (``ApiClient``
method) and its renderer; ``run_client_command`` runs one of them.
"""

from __future__ import annotations

import argparse
import json
import os
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console

from protocol.replicas import InvalidPolicy, parse_labels

from . import last_write
from .client import (
    DEFAULT_PEER,
    DEFAULT_TIMEOUT_S,
    AnswerError,
    ApiClient,
    ClientError,
    NotAnApiError,
    PeerUnreachableError,
    check_token,
    model_path,
    normalize_peer_url,
)
from .jobs import (
    UsageProblem,
    call_job,
    example_text,
    follow_job,
    render_job,
    render_jobs,
    render_placement,
)
from .render import (
    EXIT_ERROR,
    EXIT_OK,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
    UsageError,
    fail,
    render_availability,
    render_delete,
    render_info,
    render_list,
    render_nodes,
    render_pin,
    render_register,
    render_status,
    render_transfer,
    render_transfer_started,
    render_transfers,
    render_unregister,
    stdout_console,
)
from .services import (
    call_serve,
    call_stop_serve,
    follow_service,
    render_service,
    render_services,
    render_stopped,
)
from .top import run_top
from .values import positive_float
from .waiting import wait_for_transfer

__all__ = ["COMMANDS", "file_url", "make_client", "run_client_command", "run_start"]


def make_client(base_url: str, token: str | None, timeout_s: float,
                verify: ssl.SSLContext | bool = True, client_cert: bool = False) -> ApiClient:
    """Build the ``ApiClient`` every client command uses.

    Module-level on purpose: tests swap it for one with an ``httpx.MockTransport``.
    """
    return ApiClient(base_url, token=token, timeout_s=timeout_s, verify=verify, client_cert=client_cert)


Call = Callable[[ApiClient, argparse.Namespace], Any]
Render = Callable[[Console, Any, argparse.Namespace], None]


def _requirements(args: argparse.Namespace) -> dict[str, Any]:
    req: dict[str, Any] = {}
    if args.min_memory is not None:
        req["min_memory"] = args.min_memory
    if args.min_vram is not None:
        req["min_vram"] = args.min_vram
    if args.gpu_arch:
        arches = _tags(args.gpu_arch)
        req["gpu_arch"] = arches[0] if len(arches) == 1 else arches
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


def _call_unregister(api: ApiClient, args: argparse.Namespace) -> Any:
    """``--force`` (gswarm's): every service of the model stopped, then unregistered with its copies purged."""
    stopped: list[Any] = []
    if args.force:
        services = api.request("GET", model_path(args.name) + "/services")
        nodes = sorted({str(s.get("node")) for s in (services.get("services") or []) if isinstance(s, dict)})
        for node in nodes:
            stopped += api.request("DELETE", model_path(args.name) + f"/services/{node}").get("stopped") or []
    out = api.unregister_model(args.name, purge=args.purge or args.force)
    if stopped and isinstance(out, dict):
        out["stopped_services"] = stopped
    return out


def _call_jobs(api: ApiClient, args: argparse.Namespace) -> Any:
    out = api.jobs()
    if args.status and isinstance(out, dict):
        jobs = [j for j in out.get("jobs") or [] if isinstance(j, dict) and j.get("status") == args.status]
        out = {**out, "jobs": jobs, "total_count": len(jobs)}
    return out


def _call_pin(api: ApiClient, args: argparse.Namespace) -> Any:
    policy: dict[str, Any] = {"min": args.replicas, "max": args.replicas if args.max is None else args.max,
                              "tier": args.tier}
    if args.labels:
        policy["labels"] = args.labels
    if args.spread:
        policy["spread"] = args.spread
    return api.pin_model(args.name, policy)


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
    if getattr(args, "quiet", False) and (args.wait or args.json):
        raise UsageError("--quiet prints the transfer id alone: it goes with neither --wait nor --json")
    if args.command == "download":
        args.source_url = file_url(args.from_path) if args.from_path is not None else args.url
    if args.command == "pin" and args.labels is not None:
        try:
            args.labels = parse_labels(args.labels)
        except InvalidPolicy as e:
            raise UsageError(f"--labels: {e}") from None
    if args.command == "transfer" and not args.transfer_id.strip():
        raise UsageError("transfer id is empty")
    if args.command == "job" and args.wait and args.target[0] in ("cancel", "example"):
        raise UsageError(f"--wait follows a job you run: not with job {args.target[0]}")


COMMANDS: dict[str, tuple[str, Call, Render]] = {
    "status": ("the mesh at a glance", lambda api, a: api.status(), render_status),
    "nodes": ("every known node", lambda api, a: api.nodes(), render_nodes),
    "list": ("every registered model", lambda api, a: api.list_models(), render_list),
    "info": (
        "one model: registration, copies, services",
        lambda api, a: api.get_model(a.name),
        render_info,
    ),
    "register": ("register a model in the catalog", _call_register, render_register),
    "unregister": ("remove a model from the catalog", _call_unregister, render_unregister),
    "delete": (
        "delete a model's copy on one device (the model stays registered)",
        lambda api, a: api.delete_from(a.name, a.on),
        render_delete,
    ),
    "pin": ("keep N copies of a model: the mesh adds and drops them, and heals itself", _call_pin, render_pin),
    "unpin": ("stop keeping copies of a model (they stay where they are)", lambda api, a: api.pin_model(a.name, None),
              render_pin),
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
        "one transfer: progress, sources, error; --cancel stops it",
        lambda api, a: api.cancel_transfer(a.transfer_id) if a.cancel else api.get_transfer(a.transfer_id),
        render_transfer,
    ),
    "job": ("run a pipeline (YAML or JSON), show or cancel a job, or print an example", call_job, render_job),
    "jobs": ("every job the mesh knows of", _call_jobs, render_jobs),
    "job-status": ("one job: its steps, their status and errors", lambda api, a: api.job(a.job_id), render_job),
    "job-cancel": ("cancel a job: running steps stop, pending ones are cancelled",
                   lambda api, a: api.cancel_job(a.job_id), render_job),
    "placement": (
        "where a step that names no node would run, and why not elsewhere",
        lambda api, a: api.placement(a.name, a.device),
        render_placement,
    ),
    "serve": ("start an engine serving a model on a node's GPUs", call_serve, render_service),
    "services": ("every engine the mesh runs", lambda api, a: api.all_pages("/services", "services"), render_services),
    "ps": ("every engine the mesh runs (as services)", lambda api, a: api.all_pages("/services", "services"),
           render_services),
    "stop-serve": ("stop a node's engines of a model", call_stop_serve, render_stopped),
    "top": ("the mesh live: nodes, GPUs, transfers, jobs, services, redrawn until Ctrl-C", run_top,
            lambda console, data, args: None),
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
        return positive_float(text)
    except argparse.ArgumentTypeError as exc:
        raise UsageError(f"MESHNODE_TIMEOUT: {exc}") from None


def _tls_context(args: argparse.Namespace, environ: dict[str, str] | os._Environ[str]) -> ssl.SSLContext | bool:
    """``--cacert``, ``--cert``, ``--key`` (or their variables) as one TLS
    context; True (the system's CAs, no client certificate) without them."""
    cacert = args.cacert or environ.get("MESHNODE_CACERT") or None
    cert = args.cert or environ.get("MESHNODE_CERT") or None
    key = args.key or environ.get("MESHNODE_KEY") or None
    if key and not cert:
        raise UsageError("--key needs --cert (the certificate it belongs to)")
    if not (cacert or cert):
        return True
    try:
        ctx = ssl.create_default_context(cafile=cacert)
    except (OSError, ssl.SSLError) as exc:
        raise UsageError(f"--cacert {cacert}: {getattr(exc, 'strerror', None) or exc}") from None
    if cert:
        try:
            ctx.load_cert_chain(cert, key)
        except (OSError, ssl.SSLError) as exc:
            raise UsageError(f"--cert {cert}{f' --key {key}' if key else ''}: "
                             f"{getattr(exc, 'strerror', None) or exc}") from None
    return ctx


def run_client_command(args: argparse.Namespace) -> int:
    """Run one HTTP command against ``--peer``; return the exit code."""
    if args.command == "job" and args.target[0] == "example":  # needs no peer
        if len(args.target) > 2:
            return fail("usage: meshnode job example [NAME]", EXIT_USAGE)
        try:
            print(example_text(args.target[1] if len(args.target) == 2 else "deployment"), end="")
        except UsageProblem as exc:
            return fail(str(exc), EXIT_USAGE)
        return EXIT_OK
    environ = os.environ
    token: str | None = None
    try:
        token = _resolve_token(args, environ)
        check_token(token)
        peer = normalize_peer_url(args.peer or environ.get("MESHNODE_PEER") or DEFAULT_PEER)
        timeout_s = _resolve_timeout(args, environ)
        verify = _tls_context(args, environ)
        if getattr(args, "name", None) is not None:
            model_path(args.name)  # reject impossible names before any I/O
        _prepare(args)
    except (UsageError, ValueError) as exc:
        return fail(str(exc), EXIT_USAGE)

    _help, call, render = COMMANDS[args.command]
    try:
        with make_client(peer, token, timeout_s, verify, bool(args.cert or environ.get("MESHNODE_CERT"))) as api:
            api.last_write = last_write.load()
            before = api.last_write
            try:
                data = call(api, args)
            finally:
                if api.last_write != before:
                    last_write.save(api.last_write)
            if args.command == "top":  # it drew its own frames
                return EXIT_OK
            if getattr(args, "wait", False):
                if args.command == "job":
                    return follow_job(api, data, args)
                if args.command == "serve":
                    return follow_service(api, data, args)
                return wait_for_transfer(api, data, args)
    except PeerUnreachableError as exc:
        return fail(str(exc), EXIT_UNREACHABLE, "PEER_UNREACHABLE")
    except AnswerError as exc:
        return fail(str(exc), EXIT_ERROR, exc.code, status=exc.status)
    except NotAnApiError as exc:
        return fail(str(exc), EXIT_USAGE, "NOT_AN_API_PORT")
    except ClientError as exc:
        return fail(str(exc), EXIT_ERROR)
    except UsageProblem as exc:
        return fail(str(exc), EXIT_USAGE)

    if args.json:
        print(json.dumps(data, indent=2, ensure_ascii=False))
        return EXIT_OK
    try:
        render(stdout_console(), data, args)
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        return fail(
            f"unexpected response from peer {peer} for {args.command}: {type(exc).__name__}: {exc}"
            " (try --json)",
            EXIT_ERROR
        )
    return EXIT_OK


def run_start(args: argparse.Namespace) -> int:
    """``meshnode start``: imported here, not at the top, so that the client
    commands start without loading the daemon (trio, the web server, NVML)."""
    from ..daemon import main_start

    return main_start(args)
