"""Jobs on this node: take pipelines, run this node's parts, answer for any job.

The decisions are ``protocol.jobs`` (what state a job is in, which parts are
whose, who coordinates, what is overdue) and ``protocol.placement``; this
module is their executor.  ``submit`` validates a pipeline whole, places the
steps that name no node, and writes the job record (durable before the 202).
``run`` wakes on every change to a job record (a catalog listener) and every
half second, derives each job's view, and

* starts the parts that are this node's (``runnable``), each in its own task,
  at most ``PARALLEL_MAX`` at once, higher ``priority`` first; a part writes
  its ``step/`` record as it goes (running with progress, then completed,
  failed or cancelled), retries what is retryable with backoff, and stops at
  the action's ``timeout_s``;
* for the jobs it coordinates: re-publishes a job whose writer is dead, fails
  with ``NODE_UNAVAILABLE`` a part whose node stayed unreachable past the
  bound, cancels such parts when the job is cancelled;
* cancels its running parts of a cancelled job (a transfer is cancelled and
  its partial removed);
* forgets its records of jobs that ended more than ``keep_s`` ago.

A part's work is idempotent, so a part resumed after a restart (its own
``running`` record, no task) is simply run again: a copy to a target that
holds it is "already present".
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
import re
import secrets
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import httpx
import trio

from protocol.gpus import GpusRecord
from protocol.healthcheck import (
    HealthTarget,
    TargetRefused,
    health_target,
    shown_url,
    unreachable_message,
)
from protocol.jobs import (
    CANCEL_PREFIX,
    JOB_PREFIX,
    STEP_PREFIX,
    ActionStatus,
    CancelRecord,
    JobBook,
    JobRecord,
    JobStatus,
    JobView,
    Part,
    PartStatus,
    StepRecord,
    cancel_key,
    coordinator,
    job_key,
    job_view,
    overdue_parts,
    parts,
    runnable,
    step_key,
)
from protocol.keys import GPUS_KEY, STORAGE_KEY, RecordError, Storage
from protocol.pipeline import (
    Action,
    InvalidPipeline,
    Pipeline,
    StepDevice,
    check_against,
    parse_pipeline,
)
from protocol.placement import GpuFacts, NodeFacts, NoPlacement, place, rank, vram_needed
from protocol.serving import ServiceState

from .actions import Router
from .copies.transfers import Transfers
from .errors import MeshError, first_mesh_error
from .mesh import Mesh, wall_ms
from .peers import PeerClient, Recipient
from .registry import Registry, model_name
from .saver import Saver
from .serving import Services

__all__ = ["JobSettings", "Jobs"]

log = logging.getLogger("meshnode.jobs")

PARALLEL_MAX = 32  # parts this node runs at once
ACTIVE_JOBS_MAX = 256  # unfinished jobs the mesh takes; more is 429
KEPT_JOBS_MAX = 1024  # finished ones kept past that are forgotten, oldest first
TICK_S = 0.5
RETRYABLE = frozenset({"NODE_UNAVAILABLE", "PEER_UNREACHABLE", "PEER_ERROR", "NO_SOURCE", "UNAVAILABLE",
                       "TIMEOUT", "INTERRUPTED", "UNHEALTHY", "IO_ERROR"})
JOB_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
HEALTH_TIMEOUT_S = 60.0  # a health check with no timeout_s
PROGRESS_S = 1.0
REPLICAS = 2  # peers asked to hold a new job before the 202
REPLICATE_WAIT_S = 3.0


@dataclass(frozen=True)
class JobSettings:
    node_wait_s: float = 60.0  # a part whose node is unreachable this long fails NODE_UNAVAILABLE
    keep_s: float = 24 * 3600.0  # finished jobs are forgotten after this


def _problems_json(e: InvalidPipeline) -> MeshError:
    return MeshError("INVALID_PIPELINE", f"the pipeline is not valid: {e}",
                     details={"problems": [p.to_value() for p in e.problems], "problem_count": e.total})


class Jobs:
    def __init__(self, mesh: Mesh, registry: Registry, router: Router, transfers: Transfers, saver: Saver,
                 peers: PeerClient, settings: JobSettings, rng: random.Random,
                 services: Services | None = None) -> None:
        self.mesh = mesh
        self.services = services
        self.peers = peers
        self.rng = rng
        self.registry = registry
        self.router = router
        self.transfers = transfers
        self.saver = saver
        self.settings = settings
        self.book = JobBook()
        self._wake = trio.Event()
        self._running: dict[tuple[str, str, int], trio.CancelScope] = {}
        self._nursery: trio.Nursery | None = None
        self._http = httpx.AsyncClient(trust_env=False, timeout=5.0, follow_redirects=False)
        self._transfer_of: dict[str, str] = {}  # step key -> the transfer it follows
        self.started_parts = 0
        self._ends_logged: set[str] = set()  # jobs whose end this node (their coordinator) logged

    # -- catalog listener: the job book follows every job record --------------------------

    def key_changed(self, node_id: str, key: str, value: Any | None) -> None:
        if key.startswith((JOB_PREFIX, STEP_PREFIX, CANCEL_PREFIX)):
            bad = self.book.bad_records
            self.book.put(node_id, key, value)
            if self.book.bad_records != bad:
                log.debug("skipping a bad job record %s from %s", key[:80], node_id)
            self._wake.set()

    def node_cleared(self, node_id: str) -> None:
        self.book.clear_writer(node_id)
        self._wake.set()

    def load(self) -> None:
        """What the catalog already holds (restored from disk before we subscribed)."""
        for prefix in (JOB_PREFIX, STEP_PREFIX, CANCEL_PREFIX):
            for nid, key, value in self.mesh.items(prefix):
                self.book.put(nid, key, value)

    # -- reading -------------------------------------------------------------------------

    def views(self) -> list[JobView]:
        return self.book.views(self._reachable)

    def view(self, job_id: str) -> JobView:
        v = self.book.view(job_id, self._reachable) if len(job_id) <= 64 else None
        if v is None:
            raise MeshError("JOB_NOT_FOUND", f"no job {job_id[:40]!r} is known")
        return v

    def _gpu_indexes(self, node_id: str) -> list[int] | None:
        """The GPUs ``node_id`` reports (None: it has reported none we can read yet)."""
        raw = self.mesh.get(node_id, GPUS_KEY)
        try:
            return None if raw is None else [g.index for g in GpusRecord.from_value(raw).gpus]
        except RecordError:
            return None

    def _reachable(self, node_id: str) -> bool:
        return node_id == self.mesh.id or self.mesh.reachable(node_id)

    # -- taking a pipeline -----------------------------------------------------------------

    async def submit(self, doc: Any, job_id: str | None = None) -> tuple[JobView, list[str]]:
        """Take a pipeline: its job, and the peers that held it too at the answer.
        ``job_id``: the caller's (gswarm's ``POST /jobs/{id}/create``), refused
        409 ``JOB_ID_TAKEN`` when the mesh knows a job of that id."""
        if job_id is not None:
            if not JOB_ID.fullmatch(job_id):
                raise MeshError("INVALID_REQUEST", "a job id is 1 to 64 letters, digits, '.', '_' or '-'")
            if self.book.view(job_id, self._reachable) is not None:
                raise MeshError("JOB_ID_TAKEN", f"the mesh already has a job {job_id!r}")
        try:
            pipe = parse_pipeline(doc)
            known = {m.record.node_id for m in self.mesh.members()}
            check_against(pipe, known_node=known.__contains__,
                          registered=lambda m: self.registry.find(m) is not None, gpus_of=self._gpu_indexes)
        except InvalidPipeline as e:
            raise _problems_json(e) from None
        active = sum(1 for v in self.views() if v.status in (JobStatus.PENDING, JobStatus.RUNNING))
        if active >= ACTIVE_JOBS_MAX:
            raise MeshError("TOO_MANY_JOBS", f"{active} jobs are unfinished: at most {ACTIVE_JOBS_MAX}; "
                            "wait for some to end, or cancel them")
        pipe = self._place(pipe)
        rec = JobRecord(job_id or secrets.token_hex(8), pipe, self.mesh.id, wall_ms())
        self.mesh.set(job_key(rec.job_id), rec.to_value())
        await self.saver.persist_now()
        held_by = await self._replicate()
        log.info("job %s (%s): %d actions, taken; also held by %s", rec.job_id, pipe.name, len(pipe.actions),
                 ", ".join(held_by) or "no other node yet")
        self._wake.set()
        return job_view(rec, {}, None, self._reachable), held_by

    async def _replicate(self) -> list[str]:
        """Before the 202: the job is on another node too (so no single death loses
        it), when any is reachable.  Asks up to ``REPLICAS`` live peers whether
        they have our write; those that said yes within a few seconds."""
        token = self.mesh.token()
        peers = [m.record for m in self.mesh.members()
                 if m.record.node_id != self.mesh.id and self._reachable(m.record.node_id)]
        self.rng.shuffle(peers)
        held: list[str] = []
        done = trio.Event()

        async def ask(node_id: str, address: str, generation: int) -> None:
            if await self.peers.seen(address, token, to=Recipient(node_id, generation)):
                held.append(node_id)
                done.set()

        with trio.move_on_after(REPLICATE_WAIT_S):
            async with trio.open_nursery() as n:
                for r in peers[:REPLICAS]:
                    n.start_soon(ask, r.node_id, r.address, r.generation)
                if peers:
                    await done.wait()
                n.cancel_scope.cancel()
        return held

    def facts(self, model: str | None) -> list[NodeFacts]:
        mv = self.registry.find(model) if model else None
        holders = {d.split(":", 1)[0] for d in (mv.locations if mv else [])}
        out = []
        for m in self.mesh.members():
            nid = m.record.node_id
            free: dict[str, int] = {}
            try:
                st = Storage.from_value(self.mesh.get(nid, STORAGE_KEY) or {})
                free = {k: u.free for k, u in st.tiers.items()}
            except RecordError:
                pass
            gpus: tuple[GpuFacts, ...] = ()
            try:
                raw = self.mesh.get(nid, GPUS_KEY)
                if raw is not None:
                    gpus = tuple(GpuFacts(g.index, g.free_bytes) for g in GpusRecord.from_value(raw).gpus)
            except RecordError:
                pass
            out.append(NodeFacts(nid, self._reachable(nid), free, gpus, nid in holders))
        return out

    def placement(self, model: str, tier: str) -> dict[str, Any]:
        """``GET /placement``: the ranking and its reasons, nothing run."""
        if tier not in ("disk", "dram", "gpu"):
            raise MeshError("INVALID_DEVICE", "device is disk, dram or gpu")
        mv = self.registry.find(model_name(model))
        if mv is None:
            raise MeshError("MODEL_NOT_AVAILABLE", f"model {model!r} is not registered")
        size = mv.size or 0
        need = vram_needed(size, (mv.metadata or {}).get("requirements")) if tier == "gpu" else size
        ranking = rank(tier, need, self.facts(mv.name))
        best = next((c for c in ranking if c.fits), None)
        return {"model_name": mv.name, "device": tier, "needs_bytes": need,
                "chosen": best.device if best else None, "ranking": [c.to_value() for c in ranking]}

    def _place(self, pipe: Pipeline) -> Pipeline:
        """Give every device that names no node one (``protocol.placement``)."""
        actions = []
        for a in pipe.actions:
            if a.action_type == "serve" and not a.devices:
                a = dataclasses.replace(a, devices=(StepDevice(None, "gpu"),))
            if all(d.node is not None for d in a.devices):
                actions.append(a)
                continue
            mv = self.registry.find(a.model_name) if a.model_name else None
            size = (mv.size or 0) if mv else 0
            devs = []
            for d in a.devices:
                if d.node is not None:
                    devs.append(d)
                    continue
                need = vram_needed(size, (mv.metadata or {}).get("requirements") if mv else None) \
                    if d.tier == "gpu" else size
                try:
                    best, _ = place(d.tier, need, self.facts(a.model_name))
                except NoPlacement as e:
                    raise MeshError(e.code, f"action {a.action_id!r}: {e.message}",
                                    details={"ranking": [c.to_value() for c in e.ranking]}) from None
                assert best.device is not None
                node, kind = best.device.split(":", 1)
                devs.append(StepDevice(node, kind))
            actions.append(dataclasses.replace(a, devices=tuple(devs)))
        return dataclasses.replace(pipe, actions=tuple(actions))

    async def cancel(self, job_id: str) -> JobView:
        v = self.view(job_id)
        if v.status in (JobStatus.PENDING, JobStatus.RUNNING) and v.cancelled is None:
            self.mesh.set(cancel_key(job_id), CancelRecord(wall_ms(), self.mesh.id).to_value())
            await self.saver.persist_now()
            log.info("job %s: cancel asked", job_id)
            self._wake.set()
        return self.view(job_id)

    # -- the loop ----------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                task_status.started()
                while True:
                    with trio.move_on_after(TICK_S):
                        await self._wake.wait()
                    self._wake = trio.Event()
                    try:
                        self.tick()
                    except Exception:  # a bug in one round must not end the loop
                        log.exception("the job loop's round failed")
        finally:
            with trio.CancelScope(shield=True):
                await self._http.aclose()

    def tick(self) -> None:
        me = self.mesh.id
        live = [m.record.node_id for m in self.mesh.members() if self._reachable(m.record.node_id)]
        views = self.views()
        starts: list[tuple[int, JobView, Action, Part]] = []
        for v in views:
            jid = v.job.job_id
            coord = coordinator(v.job, self._reachable, live) == me
            if v.cancelled is not None:
                for (j, _a, _p), scope in list(self._running.items()):
                    if j == jid:
                        scope.cancel()
            if coord:
                self._coordinate(v)
            for a, p in runnable(v, me, coord):
                if (jid, a.action_id, p.index) not in self._running:
                    starts.append((v.job.pipeline.priority, v, a, p))
        starts.sort(key=lambda s: -s[0])
        for _prio, v, a, p in starts:
            if len(self._running) >= PARALLEL_MAX:
                break
            self._start_part(v, a, p)
        self._collect(views)

    def _coordinate(self, v: JobView) -> None:
        jid = v.job.job_id
        me = self.mesh.id
        if v.status not in (JobStatus.PENDING, JobStatus.RUNNING) and jid not in self._ends_logged:
            self._log_end(v)
        if self.mesh.entry(me, job_key(jid)) is None and not self._reachable(v.job.submitted_by):
            self.mesh.set(job_key(jid), v.job.to_value())  # outlives the reap of its dead writer's keys
            log.info("job %s: coordinating it, its writer %s being gone", jid, v.job.submitted_by)
        now = wall_ms()
        if v.cancelled is not None:
            for av in v.actions.values():
                if av.status is ActionStatus.WAITING_NODE:
                    for p in parts(av.action):
                        rec = av.parts.get(p.index)
                        if rec is None or not rec.status.final:
                            self._verdict(jid, av.action, p, PartStatus.CANCELLED, "", "the job was cancelled")
            return
        bound = int(self.settings.node_wait_s * 1000)
        for a, p in overdue_parts(v, self._down_since_ms, now, bound):
            node = p.node or "?"
            self._verdict(jid, a, p, PartStatus.FAILED, "NODE_UNAVAILABLE",
                          f"node {node} was unreachable for over {self.settings.node_wait_s:g} s")

    def _log_end(self, v: JobView) -> None:
        """One INFO line when a job ends, from its coordinator, and only for
        a recent end (a restart does not log the ends it reads back)."""
        if len(self._ends_logged) >= 2 * KEPT_JOBS_MAX:
            self._ends_logged.clear()
        self._ends_logged.add(v.job.job_id)
        if wall_ms() - v.finished_ms > 60_000:
            return
        took = max(v.finished_ms - v.job.submitted_ms, 0) / 1000
        steps = ", ".join(f"{aid} {av.status.value}" for aid, av in v.actions.items())
        why = f"; first error: {v.first_error[0]} {v.first_error[1]}" if v.first_error else ""
        log.info("job %s (%r) %s in %.1f s: %s%s", v.job.job_id, v.job.pipeline.name, v.status.value, took, steps, why)

    def _verdict(self, jid: str, a: Action, p: Part, status: PartStatus, code: str, message: str) -> None:
        now = wall_ms()
        rec = StepRecord(status, self.mesh.id, 0, now, now, code, message)
        self.mesh.set(step_key(jid, a.action_id, p.index), rec.to_value())
        log.warning("job %s: %s part %d %s: %s", jid, a.action_id, p.index, status.value, message)

    def _down_since_ms(self, node_id: str) -> int | None:
        if self._reachable(node_id):
            return None
        m = self.mesh.member(node_id)
        if m is None:
            return 0
        return wall_ms() - int(max(trio.current_time() - m.since, 0.0) * 1000)

    def _collect(self, views: Iterable[JobView]) -> None:
        """Forget our records of jobs that ended long ago (or past the count bound)."""
        now = wall_ms()
        ended = sorted((v.finished_ms, v.job.job_id) for v in views
                       if v.status not in (JobStatus.PENDING, JobStatus.RUNNING))
        over = max(len(ended) - KEPT_JOBS_MAX, 0)
        for i, (fin, jid) in enumerate(ended):
            if i < over or now - fin > self.settings.keep_s * 1000:
                self._forget(jid)

    def _forget(self, jid: str) -> None:
        self._ends_logged.discard(jid)
        for key, _e in list(self.mesh.own_keys(JOB_PREFIX + jid)):
            if key == job_key(jid):
                self.mesh.delete(key)
        for key, _e in list(self.mesh.own_keys(f"{STEP_PREFIX}{jid}/")):
            self.mesh.delete(key)
        for key, _e in list(self.mesh.own_keys(cancel_key(jid))):
            self.mesh.delete(key)

    # -- one part ----------------------------------------------------------------------------

    def _start_part(self, v: JobView, a: Action, p: Part) -> None:
        assert self._nursery is not None
        key = (v.job.job_id, a.action_id, p.index)
        scope = trio.CancelScope()
        self._running[key] = scope
        self.started_parts += 1
        self._nursery.start_soon(self._run_part, v.job, a, p, scope)

    async def _run_part(self, job: JobRecord, a: Action, p: Part, scope: trio.CancelScope) -> None:
        try:
            await self._run_part_in(job, a, p, scope)
        except Exception:  # a bug, or a disk that will not take the record: a log line, never the node's end
            log.exception("job %s: %s part %d crashed", job.job_id, a.action_id, p.index)

    async def _run_part_in(self, job: JobRecord, a: Action, p: Part, scope: trio.CancelScope) -> None:
        jid = job.job_id
        key = step_key(jid, a.action_id, p.index)
        state = StepRecord(PartStatus.RUNNING, self.mesh.id, 1, wall_ms())
        self.mesh.set(key, state.to_value())
        log.info("job %s: %s (%s) part %d started here", jid, a.action_id, a.action_type, p.index)
        final: StepRecord | None = None
        try:
            with scope:
                final = await self._attempts(job, a, p, state, key)
            if final is None:  # our scope: the job was cancelled (a stopping node never gets here)
                self._cancel_transfer(key)
                final = dataclasses.replace(state, status=PartStatus.CANCELLED, finished_ms=wall_ms(),
                                            note="cancelled with the job")
        finally:
            self._running.pop((jid, a.action_id, p.index), None)
            self._transfer_of.pop(key, None)
        self.mesh.set(key, final.to_value())
        await self.saver.persist_now()
        log.info("job %s: %s part %d %s%s", jid, a.action_id, p.index, final.status.value,
                 f": {final.error_code}: {final.error_message}" if final.error_code else "")
        self._wake.set()

    async def _attempts(self, job: JobRecord, a: Action, p: Part, state: StepRecord, key: str) -> StepRecord:
        attempt = 1
        while True:
            state = dataclasses.replace(state, attempt=attempt)
            self.mesh.set(key, state.to_value())
            try:
                timeout = a.timeout_s if a.timeout_s is not None else math.inf
                with trio.fail_after(timeout):
                    note = await self._work(job, a, p, key, state)
                return dataclasses.replace(state, status=PartStatus.COMPLETED, finished_ms=wall_ms(), note=note)
            except trio.TooSlowError:
                self._cancel_transfer(key)
                code, message = "TIMEOUT", f"the step took longer than its timeout_s ({a.timeout_s:g} s)"
            except MeshError as e:
                code, message = e.code, e.message
            except Exception as exc:
                e2 = first_mesh_error(exc)
                if e2 is None:
                    log.exception("job %s: %s crashed", job.job_id, a.action_id)
                    code, message = "INTERNAL", f"{type(exc).__name__}: {exc}"
                else:
                    code, message = e2.code, e2.message
            if code not in RETRYABLE or attempt > a.retries:
                return dataclasses.replace(state, status=PartStatus.FAILED, finished_ms=wall_ms(),
                                           error_code=code, error_message=message[:1000])
            delay = min(a.backoff_s * 2 ** (attempt - 1), 3600.0)
            log.info("job %s: %s attempt %d failed (%s), again in %.1f s", job.job_id, a.action_id, attempt, code, delay)
            await trio.sleep(delay)
            attempt += 1

    async def _work(self, job: JobRecord, a: Action, p: Part, key: str, state: StepRecord) -> str:
        """Do one part's work here; its note.  Raises ``MeshError`` on failure."""
        t = a.action_type
        if t in ("serve", "stop_serve"):
            return await self._serving(job, a, t)
        if p.device is not None and p.device.tier == "gpu":
            return await self._gpu_target(job, a, p, key, state)
        if t == "health_check":
            return await self._health(a)
        assert a.model_name is not None and p.device is not None
        if t == "delete":
            done = await self.router.delete_copy(a.model_name, str(p.device))
            return "deleted" if done is not None else "nothing to delete: no copy there"
        if t == "download":
            body: dict[str, Any] = {"target_device": str(p.device)}
            if a.source_url:
                body["source_url"] = a.source_url
            for k in ("revision", "allow_patterns", "ignore_patterns"):
                if k in a.config:
                    body[k] = a.config[k]
            answer = await self.router.download(a.model_name, body)
        else:  # copy, move
            src = str(a.devices[0])
            drop = t == "move" and not a.keep_source
            one = len(a.devices) == 2
            # One target: a move is the transfer's own (copy, then drop the source); several:
            # copies, and the last target drops the source below.
            body = {"from_device": src, "to_device": str(p.device)}
            answer = await self.router.copy(a.model_name, body, move=drop and one)
            note = await self._follow(answer, key, state)
            if drop and not one and p.index == len(a.devices) - 2:
                # Several targets: the last one drops the source once every target has its copy.
                await self._after_others(job, a, p)
                await self.router.delete_source(a.model_name, src)
                return f"{note}; the source {src} deleted"
            return note
        return await self._follow(answer, key, state)

    async def _gpu_target(self, job: JobRecord, a: Action, p: Part, key: str, state: StepRecord) -> str:
        """A copy or move to ``node:gpuN`` loads the model for that GPU: the weights
        staged on this node's fastest tier, the VRAM it needs reserved on gpuN
        until a serve there takes it.  A delete of ``node:gpuN`` stops what serves
        the model there."""
        if self.services is None:
            raise MeshError("NOT_SUPPORTED", "this node has no serving executor")
        assert a.model_name is not None and p.device is not None
        gpu = int(p.device.kind[3:]) if p.device.kind[3:].isdigit() else 0
        if a.action_type == "delete":
            try:
                stopped = await self.services.stop(a.model_name, gpus=(gpu,))
            except MeshError as e:
                if e.code != "SERVICE_NOT_FOUND":
                    raise
                self.services.unstage(a.model_name, gpu)
                return f"gpu{gpu} held nothing of it"
            return "freed: stopped " + ", ".join(f"port {s.port}" for s in stopped)
        mv = self.registry.find(a.model_name)
        if mv is None:
            raise MeshError("MODEL_NOT_AVAILABLE", f"model {a.model_name!r} is not registered")
        me = self.mesh.id
        share_of = sum(1 for d in a.devices[1:] if d.node == me and d.tier == "gpu")
        need = vram_needed(mv.size or 0, (mv.metadata or {}).get("requirements"))
        self.services.stage(mv.name, gpu, -(-need // max(share_of, 1)))  # NO_CAPACITY when it does not fit
        tier = "dram" if "dram" in (self.mesh.get(me, STORAGE_KEY) or {}) else "disk"  # the fastest tier here
        src = str(a.devices[0])
        staged = f"{me}:{tier}"
        notes = []
        if not any(c.device == staged for c in mv.copies):
            answer = await self.router.copy(mv.name, {"from_device": src, "to_device": staged}, move=False)
            notes.append(await self._follow(answer, key, state))
        else:
            notes.append(f"already staged on {staged}")
        gpus_here = [d for d in a.devices[1:] if d.tier == "gpu"]
        last = p.index == len(a.devices) - 2
        if a.action_type == "move" and not a.keep_source and src != staged and last:
            if len(gpus_here) > 1:
                await self._after_others(job, a, p)
            await self.router.delete_source(mv.name, src)
            notes.append(f"the source {src} deleted")
        return f"loaded for gpu{gpu}: {need // max(share_of, 1) / 2**30:.1f} GiB reserved; " + "; ".join(notes)

    async def _serving(self, job: JobRecord, a: Action, t: str) -> str:
        """A serve (healthy, or failed with the engine's log tail) or a stop_serve, on this node's GPUs."""
        if self.services is None:
            raise MeshError("NOT_SUPPORTED", "this node has no serving executor")
        assert a.model_name is not None
        me = self.mesh.id
        gpus = tuple(sorted(int(d.kind[3:]) for d in a.devices if d.node == me and d.kind[3:].isdigit()))
        if t == "stop_serve":
            try:
                stopped = await self.services.stop(a.model_name, gpus=gpus or None)
            except MeshError as e:
                if e.code != "SERVICE_NOT_FOUND":
                    raise
                return "nothing to stop: not served here"
            return "stopped " + ", ".join(f"port {s.port}" for s in stopped)
        mv = self.registry.find(a.model_name)
        if mv is None:
            raise MeshError("MODEL_NOT_AVAILABLE", f"model {a.model_name!r} is not registered")
        md = mv.metadata or {}
        rec = await self.services.serve(mv.name, gpus, a.port, dict(a.config), size=mv.size or 0,
                                        requirements=md.get("requirements"), job_id=job.job_id,
                                        default_engine=md.get("engine"))
        return f"{rec.engine} healthy on port {rec.port} (pid {rec.pid})"

    def _cancel_transfer(self, key: str) -> None:
        tid = self._transfer_of.get(key)
        if tid is not None:
            self.transfers.cancel(tid, "its job step was cancelled or timed out")

    async def _after_others(self, job: JobRecord, a: Action, p: Part) -> None:
        """A move's last target waits for the other targets before it drops the source."""
        while True:
            v = self.view(job.job_id)
            av = v.actions[a.action_id]
            others = [r for i, r in av.parts.items() if i != p.index]
            if all(r is not None and r.status is PartStatus.COMPLETED for r in others):
                return
            if any(r is not None and r.status.final and r.status is not PartStatus.COMPLETED for r in others):
                raise MeshError("INCOMPLETE", "another target of this move failed: the source is kept")
            await trio.sleep(0.2)

    async def _follow(self, answer: dict[str, Any], key: str, state: StepRecord) -> str:
        """Wait for the local transfer ``answer`` names; progress into the step record."""
        tid = str(answer.get("transfer_id", ""))
        tr = self.transfers.by_id.get(tid)
        if tr is None:
            raise MeshError("INTERNAL", f"the transfer {tid[:20]!r} did not start here")
        self._transfer_of[key] = tid
        next_progress = trio.current_time()
        while tr.status.active:
            if trio.current_time() >= next_progress:
                self.mesh.set(key, dataclasses.replace(
                    state, transfer_id=tid, bytes_done=tr.bytes_done, bytes_total=tr.bytes_total).to_value())
                next_progress = trio.current_time() + PROGRESS_S
            await trio.sleep(0.1)
        if tr.error is not None:
            raise MeshError(tr.error.code, tr.error.message)
        return f"transfer {tid}: {tr.note or 'done'}"

    def _service_health_url(self, model: str) -> str | None:
        """The health URL of a service of ``model`` on this node (engines listen
        on their node's loopback), or None when this node runs none."""
        if self.services is None:
            return None
        recs = [r for r in self.services.records() if r.model == model and r.node == self.mesh.id]
        recs.sort(key=lambda r: (r.state is not ServiceState.HEALTHY, r.port))
        return self.services.url_of(recs[0]) + recs[0].health_path if recs else None

    def _healthy_elsewhere(self, model: str) -> str | None:
        """A healthy service of ``model`` on another node, as its node reports it
        (the node probes its own engine every few seconds): where it runs."""
        if self.services is None or self._service_health_url(model) is not None:
            return None
        recs = sorted(f"{r.node}:{r.port}" for r in self.services.records()
                      if r.model == model and r.node != self.mesh.id and r.state is ServiceState.HEALTHY
                      and self._reachable(r.node))
        return recs[0] if recs else None

    async def _health(self, a: Action) -> str:
        if a.target_url is None:  # the model's service
            model = str(a.model_name)
            deadline = trio.current_time() + (a.timeout_s if a.timeout_s is not None else HEALTH_TIMEOUT_S)
            while self._service_health_url(model) is None:  # none here: its own node's probes tell
                where = self._healthy_elsewhere(model)
                if where is not None:
                    return f"healthy: {where} reports it healthy (its node probes it)"
                if trio.current_time() + 1.0 > deadline:
                    raise MeshError("UNHEALTHY", f"no healthy service of {model[:200]!r} in the mesh")
                await trio.sleep(1.0)
            return await self._health_of(a, lambda: self._service_health_url(model))
        url = a.target_url
        return await self._health_of(a, lambda: url)

    def _health_target(self, url: str) -> HealthTarget:
        """What a check of ``url`` fetches from here (``protocol.healthcheck``): a member's
        node id replaced by its advertised host; the mesh's own hosts and services marked."""
        members = {m.record.node_id: m.record.address for m in self.mesh.members()}
        services = [(r.node, r.port) for r in self.services.records()] if self.services is not None else []
        return health_target(url, members, services, here=self.mesh.id)

    async def _health_of(self, a: Action, target: Callable[[], str | None]) -> str:
        """Look at the target once a second until it answers 2xx or the time is up.  A
        target that answers reports its status; one that cannot be reached, or may not
        be (whatever the cause), fails with one message (``unreachable_message``)."""
        budget_s = a.timeout_s if a.timeout_s is not None else HEALTH_TIMEOUT_S
        # Ends a little before the step's own timeout_s, so a hanging target is "not reachable", not TIMEOUT.
        deadline = trio.current_time() + budget_s - min(0.25, budget_s / 4)
        me = self.mesh.id
        tries = 0
        last: str | None = None  # None: the target did not answer
        shown = ""
        while True:
            tries += 1
            url = target()
            if url is None:
                last, shown = f"no service of {a.model_name!r} in the mesh", str(a.model_name)
            else:
                try:
                    t = self._health_target(url)
                except TargetRefused:
                    raise MeshError("UNHEALTHY", unreachable_message(shown_url(url), me)) from None
                shown = t.shown
                status: int | None = None
                with trio.move_on_at(deadline):
                    status = await self.router.executors.probe_health(self._http, t)  # UNHEALTHY: refused now
                if status is not None and 200 <= status < 300:
                    return f"healthy (HTTP {status}) from {me}: fetched {shown} after {tries} tries"
                last = None if status is None else f"HTTP {status}"
            if trio.current_time() + 1.0 > deadline:
                if last is None:
                    raise MeshError("UNHEALTHY", unreachable_message(shown, me))
                raise MeshError("UNHEALTHY", f"health check of {shown[:200]} from {me}: not healthy after {tries} "
                                f"tries (last: {last})")
            await trio.sleep(1.0)

    # -- what the API shows --------------------------------------------------------------------

    def job_json(self, v: JobView) -> dict[str, Any]:
        live = [m.record.node_id for m in self.mesh.members() if self._reachable(m.record.node_id)]
        acts = []
        for aid, av in v.actions.items():
            a = av.action
            ps = []
            for p in parts(a):
                r = av.parts.get(p.index)
                ps.append({"node": (r.node if r else p.node), "device": str(p.device) if p.device else None,
                           "status": r.status.value if r else None, "attempt": r.attempt if r else 0,
                           "transfer_id": (r.transfer_id or None) if r else None,
                           "bytes_done": r.bytes_done if r else 0, "bytes_total": r.bytes_total if r else 0,
                           "note": r.note if r else "",
                           "error": {"code": r.error_code, "message": r.error_message} if r and r.error_code else None})
            acts.append({
                "action_id": aid, "action_type": a.action_type, "model_name": a.model_name,
                "devices": [str(d) for d in a.devices], "dependencies": list(a.dependencies),
                "status": av.status.value, "attempts": max((r.attempt for r in av.parts.values() if r), default=0),
                "started_ms": av.started_ms or None, "finished_ms": av.finished_ms or None,
                "error": {"code": av.error[0], "message": av.error[1]} if av.error else None, "parts": ps,
            })
        done = sum(1 for av in v.actions.values() if av.status is ActionStatus.COMPLETED)
        err = v.first_error
        return {
            "job_id": v.job.job_id, "name": v.job.pipeline.name, "description": v.job.pipeline.description,
            "status": v.status.value, "submitted_by": v.job.submitted_by, "submitted_ms": v.job.submitted_ms,
            "finished_ms": v.finished_ms or None,
            "coordinator": coordinator(v.job, self._reachable, live),
            "fail_fast": v.job.pipeline.fail_fast, "priority": v.job.pipeline.priority,
            "progress": {"completed": done, "total": len(v.actions)},
            "cancelled": v.cancelled is not None,
            "error": {"action_id": err[0], "code": err[1], "message": err[2]} if err else None,
            "actions": acts,
        }

    def jobs_json(self) -> list[dict[str, Any]]:
        return [self.job_json(v) for v in sorted(self.views(), key=lambda v: -v.job.submitted_ms)]
