"""The daemon: one trio nursery per node.

``MeshNode.run`` binds the HTTP server (public API and peer routes on one
port), loads the saved state, starts the gossip state machine at a new, higher
generation, and runs its loops: gossip ticks, outgoing peer messages,
persistence, storage sampling.  ``stop()`` (SIGTERM/SIGINT) tells the mesh
we are leaving, saves, and returns.
"""

from __future__ import annotations

import errno
import gc
import logging
import random
import signal
import sys
import time
from typing import Any

import httpx
import trio
from hypercorn.config import Config as HyperConfig

from protocol import HLC, Catalog, GossipNode, MemberState, RemoteProtocolError
from protocol.keys import COPY_PREFIX, copy_key
from protocol.view import ModelIndex
from protocol.wire import WrongCluster, WrongVersion, decode

from . import __version__
from .api.auth import PeerGate
from .config import Config, ConfigError, config_from_args
from .dataplane import DataClient, DataServer
from .errors import MeshError
from .httpserver import ConnectionLimits, HttpServer, raise_fd_limit
from .peers import PeerSender, make_peer_client
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
from .ratelimit import TokenBucket
from .service import Clock, MeshService
from .store import TIERS, Copy, Store
from .transfer import Transfers, full_bitfield

__all__ = ["MeshNode", "main_start"]

log = logging.getLogger("meshnode.node")

SNAPSHOT_INTERVAL_S = 300.0  # a fresh snapshot at least this often (the peers it remembers)


def wall_ms() -> int:
    return int(time.time() * 1000)


