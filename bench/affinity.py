"""Prefix affinity with a real engine: time to first token, routed by the
mesh against round-robin.

    .venv/bin/python bench/affinity.py [--requests 50] [--prompts 5] [--prompt-tokens 1100]

Two ``meshnode start`` processes on loopback with fake GPUs; node1 serves one
model twice (``node1:gpu0`` and ``node1:gpu1``) with llama.cpp's server
(llama-cpp-python, the tiny random-weight GGUF the tests build, context
2048).  Each engine keeps a RAM cache of evaluated prompts big enough for
``--cache-prompts`` (4) of them, as an engine holds a few prefixes in its
KV cache and evicts the oldest.

Two runs, each with its own ``--prompts`` fresh system prompts of at least
``--prompt-tokens`` tokens (so neither run finds the other's prefixes
cached), ``--requests`` streaming completions one after another, the
system prompts interleaved (request i uses prompt i mod 5) and each
followed by its own short question:

* **affinity**: every request through node2, which routes with the
  daemon's own decision (``protocol.routing.route``: rendezvous hashing of
  the prompt's first 256 characters, load within a slack);
* **round-robin**: straight to the two engines alternately (as GPUStack
  routes).  It skips node2's hop, so it is the faster path by the proxy's
  cost: the comparison favours round-robin.

Printed: p50 and p99 time to the first streamed token of each run, their
ratio, how the affinity run spread over the two services, and the engines'
own prompt-cache hits (llama-cpp-python logs each).  The tiny model's
prefill is cheap next to a real model's, so the ratio is a floor.
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.jobs import Node, mesh, row

MODEL = "bench/gguf"
N_CTX = 2048
WORDS = ("the", "a", "hello", "world", "tea", "toe", "eat", "ate", "to", "oat")


def system_prompts(run: str, n: int, tokens: int, count: Callable[[str], int]) -> list[str]:
    """``n`` system prompts of at least ``tokens`` tokens each (as ``count``
    counts them), distinct from their first characters on."""
    out = []
    for i in range(n):
        text = f"System prompt {run}-{i}: you are assistant number {i} of run {run}."
        k = i * 7 + len(run)
        while count(text) < tokens:
            text += " " + " ".join(WORDS[((k + j) * 2654435761) % len(WORDS)] for j in range(50))
            k += 50
        out.append(text + "\n")
    return out


def ttft(c: httpx.Client, url: str, prompt: str, max_tokens: int) -> tuple[float, str]:
    """Seconds from the request to the first streamed token, and the service that answered."""
    body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "stream": True, "temperature": 0}
    t0 = time.perf_counter()
    first: float | None = None
    with c.stream("POST", url + "/v1/completions", json=body) as r:
        if r.status_code != 200:
            r.read()
            raise SystemExit(f"{url}: {r.status_code} {r.text[:500]}")
        where = r.headers.get("x-mesh-service", url)
        for line in r.iter_lines():
            if first is None and line.startswith("data: ") and line != "data: [DONE]":
                first = time.perf_counter() - t0
    if first is None:
        raise SystemExit(f"{url}: no token streamed")
    return first, where


def run(c: httpx.Client, urls: list[str], systems: list[str], requests: int,
        max_tokens: int) -> tuple[list[float], dict[str, int]]:
    """``requests`` streamed completions over the ``systems`` prompts,
    interleaved, one after another: to ``urls`` in turn."""
    prompts = len(systems)
    firsts: list[float] = []
    spread: dict[str, int] = {}
    for i in range(requests):
        prompt = systems[i % prompts] + f"User {i}: say hello to the world.\nAssistant:"
        first, where = ttft(c, urls[i % len(urls)], prompt, max_tokens)
        firsts.append(first)
        spread[where] = spread.get(where, 0) + 1
    return firsts, spread


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(int(q * len(s)), len(s) - 1)] * 1000


def reused(root: Path) -> tuple[int, int]:
    """What the engines' logs say they took from their prompt cache (llama-cpp-python
    logs each prefix it reuses): prompt tokens reused, and requests that reused most
    of their prompt."""
    tokens = most = 0
    for log in root.rglob("*.log"):
        if log.name == "state.log":
            continue
        for n, left in re.findall(r"(\d+) prefix-match hit, remaining (\d+) prompt tokens",
                                  log.read_text(errors="replace")):
            tokens += int(n)
            most += int(n) >= int(left)
    return tokens, most


def serve(c: httpx.Client, node: Node, gpu: int, cache_bytes: int) -> int:
    command = [sys.executable, "-m", "llama_cpp.server", "--model", "{model_dir}/tiny.gguf", "--host", "{host}",
               "--port", "{port}", "--model_alias", "{model_name}", "--n_ctx", str(N_CTX), "--n_threads", "1",
               "--cache", "true", "--cache_size", str(cache_bytes)]
    t0 = time.monotonic()
    while True:
        r = c.post(node.url + f"/models/{MODEL}/services",
                   json={"device": f"node1:gpu{gpu}", "config": {"engine": "command", "command": command,
                                                                 "health_path": "/v1/models",
                                                                 "startup_timeout_s": 120}})
        if r.status_code == 202:
            return int(r.json()["port"])
        if time.monotonic() - t0 > 30:
            raise SystemExit(f"the llama.cpp serve was refused: {r.text}")
        time.sleep(0.2)  # the copy is still arriving


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=50)
    ap.add_argument("--prompts", type=int, default=5, help="system prompts, interleaved")
    ap.add_argument("--prompt-tokens", type=int, default=1100, help="tokens in each system prompt (at least)")
    ap.add_argument("--max-tokens", type=int, default=4, help="tokens each completion streams")
    ap.add_argument("--cache-prompts", type=int, default=4, help="prompts each engine's cache holds")
    args = ap.parse_args()
    if not (2 <= args.requests <= 1000 and 1 <= args.prompts <= 50 and 1 <= args.max_tokens <= 64
            and 1 <= args.cache_prompts <= 64):
        ap.error("--requests 2 to 1000, --prompts 1 to 50, --max-tokens 1 to 64, --cache-prompts 1 to 64")
    if not 256 <= args.prompt_tokens <= N_CTX - 100:
        ap.error(f"--prompt-tokens 256 to {N_CTX - 100} (the engines' context is {N_CTX})")
    if importlib.util.find_spec("llama_cpp") is None or importlib.util.find_spec("gguf") is None:
        print("llama-cpp-python is not installed: no real engine (pip install -e '.[real-engine]')")
        return 1
    from tests.engine import tiny_gguf

    extra = ["--fake-gpus", "2x24GiB", "--engines", "command", "--engine-startup", "120"]
    t_start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench-affinity-") as tmp, httpx.Client(timeout=120,
                                                                                    trust_env=False) as c:
        root = Path(tmp)
        src = root / "import" / "gguf"
        src.mkdir(parents=True)
        tiny_gguf.write_tiny_gguf(src / "tiny.gguf")
        import llama_cpp

        vocab = llama_cpp.Llama(str(src / "tiny.gguf"), vocab_only=True, verbose=False)

        def count(text: str) -> int:
            return len(vocab.tokenize(text.encode()))

        # What the engine's cache stores for one request: the state after the longest prompt and its answer.
        longest = max((p for run in ("rr", "aff") for p in system_prompts(run, args.prompts, args.prompt_tokens, count)),
                      key=count)
        probe = llama_cpp.Llama(str(src / "tiny.gguf"), n_ctx=N_CTX, verbose=False)
        probe.create_completion(longest + "User 99: say hello to the world.\nAssistant:", max_tokens=args.max_tokens)
        cache_bytes = int(probe.save_state().llama_state_size * (args.cache_prompts + 0.5))
        del probe
        nodes = mesh(root / "two", 2, c, {"node1": extra, "node2": extra})
        try:
            c.post(nodes[0].url + f"/models/{MODEL}/download",
                   json={"source_url": src.as_uri(), "target_device": "node1:disk"}).raise_for_status()
            ports = [serve(c, nodes[0], g, cache_bytes) for g in (0, 1)]
            t0 = time.monotonic()
            while True:
                s = [x for x in c.get(nodes[1].url + "/services").json()["services"] if x["model_name"] == MODEL]
                if len(s) == 2 and all(x["state"] == "healthy" for x in s):
                    break
                if time.monotonic() - t0 > 150:
                    raise SystemExit(f"llama.cpp did not become healthy: {s}")
                time.sleep(0.3)
            direct = [f"http://127.0.0.1:{p}" for p in ports]
            for u in direct:  # load the weights and the code paths once, outside both runs
                ttft(c, u, "hello world", 2)
            h0 = reused(root)
            sent: dict[str, int] = {}
            systems = system_prompts("rr", args.prompts, args.prompt_tokens, count)
            sent["round-robin"] = sum(count(systems[i % args.prompts]) for i in range(args.requests))
            rr, _ = run(c, direct, systems, args.requests, args.max_tokens)
            h1 = reused(root)
            systems = system_prompts("aff", args.prompts, args.prompt_tokens, count)
            sent["affinity"] = sum(count(systems[i % args.prompts]) for i in range(args.requests))
            aff, spread = run(c, [nodes[1].url], systems, args.requests, args.max_tokens)
            h2 = reused(root)
        finally:
            for n in nodes:
                n.stop()
    print(f"\nPrefix affinity: {args.requests} streamed completions one after another over {args.prompts} system "
          f"prompts of >= {args.prompt_tokens} tokens (interleaved), two llama.cpp services of one model "
          f"(tiny GGUF, n_ctx {N_CTX}, a prompt cache of {args.cache_prompts} prompts each)")
    row("round-robin (straight to the engines, alternately)",
        f"p50 {pct(rr, 0.5):.1f} ms  p99 {pct(rr, 0.99):.1f} ms")
    row("affinity (through node2, the mesh's routing)",
        f"p50 {pct(aff, 0.5):.1f} ms  p99 {pct(aff, 0.99):.1f} ms")
    row("time to first token, round-robin / affinity",
        f"p50 {pct(rr, 0.5) / pct(aff, 0.5):.2f}x  p99 {pct(rr, 0.99) / pct(aff, 0.99):.2f}x")
    row("affinity: requests per service", ", ".join(f"{k} {v}" for k, v in sorted(spread.items())))
    for label, (a, b) in (("round-robin", (h0, h1)), ("affinity", (h1, h2))):
        row(f"engines' prompt tokens reused from their cache, {label}", f"{(b[0] - a[0]) / sent[label] * 100:.0f}%",
            f"{b[1] - a[1]} of {args.requests} requests reused most of theirs")
    print(f"  wall time {time.monotonic() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
