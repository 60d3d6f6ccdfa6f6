"""A stand-in inference engine for tests of model serving and of the inference proxy.

It speaks a small slice of the OpenAI HTTP API (models, completions, chat completions,
embeddings, with SSE streaming) and behaves like a real engine where a serving daemon can
tell: it checks its weights before it listens, takes a while to become healthy when told
to, exits on SIGTERM (or refuses to), crashes on demand, and ignores flags it does not know
(engines get pass-through flags). Its answers are deterministic and carry a digest of the
weights it loaded, so a test can tell which model answered.

Run it as a subprocess::

    python tests/engine/fake_engine.py --model-dir DIR --port P [options]

DIR must hold ``engine.json`` = ``{"weights": {"<relative file>": "<sha256 hex>", ...}}``;
:func:`write_model` writes such a directory and returns the digest the engine will report.

``--cuda-mib N`` holds N MiB of real GPU memory (the CUDA driver API through ctypes, on
the first GPU ``CUDA_VISIBLE_DEVICES`` leaves it) from before it listens until it exits, as
an engine's weights would: it proves VRAM accounting on a machine with an NVIDIA GPU.

Exit codes: 0 after SIGTERM, 1 when told to crash, 2 bad arguments (argparse), 3 weights
check failed, 4 ``--fail-start``, 5 cannot listen on the address, 6 no GPU memory to hold.

Only the standard library, so it starts in well under 0.3 s.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pathlib
import signal
import socketserver
import struct
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

PREFIX = "fake-engine:"
MAX_BODY = 1 << 20  # 1 MiB
DRAIN_LIMIT = 64 << 20  # a too-large body up to this size is read away before the 413
MAX_TOKENS_LIMIT = 65536

EXIT_CRASH = 1
EXIT_WEIGHTS = 3
EXIT_FAIL_START = 4
EXIT_LISTEN = 5
EXIT_CUDA = 6

_HELD: list[object] = []  # GPU memory held for the process's life (--cuda-mib); the driver frees it at exit


# ---------------------------------------------------------------------------- weights


class WeightsError(Exception):
    """The model directory does not hold the weights its engine.json lists."""


def _sha256_file(path: pathlib.Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _digest(hashes: dict[str, str]) -> str:
    """First 12 hex chars of sha256 over the per-file sha256 values, sorted by file name."""
    h = hashlib.sha256()
    for name in sorted(hashes):
        h.update(hashes[name].lower().encode("ascii"))
    return h.hexdigest()[:12]


def check_weights(model_dir: pathlib.Path) -> str:
    """Check every file engine.json lists against its sha256; return the model's digest."""
    manifest = model_dir / "engine.json"
    try:
        raw = manifest.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise WeightsError(f"{manifest} not found") from None
    except OSError as e:
        raise WeightsError(f"cannot read {manifest}: {e.strerror or e}") from None
    try:
        doc = json.loads(raw)
    except ValueError as e:
        raise WeightsError(f"{manifest} is not valid JSON: {e}") from None
    weights = doc.get("weights") if isinstance(doc, dict) else None
    if not isinstance(weights, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weights.items()
    ):
        raise WeightsError(f'{manifest} must be {{"weights": {{"<file>": "<sha256 hex>"}}}}')
    for name, want in sorted(weights.items()):
        path = model_dir / name
        try:
            got = _sha256_file(path)
        except FileNotFoundError:
            raise WeightsError(f"{name} missing") from None
        except OSError as e:
            raise WeightsError(f"cannot read {name}: {e.strerror or e}") from None
        if got != want.lower():
            raise WeightsError(f"{name} sha256 mismatch")
    return _digest(weights)


