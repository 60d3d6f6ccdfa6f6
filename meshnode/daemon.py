"""The composition root: one node, its sockets, its parts, one trio nursery.

``MeshNode.run`` takes the data dir (a lock, the leftovers of interrupted
writes, the import directory), binds the HTTP server (public API and peer
routes on one port) and the data plane, loads the saved state, starts the
gossip state machine at a new, higher generation, makes the parts, each
given only what it uses:

=============  ====================================================================
``mesh``       the gossip state machine, the catalog and the members (``Mesh``)
``saver``      own keys on disk, registry writes before they are seen (``Saver``)
``registry``   the model registry (``Registry``) and its read views (``Views``)
``copies``     the store's copies and storage in the catalog (``CopyCatalog``)
``puller``     builds copies from the holders, serves what it has (``Puller``)
``transfers``  runs transfers of every kind (``Transfers``)
``router``     runs an action here (``Executors``) or on the node it names
``jobs``       takes pipelines, runs this node's steps, answers for any job (``Jobs``)
``bundles``    exports copies as bundles, imports bundles (``Bundles``)
``leases``     ``ensure``, and the leases that keep what it handed out (``Leases``)
=============  ====================================================================

and runs their loops.  ``stop()`` (SIGTERM/SIGINT) tells the mesh we are
leaving, saves a snapshot, and returns.  Nothing imports this module back.
"""

from __future__ import annotations

import gc
import logging
import random
import signal
import ssl
import sys
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Any

import trio
from hypercorn.config import Config as HyperConfig

from protocol import HLC, Catalog, GossipNode
from protocol.keys import NODE_KEY, NodeInfo
from protocol.names import Device
from protocol.serving import LifePolicy
from protocol.view import ModelIndex

from . import __version__
from .actions import CopyRequest, Executors, Router
from .api.app import ApiParts, Running, create_app
from .api.auth import PeerGate, Refusals
from .api.guard import ApiGuard
from .bundles import Bundles
from .config import Config, ConfigError, config_from_args
from .copies.catalog import CopyCatalog
from .copies.dataplane import Arriving, DataClient, DataServer
from .copies.evictor import Evictor
from .copies.puller import LocalChunks, Puller
from .copies.store import Store
from .copies.transfers import Transfers, TransferSettings
from .copies.verifier import Verifier
from .datagrams import Datagrams
from .errors import MeshError, first_of
from .gpus import GpuMonitor, open_reader
from .httpserver import ConnectionLimits, HttpServer, raise_fd_limit
from .jobs import Jobs, JobSettings
from .keeper import Keeper
from .leases import Leases
from .mesh import Mesh, wall_ms
from .metrics import Gauges, render_metrics
from .peers import PeerClient, PeerSender, make_peer_client, peer_ssl_context
from .persist import (
    DataDirError,
    DataDirLock,
    OwnKeysJournal,
    SavedState,
    StateFile,
    check_data_dir,
    make_dirs,
    remove_leftovers,
)
from .proxy import InferenceProxy, PeerHop
from .ratelimit import TokenBucket
from .registry import Registry
from .saver import Saver
from .sdnotify import Notifier
from .serving import Services, ServingSettings
from .views import Views

__all__ = ["MeshNode", "main_start"]

log = logging.getLogger("meshnode.daemon")


