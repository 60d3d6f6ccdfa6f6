"""NVML on real hardware: a node's ``gpus`` record beside nvidia-smi, and a serve on gpu0 whose VRAM shows.

    python3 bench/gpu_proof.py [--vram-mib 4096]

Needs an NVIDIA GPU (``nvidia-smi`` and the driver's NVML); without one it
says so and exits 2.  One ``meshnode start`` on loopback, reading its GPUs
through NVML (no ``--fake-gpus``).  Printed:

1. each GPU as the node publishes it (``GET /nodes``) beside ``nvidia-smi``'s
   figures read at the same moment, and their difference;
2. a serve on ``node1:gpu0`` of a 1 MiB model with the test engine
   (``tests/engine/fake_engine.py --cuda-mib``, which holds that much real
   device memory through the CUDA driver API, as an engine's weights would):
   the GPU's used memory before, while it serves, and after ``stop_serve``, as
   the node's record and ``nvidia-smi`` see it, the engine's process in
   NVML's list, the reservation, a completion through the node;
3. ``/storage``'s gpu0 and the ``/metrics`` GPU lines.

Every figure is checked (a count, a uuid or a total that differs, VRAM that
does not show or is not given back: exit 1, with what differed).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench.jobs import free_port  # noqa: E402
from tests.engine.fake_engine import write_model  # noqa: E402

ENGINE = str(ROOT / "tests" / "engine" / "fake_engine.py")
MiB = 1 << 20
SMI_FIELDS = ("index", "uuid", "name", "memory.total", "memory.used", "memory.free", "utilization.gpu",
              "temperature.gpu", "power.draw", "power.limit")

failures: list[str] = []


def check(ok: bool, what: str) -> bool:
    print(f"  [{'ok' if ok else 'FAILED'}] {what}")
    if not ok:
        failures.append(what)
    return ok


def smi() -> list[dict[str, str]]:
    out = subprocess.run(["nvidia-smi", f"--query-gpu={','.join(SMI_FIELDS)}", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True, timeout=30, check=True).stdout
    return [dict(zip(SMI_FIELDS, (v.strip() for v in line.split(",")), strict=True))
            for line in out.splitlines() if line.strip()]


def smi_apps() -> list[dict[str, str]]:
    out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,gpu_uuid,used_memory", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True, timeout=30).stdout
    return [dict(zip(("pid", "gpu_uuid", "used_memory"), (v.strip() for v in line.split(",")), strict=False))
            for line in out.splitlines() if line.strip() and "," in line]


def num(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None  # "[N/A]", "[Not Supported]"


def wait(c: Callable[[], Any], what: str, timeout: float = 60) -> Any:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        v = c()
        if v:
            return v
        time.sleep(0.25)
    raise SystemExit(f"timed out after {timeout:g} s waiting for {what}")


def row(label: str, node: object, ref: object, diff: str = "") -> None:
    print(f"  {label:<26} {node!s:>22} {ref!s:>22}  {diff}")


def compare(gpus: list[dict[str, Any]], cards: list[dict[str, str]]) -> None:
    check(len(gpus) == len(cards), f"{len(gpus)} GPUs in the node's record, {len(cards)} in nvidia-smi")
    for g, s in zip(gpus, cards, strict=False):
        print(f"\n  GPU {g['index']}: {'figure':<16} {'node (NVML)':>22} {'nvidia-smi':>22}  difference")
        row("uuid", g["uuid"][:22], s["uuid"][:22], "same" if g["uuid"] == s["uuid"] else "DIFFERS")
        row("name", g["name"][:22], s["name"][:22])
        total_smi = num(s["memory.total"])
        for label, key, field in (("memory total MiB", "total_bytes", "memory.total"),
                                  ("memory used MiB", "used_bytes", "memory.used"),
                                  ("memory free MiB", "free_bytes", "memory.free")):
            ref, mine = num(s[field]), g[key] / MiB
            row(label, f"{mine:.0f}", s[field], "" if ref is None else f"{mine - ref:+.0f} MiB")
        row("utilisation %", g.get("util_pct"), s["utilization.gpu"])
        row("temperature C", g.get("temperature_c"), s["temperature.gpu"])
        power = g.get("power_mw")
        row("power W", None if power is None else f"{power / 1000:.1f}", s["power.draw"])
        limit = g.get("power_limit_mw")
        row("power limit W", None if limit is None else f"{limit / 1000:.0f}", s["power.limit"])
        check(g["uuid"] == s["uuid"], f"GPU {g['index']}: uuid as nvidia-smi's")
        check(total_smi is not None and abs(g["total_bytes"] / MiB - total_smi) <= 1,
              f"GPU {g['index']}: memory total as nvidia-smi's (to the MiB)")
        t = num(s["temperature.gpu"])
        if t is not None and g.get("temperature_c") is not None:
            check(abs(g["temperature_c"] - t) <= 3, f"GPU {g['index']}: temperature within 3 C of nvidia-smi's")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vram-mib", type=int, default=4096, help="GPU memory the engine holds (default 4096)")
    ap.add_argument("--dry-run", action="store_true",
                    help="this script's own flow without a GPU: fake GPUs, an engine holding nothing, a stand-in "
                         "nvidia-smi on PATH (its figures will not match)")
    args = ap.parse_args()
    if not 64 <= args.vram_mib <= 1 << 20:
        ap.error("--vram-mib: 64 to 1048576")
    if shutil.which("nvidia-smi") is None:
        print("no NVIDIA GPU here (nvidia-smi is missing): nothing to prove", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="gpu-proof-") as tmp, httpx.Client(timeout=30, trust_env=False) as c:
        root = Path(tmp)
        port, data_port = free_port(), free_port()
        url = f"http://127.0.0.1:{port}"
        log = open(root / "node1.log", "wb")
        node = subprocess.Popen(
            [sys.executable, "-m", "meshnode", "start", "--node-id", "node1", "--port", str(port),
             "--data-port", str(data_port), "--data-dir", str(root / "node1"), "--dram-dir", str(root / "shm"),
             "--gpu-interval", "0.5", "--engines", "command", "--allow-private-sources",
             "--ingest-roots", str(root), "--log-level", "INFO", *(["--fake-gpus", "1x24GiB"] if args.dry_run else [])],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=ROOT)
        try:
            def up() -> bool:
                if node.poll() is not None:
                    raise SystemExit("node1 did not start:\n" + (root / "node1.log").read_text(errors="replace")[-3000:])
                try:
                    return c.get(url + "/health").status_code == 200
                except httpx.HTTPError:
                    return False

            wait(up, "node1 to start")

            def me() -> dict[str, Any]:
                nodes = c.get(url + "/nodes").json()["nodes"]
                return next(n for n in nodes if n["self"])

            print("1. The node's GPUs (NVML, GET /nodes) beside nvidia-smi, read together")
            first = wait(lambda: me()["gpus"], "the node's gpus record", 30)
            status = me()["gpu_status"]
            print(f"  gpu_status: {json.dumps(status)}")
            check(status is not None and status["source"] == ("fake" if args.dry_run else "nvml") and not status["stale"],
                  "read through NVML, not stale")
            compare(first, smi())
            used0 = me()["gpus"][0]["used_bytes"]
            smi0 = num(smi()[0]["memory.used"]) or 0.0

            print(f"\n2. A serve on node1:gpu0 holding {args.vram_mib} MiB of device memory")
            src = root / "import" / "tiny"
            write_model(src, size=MiB)
            need = args.vram_mib * MiB
            r = c.post(url + "/models/proof/tiny/register",
                       json={"metadata": {"requirements": {"min_vram": need}}, "model_type": "llm"})
            check(r.status_code in (200, 201), f"registered with min_vram {args.vram_mib} MiB ({r.status_code})")
            r = c.post(url + "/models/proof/tiny/download",
                       json={"source_url": src.as_uri(), "target_device": "node1:disk"})
            check(r.status_code == 202, f"ingested ({r.status_code})")
            wait(lambda: any(loc.startswith("node1:disk") for loc in
                             c.get(url + "/models/proof/tiny").json().get("locations", [])), "the copy on disk")
            command = [sys.executable, ENGINE, "--model-dir", "{model_dir}", "--port", "{port}", "--host", "{host}",
                       "--served-model-name", "{model_name}", *([] if args.dry_run else ["--cuda-mib", str(args.vram_mib)])]
            t0 = time.monotonic()
            r = c.post(url + "/models/proof/tiny/services",
                       json={"device": "node1:gpu0", "config": {"engine": "command", "command": command}})
            check(r.status_code == 202, f"serve accepted ({r.status_code}: {r.text[:200]})")

            def healthy() -> dict[str, Any] | None:
                s = c.get(url + "/services").json()["services"]
                if s and s[0]["state"] in ("error", "stopped"):
                    raise SystemExit(f"the engine failed: {json.dumps(s[0])[:3000]}")
                return s[0] if s and s[0]["state"] == "healthy" else None

            svc = wait(healthy, "the engine to be healthy", 120)
            print(f"  healthy after {time.monotonic() - t0:.1f} s: pid {svc['pid']}, port {svc['port']}, "
                  f"reserved {svc['vram_bytes'] / MiB:.0f} MiB, gpus {svc['gpus']}")
            check(svc["vram_bytes"] == need, "the service reserves the model's min_vram")
            want = used0 + need * 0.95
            g = wait(lambda: (x := me()["gpus"][0])["used_bytes"] >= want and x, "the node's record to show the VRAM", 30)
            smi1 = num(smi()[0]["memory.used"]) or 0.0
            apps = smi_apps()
            print(f"\n  {'gpu0 memory used MiB':<26} {'node (NVML)':>22} {'nvidia-smi':>22}")
            row("before the serve", f"{used0 / MiB:.0f}", f"{smi0:.0f}")
            row("while it serves", f"{g['used_bytes'] / MiB:.0f}", f"{smi1:.0f}")
            row("added", f"{(g['used_bytes'] - used0) / MiB:.0f}", f"{smi1 - smi0:.0f}",
                f"engine holds {args.vram_mib}; node/held {(g['used_bytes'] - used0) / need:.3f}")
            print(f"  NVML's processes on gpu0 (node record): {g['processes']} of {g['processes_total']}")
            print(f"  nvidia-smi --query-compute-apps: {apps}")
            check(g["used_bytes"] - used0 >= need * 0.95, "the node's record shows the engine's VRAM")
            check(smi1 - smi0 >= args.vram_mib * 0.95, "nvidia-smi shows the engine's VRAM")
            check(abs(g["used_bytes"] / MiB - smi1) <= 256, "node and nvidia-smi agree on used memory (within 256 MiB)")
            procs = {p[0]: p[1] for p in g["processes"]}
            if procs:
                check(any(b is not None and b >= need * 0.95 for b in procs.values()),
                      "a process in NVML's list holds the engine's memory")
                print(f"  engine pid {svc['pid']} in NVML's list: {svc['pid'] in procs} "
                      "(a container's pid namespace can hide it)")
            st = c.get(url + "/storage").json()
            print(f"  /storage gpu0: {json.dumps(st['devices'].get('gpu0'))}")
            check("gpu0" in st["devices"], "/storage lists gpu0")
            comp = c.post(url + "/v1/completions", json={"model": "proof/tiny", "prompt": "hi", "max_tokens": 4})
            check(comp.status_code == 200, f"a completion through the node ({comp.status_code})")
            metrics = [ln for ln in c.get(url + "/metrics").text.splitlines() if ln.startswith("meshnode_gpu")]
            print("  /metrics:\n    " + "\n    ".join(metrics[:12]))
            check(bool(metrics), "/metrics has GPU lines")

            print("\n3. stop_serve: the VRAM goes back")
            r = c.delete(url + "/models/proof/tiny/services/node1")
            check(r.status_code in (200, 202), f"stop_serve ({r.status_code})")
            wait(lambda: not c.get(url + "/services").json()["services"], "the service to be gone", 60)
            g2 = wait(lambda: (x := me()["gpus"][0])["used_bytes"] <= used0 + need * 0.05 and x,
                      "the node's record to show the VRAM freed", 30)
            smi2 = num(smi()[0]["memory.used"]) or 0.0
            row("after stop_serve", f"{g2['used_bytes'] / MiB:.0f}", f"{smi2:.0f}")
            check(smi2 - smi0 <= args.vram_mib * 0.05, "nvidia-smi shows the VRAM freed")
            check(not any(a.get("pid") == str(svc["pid"]) for a in smi_apps()), "no engine process left on the GPU")
        finally:
            node.terminate()
            try:
                node.wait(timeout=20)
            except subprocess.TimeoutExpired:
                node.kill()
                node.wait()
            log.close()
            if failures:
                print("\nnode1's log (tail):\n" + (root / "node1.log").read_text(errors="replace")[-4000:])
    print(f"\n{'FAILED: ' + '; '.join(failures) if failures else 'every check passed'}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
