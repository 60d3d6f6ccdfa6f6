"""A real S3 API on loopback for tests and benchmarks: moto's server, with
three things of our own around it.

* It counts the requests and the object bytes it sends (``GET
  /__meshnode/stats``), so a benchmark can say how many times an object left
  the server.
* It can be slow: ``POST /__meshnode/slow?rate=N`` sends each object
  download at N bytes a second (0: as fast as it goes).
* It can drop connections: ``POST /__meshnode/fault?drop_after=N&times=K``
  makes the next K object downloads stop after N bytes, the connection cut
  (a flaky network, a proxy restart).

With ``--auth`` moto checks every request's credentials (its IAM): the
first three requests (create a user, its access key, its policy) are the
only ones it takes unsigned; ``make_user`` makes them.

Run: ``python -m bench.s3server --port 0 [--auth]``; it prints
``listening on http://127.0.0.1:PORT`` once it serves.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any

NO_AUTH_SETUP_ACTIONS = 3  # make_user's requests
POLICY = json.dumps({"Version": "2012-10-17",
                     "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]})


class Counting:
    """WSGI middleware: bytes served per object GET, and injected drops."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.lock = threading.Lock()
        self.object_bytes = 0
        self.object_gets = 0
        self.requests = 0  # every S3 request (control ones aside)
        self.rate = 0  # bytes a second each object GET is sent at (0: as fast as it goes)
        self.drop_after: int | None = None
        self.drops_left = 0

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path.startswith("/__meshnode/"):
            return self._control(environ, start_response, path)
        with self.lock:
            self.requests += 1
        body: Iterable[bytes] = self.app(environ, start_response)
        is_object_get = environ.get("REQUEST_METHOD") == "GET" and path.strip("/").count("/") >= 1 and \
            "list-type" not in environ.get("QUERY_STRING", "")
        if not is_object_get:
            return body
        with self.lock:
            self.object_gets += 1
            drop = self.drop_after if self.drops_left > 0 else None
            if drop is not None:
                self.drops_left -= 1
        return self._counted(body, drop)

    def _counted(self, body: Iterable[bytes], drop: int | None) -> Iterator[bytes]:
        sent = 0
        try:
            for piece in self._paced(body):
                if drop is not None and sent + len(piece) > drop:
                    piece = piece[: drop - sent]
                    with self.lock:
                        self.object_bytes += len(piece)
                    yield piece
                    raise ConnectionAbortedError("meshnode fault: connection dropped")  # werkzeug cuts it
                sent += len(piece)
                with self.lock:
                    self.object_bytes += len(piece)
                yield piece
        finally:
            close = getattr(body, "close", None)
            if close is not None:
                close()

    def _paced(self, body: Iterable[bytes]) -> Iterator[bytes]:
        """The body in 64 KiB pieces at ``rate`` bytes a second (a slow link)."""
        for piece in body:
            if not self.rate:
                yield piece
                continue
            for i in range(0, len(piece), 65536):
                time.sleep(min(len(piece) - i, 65536) / self.rate)
                yield piece[i:i + 65536]

    def _control(self, environ: dict[str, Any], start_response: Any, path: str) -> list[bytes]:
        from urllib.parse import parse_qs

        q = {k: v[0] for k, v in parse_qs(environ.get("QUERY_STRING", "")).items()}
        if path == "/__meshnode/fault":
            with self.lock:
                self.drop_after = int(q.get("drop_after", "0"))
                self.drops_left = int(q.get("times", "1"))
        elif path == "/__meshnode/slow":
            with self.lock:
                self.rate = int(q.get("rate", "0"))
        elif path == "/__meshnode/reset":
            with self.lock:
                self.object_bytes = self.object_gets = self.requests = self.rate = 0
        with self.lock:
            out = json.dumps({"object_bytes": self.object_bytes, "object_gets": self.object_gets,
                              "requests": self.requests, "drops_left": self.drops_left}).encode()
        start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(out)))])
        return [out]


def make_user(endpoint: str) -> tuple[str, str]:
    """On a server started with ``--auth``: an IAM user allowed s3:*, and its key (id, secret)."""
    import boto3

    iam = boto3.client("iam", endpoint_url=endpoint, region_name="us-east-1",
                       aws_access_key_id="setup", aws_secret_access_key="setup")
    iam.create_user(UserName="meshnode")
    key = iam.create_access_key(UserName="meshnode")["AccessKey"]
    iam.put_user_policy(UserName="meshnode", PolicyName="s3", PolicyDocument=POLICY)
    return key["AccessKeyId"], key["SecretAccessKey"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--auth", action="store_true", help="check credentials (moto's IAM)")
    args = ap.parse_args()
    if args.auth:
        os.environ["INITIAL_NO_AUTH_ACTION_COUNT"] = str(NO_AUTH_SETUP_ACTIONS)
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app
    from werkzeug.serving import make_server

    app = Counting(DomainDispatcherApplication(create_backend_app))
    server = make_server(args.host, args.port, app, threaded=True)
    print(f"listening on http://{args.host}:{server.server_port}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