class MeshNode:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.rng = random.Random(random.SystemRandom().getrandbits(64))
        self.hlc = HLC(cfg.node_id)
        self.state_file = StateFile(cfg.data_dir)
        self.store = Store(cfg.node_id, cfg.data_dir, cfg.dram_dir)
        self.refusals = Refusals()
        self.api = ApiParts(
            node_id=cfg.node_id,
            api_tokens=cfg.secrets.api_tokens,
            scheme=cfg.scheme,
            store=self.store,
            peer_gate=PeerGate(cfg.secrets.cluster_secrets, cfg.node_id, lambda: self.generation),
            refusals=self.refusals,
            generation=lambda: self.generation,
            metrics=self._metrics,
            not_ready=self._not_ready,
            guard=ApiGuard.of(cfg.host_names, cfg.http_hosts, cfg.secrets.api_tokens, cfg.write_rate),
        )
        # Made once the node has joined (``_start``).
        self.mesh: Mesh | None = None
        self.saver: Saver | None = None
        self.registry: Registry | None = None
        self.copies: CopyCatalog | None = None
        self.puller: Puller | None = None
        self.transfers: Transfers | None = None
        self.router: Router | None = None
        self.jobs: Jobs | None = None
        self.gpus: GpuMonitor | None = None
        self.services: Services | None = None
        self.proxy: InferenceProxy | None = None
        self.keeper: Keeper | None = None
        self.evictor: Evictor | None = None
        self.verifier: Verifier | None = None
        self.bundles: Bundles | None = None
        self.leases: Leases | None = None
        self.http: HttpServer | None = None
        self.datagrams: Datagrams | None = None  # the UDP port, when bound (``meshnode.datagrams``)
        self.data_server: DataServer | None = None
        self.data_client: DataClient | None = None
        self.data_port = 0
        self.address: str | None = None
        self.url: str | None = None
        self.start_generation = 0
        self._chunks: LocalChunks | None = None
        self._member_hosts: set[str] = set()
        self._member_hosts_version = -1
        self.started = trio.Event()
        self.ready = trio.Event()  # listening, and every join seed tried (systemd's READY=1)
        self.ready_status = ""
        self._stop = trio.Event()

    @property
    def generation(self) -> int:
        """The generation we run as: set at start, moved up only to refute an identity conflict."""
        return self.mesh.generation if self.mesh is not None else self.start_generation

    def stop(self) -> None:
        self._stop.set()

    # -- start -------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[MeshNode] = trio.TASK_STATUS_IGNORED) -> None:
        cfg = self.cfg
        for note in cfg.notes:
            log.warning("%s", note)
        check_data_dir(cfg.data_dir)
        lock = DataDirLock(cfg.data_dir)
        lock.acquire()
        try:
            await self._run_locked(task_status)
        finally:
            lock.release()

    async def _run_locked(self, task_status: trio.TaskStatus[MeshNode]) -> None:
        cfg = self.cfg
        for where in (cfg.data_dir, cfg.data_dir / "transfers"):
            n = remove_leftovers(where)
            if n:
                log.info("removed %d files an interrupted write left in %s", n, where)
        for root in cfg.ingest_roots:
            if root == cfg.data_dir / "import":
                make_dirs(root)  # where an operator drops files to ingest, by default
            elif not root.is_dir():
                log.warning("ingest root %s is not a directory: nothing can be ingested from it", root)
        server_ssl, client_ssl = self._ssl_contexts()
        data_client = self.data_client = DataClient(
            cfg.secrets.cluster_secrets,
            ssl_context=client_ssl,
            ingress=TokenBucket(cfg.max_ingress_bps, 1024 * 1024) if cfg.max_ingress_bps else None,
        )
        self.data_server = DataServer(
            self,
            cfg.secrets.cluster_secrets,
            ssl_context=server_ssl,
            egress=TokenBucket(cfg.max_egress_bps, 1024 * 1024) if cfg.max_egress_bps else None,
        )
        try:
            await self._serve(data_client, task_status)
        finally:
            with trio.CancelScope(shield=True):
                await data_client.aclose()
                if self.proxy is not None:
                    await self.proxy.aclose()
        log.info("node %s stopped", cfg.node_id)

    async def _serve(self, data_client: DataClient, task_status: trio.TaskStatus[MeshNode]) -> None:
        cfg = self.cfg
        assert self.data_server is not None
        datagrams = Datagrams(cfg.node_id, cfg.secrets.outgoing_cluster_secret, self.api.peer_gate.check_datagram)
        try:
            async with make_peer_client(cfg) as client, trio.open_nursery() as nursery:
                nofile = raise_fd_limit()
                limits = ConnectionLimits.for_fd_limit(nofile, total=cfg.max_connections, per_client=cfg.max_client_connections)
                self.http = HttpServer(create_app(self.api), self._hyper_config(), limits, self._privileged_client)
                bound = await nursery.start(self.http.serve)
                port = int(str(bound[0]).rsplit(":", 1)[1])
                if cfg.datagram_max > 0 and await datagrams.bind(cfg.host, port):
                    self.api.takes_datagrams = True
                self.datagrams = datagrams if datagrams.bound else None
                sender = PeerSender(cfg, client, self.datagrams)
                log.info("HTTP: at most %d connections (%d from one client, the last %d for peers and local "
                         "clients); open-file limit %d", limits.total, limits.per_client, limits.reserve, nofile)
                self.data_port = await nursery.start(self.data_server.serve, cfg.host, cfg.data_port)
                host = cfg.host if ":" not in cfg.host else f"[{cfg.host}]"
                self.address = cfg.advertise or f"{host}:{port}"
                self.url = f"{cfg.scheme}://{host}:{port}"
                await self._start(self.address, sender, data_client, PeerClient(client, cfg.scheme))
                assert self.mesh and self.saver and self.transfers and self.copies and self.jobs and self.gpus
                assert self.services and self.keeper and self.evictor
                await nursery.start(sender.run)
                await nursery.start(datagrams.run, self._receive_datagram)
                await nursery.start(self.gpus.run)
                await nursery.start(self.services.run)
                await nursery.start(self.transfers.run)
                await nursery.start(self.jobs.run)
                sender.watch_seeds([j for j in cfg.join if j != self.address])
                await nursery.start(self.mesh.run)
                await nursery.start(self.saver.run, cfg.persist_interval_s)
                await nursery.start(self.copies.run, cfg.storage_refresh_s)
                await nursery.start(self.keeper.run)
                assert self.bundles is not None
                await nursery.start(self.bundles.run)
                await nursery.start(self.evictor.run)
                assert self.verifier is not None and self.router is not None
                await nursery.start(self.verifier.run)
                await nursery.start(self.router.run_reports)
                log.info(
                    "node %s generation %d listening on %s (cluster %r, joining %s)",
                    cfg.node_id, self.generation, self.url, cfg.cluster, ",".join(cfg.join) or "nobody",
                )
                self.started.set()
                task_status.started(self)
                nursery.start_soon(self._announce_ready, sender)
                await self._stop.wait()
                await self.mesh.leave(cfg.peer_timeout_s)
                await self.saver.save_snapshot()
                nursery.cancel_scope.cancel()
        finally:
            datagrams.close()  # the UDP socket, however the node ends

    def _not_ready(self) -> str | None:
        if self._stop.is_set():
            return "the node is leaving the mesh"
        if not self.ready.is_set():
            return "the node is starting: trying its join seeds"
        return None

    async def _announce_ready(self, sender: PeerSender) -> None:
        """Ready once every join seed has had its first try (bounded by the
        peer timeout): a node that cannot reach its seeds is up all the same,
        alone, and keeps dialling them; its status says so."""
        with trio.move_on_after(self.cfg.peer_timeout_s + 1.0):
            await sender.seeds_tried.wait()
        seeds = [j for j in self.cfg.join if j != self.address]
        if not seeds:
            self.ready_status = f"{self.cfg.node_id}: serving on {self.url}; no join seeds (a mesh of its own)"
        elif sender.seeds_answered:
            self.ready_status = (f"{self.cfg.node_id}: serving on {self.url}; joined through "
                                 f"{', '.join(sender.seeds_answered)}")
        else:
            self.ready_status = (f"{self.cfg.node_id}: serving on {self.url}; no join seed answered yet "
                                 f"({', '.join(seeds)}), retrying")
        self.ready.set()

    async def _start(self, address: str, sender: PeerSender, data_client: DataClient, peers: PeerClient) -> None:
        """Load the saved state, join at a new generation, make the parts."""
        cfg = self.cfg
        saved = self.state_file.load(cfg.node_id)
        now = trio.current_time()
        prev = saved.generation if saved else 0
        # Wall-clock ms as the generation survives a lost data dir; +1 survives a clock step back.
        self.start_generation = generation = max(prev + 1, wall_ms())
        catalog = Catalog(cfg.node_id, generation, tombstone_grace_s=cfg.gossip.tombstone_grace_s)
        index = ModelIndex()
        catalog.subscribe(index)  # before the restore, so it sees every key
        seeds = list(cfg.join)
        if saved is not None:
            self._restore(catalog, saved, generation, now)
            seeds += [p for p in saved.peers if p not in seeds and p != address]
        journal = OwnKeysJournal(cfg.node_id)
        catalog.subscribe(journal)  # after the restore: what was restored is on disk
        mesh = self.mesh = Mesh(GossipNode(cfg.node_id, address, generation, cfg.gossip, now, seeds, catalog), sender, self.rng)
        mesh.set(NODE_KEY, NodeInfo(address, __version__, wall_ms(), self.data_port, cfg.labels).to_value())
        saver = self.saver = Saver(mesh, self.hlc, self.state_file, journal)
        registry = self.registry = Registry(mesh, self.hlc, index, saver, models_max=cfg.max_models)
        copies = self.copies = CopyCatalog(mesh, self.store, saver)
        gpus = self.gpus = GpuMonitor(mesh, open_reader(cfg.fake_gpus, cfg.node_id), cfg.gpu_interval_s)
        catalog.subscribe(copies)  # a purge reaching this node deletes its copies
        # Asks the parts made below (through these methods) what it may not evict.
        evictor = self.evictor = Evictor(self.store, copies, dict(cfg.watermarks), keep_reason=self._keep_reason,
                                         active_partials=self._active_partials, written=self._written,
                                         interval_s=cfg.scrub_interval_s, partial_keep_s=cfg.partial_keep_s)
        puller = self.puller = Puller(mesh, self.store, data_client, peers, cfg.chunk_stall_s, self.rng,
                                     source_wait_s=cfg.source_wait_s, make_room=evictor.make_room)
        self._chunks = LocalChunks(self.store, puller)
        settings = TransferSettings(
            intents_dir=cfg.data_dir / "transfers",
            chunk_stall_s=cfg.chunk_stall_s,
            ingest_roots=cfg.ingest_roots,
            allow_private_sources=cfg.allow_private_sources,
            settle_s=4 * cfg.gossip.gossip_interval_s,
            s3_endpoint=cfg.s3_endpoint_url,
        )
        transfers = self.transfers = Transfers(
            mesh, self.store, puller, copies, saver, registry, self.hlc, settings, self._delete_source,
            evictor.make_room,
        )
        services = self.services = Services(mesh, self.store, gpus, ServingSettings(
            run_dir=cfg.data_dir / "services", port_range=cfg.service_ports, engines=cfg.engines,
            binaries=cfg.engine_binaries, drain_s=cfg.engine_drain_s, engine_policy=cfg.engine_policy,
            policy=LifePolicy(startup_timeout_s=cfg.engine_startup_s)), self._pull_for_serving)
        executors = Executors(cfg.node_id, transfers, copies, cfg.ingest_roots, cfg.allow_private_sources,
                              services, registry)
        router = self.router = Router(mesh, registry, executors, peers)
        jobs = self.jobs = Jobs(mesh, registry, router, transfers, saver, peers,
                                JobSettings(node_wait_s=cfg.job_node_wait_s, keep_s=cfg.job_keep_s), self.rng,
                                services)
        catalog.subscribe(jobs)  # a job record changing anywhere wakes the job loop
        jobs.load()
        self.proxy = InferenceProxy(mesh, services, registry, PeerHop(
            cfg.scheme, peer_ssl_context(cfg), cfg.secrets.outgoing_cluster_secret, cfg.secrets.cluster_secrets))
        self.keeper = Keeper(mesh, registry, transfers, copies, grace_s=cfg.replica_grace_s,
                             interval_s=cfg.replica_interval_s)
        bundles = self.bundles = Bundles(mesh, self.store, registry, copies, saver, puller, busy=transfers.active_partials,
                                         make_room=evictor.make_room)
        leases = self.leases = Leases(mesh, self.store, registry, transfers, router, cfg.data_dir / "leases.json")
        leases.load()
        copies.watermarks = dict(cfg.watermarks)
        self.verifier = executors.verifier = Verifier(
            self.store, copies, period_s=cfg.verify_period_s, rate_bps=cfg.verify_rate_bps,
            cursor_path=cfg.data_dir / "verify.json", counts=evictor.counts)
        puller.on_ban = router.report_bad_chunk  # a holder banned for a bad chunk hears of it
        self.api.running = Running(mesh, registry, Views(mesh, index), router, transfers, copies, jobs, gpus,
                                   services, self.proxy, self.keeper, bundles, leases)
        copies.sample_storage()
        await copies.load()
        await saver.save_snapshot()  # the new generation is on disk before anyone hears of it

    def _keep_reason(self, model: str, kind: str) -> str | None:
        """Why a copy here may not be evicted: a lease ``ensure`` handed out (a pod
        reads it), then the keeper's reasons (the replica rule, an engine, a transfer)."""
        assert self.leases is not None and self.keeper is not None
        return self.leases.keep_reason(model, kind) or self.keeper.keep_reason(model, kind)

    def _written(self, model: str, kind: str) -> tuple[str, list[Path]] | None:
        """What a transfer here writes (``Transfers.written``), for the evictor."""
        assert self.transfers is not None
        return self.transfers.written(model, kind)

    def _active_partials(self) -> set[str]:
        """The ``.partial`` entries of the transfers and bundle imports in flight here."""
        assert self.transfers is not None and self.bundles is not None
        return self.transfers.active_partials() | self.bundles.active_partials()

    async def _pull_for_serving(self, model: str) -> None:
        """Lazy pull: a copy of ``model`` on this node's disk, from the mesh, before an engine serves it."""
        assert self.router is not None and self.transfers is not None and self.mesh is not None
        answer = await self.router.start_copy(model, CopyRequest(Device(self.mesh.id, "disk")), move=False)
        tid = str(answer.get("transfer_id", ""))
        if tid not in self.transfers.by_id:
            raise MeshError("INTERNAL", "the pull of the model's copy did not start here")
        log.info("serving %s: pulling its copy from the mesh first (transfer %s)", model, tid)
        tr = await self.transfers.wait(tid)
        if tr.error is not None:
            raise MeshError(tr.error.code, f"pulling the model for serving: {tr.error.message}")

    def _restore(self, catalog: Catalog, saved: SavedState, generation: int, now: float) -> None:
        own = saved.catalog.get(self.cfg.node_id)
        if own is not None:
            catalog.restore({self.cfg.node_id: own}, now, generation)
        self.hlc.advance_to(saved.hlc_wall_ms)
        log.info(
            "restarting as generation %d (was %d) with %d keys of our own; %d peers remembered",
            generation, saved.generation, len(catalog.own.keys), len(saved.peers),
        )

    async def _delete_source(self, model: str, device: str) -> object:
        assert self.router is not None
        return await self.router.delete_source(model, device)

    # -- what the data plane serves ----------------------------------------------------

    def locate(self, manifest_hash: str, index: int) -> tuple[str, int, int] | None:
        return None if self._chunks is None else self._chunks.locate(manifest_hash, index)

    def have(self, manifest_hash: str) -> bytes | None:
        return None if self._chunks is None else self._chunks.have(manifest_hash)

    async def wait_have(self, manifest_hash: str, known: int, timeout_s: float) -> tuple[int, bytes] | None:
        return None if self._chunks is None else await self._chunks.wait_have(manifest_hash, known, timeout_s)

    def arriving(self, manifest_hash: str, index: int) -> Arriving | None:
        return None if self._chunks is None else self._chunks.arriving(manifest_hash, index)

    # -- sockets ------------------------------------------------------------------------

    def _hyper_config(self) -> HyperConfig:
        hc = HyperConfig()
        host = self.cfg.host
        hc.bind = [f"[{host}]:{self.cfg.port}" if ":" in host else f"{host}:{self.cfg.port}"]
        hc.accesslog = None
        hc.errorlog = logging.getLogger("meshnode.http")
        hc.graceful_timeout = 1.0
        # Also the time a client has to send a complete request head (the idle
        # timer runs until one arrives), so a slowloris is cut off in 5 s.  Peer
        # and CLI clients let an idle connection go sooner (3 s).
        hc.keep_alive_timeout = 5.0
        hc.read_timeout = 30
        if self.cfg.tls:
            hc.certfile = str(self.cfg.tls_cert)
            hc.keyfile = str(self.cfg.tls_key)
            if self.cfg.tls_ca:
                hc.ca_certs = str(self.cfg.tls_ca)
                hc.verify_mode = ssl.CERT_REQUIRED
        return hc

    def _ssl_contexts(self) -> tuple[ssl.SSLContext | None, ssl.SSLContext | None]:
        cfg = self.cfg
        if not cfg.tls:
            return None, None
        server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        server.load_cert_chain(str(cfg.tls_cert), str(cfg.tls_key))
        if cfg.tls_ca:
            server.load_verify_locations(str(cfg.tls_ca))
            server.verify_mode = ssl.CERT_REQUIRED
        client = ssl.create_default_context(cafile=str(cfg.tls_ca) if cfg.tls_ca else None)
        client.load_cert_chain(str(cfg.tls_cert), str(cfg.tls_key))
        return server, client

    def _receive_datagram(self, data: bytes, remote: str, signer: str | None) -> None:
        assert self.mesh is not None  # the receiving loop starts after the mesh is made
        self.mesh.receive(data, remote, signer)

    def _privileged_client(self, ip: str) -> bool:
        """Members of the mesh, this host's own addresses and loopback: the
        clients the HTTP server keeps a reserve of connections for."""
        if ip in ("127.0.0.1", "::1") or ip == self.cfg.host:
            return True
        mesh = self.mesh
        if mesh is None:
            return False
        if self._member_hosts_version != mesh.version:
            self._member_hosts_version = mesh.version
            self._member_hosts = {m.record.address.rsplit(":", 1)[0].strip("[]") for m in mesh.members()}
        return ip in self._member_hosts

    # -- numbers ------------------------------------------------------------------------

    def statistics(self) -> dict[str, Any]:
        out: dict[str, Any] = {"refused_requests": self.refusals.count}
        if self.mesh is not None:
            out.update(self.mesh.statistics())
        if self.http is not None:
            out.update(self.http.statistics())
        if self.datagrams is not None:
            out.update({f"datagram_{k}": v for k, v in self.datagrams.stats.items()})
        if self.data_client is not None:
            out["data_received_bytes"] = self.data_client.statistics().bytes_received
        if self.data_server is not None:
            out["data_sent_bytes"] = self.data_server.statistics().bytes_sent
            out["data_have_sent_bytes"] = self.data_server.statistics().have_bytes_sent
        if self.puller is not None:
            out.update(self.puller.totals)
        return out

    def data_server_stats(self) -> dict[str, Any]:
        return asdict(self.data_server.statistics()) if self.data_server is not None else {}

    def _metrics(self) -> tuple[bytes, str]:
        g = Gauges(version=__version__)
        members: Counter[str] = Counter()
        if self.mesh is not None:
            members.update(m.state.label for m in self.mesh.members())
        g.members = members
        g.latency = self.api.latency
        g.gpus = self.gpus.current if self.gpus is not None else None
        if self.copies is not None:
            g.tiers = self.copies.storage()
        if self.transfers is not None:
            g.transfers = Counter(t.status.value for t in self.transfers.by_id.values())
            g.fetched_bytes = self.transfers.web.fetched_bytes
        if self.keeper is not None and self.evictor is not None:
            g.upkeep = {**self.keeper.counts, **self.evictor.counts}
        if self.jobs is not None:
            g.jobs = Counter(v.status.value for v in self.jobs.views())
        if self.services is not None:
            g.services = Counter(r.state.value for r in self.services.records() if r.node == self.cfg.node_id)
        return render_metrics(self.statistics(), g)


