"""Engines on this node's GPUs: started, probed, restarted, stopped.

``Services.serve`` checks a request (the engine allowed here, its config,
free VRAM minus what services still starting hold, a port in the node's
range that binds), pulls the model's copy from the mesh when this node has
none (lazy pull), and starts a supervisor task.  The supervisor runs the
engine in its own process group with ``CUDA_VISIBLE_DEVICES`` set to the
service's GPUs, probes it (its health path, and the model in ``/v1/models``
for OpenAI-style engines), and feeds ``protocol.serving.ServiceLife``: the
decisions (restart after a backoff, kill a hung engine, give up) are made
there.  Each state change is the service's record in the catalog
(``svc/<model>@<node>:<port>``).

Stopping sends SIGTERM to the group, waits ``drain_s``, then SIGKILL; once
the engine is gone the whole group is killed too, so no worker it forked
survives.  A pid file per service (``<data-dir>/services``) lets a node
restarted after kill -9 find the engines of its earlier run and stop them,
so no GPU stays held by an orphan.  The process side (groups, ports, logs,
orphans): ``meshnode.engineprocs``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import signal
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import trio

from protocol.engines import EnginePolicy, check_args, check_env_names
from protocol.keys import SVC_PREFIX, RecordError
from protocol.placement import vram_needed
from protocol.routing import parse_load
from protocol.serving import (
    EngineSpec,
    LifePolicy,
    ServeError,
    ServiceAction,
    ServiceLife,
    ServiceRecord,
    ServiceState,
    choose_port,
    engine_spec,
    parse_svc_key,
    pick_engine,
    svc_key,
    validate_config,
    vram_fits,
)

from .copies.store import Store
from .engineprocs import LOG_KEEP as LOG_KEEP  # re-exported: an engine's log bounds
from .engineprocs import LOG_MAX as LOG_MAX
from .engineprocs import bind_free, kill_group, log_tail, proc_stat, stop_orphans
from .engineprocs import bound_log as _bound_log  # (tests call it here)
from .errors import MeshError
from .gpus import FakeGpus, GpuMonitor
from .mesh import Mesh, wall_ms

__all__ = ["Services", "ServingSettings"]

log = logging.getLogger("meshnode.serving")

SERVICES_MAX = 64
STAGED_HOLD_S = 3600.0  # a model loaded for a GPU holds its VRAM this long, waiting for its serve
STARTING_PROBE_S = 0.5  # how often a starting engine is asked whether it is ready


ENGINE_HOST = "127.0.0.1"  # engines listen on loopback only: other nodes reach them through the signed peer hop


@dataclass(frozen=True)
class ServingSettings:
    run_dir: Path
    port_range: tuple[int, int] = (8000, 8999)
    engines: frozenset[str] = frozenset({"vllm", "llama.cpp", "sglang", "tgi"})
    binaries: dict[str, str] = field(default_factory=dict)
    drain_s: float = 30.0
    policy: LifePolicy = field(default_factory=LifePolicy)
    engine_policy: EnginePolicy = field(default_factory=EnginePolicy)


@dataclass
class _Service:
    model: str
    port: int
    gpus: tuple[int, ...]
    spec: EngineSpec
    vram_bytes: int
    life: ServiceLife
    log_path: Path
    pid_path: Path
    job_id: str | None
    started_ms: int = field(default_factory=wall_ms)
    proc: trio.Process | None = None
    ended: trio.Event = field(default_factory=trio.Event)  # ready, or given up
    stop_asked: trio.Event = field(default_factory=trio.Event)
    done: trio.Event = field(default_factory=trio.Event)  # the supervisor returned
    reserved: bool = True  # VRAM held while starting (NVML shows it once it runs)
    error_code: str | None = None
    log_tail: str | None = None  # kept when it fails
    load: tuple[int, int] | None = None  # the engine's (running, waiting), as last read


class Services:
    def __init__(self, mesh: Mesh, store: Store, gpus: GpuMonitor, settings: ServingSettings,
                 pull: Callable[[str], Any]) -> None:
        self.mesh = mesh
        self.store = store
        self.gpus = gpus
        self.settings = settings
        self._pull = pull  # async (model) -> None: a local copy of the model, from the mesh
        self._by_key: dict[str, _Service] = {}
        self._staged: dict[tuple[str, int], tuple[int, float]] = {}  # (model, gpu) -> (bytes, expires)
        self._nursery: trio.Nursery | None = None
        self._http = httpx.AsyncClient(timeout=settings.policy.probe_timeout_s, trust_env=False)

    # -- life of the executor -----------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self.settings.run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        await trio.to_thread.run_sync(stop_orphans, self.settings.run_dir, self.settings.drain_s)
        self._forget_own_records()
        try:
            async with trio.open_nursery() as n:
                self._nursery = n
                task_status.started()
                await trio.sleep_forever()
        finally:
            with trio.CancelScope(shield=True):
                await self._stop_all()
                await self._http.aclose()

    def _forget_own_records(self) -> None:
        """Our service records from an earlier run: those engines are gone now."""
        for nid, key, _value in list(self.mesh.items(SVC_PREFIX)):
            if nid == self.mesh.id:
                self.mesh.delete(key)

    async def _stop_all(self) -> None:
        for svc in list(self._by_key.values()):
            svc.life.stop()
            svc.stop_asked.set()
        with trio.move_on_after(self.settings.drain_s + 5):
            for svc in list(self._by_key.values()):
                await svc.done.wait()

    # -- requests ----------------------------------------------------------------------------

    def _taken_ports(self) -> set[int]:
        return {s.port for s in self._by_key.values() if not s.done.is_set()}

    def stage(self, model: str, gpu: int, nbytes: int) -> None:
        """A copy or move to ``node:gpuN``: hold ``nbytes`` of gpuN's VRAM for
        ``model`` until a serve of it there starts (or ``STAGED_HOLD_S`` pass).
        ``MeshError`` NO_CAPACITY when it does not fit."""
        now = trio.current_time()
        for k in [k for k, (_b, exp) in self._staged.items() if exp <= now]:
            del self._staged[k]
        self._staged.pop((model, gpu), None)  # staged again: counted once
        rec = self.gpus.current
        free = {g.index: g.free_bytes for g in rec.gpus} if rec is not None else {}
        why = vram_fits(nbytes, (gpu,), free, self._reserved())
        if why:
            raise MeshError("NO_CAPACITY", f"cannot load {model!r} for {self.mesh.id}:gpu{gpu}: {'; '.join(why)}")
        self._staged[(model, gpu)] = (nbytes, now + STAGED_HOLD_S)
        self.gpus.poke()

    def unstage(self, model: str, gpu: int) -> None:
        self._staged.pop((model, gpu), None)

    def _reserved(self) -> dict[int, int]:
        """VRAM that services still starting will take beyond what NVML already
        shows their processes using (an engine's memory appears as it loads),
        and what models loaded for a GPU hold until their serve starts."""
        rec = self.gpus.current
        used = {(g.index, p.pid): p.used_bytes or 0 for g in rec.gpus for p in g.processes} if rec else {}
        now = trio.current_time()
        out: dict[int, int] = {}
        for (_model, g), (nbytes, expires) in self._staged.items():
            if expires > now:
                out[g] = out.get(g, 0) + nbytes
        for s in self._by_key.values():
            if s.reserved:
                pid = s.proc.pid if s.proc is not None else -1
                for g in s.gpus:
                    share = math.ceil(s.vram_bytes / max(len(s.gpus), 1))
                    out[g] = out.get(g, 0) + max(share - used.get((g, pid), 0), 0)
        return out

    async def serve(self, model: str, gpus: tuple[int, ...], port: int | None, config: dict[str, Any],
                    *, size: int, requirements: dict[str, Any] | None, job_id: str | None = None,
                    wait: bool = True, default_engine: str | None = None) -> ServiceRecord:
        """Start ``model`` on ``gpus``; with ``wait``, return once it is healthy
        (raise when it gave up).  ``MeshError`` for anything refused."""
        try:
            if default_engine is not None and "engine" not in config:  # the registration's choice
                config = {**config, "engine": default_engine}
            return await self._serve(model, gpus, port, config, size, requirements, job_id, wait)
        except ServeError as e:
            raise MeshError(e.code, e.message) from None

    async def _serve(self, model: str, gpus: tuple[int, ...], port: int | None, config: dict[str, Any], size: int,
                     requirements: dict[str, Any] | None, job_id: str | None, wait: bool) -> ServiceRecord:
        if self._nursery is None:
            raise MeshError("STARTING", "the serving executor is not running yet")
        cfg = validate_config(config)
        check_env_names(cfg["env"], self.settings.engine_policy)  # refused before anything starts
        for key in [k for k, s in self._by_key.items() if s.done.is_set() and s.model == model and s.gpus == gpus]:
            self._by_key.pop(key)  # failed before: a new request starts it afresh
            self.mesh.delete(key)
        for s in self._by_key.values():
            if s.model == model and s.gpus == gpus and s.life.state.up:
                if wait:
                    await self._wait_ready(s)
                return self._record(s)  # serving it already: idempotent
        if len(self._by_key) >= SERVICES_MAX:
            raise ServeError("NO_CAPACITY", f"this node runs {SERVICES_MAX} services already")
        for g in gpus:  # what a move to these GPUs held is this serve's now
            self._staged.pop((model, g), None)
        copy = self.store.get(model, "disk") or self.store.get(model, "dram")
        files = [f.path for f in copy.manifest.files] if copy is not None else []
        engine = pick_engine(cfg.get("engine"), files)
        self._check_allowed(engine, cfg)
        rec = self.gpus.current
        free = {g.index: g.free_bytes for g in rec.gpus} if rec is not None else {}
        if gpus and not free:
            raise ServeError("NO_CAPACITY", f"{self.mesh.id} has no GPU")
        need = vram_needed(size, requirements) if gpus else 0
        why = vram_fits(need, gpus, free, self._reserved())
        if why:
            raise ServeError("NO_CAPACITY", f"not enough free VRAM on {self.mesh.id}: {'; '.join(why)}")
        chosen = None
        for p in choose_port(port, self.settings.port_range, self._taken_ports()):
            if await trio.to_thread.run_sync(bind_free, ENGINE_HOST, p):
                chosen = p
                break
        if chosen is None:
            raise ServeError("PORT_IN_USE", f"port {port} is in use on {self.mesh.id}" if port is not None
                             else f"no port of {self.settings.port_range[0]}-{self.settings.port_range[1]} binds")
        key = svc_key(model, self.mesh.id, chosen)
        if copy is None:
            await self._pull(model)  # lazy pull: the weights come from the mesh first
            copy = self.store.get(model, "disk") or self.store.get(model, "dram")
            if copy is None:
                raise ServeError("COPY_NOT_FOUND", f"{model!r} could not be pulled to {self.mesh.id}")
            files = [f.path for f in copy.manifest.files]
            engine = pick_engine(cfg.get("engine"), files)  # the files tell now (a .gguf: llama.cpp)
            self._check_allowed(engine, cfg)
        self.store.touch(copy.model, copy.kind)  # an engine reads it: used
        spec = engine_spec(engine, model, str(copy.path), files, ENGINE_HOST, chosen, gpus, cfg,
                           self.settings.binaries, self.settings.engine_policy, os.environ)
        if shutil.which(spec.argv[0]) is None:
            raise ServeError("ENGINE_NOT_FOUND", f"the {engine} engine's program {spec.argv[0]!r} is not on "
                             f"{self.mesh.id} (install it, or give its path with --engine-binaries)")
        policy = self.settings.policy
        if "startup_timeout_s" in cfg:
            policy = dataclasses.replace(policy, startup_timeout_s=cfg["startup_timeout_s"])
        if chosen in self._taken_ports():  # taken while the copy was pulled
            raise ServeError("PORT_IN_USE", f"port {chosen} was taken meanwhile")
        sid = key[len(SVC_PREFIX):].replace("/", "--").replace("@", "_").replace(":", "_")
        svc = _Service(model, chosen, gpus, spec, need, ServiceLife(policy), self.settings.run_dir / f"{sid}.log",
                       self.settings.run_dir / f"{sid}.json", job_id)
        self._by_key[key] = svc
        self._publish(svc)
        self._nursery.start_soon(self._supervise, key, svc)
        if wait:
            try:
                await self._wait_ready(svc)
            except trio.Cancelled:  # the step gave up (its timeout, a cancel): nothing is left running
                with trio.CancelScope(shield=True):
                    svc.life.stop()
                    svc.stop_asked.set()
                    with trio.move_on_after(self.settings.drain_s + 5):
                        await svc.done.wait()
                raise
        return self._record(svc)

    def _check_allowed(self, engine: str, cfg: dict[str, Any]) -> None:
        """The engine enabled here, and the caller's arguments in its allow list."""
        if engine not in self.settings.engines:
            raise ServeError("ENGINE_NOT_ALLOWED", f"engine {engine!r} is not enabled on {self.mesh.id} "
                             f"(--engines {','.join(sorted(self.settings.engines))})")
        check_args(engine, cfg["args"], self.settings.engine_policy, None)

    async def _wait_ready(self, svc: _Service) -> None:
        await svc.ended.wait()
        if svc.life.state is ServiceState.ERROR or not svc.life.ever_healthy:
            raise MeshError(svc.error_code or "ENGINE_FAILED",
                            f"{svc.life.error or 'the engine stopped'}; its log ends:\n{log_tail(svc.log_path)[-1500:]}")

    async def stop(self, model: str, port: int | None = None, gpus: tuple[int, ...] | None = None) -> list[ServiceRecord]:
        """Stop this node's services of ``model`` (on ``port``, or on ``gpus``); what stopped."""
        hits = [(k, s) for k, s in self._by_key.items() if s.model == model and (port is None or s.port == port)
                and (gpus is None or set(gpus) & set(s.gpus))]
        if not hits:
            raise MeshError("SERVICE_NOT_FOUND", f"{self.mesh.id} serves no {model!r}"
                            + (f" on port {port}" if port is not None else ""))
        for _k, s in hits:
            if not s.done.is_set():
                s.life.stop()
            s.stop_asked.set()
        for _k, s in hits:
            await s.done.wait()
        out = [self._record(s) for _k, s in hits]
        for k, _s in hits:  # those that had failed: listed until now
            if self._by_key.pop(k, None) is not None:
                self.mesh.delete(k)
        return out

    # -- the supervisor -----------------------------------------------------------------------

    async def _supervise(self, key: str, svc: _Service) -> None:
        try:
            while not svc.stop_asked.is_set():
                await self._run_once(svc)
                if svc.life.state is ServiceState.RESTARTING and svc.life.restart_at is not None:
                    self._publish(svc)
                    with trio.move_on_after(max(svc.life.restart_at - trio.current_time(), 0)):
                        await svc.stop_asked.wait()
                    continue
                break
        except Exception:  # a supervisor's bug is a log line and an error state, never the node's end
            log.exception("service %s: supervisor failed", key)
            svc.life.state, svc.life.error = ServiceState.ERROR, "the supervisor failed (see the node's log)"
        finally:
            if svc.life.state is not ServiceState.ERROR:
                svc.life.state = ServiceState.STOPPED
            svc.reserved = False
            svc.ended.set()
            svc.pid_path.unlink(missing_ok=True)
            if svc.life.state is ServiceState.STOPPED:
                self._by_key.pop(key, None)
                self.mesh.delete(key)
            else:
                self._publish(svc)  # error: it stays listed, with why, until it is stopped
            svc.done.set()
            self.gpus.poke()

    async def _run_once(self, svc: _Service) -> None:
        env = dict(svc.spec.env)  # built from the operator's allow lists (protocol.engines), never os.environ
        try:
            logf = await trio.to_thread.run_sync(svc.log_path.open, "ab")
        except OSError as e:
            svc.life.state, svc.life.error, svc.error_code = ServiceState.ERROR, f"cannot open its log: {e}", "INTERNAL"
            return
        try:
            proc = await trio.lowlevel.open_process(
                list(svc.spec.argv), stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT, env=env,
                cwd=str(self.settings.run_dir), start_new_session=True)
        except OSError as e:
            what = "is missing" if isinstance(e, FileNotFoundError) else f"cannot start: {e.strerror}"
            svc.life.state, svc.life.error = ServiceState.ERROR, f"the engine binary {svc.spec.argv[0]!r} {what}"
            svc.error_code = "ENGINE_NOT_FOUND" if isinstance(e, FileNotFoundError) else "ENGINE_FAILED"
            log.warning("service %s on port %d: %s", svc.model, svc.port, svc.life.error)
            return
        finally:
            logf.close()
        svc.proc = proc
        pgid = proc.pid  # start_new_session: the engine leads its own group
        svc.life.spawned(trio.current_time())
        st = proc_stat(proc.pid)
        svc.pid_path.write_text(json.dumps({"pid": proc.pid, "pgid": pgid, "port": svc.port, "model": svc.model,
                                            "start_ticks": st[1] if st is not None else 0, "started_ms": wall_ms()}))
        fake = self.gpus.reader if isinstance(self.gpus.reader, FakeGpus) else None
        if fake is not None:  # what the engine would take on a real GPU
            for g in svc.gpus:
                fake.allocate(g, proc.pid, math.ceil(svc.vram_bytes / len(svc.gpus)))
        self.gpus.poke()
        self._publish(svc)
        log.info("service %s: %s started as pid %d on port %d, GPUs %s", svc.model, svc.spec.engine, proc.pid,
                 svc.port, ",".join(map(str, svc.gpus)) or "none")
        try:
            async with trio.open_nursery() as n:
                n.start_soon(self._watch_exit, svc, proc, n.cancel_scope)
                n.start_soon(self._probe_loop, svc, pgid, n.cancel_scope)
                await svc.stop_asked.wait()
                n.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                await self._end_process(svc, proc, pgid)
                if fake is not None:
                    for g in svc.gpus:
                        fake.release(g, proc.pid)

    async def _watch_exit(self, svc: _Service, proc: trio.Process, scope: trio.CancelScope) -> None:
        code = await proc.wait()
        act = svc.life.exited(trio.current_time(), code)
        log.warning("service %s on port %d: the engine exited with code %s (%s)", svc.model, svc.port, code,
                    svc.life.state.value)
        self._after(svc, act)
        scope.cancel()

    async def _probe_loop(self, svc: _Service, pgid: int, scope: trio.CancelScope) -> None:
        p = svc.life.policy
        n = 0
        while True:
            n += 1
            if n % 20 == 0:
                await trio.to_thread.run_sync(_bound_log, svc.log_path)
            starting = svc.life.state is ServiceState.STARTING
            await trio.sleep(STARTING_PROBE_S if starting else p.probe_interval_s)
            ok, why = await self._probe(svc)
            now = trio.current_time()
            act = svc.life.probe_ok(now) if ok else svc.life.probe_failed(now, why)
            if ok and svc.spec.load_path is not None:
                await self._read_load(svc)  # published with the probe's outcome: every node routes by it
            self._after(svc, act)
            if act is ServiceAction.KILL:
                kill_group(pgid, signal.SIGKILL)  # hung (even SIGSTOPped): nothing but SIGKILL ends it
                log.warning("service %s on port %d: killed (%s)", svc.model, svc.port, svc.life.error)
                scope.cancel()
                return

    def _after(self, svc: _Service, act: ServiceAction) -> None:
        if act is ServiceAction.REPORT_READY:
            svc.reserved = False  # NVML counts its memory now
            svc.ended.set()
            log.info("service %s on port %d is healthy", svc.model, svc.port)
        elif svc.life.state is ServiceState.ERROR:
            svc.error_code = svc.error_code or "ENGINE_FAILED"
            svc.ended.set()
        self._publish(svc)

    async def _probe(self, svc: _Service) -> tuple[bool, str]:
        base = f"http://{ENGINE_HOST}:{svc.port}"
        try:
            r = await self._http.get(base + svc.spec.health_path)
            # An engine with no health route (llama-cpp-python's server): its model list tells instead.
            listed_only = r.status_code == 404 and svc.spec.health_fallback and svc.spec.models_path is not None
            if r.status_code != 200 and not listed_only:
                return False, f"{svc.spec.health_path} answered {r.status_code}"
            starting = svc.life.state is ServiceState.STARTING
            if svc.spec.models_path is not None and (starting or listed_only):  # readiness; liveness is /health
                r = await self._http.get(base + svc.spec.models_path)
                ids = [m.get("id") for m in r.json().get("data", []) if isinstance(m, dict)] if r.status_code == 200 else []
                if svc.model not in ids:
                    return False, f"{svc.spec.models_path} does not list {svc.model!r} yet"
            if svc.spec.completion_probe and not starting:
                r = await self._http.post(base + "/v1/completions",
                                          json={"model": svc.model, "prompt": "ping", "max_tokens": 1})
                if r.status_code != 200:
                    return False, f"a one-token completion answered {r.status_code}"
            return True, ""
        except (httpx.HTTPError, ValueError, AttributeError) as e:
            return False, f"{svc.spec.health_path}: {type(e).__name__}"

    async def _read_load(self, svc: _Service) -> None:
        """Read the engine's own load (``protocol.routing.parse_load``)."""
        assert svc.spec.load_path is not None and svc.spec.load_format is not None
        try:
            r = await self._http.get(f"http://{ENGINE_HOST}:{svc.port}{svc.spec.load_path}")
            load = parse_load(svc.spec.load_format, r.text) if r.status_code == 200 else None
        except httpx.HTTPError:
            load = None
        svc.load = load

    async def _end_process(self, svc: _Service, proc: trio.Process, pgid: int) -> None:
        if proc.returncode is None:
            if svc.stop_asked.is_set():
                svc.life.stop()
                self._publish(svc)
                kill_group(pgid, signal.SIGTERM)
                with trio.move_on_after(self.settings.drain_s):
                    await proc.wait()
            kill_group(pgid, signal.SIGKILL)
            await proc.wait()
        kill_group(pgid, signal.SIGKILL)  # any worker the engine forked into its group
        if svc.life.state is ServiceState.STOPPING:
            svc.life.state = ServiceState.STOPPED
        svc.log_tail = log_tail(svc.log_path) if svc.life.state is ServiceState.ERROR else None

    # -- the catalog and the API --------------------------------------------------------------

    def _record(self, svc: _Service) -> ServiceRecord:
        return ServiceRecord(svc.model, self.mesh.id, svc.port, svc.spec.engine, svc.gpus, svc.life.state,
                             svc.proc.pid if svc.proc is not None else None, svc.started_ms, svc.life.restarts,
                             svc.vram_bytes, svc.job_id, svc.life.error, svc.log_tail, svc.spec.health_path,
                             svc.load if svc.life.state is ServiceState.HEALTHY else None)

    def _publish(self, svc: _Service) -> None:
        self.mesh.set(svc_key(svc.model, self.mesh.id, svc.port), self._record(svc).to_value())

    @staticmethod
    def url_of(rec: ServiceRecord) -> str:
        """Where the engine answers, on its own node's loopback (other nodes
        reach it through the node's peer route: ``meshnode/proxy.py``)."""
        return f"http://{ENGINE_HOST}:{rec.port}"

    def record_json(self, rec: ServiceRecord) -> dict[str, Any]:
        out = rec.to_value()
        out["model_name"] = out.pop("model")
        out["device"] = rec.device
        out["url"] = self.url_of(rec)
        m = self.mesh.member(rec.node)
        # A service's record outlives its node's death until the node is reaped: say so.
        out["node_state"] = m.state.label if m is not None else "unknown"
        return out

    def records(self) -> list[ServiceRecord]:
        """Every service the mesh knows of, from the catalog."""
        out = []
        for _nid, key, value in self.mesh.items(SVC_PREFIX):
            if parse_svc_key(key) is None:
                continue
            try:
                out.append(ServiceRecord.from_value(value))
            except RecordError:
                continue
        return sorted(out, key=lambda r: (r.model, r.node, r.port))
