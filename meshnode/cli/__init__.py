"""The ``meshnode`` console script.

``meshnode start`` runs a node (see ``meshnode.config`` and ``meshnode.daemon``);
every other command talks HTTP to one peer, which answers for the whole mesh.

- ``parser``: the arguments of every command;
- ``commands``: what each client command asks the peer, and how it runs;
- ``waiting``: following a transfer until it ends (``--wait``);
- ``render``: what the CLI prints (tables, bars, error lines, exit codes);
- ``client``: the HTTP client of the public API, for scripts too.

Exit codes: 0 success; 1 the peer answered with an error or something else
went wrong (one line on stderr); 2 bad usage or the peer could not be reached;
130 interrupted.  Logging is configured here and only here.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import sys
from collections.abc import Callable

import argcomplete

from .parser import build_parser, client_defaults
from .render import EXIT_ERROR, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, errors_as_json, fail
from .values import log_level

__all__ = ["build_parser", "configure_logging", "main"]

_LOG_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
_LOG_DATEFMT = "%Y-%m-%dT%H:%M:%S"


# -- entry point ---------------------------------------------------------------


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time (UTC, ISO 8601), level, logger, message,
    and the traceback when there is one.  Messages are the same text the
    plain format shows, so what is kept out of one (tokens, secrets) is kept
    out of the other."""

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


def configure_logging(level_name: str, fmt: str = "text") -> None:
    level = getattr(logging, level_name)
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(_LOG_FORMAT, _LOG_DATEFMT))
    logging.basicConfig(level=level, handlers=[handler])
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
    if argv is None:
        # Shell completion (README: `register-python-argcomplete meshnode`): when the shell
        # asks, this prints the candidates and exits; otherwise it returns at once.
        argcomplete.autocomplete(parser)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version and usage errors
        return _exit_code(exc.code)
    problem = client_defaults(args)
    errors_as_json(bool(getattr(args, "json", False)))
    if problem is not None:
        return fail(problem, EXIT_USAGE)

    level = getattr(args, "log_level", None) or os.environ.get("MESHNODE_LOG_LEVEL") or "INFO"
    try:
        level = log_level(level)
    except argparse.ArgumentTypeError as exc:
        return fail(f"MESHNODE_LOG_LEVEL: {exc}", EXIT_USAGE)
    fmt = getattr(args, "log_format", None) or os.environ.get("MESHNODE_LOG_FORMAT") or "text"
    if fmt not in ("text", "json"):
        return fail(f"MESHNODE_LOG_FORMAT: {fmt!r} is not text or json", EXIT_USAGE)
    configure_logging(level, fmt)

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
