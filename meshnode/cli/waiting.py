"""Following a transfer until it ends (``--wait``): polls, a progress bar, and
what to say when the wait stops before the transfer does."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from typing import Any

from .client import AnswerError, ApiClient, ClientError, PeerUnreachableError
from .render import (
    EXIT_ERROR,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_UNREACHABLE,
    PROG,
    TRANSFER_FINAL,
    TransferBar,
    as_dict,
    as_number,
    fail,
    follow_hint,
    human_bytes,
    human_duration,
    name_list,
    stderr_console,
    stdout_console,
    transfer_error,
    transfer_target,
)

__all__ = ["NOT_FOUND_GRACE_S", "POLL_INTERVAL_S", "wait_for_transfer"]

# Tests replace the clock and the sleep.
POLL_INTERVAL_S = 0.5
# GET /transfers/{id} on a peer that is not the target may answer 404 until
# gossip brings the transfer there; that long after the POST it means "queued".
NOT_FOUND_GRACE_S = 5.0
_sleep: Callable[[float], None] = time.sleep
_monotonic: Callable[[], float] = time.monotonic


def _print_ndjson(state: dict[str, Any]) -> None:
    print(json.dumps(state, ensure_ascii=False, sort_keys=True), flush=True)


def wait_for_transfer(
    api: ApiClient, first: Any, args: argparse.Namespace
) -> int:
    """Poll ``GET /transfers/{id}`` on the same peer until the transfer is done
    (exit 0) or failed (exit 1), ``--wait-timeout`` passes (1) or Ctrl-C (130).

    A bar on stderr when it is a terminal; with ``--json`` one JSON object per
    answer on stdout, the POST's answer first and the final state last.
    """
    state = as_dict(first)
    tid = state.get("transfer_id")
    if not isinstance(tid, str) or not tid:
        return fail(
            f"the peer's answer to {args.command} names no transfer_id, so there is nothing "
            "to wait for (try --json)",
            EXIT_ERROR
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
                return fail(
                    f"unexpected answer about transfer {tid}: no status (try `{hint} --json`)",
                    EXIT_ERROR
                )
            now = _monotonic()
            if deadline is not None and now >= deadline:
                return fail(
                    f"transfer {tid} still {state.get('status')} after --wait-timeout "
                    f"{args.wait_timeout:g}s; it continues {where}: follow it with `{hint}`",
                    EXIT_ERROR, "WAIT_TIMEOUT", transfer_id=tid
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
        return fail(
            f"{exc}; transfer {tid} may continue {where}: `{hint}`", EXIT_UNREACHABLE, "PEER_UNREACHABLE",
            transfer_id=tid
        )
    except ClientError as exc:
        return fail(f"{exc} (while following transfer {tid}: `{hint}`)", EXIT_ERROR)
    finally:
        if bar is not None:
            bar.stop()

    if state.get("status") == "failed":
        error = state.get("error")
        code = error.get("code") if isinstance(error, dict) and isinstance(error.get("code"), str) else None
        return fail(
            f"{transfer_error(state)} (transfer {tid}: {transfer_target(state)})", EXIT_ERROR, code, transfer_id=tid
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