class MeshNode:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.state_file = StateFile(cfg.data_dir)
        self.rng = random.Random(random.SystemRandom().getrandbits(64))
        self.hlc = HLC(cfg.node_id)
        self.gossip: GossipNode | None = None
        self.service: MeshService | None = None
        self.sender: PeerSender | None = None
        self.store = Store(cfg.node_id, cfg.data_dir, cfg.dram_dir)
        self.peer_gate = PeerGate(cfg.secrets.cluster_secrets)
        self.transfers = Transfers(self)
        self.peer_client: httpx.AsyncClient | None = None
        self.data_client: DataClient | None = None
        self.data_port = 0
        self.data_server: DataServer | None = None
        self.address: str | None = None
        self.url: str | None = None
        self.start_generation = 0
        self.started = trio.Event()
        self._stop = trio.Event()
        self._persist_lock = trio.Lock()
        self.journal = OwnKeysJournal(cfg.node_id)
        self._persisted_meta: tuple[int, int] | None = None
        self._snapshot_at = 0.0
        self._bad_peer_logged: dict[tuple[str, str], float] = {}
        self.http: HttpServer | None = None
        self._member_hosts: set[str] = set()
        self._member_hosts_version = -1
        self.bad_messages = 0
        self.refused_requests = 0

    @property
    def generation(self) -> int:
        """The generation we run as: set at start, moved up only to refute an identity conflict."""
        return self.gossip.generation if self.gossip is not None else self.start_generation

    # -- clock -----------------------------------------------------------------

    def clock(self) -> Clock:
        return Clock(trio.current_time(), wall_ms())

    # -- lifecycle -------------------------------------------------------------

    def stop(self) -> None:
        self._stop.set()

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
                import ssl

                hc.ca_certs = str(self.cfg.tls_ca)
                hc.verify_mode = ssl.CERT_REQUIRED
        return hc

    def _privileged_client(self, ip: str) -> bool:
        """Members of the mesh, this host's own addresses and loopback: the
        clients the HTTP server keeps a reserve of connections for."""
        if ip in ("127.0.0.1", "::1") or ip == self.cfg.host:
            return True
        g = self.gossip
        if g is None:
            return False
        if self._member_hosts_version != g.version:
            self._member_hosts_version = g.version
            self._member_hosts = {m.record.address.rsplit(":", 1)[0].strip("[]") for m in g.members}
        return ip in self._member_hosts

    def _start_gossip(self, address: str) -> None:
        cfg = self.cfg
        check_data_dir(cfg.data_dir)
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
            own = saved.catalog.get(cfg.node_id)
            if own is not None:
                catalog.restore({cfg.node_id: own}, now, generation)
            self.hlc.advance_to(saved.hlc_wall_ms)
            seeds += [p for p in saved.peers if p not in seeds and p != address]
            log.info(
                "restarting as generation %d (was %d) with %d keys of our own; %d peers remembered",
                generation, prev, len(catalog.own.keys), len(saved.peers),
            )
        catalog.subscribe(self.journal)  # after the restore: what was restored is on disk
        self.gossip = GossipNode(cfg.node_id, address, generation, cfg.gossip, now, seeds, catalog)
        self.service = MeshService(self.gossip, self.hlc, index)
        self.gossip.set(
            "node",
            {"address": address, "version": __version__, "started_ms": wall_ms(), "data_port": self.data_port},
            now,
        )
        self._sample_storage()

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
        self.data_client = DataClient(
            cfg.secrets.cluster_secrets,
            ssl_context=client_ssl,
            ingress=TokenBucket(cfg.max_ingress_bps, 1024 * 1024) if cfg.max_ingress_bps else None,
        )
        self.data_server = data_server = DataServer(
            self,
            cfg.secrets.cluster_secrets,
            ssl_context=server_ssl,
            egress=TokenBucket(cfg.max_egress_bps, 1024 * 1024) if cfg.max_egress_bps else None,
        )
        try:
            await self._serve(data_server, task_status)
        finally:
            with trio.CancelScope(shield=True):
                await self.data_client.aclose()
        log.info("node %s stopped", cfg.node_id)

    async def _serve(self, data_server: DataServer, task_status: trio.TaskStatus[MeshNode]) -> None:
        from .api import create_app

        cfg = self.cfg
        async with make_peer_client(cfg) as client, trio.open_nursery() as nursery:
            self.peer_client = client
            self.sender = PeerSender(cfg, client)
            nofile = raise_fd_limit()
            limits = ConnectionLimits.for_fd_limit(nofile, total=cfg.max_connections, per_client=cfg.max_client_connections)
            self.http = HttpServer(create_app(self), self._hyper_config(), limits, self._privileged_client)
            bound = await nursery.start(self.http.serve)
            port = int(str(bound[0]).rsplit(":", 1)[1])
            log.info("HTTP: at most %d connections (%d from one client, the last %d for peers and local "
                     "clients); open-file limit %d", limits.total, limits.per_client, limits.reserve, nofile)
            self.data_port = await nursery.start(data_server.serve, cfg.host, cfg.data_port)
            host = cfg.host if ":" not in cfg.host else f"[{cfg.host}]"
            self.address = cfg.advertise or f"{host}:{port}"
            self.url = f"{cfg.scheme}://{host}:{port}"
            self._start_gossip(self.address)
            await self._load_copies()
            await self.save_snapshot()  # the new generation is on disk before anyone hears of it
            await nursery.start(self.sender.run)
            await nursery.start(self.transfers.run)
            nursery.start_soon(self._gossip_loop)
            nursery.start_soon(self._persist_loop)
            nursery.start_soon(self._storage_loop)
            log.info(
                "node %s generation %d listening on %s (cluster %r, joining %s)",
                cfg.node_id, self.generation, self.url, cfg.cluster, ",".join(cfg.join) or "nobody",
            )
            self.started.set()
            task_status.started(self)
            await self._stop.wait()
            await self._leave()
            await self.save_snapshot()
            nursery.cancel_scope.cancel()

    async def _leave(self) -> None:
        assert self.gossip is not None and self.sender is not None
        sends = self.gossip.leave(trio.current_time(), self.rng)
        with trio.move_on_after(self.cfg.peer_timeout_s):
            async with trio.open_nursery() as n:
                for s in sends:
                    n.start_soon(self.sender.send_now, s)
        log.info("left the mesh (told %d peers)", len(sends))

    # -- loops -----------------------------------------------------------------

    async def _gossip_loop(self) -> None:
        g, sender = self.gossip, self.sender
        assert g is not None and sender is not None
        while True:
            now = trio.current_time()
            try:
                sender.enqueue(g.tick(now, self.rng))
                self._log_notices()
            except Exception:  # a bug in a tick must not take the node down
                log.exception("gossip tick failed")
            # Sleep until the next timer, but never longer than a quarter second.
            await trio.sleep_until(min(g.next_deadline(), trio.current_time() + 0.25))

    async def _persist_loop(self) -> None:
        while True:
            await trio.sleep(self.cfg.persist_interval_s)
            try:
                await self.persist_now()
                if trio.current_time() - self._snapshot_at > SNAPSHOT_INTERVAL_S:
                    await self.save_snapshot()  # keeps the remembered peers fresh
            except OSError as e:
                log.error("cannot save state to %s: %s", self.state_file.dir, e)

    def storage(self) -> dict[str, dict[str, int]]:
        out = {}
        for kind in TIERS:
            try:
                out[kind] = self.store.usage(kind)
            except OSError:
                continue
        return out

    def _sample_storage(self) -> None:
        assert self.gossip is not None
        mib = 1024 * 1024
        # Round to MiB so that a few bytes written do not cause gossip.
        self.gossip.set(
            "storage",
            {k: {f: v // mib * mib for f, v in u.items()} for k, u in self.storage().items()},
            trio.current_time(),
        )

    # -- copies ------------------------------------------------------------------

    def _ssl_contexts(self) -> tuple[Any, Any]:
        cfg = self.cfg
        if not cfg.tls:
            return None, None
        import ssl

        server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        server.load_cert_chain(str(cfg.tls_cert), str(cfg.tls_key))
        if cfg.tls_ca:
            server.load_verify_locations(str(cfg.tls_ca))
            server.verify_mode = ssl.CERT_REQUIRED
        client = ssl.create_default_context(cafile=str(cfg.tls_ca) if cfg.tls_ca else None)
        client.load_cert_chain(str(cfg.tls_cert), str(cfg.tls_key))
        return server, client

    async def _load_copies(self) -> None:
        """Publish the copies on disk; forget copy keys whose copy is gone."""
        g = self.gossip
        assert g is not None
        copies = await trio.to_thread.run_sync(self.store.scan)
        present = {copy_key(c.model, c.kind) for c in copies}
        for key in [k for k, e in g.catalog.own.keys.items() if k.startswith(COPY_PREFIX) and not e.tombstone]:
            if key not in present:
                g.delete(key, trio.current_time())
        for c in copies:
            self.publish_copy(c)
        if copies:
            log.info("holding %d copies: %s", len(copies), ", ".join(f"{c.model}@{c.kind}" for c in copies[:10]))

    def publish_copy(self, c: Copy) -> None:
        assert self.gossip is not None
        prev = self.gossip.catalog.get(self.cfg.node_id, copy_key(c.model, c.kind))
        published = prev.get("published_ms") if isinstance(prev, dict) and prev.get("manifest_hash") == c.manifest_hash else None
        self.gossip.set(
            copy_key(c.model, c.kind),
            {
                "manifest_hash": c.manifest_hash,
                "size": c.manifest.total_bytes,
                "files": len(c.manifest.files),
                "chunk_bytes": c.manifest.chunk_bytes,
                "published_ms": published or wall_ms(),
            },
            trio.current_time(),
        )
        self._sample_storage()

    async def delete_copy_local(self, model: str, kind: str) -> bool:
        assert self.gossip is not None
        c = await trio.to_thread.run_sync(self.store.delete, model, kind)
        self.gossip.delete(copy_key(model, kind), trio.current_time())
        self._sample_storage()
        await self.persist_now()
        return c is not None

    async def delete_copy_anywhere(self, model: str, device: str) -> None:
        node_id, _, kind = device.partition(":")
        if node_id == self.cfg.node_id:
            await self.delete_copy_local(model, kind)
        else:
            await self.forward_action(node_id, {"op": "delete_copy", "model": model, "kind": kind})

    async def forward_action(self, node_id: str, action: dict[str, Any]) -> dict[str, Any]:
        """Hand an action to the node that must run it; its answer, or a MeshError."""
        g = self.gossip
        assert g is not None and self.peer_client is not None
        m = g.members.get(node_id)
        if m is None:
            raise MeshError("NODE_NOT_FOUND", f"no node {node_id!r} is known to the mesh")
        if not m.state.reachable:
            raise MeshError("NODE_UNAVAILABLE", f"node {node_id!r} is {m.state.label}")
        url = f"{self.cfg.scheme}://{m.record.address}/mesh/v1/actions"
        try:
            r = await self.peer_client.post(url, json=action, timeout=10)
        except (httpx.HTTPError, httpx.InvalidURL, OSError) as e:
            raise MeshError("PEER_UNREACHABLE", f"node {node_id!r} did not answer: {type(e).__name__}") from None
        try:
            body = r.json()
        except ValueError:
            raise MeshError("BAD_PEER_ANSWER", f"node {node_id!r} sent a non-JSON answer (HTTP {r.status_code})") from None
        if r.status_code >= 400:
            err = body.get("error", {}) if isinstance(body, dict) else {}
            # The peer's own answer, passed on as it was.
            raise MeshError(str(err.get("code", "PEER_ERROR"))[:64], str(err.get("message", "peer refused"))[:500], status=r.status_code)
        return body if isinstance(body, dict) else {}

    # -- data plane resolver ----------------------------------------------------------

    def locate(self, manifest_hash: str, index: int) -> tuple[str, int, int] | None:
        return self.store.locate(manifest_hash, index) or self.transfers.locate(manifest_hash, index)

    def have(self, manifest_hash: str) -> bytes | None:
        c = self.store.find(manifest_hash)
        if c is not None:
            return full_bitfield(c.manifest.n_chunks)
        return self.transfers.have(manifest_hash)

    async def _storage_loop(self) -> None:
        while True:
            await trio.sleep(self.cfg.storage_refresh_s)
            self._sample_storage()

    async def persist_now(self) -> None:
        """Write our own keys that changed since the last time to the state
        log; returns once they are on disk.  Raises OSError (ENOSPC: full)."""
        g = self.gossip
        assert g is not None
        async with self._persist_lock:
            keys = self.journal.drain()
            meta = (g.generation, self.hlc.high_water_ms)
            if not keys and meta == self._persisted_meta:
                return
            own = g.catalog.own.keys
            records = []
            for k in keys:
                e = own.get(k)
                records.append((k, None, True) if e is None else (k, e.value, e.tombstone))
            try:
                await trio.to_thread.run_sync(self.state_file.append, records, *meta)
            except BaseException:
                self.journal.put_back(keys)
                raise
            self._persisted_meta = meta
            if self.state_file.needs_compaction():
                await self._save_snapshot_locked()

    async def save_snapshot(self) -> None:
        """Fold the log into a new snapshot (at start, at stop, and when the log outgrew the last one)."""
        async with self._persist_lock:
            await self._save_snapshot_locked()

    async def _save_snapshot_locked(self) -> None:
        g = self.gossip
        assert g is not None
        self.journal.drain()  # the snapshot holds every own key as it is now
        state = SavedState(
            node_id=self.cfg.node_id,
            generation=g.generation,  # moved up by a refuted identity conflict, maybe
            hlc_wall_ms=self.hlc.high_water_ms,
            catalog=g.catalog.snapshot([g.id]),
            peers=sorted(
                m.record.address for m in g.members if m.record.node_id != g.id and m.state is not MemberState.LEFT
            )[:1000],
        )
        try:
            await trio.to_thread.run_sync(self.state_file.save, state)
        except BaseException:
            self.journal.put_back(list(g.catalog.own.keys))
            raise
        self._persisted_meta = (state.generation, state.hlc_wall_ms)
        self._snapshot_at = trio.current_time()

    async def commit(self, writes: list[tuple[str, Any]]) -> None:
        """Registry writes: on disk first, then in the catalog, so what a
        client was told is done survives a crash, and a write that cannot be
        saved (a full disk: 507 NO_SPACE) is seen by no one.  A value of None
        deletes the key."""
        g = self.gossip
        assert g is not None
        for key, value in writes:
            if value is not None:
                g.catalog.check(key, value)  # LocalProtocolError (400) before anything is written
        async with self._persist_lock:
            records = [(k, v, v is None) for k, v in writes]
            meta = (g.generation, self.hlc.high_water_ms)
            try:
                await trio.to_thread.run_sync(self.state_file.append, records, *meta)
            except OSError as e:
                if e.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise MeshError("NO_SPACE", f"the data dir {self.cfg.data_dir} is full: nothing was written") from None
                raise MeshError("IO_ERROR", f"cannot write to the data dir: {e.strerror or e}") from None
            self._persisted_meta = meta
            now = trio.current_time()
            for key, value in writes:
                if value is None:
                    g.delete(key, now)
                else:
                    g.set(key, value, now)
            self.journal.discard([k for k, _ in writes])  # on disk already, as they are now

    # -- peer messages -----------------------------------------------------------

    def handle_peer_message(self, data: bytes, remote: str, signer: str | None = None) -> None:
        """Decode, check and apply one peer message; ``signer`` is the node id
        its credential proved (None when the node needs none).  Raises
        RemoteProtocolError."""
        g, sender = self.gossip, self.sender
        if g is None or sender is None:
            raise RemoteProtocolError("node is starting")
        try:
            env = decode(data, self.cfg.cluster)
            if signer is not None and env.sender != signer:
                raise RemoteProtocolError(f"message from {env.sender!r} signed by {signer!r}")
        except (WrongCluster, WrongVersion, RemoteProtocolError) as e:
            self.note_bad_peer(remote, e)
            raise
        sender.enqueue(g.receive(env, trio.current_time(), self.rng, wall_ms()))
        self._log_notices()

    def _log_notices(self) -> None:
        g = self.gossip
        assert g is not None
        while g.notices:
            log.warning("%s", g.notices.popleft().text)

    def note_bad_peer(self, remote: str, e: Exception) -> None:
        self.bad_messages += 1
        kind = type(e).__name__
        now = time.monotonic()
        key = (remote.rsplit(":", 1)[0], kind)
        last = self._bad_peer_logged.get(key)
        if last is None or now - last > 60:
            if len(self._bad_peer_logged) > 10_000:
                self._bad_peer_logged.clear()
            self._bad_peer_logged[key] = now
            if isinstance(e, WrongCluster):
                log.warning("refused a node of another cluster at %s: %s", remote, e)
            elif isinstance(e, WrongVersion):
                log.warning("refused a peer at %s that speaks another protocol: %s", remote, e)
            else:
                log.warning("dropped a bad message from %s: %s", remote, e)

    def note_refused(self, remote: str, what: str, why: Exception | None = None) -> None:
        """A request refused for its credential: counted, and one log line per
        client and kind a minute (the reason never holds a secret)."""
        self.refused_requests += 1
        now = time.monotonic()
        key = (remote.rsplit(":", 1)[0], what)
        last = self._bad_peer_logged.get(key)
        if last is None or now - last > 60:
            if len(self._bad_peer_logged) > 10_000:
                self._bad_peer_logged.clear()
            self._bad_peer_logged[key] = now
            log.warning("refused %s from %s: %s", what, remote, why or "missing or wrong credential")

    def data_server_stats(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self.data_server.statistics()) if self.data_server is not None else {}

    def statistics(self) -> dict[str, Any]:
        g = self.gossip
        out: dict[str, Any] = {"bad_messages": self.bad_messages, "refused_requests": self.refused_requests}
        if g is not None:
            out.update(
                messages_in=g.stats.messages_in,
                messages_out=g.stats.messages_out,
                suspicions_raised=g.stats.suspicions_raised,
                deaths_declared=g.stats.deaths_declared,
                refutations=g.stats.refutations,
                identity_conflicts=g.stats.identity_conflicts,
                generation_moves=g.stats.generation_moves,
                future_generations_dropped=g.stats.future_generations_dropped,
                catalog_nodes=len(g.catalog.nodes),
                catalog_keys=sum(len(st.keys) for st in g.catalog.nodes.values()),
            )
        if self.sender is not None:
            out.update({f"send_{k}": v for k, v in self.sender.stats.items()})
        if self.http is not None:
            out.update(self.http.statistics())
        return out


async def _run_until_signal(node: MeshNode) -> None:
    async with trio.open_nursery() as nursery:

        async def watch_signals() -> None:
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as sigs:
                async for sig in sigs:
                    log.info("received %s: leaving the mesh", signal.Signals(sig).name)
                    node.stop()
                    return

        nursery.start_soon(watch_signals)
        await node.run()
        nursery.cancel_scope.cancel()


def _leaf_errors(e: BaseException) -> list[BaseException]:
    if isinstance(e, BaseExceptionGroup):
        out: list[BaseException] = []
        for sub in e.exceptions:
            out.extend(_leaf_errors(sub))
        return out
    return [e]


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
    _tune_gc()
    try:
        trio.run(_run_until_signal, node)
    except BaseException as e:  # unwrap trio's exception groups into one clear line
        for leaf in _leaf_errors(e):
            if isinstance(leaf, DataDirError):
                print(f"meshnode: error: {leaf}", file=sys.stderr)
                return 2
            if isinstance(leaf, OSError) and not isinstance(leaf, ConnectionError):
                print(f"meshnode: error: cannot serve on {cfg.host} (port {cfg.port}, data port {cfg.data_port}): {leaf.strerror or leaf}", file=sys.stderr)
                return 2
            if isinstance(leaf, KeyboardInterrupt):
                return 130
        raise
    return 0


