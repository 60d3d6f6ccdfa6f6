"""An engine that answers oddly on purpose, for the proxy's tests: standard
library only, one thread per connection.

``/health`` is 200 (404 with ``--no-health``, as llama-cpp-python's server
answers) and ``/v1/models`` lists the model; ``POST
/v1/completions`` answers by the request's ``prompt``:

* ``garbage``: 200, ``application/json``, body ``not json {``;
* ``not-http``: bytes that are no HTTP answer at all;
* ``cut``: a ``Content-Length`` of 1000 and 10 bytes, then the connection closes;
* ``big:N``: 200, a JSON answer of N bytes (with its length), written in 1 MiB pieces;
* ``teapot``: 418 with an engine's own JSON error body and a header of its own;
* ``sse:N``: N server-sent events, then ``data: [DONE]``;

``GET /metrics`` tells ``--load`` requests running, as vLLM's does;
* anything else: a one-choice completion.
"""

from __future__ import annotations

import argparse
import json
import socket
import threading

MiB = 1024 * 1024


def _answer(conn: socket.socket, status: str, ctype: str, body: bytes, extra: str = "") -> None:
    conn.sendall(f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n{extra}"
                 f"Connection: close\r\n\r\n".encode() + body)


def _read_request(conn: socket.socket) -> tuple[str, bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        more = conn.recv(65536)
        if not more:
            return "", b""
        data += more
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    length = next((int(x.split(":", 1)[1]) for x in lines if x.lower().startswith("content-length:")), 0)
    while len(body) < length:
        more = conn.recv(65536)
        if not more:
            break
        body += more
    return lines[0], body


def handle(conn: socket.socket, model: str, health: bool, load: int = 0) -> None:
    with conn:
        line, body = _read_request(conn)
        if line.startswith("GET /metrics"):  # vLLM's form of its load
            _answer(conn, "200 OK", "text/plain; version=0.0.4",
                    f'vllm:num_requests_running{{model_name="{model}"}} {load}.0\n'
                    f'vllm:num_requests_waiting{{model_name="{model}"}} 0.0\n'.encode())
            return
        if line.startswith("GET /health") and health:
            _answer(conn, "200 OK", "application/json", b'{"status":"ok"}')
            return
        if line.startswith("GET /v1/models"):
            _answer(conn, "200 OK", "application/json",
                    json.dumps({"object": "list", "data": [{"id": model, "object": "model"}]}).encode())
            return
        if not line.startswith("POST /v1/completions"):
            _answer(conn, "404 Not Found", "application/json", b'{"error":"no such path"}')
            return
        prompt = str(json.loads(body or b"{}").get("prompt", ""))
        if prompt == "garbage":
            _answer(conn, "200 OK", "application/json", b"not json {")
        elif prompt == "not-http":
            conn.sendall(b"\x00\x01 this is no HTTP answer\r\n\r\n")
        elif prompt == "cut":
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
                         b'{"choices"')
        elif prompt.startswith("big:"):
            n = int(prompt[4:])
            head, tail = b'{"choices":[{"text":"', b'"}]}'
            conn.sendall(f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {n}\r\n"
                         f"Connection: close\r\n\r\n".encode() + head)
            left = n - len(head) - len(tail)
            piece = b"x" * MiB
            while left > 0:
                conn.sendall(piece[:min(left, MiB)])
                left -= MiB
            conn.sendall(tail)
        elif prompt == "teapot":
            _answer(conn, "418 I'm a teapot", "application/json",
                    b'{"error":{"message":"short and stout","type":"teapot"}}', "X-Engine-Own: yes\r\n")
        elif prompt.startswith("sse:"):
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n")
            for i in range(int(prompt[4:])):
                conn.sendall(b"data: " + json.dumps({"choices": [{"text": f"t{i}"}]}).encode() + b"\n\n")
            conn.sendall(b"data: [DONE]\n\n")
        else:
            _answer(conn, "200 OK", "application/json",
                    json.dumps({"object": "text_completion", "model": model, "choices": [{"text": "ok"}]}).encode())


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--served-model-name", required=True)
    p.add_argument("--no-health", action="store_true", help="answer 404 on /health")
    p.add_argument("--load", type=int, default=0, help="the requests running that /metrics tells (vLLM's form)")
    a = p.parse_args()
    srv = socket.create_server((a.host, a.port))
    while True:
        conn, _ = srv.accept()
        threading.Thread(target=handle, args=(conn, a.served_model_name, not a.no_health, a.load), daemon=True).start()


if __name__ == "__main__":
    main()