async def _run_until_signal(node: MeshNode, notifier: Notifier | None = None) -> None:
    async with trio.open_nursery() as nursery:

        async def watch_signals() -> None:
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as sigs:
                async for sig in sigs:
                    log.info("received %s: leaving the mesh", signal.Signals(sig).name)
                    if notifier is not None:
                        notifier.notify(stopping="1", status="leaving the mesh")
                    node.stop()
                    return

        nursery.start_soon(watch_signals)
        if notifier is not None and notifier.enabled:
            nursery.start_soon(_tell_systemd, node, notifier)
        await node.run()
        nursery.cancel_scope.cancel()


async def _tell_systemd(node: MeshNode, notifier: Notifier) -> None:
    """READY=1 once the node is ready; then, with a watchdog, WATCHDOG=1 at
    a third of its period, but only while the gossip loop keeps ticking: a
    node whose event loop is stuck stops petting, and systemd restarts it."""
    await node.ready.wait()
    notifier.notify(ready="1", status=node.ready_status)
    log.info("told systemd the node is ready%s",
             f" (watchdog every {notifier.watchdog_s:g} s)" if notifier.watchdog_s else "")
    period = notifier.watchdog_s
    if period is None:
        return
    stalled = False
    while True:
        await trio.sleep(period / 3)
        mesh = node.mesh
        last = mesh.last_tick if mesh is not None else None
        if last is not None and trio.current_time() - last < period / 2:
            notifier.notify(watchdog="1")
            stalled = False
        elif not stalled:  # one line a stall
            log.warning("the gossip loop has not run for %.1f s: not petting systemd's watchdog",
                        trio.current_time() - last if last is not None else -1.0)
            stalled = True