def write_model(dir: pathlib.Path, size: int = 4096, seed: int = 0) -> str:
    """Write ``model.bin`` (deterministic pseudo-random bytes) and a matching engine.json.

    Returns the digest the engine reports for that directory.
    """
    dir = pathlib.Path(dir)
    dir.mkdir(parents=True, exist_ok=True)
    blocks = [hashlib.sha256(f"fake-engine:{seed}:{i}".encode()).digest() for i in range((size + 31) // 32)]
    data = b"".join(blocks)[:size]
    (dir / "model.bin").write_bytes(data)
    sha = hashlib.sha256(data).hexdigest()
    (dir / "engine.json").write_text(json.dumps({"weights": {"model.bin": sha}}, indent=2) + "\n")
    return _digest({"model.bin": sha})


# ---------------------------------------------------------------------------- answers


def tokens(digest: str, n: int) -> list[str]:
    return [f"t{i}-{digest[:4]}" for i in range(n)]


def embedding(text: str, digest: str) -> list[float]:
    """8 floats in [-1, 1), from sha256(text + digest)."""
    raw = hashlib.sha256((text + digest).encode("utf-8")).digest()
    return [round(v / 2**31, 6) for v in struct.unpack(">8i", raw)]


class RequestError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code


def error_body(message: str, code: str | None = None) -> dict[str, Any]:
    err: dict[str, Any] = {"message": message, "type": "invalid_request_error"}
    if code is not None:
        err["code"] = code
    return {"error": err}


class Engine:
    """What the handlers share: the model, the options, counters and the /control state."""

    def __init__(self, args: argparse.Namespace, digest: str, started: float) -> None:
        self.name: str = args.served_model_name
        self.digest = digest
        self.started = started
        self.startup_delay: float = args.startup_delay
        self.max_tokens_default: int = args.max_tokens_default
        self.stream_delay: float = args.stream_delay
        self.slow = 0.0
        self.requests = 0
        self._ids = 0
        self._lock = threading.Lock()

    def ready(self) -> bool:
        return time.monotonic() - self.started >= self.startup_delay

    def next_id(self) -> int:
        with self._lock:
            self._ids += 1
            return self._ids

    def count_request(self) -> None:
        with self._lock:
            self.requests += 1

    def check_model(self, body: dict[str, Any]) -> None:
        if "model" in body and body["model"] != self.name:
            raise RequestError(404, f"model {body['model']} not served here", "model_not_found")

    def max_tokens(self, body: dict[str, Any]) -> int:
        n = body.get("max_tokens")
        if n is None:
            return self.max_tokens_default
        if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= MAX_TOKENS_LIMIT:
            raise RequestError(400, f"max_tokens must be an integer in 0..{MAX_TOKENS_LIMIT}")
        return n

    @staticmethod
    def stream(body: dict[str, Any]) -> bool:
        s = body.get("stream", False)
        if not isinstance(s, bool):
            raise RequestError(400, "stream must be a boolean")
        return s


def _prompt_text(body: dict[str, Any]) -> str:
    prompt = body.get("prompt", "")
    if isinstance(prompt, list):
        if not all(isinstance(p, str) for p in prompt):
            raise RequestError(400, "prompt must be a string or a list of strings")
        prompt = prompt[0] if prompt else ""
    if not isinstance(prompt, str):
        raise RequestError(400, "prompt must be a string or a list of strings")
    return prompt


def _chat_text(body: dict[str, Any]) -> str:
    messages = body.get("messages")
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise RequestError(400, "messages must be a list of {role, content} objects")
    parts = []
    for m in messages:
        content = m.get("content")
        if isinstance(content, str):
            parts.append(content)
        elif isinstance(content, list):  # content parts: [{"type": "text", "text": ...}]
            parts += [p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)]
    return " ".join(parts)


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


# ---------------------------------------------------------------------------- HTTP


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go out in separate writes: no 40 ms delayed-ACK stalls
    server_version = "fake-engine/1"
    server: Server

    def log_message(self, format: str, *args: Any) -> None:  # silence request logging
        pass

    def version_string(self) -> str:
        return self.server_version

    @property
    def engine(self) -> Engine:
        return self.server.engine

    # -- plumbing

    def _send_json(self, status: int, obj: Any, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(obj).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)
        self.wfile.flush()

    def _send_error(self, status: int, message: str, code: str | None = None) -> None:
        self._send_json(status, error_body(message, code))

    def _read_body(self) -> bytes | None:
        """The request body; None after answering 400 or 413 for it."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            return self._read_chunked()
        length = self.headers.get("Content-Length")
        if length is None:
            return b""
        try:
            n = int(length)
            if n < 0:
                raise ValueError
        except ValueError:
            self.close_connection = True
            self._send_error(400, "bad Content-Length")
            return None
        if n > MAX_BODY:
            if n <= DRAIN_LIMIT:  # read it away, so the client sees the answer, not a reset
                while n > 0:
                    got = len(self.rfile.read(min(n, 1 << 16)))
                    if not got:
                        break
                    n -= got
            else:
                self.close_connection = True
            self._send_error(413, f"request body larger than {MAX_BODY} bytes")
            return None
        return self.rfile.read(n)

    def _read_chunked(self) -> bytes | None:
        out = bytearray()
        while True:
            line = self.rfile.readline(1024)
            try:
                size = int(line.split(b";")[0].strip(), 16)
            except ValueError:
                self.close_connection = True
                self._send_error(400, "bad chunked encoding")
                return None
            if size == 0:
                while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                    pass  # trailers
                return bytes(out)
            if len(out) + size > MAX_BODY:
                self.close_connection = True
                self._send_error(413, f"request body larger than {MAX_BODY} bytes")
                return None
            out += self.rfile.read(size)
            self.rfile.readline(1024)  # the CRLF after the chunk

    def _json_body(self, raw: bytes) -> dict[str, Any]:
        try:
            body = json.loads(raw) if raw.strip() else None
        except ValueError as e:
            raise RequestError(400, f"request body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise RequestError(400, "request body must be a JSON object")
        return body

    # -- dispatch

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def do_PATCH(self) -> None:
        self._dispatch("PATCH")

    ROUTES: dict[str, tuple[str, str]] = {
        "/health": ("GET", "health"),
        "/v1/models": ("GET", "models"),
        "/v1/completions": ("POST", "completions"),
        "/v1/chat/completions": ("POST", "chat"),
        "/v1/embeddings": ("POST", "embeddings"),
        "/debug/env": ("GET", "debug_env"),
        "/control/slow": ("POST", "control_slow"),
        "/control/crash": ("POST", "control_crash"),
    }

    def _dispatch(self, method: str) -> None:
        raw = self._read_body()  # always drain the body, so keep-alive stays in step
        if raw is None:
            return
        path = self.path.split("?", 1)[0]
        if len(path) > 1:
            path = path.rstrip("/")
        route = self.ROUTES.get(path)
        try:
            if route is None:
                raise RequestError(404, f"no such path: {method} {path}")
            want, name = route
            if method != want:
                raise RequestError(405, f"{path} takes {want}, not {method}")
            if path.startswith("/v1/"):
                if not self.engine.ready():
                    self._send_json(503, error_body("model is loading", "loading") | {"status": "loading"})
                    return
                self.engine.count_request()
                if self.engine.slow > 0:
                    time.sleep(self.engine.slow)
            getattr(self, "route_" + name)(raw)
        except RequestError as e:
            self._send_error(e.status, e.message, e.code)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    # -- endpoints

    def route_health(self, raw: bytes) -> None:
        if self.engine.ready():
            self._send_json(200, {"status": "ok"})
        else:
            self._send_json(503, {"status": "loading"})

    def route_models(self, raw: bytes) -> None:
        model = {"id": self.engine.name, "object": "model", "owned_by": "fake-engine"}
        self._send_json(200, {"object": "list", "data": [model]})

    def route_completions(self, raw: bytes) -> None:
        eng = self.engine
        body = self._json_body(raw)
        eng.check_model(body)
        n, stream = eng.max_tokens(body), eng.stream(body)
        prompt = _prompt_text(body)
        toks = tokens(eng.digest, n)
        cid = f"cmpl-{eng.next_id()}"
        if stream:
            self._stream(
                {"id": cid, "object": "text_completion", "created": int(time.time()), "model": eng.name},
                [[{"index": 0, "text": t + " ", "finish_reason": None}] for t in toks],
            )
            return
        self._send_json(200, {
            "id": cid,
            "object": "text_completion",
            "created": int(time.time()),
            "model": eng.name,
            "choices": [{"index": 0, "text": " ".join(toks), "finish_reason": "length", "logprobs": None}],
            "usage": _usage(len(prompt.split()), n),
        })

    def route_chat(self, raw: bytes) -> None:
        eng = self.engine
        body = self._json_body(raw)
        eng.check_model(body)
        n, stream = eng.max_tokens(body), eng.stream(body)
        prompt = _chat_text(body)
        toks = tokens(eng.digest, n)
        cid = f"chatcmpl-{eng.next_id()}"
        if stream:
            choices = []
            for i, t in enumerate(toks):
                delta = {"role": "assistant", "content": t + " "} if i == 0 else {"content": t + " "}
                choices.append([{"index": 0, "delta": delta, "finish_reason": None}])
            self._stream(
                {"id": cid, "object": "chat.completion.chunk", "created": int(time.time()), "model": eng.name},
                choices,
            )
            return
        self._send_json(200, {
            "id": cid,
            "object": "chat.completion",
            "created": int(time.time()),
            "model": eng.name,
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": " ".join(toks)},
                "finish_reason": "length",
            }],
            "usage": _usage(len(prompt.split()), n),
        })

    def _stream(self, head: dict[str, Any], choices: list[list[dict[str, Any]]]) -> None:
        """SSE: headers with Connection: close (no length), one event per token, then [DONE]."""
        self.close_connection = True
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.flush()
        for i, c in enumerate(choices):
            if i and self.engine.stream_delay > 0:
                time.sleep(self.engine.stream_delay)
            self.wfile.write(b"data: " + json.dumps(head | {"choices": c}).encode("utf-8") + b"\n\n")
            self.wfile.flush()
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()

    def route_embeddings(self, raw: bytes) -> None:
        eng = self.engine
        body = self._json_body(raw)
        eng.check_model(body)
        inputs = body.get("input")
        if isinstance(inputs, str):
            inputs = [inputs]
        if not isinstance(inputs, list) or not all(isinstance(s, str) for s in inputs):
            raise RequestError(400, "input must be a string or a list of strings")
        n = sum(len(s.split()) for s in inputs)
        self._send_json(200, {
            "object": "list",
            "data": [
                {"object": "embedding", "index": i, "embedding": embedding(s, eng.digest)}
                for i, s in enumerate(inputs)
            ],
            "model": eng.name,
            "usage": {"prompt_tokens": n, "total_tokens": n},
        })

    def route_debug_env(self, raw: bytes) -> None:
        self._send_json(200, {
            "pid": os.getpid(),
            "pgid": os.getpgid(0),
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "argv": sys.argv[1:],
            "digest": self.engine.digest,
            "requests": self.engine.requests,
        })

    def route_control_slow(self, raw: bytes) -> None:
        body = self._json_body(raw)
        s = body.get("seconds")
        if isinstance(s, bool) or not isinstance(s, int | float) or not 0 <= s <= 3600:
            raise RequestError(400, "seconds must be a number in 0..3600")
        self.engine.slow = float(s)
        self._send_json(200, {"ok": True})

    def route_control_crash(self, raw: bytes) -> None:
        _crash("fake-engine: crashing as told (/control/crash)")


class Server(ThreadingHTTPServer):
    daemon_threads = True
    engine: Engine

    def server_bind(self) -> None:
        # HTTPServer.server_bind calls socket.getfqdn, a reverse DNS lookup that can stall start.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name = str(host)
        self.server_port = int(port)

    def handle_error(self, request: Any, client_address: Any) -> None:
        exc = sys.exc_info()[1]
        if isinstance(exc, ConnectionError | TimeoutError):
            return  # a client that went away
        super().handle_error(request, client_address)


# ---------------------------------------------------------------------------- GPU memory


class CudaError(Exception):
    """The driver refused: no libcuda, no device, or not that much free memory."""


def hold_vram(nbytes: int) -> object:
    """``nbytes`` of device memory on the first visible GPU, through the CUDA
    driver API (libcuda, as every engine's framework does: a plain cuMemAlloc,
    not managed memory).  Held until the process exits; returns the context."""
    import ctypes

    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError as e:
        raise CudaError(f"no CUDA driver: {e}") from None

    def check(rc: int, what: str) -> None:
        if rc != 0:
            name = ctypes.c_char_p()
            cuda.cuGetErrorName(rc, ctypes.byref(name))
            raise CudaError(f"{what}: {(name.value or b'error').decode()} ({rc})")

    check(cuda.cuInit(0), "cuInit")
    dev, ctx, ptr = ctypes.c_int(), ctypes.c_void_p(), ctypes.c_uint64()
    check(cuda.cuDeviceGet(ctypes.byref(dev), 0), "cuDeviceGet")
    check(cuda.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev), "cuDevicePrimaryCtxRetain")
    check(cuda.cuCtxSetCurrent(ctx), "cuCtxSetCurrent")
    check(cuda.cuMemAlloc_v2(ctypes.byref(ptr), ctypes.c_size_t(nbytes)), f"cuMemAlloc of {nbytes} bytes")
    check(cuda.cuMemsetD8_v2(ptr, 0, ctypes.c_size_t(nbytes)), "cuMemsetD8")  # touched, as weights are
    check(cuda.cuCtxSynchronize(), "cuCtxSynchronize")
    return (cuda, ctx, ptr)


# ---------------------------------------------------------------------------- main


def _say(msg: str, err: bool = False) -> None:
    stream = sys.stderr if err else sys.stdout
    print(msg, file=stream, flush=True)


def _crash(msg: str) -> None:
    try:
        _say(msg, err=True)
        sys.stdout.flush()
    finally:
        os._exit(EXIT_CRASH)


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    # allow_abbrev=False: a pass-through flag such as --model must not be taken for --model-dir.
    p = argparse.ArgumentParser(
        prog="fake_engine.py",
        description=__doc__.splitlines()[0] if __doc__ else None,
        allow_abbrev=False,
    )
    p.add_argument("--model-dir", required=True, type=pathlib.Path)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", required=True, type=int, help="0 picks a free port (printed on ready)")
    p.add_argument("--served-model-name", default=None, help="default: the model dir's base name")
    p.add_argument("--startup-delay", type=float, default=0.0, help="seconds /health answers 503")
    p.add_argument("--crash-after", type=float, default=None, help="exit 1 this many seconds after start")
    p.add_argument("--fail-start", action="store_true", help="exit 4 before listening")
    p.add_argument("--ignore-sigterm", action="store_true")
    p.add_argument("--max-tokens-default", type=int, default=8)
    p.add_argument("--stream-delay", type=float, default=0.01, help="seconds between streamed tokens")
    p.add_argument("--cuda-mib", type=int, default=0, help="hold this much real GPU memory (CUDA driver API)")
    args, extra = p.parse_known_args(argv)
    if args.served_model_name is None:
        args.served_model_name = args.model_dir.name or args.model_dir.resolve().name
    return args, extra


def main(argv: list[str] | None = None) -> int:
    started = time.monotonic()
    args, extra = parse_args(argv)
    if extra:
        _say(f"{PREFIX} ignoring flags: {' '.join(extra)}")

    if args.crash_after is not None:
        delay = max(0.0, args.crash_after - (time.monotonic() - started))
        timer = threading.Timer(delay, _crash, args=(f"{PREFIX} crashing as told",))
        timer.daemon = True
        timer.start()

    stop = threading.Event()
    got: list[str] = []

    def on_signal(signum: int, frame: object) -> None:
        got.append(signal.Signals(signum).name)
        stop.set()

    if args.ignore_sigterm:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    else:
        signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    _say(f"{PREFIX} loading weights from {args.model_dir}")
    try:
        digest = check_weights(args.model_dir)
    except WeightsError as e:
        _say(f"{PREFIX} weights check failed: {e}", err=True)
        return EXIT_WEIGHTS

    if args.fail_start:
        _say(f"{PREFIX} cannot start: told to fail", err=True)
        return EXIT_FAIL_START

    if args.cuda_mib > 0:
        try:
            _HELD.append(hold_vram(args.cuda_mib << 20))
        except CudaError as e:
            _say(f"{PREFIX} cannot hold {args.cuda_mib} MiB of GPU memory: {e}", err=True)
            return EXIT_CUDA
        _say(f"{PREFIX} holding {args.cuda_mib} MiB of GPU memory "
             f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')})")

    try:
        server = Server((args.host, args.port), Handler)
    except OSError as e:
        _say(f"{PREFIX} cannot listen on {args.host}:{args.port}: {e.strerror or e}", err=True)
        return EXIT_LISTEN
    server.engine = Engine(args, digest, started)
    port = server.server_address[1]
    serving = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    serving.start()

    announced = False
    while not stop.is_set():
        if not announced and server.engine.ready():
            host = f"[{args.host}]" if ":" in args.host else args.host
            _say(f"{PREFIX} ready on {host}:{port} model {server.engine.name} digest {digest}")
            announced = True
        stop.wait(0.02 if not announced else 0.05)

    _say(f"{PREFIX} {got[0] if got else 'SIGTERM'}, draining")
    server.shutdown()
    server.server_close()
    sys.stdout.flush()
    sys.stderr.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
