"""Jobs on this node: take pipelines, run this node's parts, answer for any job.

The decisions are ``protocol.jobs`` (what state a job is in, which parts are
whose, who coordinates, what is overdue, when a part is tried again) and
``protocol.placement``; this module is their executor.  ``submit`` validates a
pipeline whole, places the steps that name no node, and writes the job record
(durable before the 202).  ``run`` wakes on every change to a job record (a
catalog listener), every half second and when a retry falls due, and carries
out what ``plan_tick`` answers from every job's view:

* start the parts that are this node's, each attempt in its own task, at most
  ``PARALLEL_MAX`` at once, higher ``priority`` first; an attempt runs the
  step runner of its ``step_kind`` (``meshnode.jobsteps``) within the action's
  ``timeout_s`` and writes the part's ``step/`` record (running with progress,
  then completed, failed or cancelled); a retryable failure waits for its
  ``next_attempt`` between two rounds, its record still ``running``;
* for the jobs it coordinates: re-publish a job whose writer is dead, fail
  with ``NODE_UNAVAILABLE`` a part whose node stayed unreachable past the
  bound, cancel such parts when the job is cancelled;
* cancel its parts of a cancelled job (a transfer is cancelled and its partial
  removed);
* forget its records of jobs that ended more than ``keep_s`` ago.

A part's work is idempotent, so a part resumed after a restart (its own
``running`` record, no task) is simply run again, from its first attempt: a
copy to a target that holds it is "already present".
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
import re
import secrets
from dataclasses import dataclass
from typing import Any

import trio

from protocol.gpus import GpusRecord
from protocol.jobbook import JobBook
from protocol.jobs import (
    CANCEL_PREFIX,
    JOB_PREFIX,
    PARALLEL_MAX,
    STEP_PREFIX,
    ActionStatus,
    CancelRecord,
    JobRecord,
    JobStatus,
    JobView,
    PartKey,
    PartStatus,
    Retry,
    Start,
    StepRecord,
    TickBounds,
    Verdict,
    cancel_key,
    coordinator,
    job_key,
    job_view,
    next_attempt,
    parts,
    plan_tick,
    step_key,
)
from protocol.keys import GPUS_KEY, STORAGE_KEY, RecordError, Storage
from protocol.pipeline import (
    InvalidPipeline,
    Pipeline,
    StepDevice,
    check_against,
    parse_pipeline,
)
from protocol.placement import GpuFacts, NoPlacement, PlacementFacts, place, rank, vram_needed

from .actions import Router
from .copies.transfers import Transfers
from .errors import MeshError, first_mesh_error
from .jobsteps import Step, StepRunners
from .mesh import Mesh, wall_ms
from .peers import PeerClient, Recipient
from .registry import Registry, model_name
from .saver import Saver
from .serving import Services

__all__ = ["JobSettings", "Jobs"]

log = logging.getLogger("meshnode.jobs")

ACTIVE_JOBS_MAX = 256  # unfinished jobs the mesh takes; more is 429
KEPT_JOBS_MAX = 1024  # finished ones kept past that are forgotten, oldest first
TICK_S = 0.5
JOB_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
REPLICAS = 2  # peers asked to hold a new job before the 202
REPLICATE_WAIT_S = 3.0


@dataclass(frozen=True)
class JobSettings:
    node_wait_s: float = 60.0  # a part whose node is unreachable this long fails NODE_UNAVAILABLE
    keep_s: float = 24 * 3600.0  # finished jobs are forgotten after this


@dataclass(frozen=True, slots=True)
class _Waiting:
    """A part between two attempts: when it is tried again, its record, the failed attempt."""

    retry: Retry
    state: StepRecord
    failed: StepRecord


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
        self._running: dict[PartKey, trio.CancelScope] = {}  # parts under way here
        self._waiting: dict[PartKey, _Waiting] = {}  # parts here between two attempts
        self._nursery: trio.Nursery | None = None
        self.steps = StepRunners(mesh, registry, router, transfers, services, self.view, self._reachable)
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

    def facts(self, model: str | None) -> list[PlacementFacts]:
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
            out.append(PlacementFacts(nid, self._reachable(nid), free, gpus, nid in holders))
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
                    with trio.move_on_after(self._next_wake_s()):
                        await self._wake.wait()
                    self._wake = trio.Event()
                    try:
                        self.tick()
                    except Exception:  # a bug in one round must not end the loop
                        log.exception("the job loop's round failed")
        finally:
            with trio.CancelScope(shield=True):
                await self.steps.aclose()

    def tick(self) -> None:
        """One round of the job loop: ``plan_tick``'s answer, carried out."""
        me = self.mesh.id
        live = [m.record.node_id for m in self.mesh.members() if self._reachable(m.record.node_id)]
        bounds = TickBounds(PARALLEL_MAX, int(self.settings.node_wait_s * 1000), int(self.settings.keep_s * 1000),
                            KEPT_JOBS_MAX)
        plan = plan_tick(self.views(), me, wall_ms(), reachable=self._reachable, live=live,
                         running=self._running.keys(), waiting={k: w.retry for k, w in self._waiting.items()},
                         holds_job=lambda jid: self.mesh.entry(me, job_key(jid)) is not None,
                         down_since_ms=self._down_since_ms, bounds=bounds)
        for key in plan.cancel:
            scope = self._running.get(key)
            if scope is not None:
                scope.cancel()
            elif key in self._waiting:
                self._cancel_waiting(key)
        for key in plan.abandon:  # its action ended meanwhile: the failed attempt is the part's end
            log.info("job %s: %s part %d: not tried again, its action has ended", *key)
            self._finish_soon(key, self._waiting.pop(key).failed)
        for v in plan.ended:
            if v.job.job_id not in self._ends_logged:
                self._log_end(v)
        for job in plan.republish:
            self.mesh.set(job_key(job.job_id), job.to_value())
            log.info("job %s: coordinating it, its writer %s being gone", job.job_id, job.submitted_by)
        for verdict in plan.verdicts:
            self._verdict(verdict)
        for start in plan.starts:
            self._start_part(start)
        for jid in plan.forget:
            self._forget(jid)

    def _next_wake_s(self) -> float:
        """Until the next round: ``TICK_S``, or sooner when a retry falls due (one
        already due that found no room waits for a part's end, or the round)."""
        now = wall_ms()
        due_ms = min((w.retry.at_ms for w in self._waiting.values() if w.retry.at_ms > now), default=None)
        return TICK_S if due_ms is None else min(TICK_S, (due_ms - now) / 1000)

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

    def _verdict(self, d: Verdict) -> None:
        now = wall_ms()
        rec = StepRecord(d.status, self.mesh.id, 0, now, now, d.code, d.message)
        self.mesh.set(step_key(d.job_id, d.action.action_id, d.part.index), rec.to_value())
        log.warning("job %s: %s part %d %s: %s", d.job_id, d.action.action_id, d.part.index, d.status.value,
                    d.message)

    def _down_since_ms(self, node_id: str) -> int | None:
        if self._reachable(node_id):
            return None
        m = self.mesh.member(node_id)
        if m is None:
            return 0
        return wall_ms() - int(max(trio.current_time() - m.since, 0.0) * 1000)

    def _forget(self, jid: str) -> None:
        """Drop our records of a job that ended long ago (or past the count bound)."""
        self._ends_logged.discard(jid)
        for key, _e in list(self.mesh.own_keys(JOB_PREFIX + jid)):
            if key == job_key(jid):
                self.mesh.delete(key)
        for key, _e in list(self.mesh.own_keys(f"{STEP_PREFIX}{jid}/")):
            self.mesh.delete(key)
        for key, _e in list(self.mesh.own_keys(cancel_key(jid))):
            self.mesh.delete(key)

    # -- one part ----------------------------------------------------------------------------

    def _start_part(self, s: Start) -> None:
        """Attempt ``s.attempt`` of a part, in its own task (a first attempt, a
        retry whose backoff is over, or our own ``running`` part after a restart)."""
        assert self._nursery is not None
        scope = trio.CancelScope()
        self._running[s.key] = scope
        waited = self._waiting.pop(s.key, None)
        jid, aid, index = s.key
        if waited is None:
            self.started_parts += 1
            state = StepRecord(PartStatus.RUNNING, self.mesh.id, s.attempt, wall_ms())
            log.info("job %s: %s (%s) part %d started here", jid, aid, s.action.action_type, index)
        else:
            state = dataclasses.replace(waited.state, attempt=s.attempt)
        step = Step(s.job, s.action, s.part, step_key(jid, aid, index), state)
        self._nursery.start_soon(self._run_part, step, scope)

    async def _run_part(self, s: Step, scope: trio.CancelScope) -> None:
        try:
            await self._run_attempt(s, scope)
        except Exception:  # a bug, or a disk that will not take the record: a log line, never the node's end
            log.exception("job %s: %s part %d crashed", s.job.job_id, s.action.action_id, s.part.index)

    async def _run_attempt(self, s: Step, scope: trio.CancelScope) -> None:
        """One attempt; then the part's final record, or its retry (``next_attempt``)
        left for a later round to start."""
        key = (s.job.job_id, s.action.action_id, s.part.index)
        self.mesh.set(s.key, s.state.to_value())
        final: StepRecord | None = None
        try:
            with scope:
                final = await self._attempt(s)
            if final is None:  # our scope: the job was cancelled (a stopping node never gets here)
                self.steps.cancel_transfer(s.key)
                final = self._cancelled(s.state)
        finally:
            self._running.pop(key, None)
            self.steps.done(s.key)
        if final.status is PartStatus.FAILED:
            retry = next_attempt(s.action, s.state.attempt, final.error_code, final.finished_ms)
            if retry is not None:
                self._waiting[key] = _Waiting(retry, s.state, final)
                log.info("job %s: %s attempt %d failed (%s), again in %.1f s", s.job.job_id, s.action.action_id,
                         s.state.attempt, final.error_code, (retry.at_ms - final.finished_ms) / 1000)
                self._wake.set()
                return
        await self._finish(key, final)

    async def _finish(self, key: PartKey, final: StepRecord) -> None:
        self.mesh.set(step_key(*key), final.to_value())
        await self.saver.persist_now()
        log.info("job %s: %s part %d %s%s", *key, final.status.value,
                 f": {final.error_code}: {final.error_message}" if final.error_code else "")
        self._wake.set()

    @staticmethod
    def _cancelled(state: StepRecord) -> StepRecord:
        return dataclasses.replace(state, status=PartStatus.CANCELLED, finished_ms=wall_ms(),
                                   note="cancelled with the job")

    def _cancel_waiting(self, key: PartKey) -> None:
        """A part between two attempts whose job was cancelled: its record says so."""
        self._finish_soon(key, self._cancelled(self._waiting.pop(key).state))

    def _finish_soon(self, key: PartKey, final: StepRecord) -> None:
        """A part's final record, from the loop's round (which cannot wait for the disk)."""
        assert self._nursery is not None
        self._nursery.start_soon(self._finish, key, final)

    async def _attempt(self, s: Step) -> StepRecord:
        """Run the part's step runner once, within the action's ``timeout_s``: the
        part completed, or failed with a code."""
        a = s.action
        try:
            timeout = a.timeout_s if a.timeout_s is not None else math.inf
            with trio.fail_after(timeout):
                note = await self.steps.run(s)
            return dataclasses.replace(s.state, status=PartStatus.COMPLETED, finished_ms=wall_ms(), note=note)
        except trio.TooSlowError:
            self.steps.cancel_transfer(s.key)
            code, message = "TIMEOUT", f"the step took longer than its timeout_s ({a.timeout_s:g} s)"
        except MeshError as e:
            code, message = e.code, e.message
        except Exception as exc:
            e2 = first_mesh_error(exc)
            if e2 is None:
                log.exception("job %s: %s crashed", s.job.job_id, a.action_id)
                code, message = "INTERNAL", f"{type(exc).__name__}: {exc}"
            else:
                code, message = e2.code, e2.message
        return dataclasses.replace(s.state, status=PartStatus.FAILED, finished_ms=wall_ms(), error_code=code,
                                   error_message=message[:1000])

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
