"""The step runners: one small async function per kind of step, each doing one
part's work on this node and answering its note (or raising ``MeshError``).

Which runner a part takes is ``protocol.jobs.step_kind`` (the action's type, or
loading and freeing a GPU), and what a copy or a GPU load does is decided there
too (``copy_plan``, ``gpu_load``); this module only does the I/O: transfers
through the router, engines through the serving executor, health probes over
HTTP.  ``meshnode.jobs`` runs a part's attempts and owns its records.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import httpx
import trio

from protocol.healthcheck import (
    HealthTarget,
    TargetRefused,
    health_target,
    shown_url,
    unreachable_message,
)
from protocol.jobs import (
    JobRecord,
    JobView,
    Part,
    PartStatus,
    StepKind,
    StepRecord,
    copy_plan,
    gpu_index,
    gpu_load,
    step_kind,
)
from protocol.keys import STORAGE_KEY
from protocol.pipeline import PipelineStep
from protocol.placement import vram_needed
from protocol.serving import ServiceState
from protocol.view import ModelView

from .actions import Router
from .actions.requests import CopyRequest, DownloadRequest, as_device
from .copies.transfer import Transfer
from .copies.transfers import Transfers
from .errors import MeshError
from .mesh import Mesh
from .registry import Registry
from .serving import Services

__all__ = ["HEALTH_TIMEOUT_S", "Step", "StepRunners"]

log = logging.getLogger("meshnode.jobs")

HEALTH_TIMEOUT_S = 60.0  # a health check with no timeout_s
PROGRESS_S = 1.0  # how often a followed transfer's progress goes into its step record
OTHERS_POLL_S = 0.2  # a move's last target looks at the other targets' records this often


@dataclass(frozen=True, slots=True)
class Step:
    """One attempt at one part: what it is, its step key, its record so far."""

    job: JobRecord
    action: PipelineStep
    part: Part
    key: str
    state: StepRecord

    @property
    def model(self) -> str:
        assert self.action.model_name is not None
        return self.action.model_name

    @property
    def device(self) -> str:
        assert self.part.device is not None
        return str(self.part.device)


Runner = Callable[[Step], Awaitable[str]]


class StepRunners:
    def __init__(self, mesh: Mesh, registry: Registry, router: Router, transfers: Transfers,
                 services: Services | None, view: Callable[[str], JobView],
                 reachable: Callable[[str], bool]) -> None:
        self.mesh = mesh
        self.registry = registry
        self.router = router
        self.transfers = transfers
        self.services = services
        self._view = view
        self._reachable = reachable
        self._http = httpx.AsyncClient(trust_env=False, timeout=5.0, follow_redirects=False)
        self._transfer_of: dict[str, str] = {}  # step key -> the transfer it follows
        self.table: dict[StepKind, Runner] = {
            StepKind.DOWNLOAD: self.download, StepKind.COPY: self.copy, StepKind.MOVE: self.copy,
            StepKind.SERVE: self.serve, StepKind.STOP_SERVE: self.stop_serve, StepKind.DELETE: self.delete,
            StepKind.HEALTH_CHECK: self.health_check, StepKind.LOAD_GPU: self.load_gpu,
            StepKind.FREE_GPU: self.free_gpu,
        }

    async def run(self, s: Step) -> str:
        return await self.table[step_kind(s.action, s.part)](s)

    def cancel_transfer(self, key: str) -> None:
        tid = self._transfer_of.get(key)
        if tid is not None:
            self.transfers.cancel(tid, "its job step was cancelled or timed out")

    def done(self, key: str) -> None:
        self._transfer_of.pop(key, None)

    async def aclose(self) -> None:
        await self._http.aclose()

    # -- one runner a kind ----------------------------------------------------------------

    async def download(self, s: Step) -> str:
        a = s.action
        req = DownloadRequest.of_step(s.device, a.source_url, a.config)
        return await self._follow(await self.router.start_download(s.model, req), s)

    async def copy(self, s: Step) -> str:
        """A copy or move to one target (``copy_plan``)."""
        plan = copy_plan(s.action, s.part)
        req = CopyRequest(as_device(plan.target, "to_device"), as_device(plan.source, "from_device"))
        answer = await self.router.start_copy(s.model, req, move=plan.move)
        note = await self._follow(answer, s)
        if plan.drop_source_last:
            await self._after_others(s)
            await self.router.delete_source(s.model, plan.source)
            return f"{note}; the source {plan.source} deleted"
        return note

    async def delete(self, s: Step) -> str:
        done = await self.router.delete_copy(s.model, s.device)
        return "deleted" if done is not None else "nothing to delete: no copy there"

    async def serve(self, s: Step) -> str:
        """Healthy, or failed with the engine's log tail, on this node's GPUs."""
        services = self._services()
        mv = self._registered(s.model)
        md = mv.metadata or {}
        rec = await services.serve(mv.name, self._my_gpus(s.action), s.action.port, dict(s.action.config),
                                   size=mv.size or 0, requirements=md.get("requirements"), job_id=s.job.job_id,
                                   default_engine=md.get("engine"))
        return f"{rec.engine} healthy on port {rec.port} (pid {rec.pid})"

    async def stop_serve(self, s: Step) -> str:
        services = self._services()
        try:
            stopped = await services.stop(s.model, gpus=self._my_gpus(s.action) or None)
        except MeshError as e:
            if e.code != "SERVICE_NOT_FOUND":
                raise
            return "nothing to stop: not served here"
        return "stopped " + ", ".join(f"port {st.port}" for st in stopped)

    async def load_gpu(self, s: Step) -> str:
        """A copy or move to ``node:gpuN``: the weights staged on this node's fastest
        tier, the VRAM the model needs reserved on gpuN until a serve there takes it
        (``gpu_load``)."""
        services = self._services()
        mv = self._registered(s.model)
        me = self.mesh.id
        need = vram_needed(mv.size or 0, (mv.metadata or {}).get("requirements"))
        load = gpu_load(s.action, s.part, me, need, tuple(self.mesh.get(me, STORAGE_KEY) or {}))
        services.stage(mv.name, load.gpu, load.reserve_bytes)  # NO_CAPACITY when it does not fit
        src = str(s.action.devices[0])
        notes = []
        if not any(c.device == load.stage_device for c in mv.copies):
            req = CopyRequest(as_device(load.stage_device, "to_device"), as_device(src, "from_device"))
            answer = await self.router.start_copy(mv.name, req, move=False)
            notes.append(await self._follow(answer, s))
        else:
            notes.append(f"already staged on {load.stage_device}")
        if load.drop_source:
            if load.wait_for_others:
                await self._after_others(s)
            await self.router.delete_source(mv.name, src)
            notes.append(f"the source {src} deleted")
        return f"loaded for gpu{load.gpu}: {load.reserve_bytes / 2**30:.1f} GiB reserved; " + "; ".join(notes)

    async def free_gpu(self, s: Step) -> str:
        """A delete of ``node:gpuN``: stop what serves the model there."""
        services = self._services()
        assert s.part.device is not None
        gpu = gpu_index(s.part.device)
        try:
            stopped = await services.stop(s.model, gpus=(gpu,))
        except MeshError as e:
            if e.code != "SERVICE_NOT_FOUND":
                raise
            services.unstage(s.model, gpu)
            return f"gpu{gpu} held nothing of it"
        return "freed: stopped " + ", ".join(f"port {st.port}" for st in stopped)

    async def health_check(self, s: Step) -> str:
        a = s.action
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

    # -- helpers ---------------------------------------------------------------------------

    def _services(self) -> Services:
        if self.services is None:
            raise MeshError("NOT_SUPPORTED", "this node has no serving executor")
        return self.services

    def _registered(self, model: str) -> ModelView:
        mv = self.registry.find(model)
        if mv is None:
            raise MeshError("MODEL_NOT_AVAILABLE", f"model {model!r} is not registered")
        return mv

    def _my_gpus(self, a: PipelineStep) -> tuple[int, ...]:
        me = self.mesh.id
        return tuple(sorted(int(d.kind[3:]) for d in a.devices if d.node == me and d.kind[3:].isdigit()))

    async def _after_others(self, s: Step) -> None:
        """A move's last target waits for the other targets before it drops the source
        (bounded by the step's ``timeout_s``, and by the job's end: a cancel stops it)."""
        while True:
            av = self._view(s.job.job_id).actions[s.action.action_id]
            others = [r for i, r in av.parts.items() if i != s.part.index]
            if all(r is not None and r.status is PartStatus.COMPLETED for r in others):
                return
            if any(r is not None and r.status.final and r.status is not PartStatus.COMPLETED for r in others):
                raise MeshError("INCOMPLETE", "another target of this move failed: the source is kept")
            await trio.sleep(OTHERS_POLL_S)

    async def _follow(self, answer: dict[str, Any], s: Step) -> str:
        """Wait for the local transfer ``answer`` names; progress into the step record."""
        tid = str(answer.get("transfer_id", ""))
        tr = self.transfers.by_id.get(tid)
        if tr is None:
            raise MeshError("INTERNAL", f"the transfer {tid[:20]!r} did not start here")
        self._transfer_of[s.key] = tid
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._progress, s, tr)
            await self.transfers.wait(tid)
            nursery.cancel_scope.cancel()
        if tr.error is not None:
            raise MeshError(tr.error.code, tr.error.message)
        return f"transfer {tid}: {tr.note or 'done'}"

    async def _progress(self, s: Step, tr: Transfer) -> None:
        """Every ``PROGRESS_S`` while ``tr`` runs: its bytes into the step's record."""
        while tr.status.active:
            self.mesh.set(s.key, dataclasses.replace(
                s.state, transfer_id=tr.id, bytes_done=tr.bytes_done, bytes_total=tr.bytes_total).to_value())
            await trio.sleep(PROGRESS_S)

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

    def _health_target(self, url: str) -> HealthTarget:
        """What a check of ``url`` fetches from here (``protocol.healthcheck``): a member's
        node id replaced by its advertised host; the mesh's own hosts and services marked."""
        members = {m.record.node_id: m.record.address for m in self.mesh.members()}
        services = [(r.node, r.port) for r in self.services.records()] if self.services is not None else []
        return health_target(url, members, services, here=self.mesh.id)

    async def _health_of(self, a: PipelineStep, target: Callable[[], str | None]) -> str:
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
