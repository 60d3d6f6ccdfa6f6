"""The outside world of README's usage examples, run in its own namespace by
``test_readme_usage.py``: a Hugging Face mirror on port 80 (the fake hub,
holding ``meta-llama/Llama-3.1-8B``) and ``https://example.org/tiny.bin`` on
port 443 under a test CA's certificate.  Prints ``ready`` once both listen."""

from __future__ import annotations

import argparse
import ssl
import sys

import trio

from tests.integration.fakehub import FakeHub, FakeRepo, model_files

HF_REPO = "meta-llama/Llama-3.1-8B"
TINY = bytes(range(256)) * 4096  # 1 MiB


async def _https(cert: str, key: str, port: int) -> None:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)

    async def one(stream: trio.SSLStream[trio.SocketStream]) -> None:
        try:
            head = b""
            while b"\r\n\r\n" not in head and len(head) < 16384:
                data = await stream.receive_some(4096)
                if not data:
                    return
                head += data
            line = head.split(b"\r\n", 1)[0].split()
            ok = len(line) >= 2 and line[0] in (b"GET", b"HEAD") and line[1] == b"/tiny.bin"
            body = TINY if ok and line[0] == b"GET" else b""
            status = b"200 OK" if ok else b"404 Not Found"
            length = len(TINY) if ok else 0
            await stream.send_all(b"HTTP/1.1 " + status + b"\r\nContent-Type: application/octet-stream\r\n"
                                  b"Content-Length: %d\r\nConnection: close\r\n\r\n" % length + body)
            await stream.aclose()
        except (trio.BrokenResourceError, trio.ClosedResourceError, ssl.SSLError, OSError):
            return

    listeners = await trio.open_ssl_over_tcp_listeners(port, ctx, host="0.0.0.0")
    await trio.serve_listeners(one, listeners)  # type: ignore[arg-type]


async def main(cert: str, key: str) -> None:
    hub = FakeHub()
    hub.host = "0.0.0.0"
    hub.port = 80
    repo = FakeRepo(HF_REPO)
    repo.add_commit(model_files(seed=7, mib=2), "main")
    hub.add_repo(repo)
    async with trio.open_nursery() as n:
        await n.start(hub.serve)
        n.start_soon(_https, cert, key, 443)
        await trio.sleep(0.2)
        print("ready", flush=True)


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--cert", required=True)
    p.add_argument("--key", required=True)
    a = p.parse_args()
    trio.run(main, a.cert, a.key)
    sys.exit(0)