def _tune_gc() -> None:
    """A daemon's heap is mostly long-lived, acyclic catalog data, which every
    full collection of the cyclic GC walks (about 150 ms at 10,000 models, a
    stall of every request).  Collect young objects in larger batches and the
    whole heap a hundred times less often than CPython's default, and keep
    what was loaded at start (modules, classes) out of every later walk."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(10_000, 50, 100)


def main_start(args: Any) -> int:
    """``meshnode start``: run one node in the foreground until SIGTERM/SIGINT."""
    try:
        cfg = config_from_args(args)
        check_data_dir(cfg.data_dir)
    except (ConfigError, DataDirError) as e:
        print(f"meshnode: error: {e}", file=sys.stderr)
        return 2
    node = MeshNode(cfg)
    notifier = Notifier.from_environ()  # before any engine inherits the environment
    _tune_gc()
    try:
        trio.run(_run_until_signal, node, notifier)
    except BaseException as e:  # trio's exception groups, as one clear line
        leaf = first_of(e, DataDirError)
        if leaf is not None:
            print(f"meshnode: error: {leaf}", file=sys.stderr)
            return 2
        leaf = first_of(e, lambda x: isinstance(x, OSError) and not isinstance(x, ConnectionError))
        if isinstance(leaf, OSError):
            print(f"meshnode: error: cannot serve on {cfg.host} (port {cfg.port}, data port {cfg.data_port}): "
                  f"{leaf.strerror or leaf}", file=sys.stderr)
            return 2
        if first_of(e, KeyboardInterrupt) is not None:
            return 130
        raise
    return 0

