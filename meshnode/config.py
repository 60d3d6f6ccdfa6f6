"""Daemon configuration: flags, ``MESHNODE_*`` environment variables and an
optional TOML config file, in that order of precedence, then defaults.

Secrets (API tokens, the cluster secret) are read from a flag, the
environment or a file, kept in a ``Secrets`` object whose ``repr`` hides
them, and never logged.
"""

from __future__ import annotations

import argparse
import ipaddress
import math
import os
import socket
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from protocol import GossipConfig, InvalidName, validate_node_id
from protocol.engines import EnginePolicy, parse_args_allow, parse_env_allow, parse_env_pass
from protocol.eviction import InvalidWatermarks, Watermarks
from protocol.gpus import parse_fake_gpus
from protocol.httpguard import split_host
from protocol.names import validate_address
from protocol.peerdgram import DGRAM_PAYLOAD_MAX
from protocol.replicas import InvalidPolicy, parse_labels
from protocol.serving import ENGINES, parse_port_range

__all__ = ["Config", "ConfigError", "Secrets", "add_start_arguments", "config_from_args"]

DEFAULT_PORT = 7420


class ConfigError(Exception):
    """The configuration cannot work; the message says why and what to do."""


@dataclass(frozen=True)
class Secrets:
    api_tokens: tuple[str, ...] = ()
    cluster_secrets: tuple[str, ...] = ()

    def __repr__(self) -> str:  # never print a secret, even by accident
        return f"Secrets(api_tokens=<{len(self.api_tokens)}>, cluster_secrets=<{len(self.cluster_secrets)}>)"

    @property
    def outgoing_cluster_secret(self) -> str | None:
        """The secret we present to peers: the first of the list (rotation adds new ones after)."""
        return self.cluster_secrets[0] if self.cluster_secrets else None


@dataclass(frozen=True)
class Config:
    node_id: str
    host: str
    port: int
    data_dir: Path
    join: tuple[str, ...] = ()
    advertise: str | None = None
    cluster: str = "meshnode"
    secrets: Secrets = field(default_factory=Secrets)
    notes: tuple[str, ...] = ()  # warnings for the operator, logged at start
    gossip: GossipConfig = field(default_factory=GossipConfig)
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_ca: Path | None = None
    data_port: int = 0
    dram_dir: Path | None = None
    max_connections: int | None = None  # None: from the open-file limit
    max_client_connections: int = 64
    http_hosts: tuple[str, ...] = ()  # --http-hosts: Host names answered besides loopback, host and advertise
    max_models: int = 100_000  # registered models in the mesh; a new one past it is 507 TOO_MANY_MODELS
    write_rate: float = 50.0  # API writes per second per token (or client address); 0: unlimited
    ingest_roots: tuple[Path, ...] = ()  # empty: <data-dir>/import
    allow_private_sources: bool = False
    datagram_max: int = 1400  # peer messages up to this many bytes go as UDP datagrams; 0: HTTP only
    max_ingress_bps: float = 0.0  # 0: unlimited
    max_egress_bps: float = 0.0
    chunk_stall_s: float = 10.0
    source_wait_s: float = 60.0
    job_node_wait_s: float = 60.0
    job_keep_s: float = 86_400.0
    replica_grace_s: float = 300.0
    watermarks: Mapping[str, Watermarks] = field(
        default_factory=lambda: {"disk": Watermarks(), "dram": Watermarks()})  # --disk/--dram-watermarks
    scrub_interval_s: float = 5.0
    verify_period_s: float = 7 * 86_400.0  # every chunk of every copy read again once per this; 0: never
    verify_rate_bps: float = 50e6  # ... and those reads, and a peer's report's, at most this many bytes a second
    s3_endpoint_url: str | None = None
    partial_keep_s: float = 3600.0
    replica_interval_s: float = 5.0
    fake_gpus: tuple[int, ...] = ()  # total bytes of each pretend GPU (--fake-gpus)
    labels: Mapping[str, str] = field(default_factory=dict)  # --labels
    gpu_interval_s: float = 5.0
    service_ports: tuple[int, int] = (8000, 8999)
    engines: frozenset[str] = frozenset({"vllm", "llama.cpp", "sglang", "tgi"})
    engine_binaries: dict[str, str] = field(default_factory=dict)
    engine_policy: EnginePolicy = field(default_factory=EnginePolicy)  # --engine-env-allow/-pass, --engine-args-allow
    engine_drain_s: float = 30.0
    engine_startup_s: float = 600.0
    peer_timeout_s: float = 2.0
    persist_interval_s: float = 1.0
    storage_refresh_s: float = 10.0
    senders: int = 64
    send_queue_max: int = 2048

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None

    @property
    def scheme(self) -> str:
        return "https" if self.tls else "http"

    @property
    def host_names(self) -> tuple[str, ...]:
        """The ``Host`` names the API answers besides loopback and IP literals:
        the bound host, the advertised one and ``--http-hosts``."""
        names = [] if self.host in ("0.0.0.0", "::", "") else [self.host]
        if self.advertise:
            names.append(self.advertise.rsplit(":", 1)[0])
        return (*names, *self.http_hosts)


# name, type, help, default.  Every one reads MESHNODE_<NAME> and the config file key <name>.
_OPTIONS: list[tuple[str, type, str, Any]] = [
    ("node_id", str, "this node's id (default: the hostname)", None),
    ("host", str, "address to bind (default 127.0.0.1)", "127.0.0.1"),
    ("port", int, f"port for the API and peer routes (default {DEFAULT_PORT}; 0 picks one)", DEFAULT_PORT),
    ("data_dir", str, "data directory (default ~/.local/share/meshnode)", None),
    ("join", str, "peers to join, HOST:PORT[,HOST:PORT...]", ""),
    ("advertise", str, "HOST:PORT peers use to reach us (default host:port)", None),
    ("data_port", int, "port of the chunk data plane (default port+1; 0 picks one)", None),
    ("dram_dir", str, "RAM-backed directory for node:dram (default /dev/shm/meshnode-<node>)", None),
    ("max_ingress", str, "cap on incoming chunk bytes per second, e.g. 500M (default: none)", None),
    ("max_egress", str, "cap on outgoing chunk bytes per second, e.g. 500M (default: none)", None),
    ("chunk_stall", float, "seconds before a chunk request that made no progress moves to another peer", 10.0),
    ("job_node_wait", float, "seconds a pipeline step waits for its unreachable node before it fails "
     "NODE_UNAVAILABLE (default 60)", 60.0),
    ("job_keep", float, "seconds finished jobs are kept (default 86400)", 86_400.0),
    ("replica_grace", float, "seconds a down node's copies still count toward a pinned model's replicas "
     "before they are replaced elsewhere (default 300: a restarting node is not a lost one)", 300.0),
    ("disk_watermarks", str, "high and low watermarks of the disk tier, percent: above high, the least recently "
     "used copies are evicted down to low; a copy that would pass high evicts first or fails NO_SPACE", "85,70"),
    ("dram_watermarks", str, "the same for the dram tier", "85,70"),
    ("s3_endpoint_url", str, "the S3 endpoint for s3:// sources whose URL names none, e.g. "
     "https://nyc3.digitaloceanspaces.com or http://minio:9000 (default: boto3's, i.e. AWS_ENDPOINT_URL or AWS); "
     "credentials come from the AWS environment and files", None),
    ("scrub_interval", float, "seconds between two checks of the store: copies removed or changed by hand "
     "withdrawn (a file whose size, mtime, inode or ctime moved is hashed again), the tiers evicted down to their "
     "low watermark (default 5)", 5.0),
    ("verify_period", float, "seconds in which every chunk of every copy is read again and checked against its "
     "manifest; 0: never (default 604800, a week)", 7 * 86_400.0),
    ("verify_rate", str, "cap on the bytes per second that re-verify reads, e.g. 50M (default 50M)", "50M"),
    ("partial_keep", float, "seconds the files of a transfer that no longer exists are kept before they are "
     "removed (default 3600)", 3600.0),
    ("replica_interval", float, "seconds between two runs of the replica rule on this node (default 5)", 5.0),
    ("source_wait", float, "seconds a transfer waits, its chunks kept, for holders that became unreachable "
     "(a partition, a restart) before it fails with NO_SOURCE", 60.0),
    ("fake_gpus", str, "pretend GPUs of these sizes instead of reading NVML, e.g. 2x24GiB or 24GiB,80GiB "
     "(tests, demos, machines without one)", None),
    ("gpu_interval", float, "seconds between GPU reads (default 5)", 5.0),
    ("service_ports", str, "ports engines may listen on, LOW-HIGH (default 8000-8999)", "8000-8999"),
    ("engines", str, "engines this node may start, comma-separated; 'command' (any program) only when listed "
     "(default vllm,llama.cpp,sglang,tgi)", "vllm,llama.cpp,sglang,tgi"),
    ("engine_binaries", str, "where the engines are, e.g. vllm=/opt/vllm/bin/vllm,llama.cpp=/usr/local/bin/llama-server "
     "(default: vllm, llama-server, python3, text-generation-launcher on PATH)", None),
    ("engine_env_allow", str, "variables an API caller's config.env may set for an engine: names or PREFIX_*, "
     "comma-separated; +NAME,... adds to the default (the engines' tuning variables: OMP_NUM_THREADS, NCCL_DEBUG, "
     "VLLM_ATTENTION_BACKEND, ...); LD_*, PYTHON*, PATH, *_PROXY, secrets and the like are never allowed", None),
    ("engine_env_pass", str, "variables of the node's own environment every engine gets, comma-separated (default "
     "PATH,HOME,LANG,LC_ALL,LC_CTYPE,TZ,TMPDIR,USER,LOGNAME,LD_LIBRARY_PATH,CUDA_HOME,HF_HOME,HF_HUB_OFFLINE,"
     "NVIDIA_DRIVER_CAPABILITIES); never a secret", None),
    ("engine_args_allow", str, "flags an API caller may give an engine beyond the default tuning flags, "
     "ENGINE:--flag,... (*:--flag for every engine), e.g. vllm:--trust-remote-code", None),
    ("engine_drain", float, "seconds an engine has to exit after SIGTERM before SIGKILL (default 30)", 30.0),
    ("engine_startup", float, "seconds an engine has to become healthy (default 600)", 600.0),
    ("cluster", str, "cluster label; nodes of other clusters are refused", "meshnode"),
    ("labels", str, "this node's labels, KEY=VALUE[,KEY=VALUE], e.g. zone=a,gpu=h100 (gossiped; shown in /nodes "
     "and /v2/nodes)", None),
    ("api_tokens", str, "comma-separated API bearer tokens", None),
    ("api_tokens_file", str, "file holding comma- or newline-separated API tokens", None),
    ("cluster_secret", str, "comma-separated cluster secrets for peer routes", None),
    ("cluster_secret_file", str, "file holding the cluster secret(s)", None),
    ("gossip_interval", float, "seconds between gossip rounds (default 0.5)", 0.5),
    ("probe_interval", float, "seconds between failure-detector probes (default 1.0)", 1.0),
    ("fanout", int, "peers contacted per gossip round (default 2)", 2),
    ("tls_cert", str, "TLS certificate (PEM) for the HTTP server", None),
    ("tls_key", str, "TLS private key (PEM)", None),
    ("tls_ca", str, "CA bundle: verify peers, and require client certificates", None),
    ("max_connections", int, "HTTP connections at once (default: from the open-file limit, at most 4096)", None),
    ("max_client_connections", int, "HTTP connections from one client address (default 64)", 64),
    ("http_hosts", str, "Host names the API answers besides localhost, IP addresses, --host and --advertise, "
     "NAME[,NAME...] (a node without API tokens refuses other names: DNS rebinding)", None),
    ("max_models", int, "registered models the mesh may hold; a new one past it is refused (default 100000)", 100_000),
    ("write_rate", float, "API writes per second one token (or, without tokens, one client address) may make, "
     "in bursts of ten times that; 0: unlimited (default 50)", 50.0),
    ("ingest_roots", str, "directories local ingest may read, comma-separated (default <data-dir>/import)", None),
    ("allow_private_sources", bool, "fetch http(s) sources on loopback, private and link-local addresses too", False),
    ("datagram_max", int, "peer messages up to this many bytes (probes, acks, rumours, digests) go as signed UDP "
     "datagrams to the peer's port, larger ones by HTTP; 0: HTTP only. Never under TLS (default 1400)", 1400),
]


def add_start_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="TOML config file (env MESHNODE_CONFIG)")
    for name, typ, help_text, _default in _OPTIONS:
        flag = "--" + name.replace("_", "-")
        if typ is bool:
            p.add_argument(flag, dest=name, action="store_const", const=True, default=None, help=help_text)
        else:
            p.add_argument(flag, dest=name, type=typ, default=None, help=help_text)


def _parse_bool(text: str) -> bool:
    v = text.strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise ValueError(text)


def _split(v: str | None) -> tuple[str, ...]:
    if not v:
        return ()
    return tuple(x.strip() for x in v.replace("\n", ",").split(",") if x.strip())


def _read_secret_file(path: str, what: str) -> str:
    try:
        return Path(path).read_text()
    except OSError as e:
        raise ConfigError(f"cannot read the {what} file {path}: {e.strerror}") from None


SECRET_BITS_MIN = 128
_GENERATE = "python3 -c 'import secrets; print(secrets.token_urlsafe(32))'  (or: openssl rand -base64 32)"


def secret_bits(text: str) -> float:
    """A rough estimate of a secret's entropy: its length times the bits of
    the alphabet its characters come from (hex digits 4, lowercase 4.7, mixed
    case and digits 5.95, any printable 6.57).  Fewer than 8 different
    characters count as none: ``aaaa...`` or ``abab...`` is not a secret."""
    if len(set(text)) < 8:
        return 0.0
    if all(c in "0123456789abcdef" for c in text) or all(c in "0123456789ABCDEF" for c in text):
        alphabet = 16
    else:
        alphabet = 0
        for chars, size in (
            (str.islower, 26),
            (str.isupper, 26),
            (str.isdigit, 10),
            (lambda c: not c.isalnum(), 33),
        ):
            if any(chars(c) for c in text):
                alphabet += size
    return len(text) * math.log2(max(alphabet, 2))


def _check_strength(values: tuple[str, ...], what: str, flag: str, host: str) -> None:
    for v in values:
        bits = secret_bits(v)
        if bits < SECRET_BITS_MIN:
            raise ConfigError(
                f"{what} has about {bits:.0f} bits of entropy; a node bound to {host} needs at least "
                f"{SECRET_BITS_MIN} (it can be guessed offline from one captured handshake otherwise). "
                f"Generate one with: {_GENERATE}, and give it with {flag}"
            )


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _hostport(text: str, what: str) -> str:
    try:
        return validate_address(text)
    except InvalidName as e:
        raise ConfigError(f"bad {what}: {e}") from None


def config_from_args(args: argparse.Namespace, env: dict[str, str] | None = None) -> Config:
    o = _option_values(args, env)
    node_id = o["node_id"] or socket.gethostname().split(".")[0]
    try:
        validate_node_id(node_id)
    except InvalidName as e:
        raise ConfigError(f"bad node id {node_id!r}: {e}") from None
    host = o["host"]
    port = o["port"]
    if not 0 <= port < 65536:
        raise ConfigError(f"bad port {port}")
    data_dir = Path(o["data_dir"] or Path.home() / ".local" / "share" / "meshnode").expanduser()

    api_tokens, secrets, notes = _secrets(args, o, host)
    advertise = o["advertise"]
    if advertise:
        _hostport(advertise, "--advertise")
    elif host in ("0.0.0.0", "::", ""):
        raise ConfigError(f"--host {host} binds every address: give --advertise HOST:PORT for peers")
    else:
        # Peers reach us at host:port: it must be an address they accept.
        _hostport(f"[{host}]:{port or 1}" if ":" in host else f"{host}:{port or 1}", "--host (give --advertise HOST:PORT)")
    join = tuple(_hostport(j, "--join peer") for j in _split(o["join"]))
    tls_cert, tls_key = o["tls_cert"], o["tls_key"]
    if bool(tls_cert) != bool(tls_key):
        raise ConfigError("TLS needs both --tls-cert and --tls-key")
    _check_intervals(o)
    verify_rate = parse_rate(o["verify_rate"], "--verify-rate")
    if not 0 < verify_rate < float("inf"):
        raise ConfigError("--verify-rate must be above 0 bytes per second, e.g. 50M (to stop the periodic "
                          "re-verify, give --verify-period 0)")
    if not 0.1 <= o["gpu_interval"] <= 3600:  # also refuses nan
        raise ConfigError("--gpu-interval must be between 0.1 and 3600 seconds")
    try:
        fake_gpus = parse_fake_gpus(o["fake_gpus"]) if o["fake_gpus"] is not None else ()
        service_ports = parse_port_range(o["service_ports"])
    except ValueError as e:
        raise ConfigError(str(e)) from None
    try:
        labels = parse_labels(o["labels"])
    except InvalidPolicy as e:
        raise ConfigError(f"--labels: {e}") from None
    watermarks = _watermarks(o)
    engines, binaries, engine_policy = _engine_settings(o)
    if o["max_connections"] is not None and o["max_connections"] < 16:
        raise ConfigError("--max-connections must be at least 16")
    if o["max_client_connections"] < 1:
        raise ConfigError("--max-client-connections must be at least 1")
    http_hosts = _split(o["http_hosts"])
    for name in http_hosts:
        if split_host(name) is None:
            raise ConfigError(f"--http-hosts: {name[:100]!r} is not a host name (NAME, NAME:PORT or [IPv6])")
    if o["max_models"] < 1:
        raise ConfigError("--max-models must be at least 1")
    if not 0 <= o["write_rate"] <= 1_000_000:  # also refuses nan
        raise ConfigError("--write-rate must be between 0 (unlimited) and 1000000 writes per second")
    if not 0 <= o["datagram_max"] <= DGRAM_PAYLOAD_MAX:
        raise ConfigError(f"--datagram-max must be between 0 (HTTP only) and {DGRAM_PAYLOAD_MAX} bytes")
    data_port = o["data_port"]
    if data_port is None:
        data_port = 0 if port == 0 else port + 1
    if not 0 <= data_port < 65536 or (data_port == port and port != 0):
        raise ConfigError(f"bad data port {data_port}")
    gossip = GossipConfig(
        cluster=o["cluster"],
        gossip_interval_s=o["gossip_interval"],
        probe_interval_s=o["probe_interval"],
        probe_timeout_s=o["probe_interval"] / 2,
        fanout=o["fanout"],
        redial_interval_s=2 * o["gossip_interval"],
    )
    return Config(
        node_id=node_id,
        host=host,
        port=port,
        data_dir=data_dir,
        join=join,
        advertise=advertise,
        cluster=o["cluster"],
        secrets=Secrets(api_tokens, secrets),
        notes=tuple(notes),
        gossip=gossip,
        tls_cert=Path(tls_cert) if tls_cert else None,
        tls_key=Path(tls_key) if tls_key else None,
        tls_ca=Path(o["tls_ca"]) if o["tls_ca"] else None,
        data_port=data_port,
        dram_dir=Path(o["dram_dir"]).expanduser() if o["dram_dir"] else None,
        max_connections=o["max_connections"],
        max_client_connections=o["max_client_connections"],
        http_hosts=http_hosts,
        max_models=o["max_models"],
        write_rate=o["write_rate"],
        ingest_roots=_ingest_roots(o["ingest_roots"], data_dir),
        allow_private_sources=bool(o["allow_private_sources"]),
        datagram_max=0 if tls_cert else o["datagram_max"],
        max_ingress_bps=parse_rate(o["max_ingress"], "--max-ingress"),
        max_egress_bps=parse_rate(o["max_egress"], "--max-egress"),
        chunk_stall_s=o["chunk_stall"],
        source_wait_s=o["source_wait"],
        job_node_wait_s=o["job_node_wait"],
        job_keep_s=o["job_keep"],
        replica_grace_s=o["replica_grace"],
        watermarks=watermarks,
        scrub_interval_s=o["scrub_interval"],
        verify_period_s=o["verify_period"],
        verify_rate_bps=verify_rate,
        s3_endpoint_url=o["s3_endpoint_url"],
        partial_keep_s=o["partial_keep"],
        replica_interval_s=o["replica_interval"],
        fake_gpus=fake_gpus,
        labels=labels,
        gpu_interval_s=o["gpu_interval"],
        service_ports=service_ports,
        engines=engines,
        engine_binaries=binaries,
        engine_policy=engine_policy,
        engine_drain_s=o["engine_drain"],
        engine_startup_s=o["engine_startup"],
    )


def _option_values(args: argparse.Namespace, env: dict[str, str] | None) -> dict[str, Any]:
    """Every option's value: the command line first, then ``MESHNODE_<NAME>``,
    then the config file (``--config`` / ``MESHNODE_CONFIG``), then its default."""
    env = dict(os.environ) if env is None else env
    file_values: dict[str, Any] = {}
    cfg_path = getattr(args, "config", None) or env.get("MESHNODE_CONFIG")
    if cfg_path:
        try:
            file_values = tomllib.loads(Path(cfg_path).read_text())
        except OSError as e:
            raise ConfigError(f"cannot read config file {cfg_path}: {e.strerror}") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file {cfg_path} is not valid TOML: {e}") from None
        unknown = set(file_values) - {o[0] for o in _OPTIONS}
        if unknown:
            raise ConfigError(f"config file {cfg_path} has unknown keys: {', '.join(sorted(unknown))}")

    def get(name: str, typ: type, default: Any) -> Any:
        v = getattr(args, name, None)
        if v is not None:
            return v
        ev = env.get("MESHNODE_" + name.upper())
        if ev is not None and ev != "":
            try:
                return _parse_bool(ev) if typ is bool else typ(ev)
            except ValueError:
                raise ConfigError(f"MESHNODE_{name.upper()}={ev!r} is not a valid {typ.__name__}") from None
        if name in file_values:
            v = file_values[name]
            if typ is bool:
                if not isinstance(v, bool):
                    raise ConfigError(f"config key {name} must be true or false")
                return v
            try:
                return typ(v)
            except (TypeError, ValueError):
                raise ConfigError(f"config key {name} is not a valid {typ.__name__}") from None
        return default

    return {name: get(name, typ, default) for name, typ, _h, default in _OPTIONS}


def _secrets(args: argparse.Namespace, o: dict[str, Any], host: str) -> tuple[tuple[str, ...], tuple[str, ...], list[str]]:
    """The API tokens and cluster secrets, and the notes to log about them: a
    node bound beyond loopback needs both, strong, and warns of what is weak."""
    api_tokens = _split(o["api_tokens"])
    if o["api_tokens_file"]:
        api_tokens += _split(_read_secret_file(o["api_tokens_file"], "API token"))
    secrets = _split(o["cluster_secret"])
    if o["cluster_secret_file"]:
        secrets += _split(_read_secret_file(o["cluster_secret_file"], "cluster secret"))
    notes: list[str] = []
    if not _is_loopback(host):
        if not api_tokens or not secrets:
            raise ConfigError(
                f"refusing to bind {host}, which is not a loopback address, without both an API token "
                "(--api-tokens-file / MESHNODE_API_TOKENS) and a cluster secret "
                "(--cluster-secret-file / MESHNODE_CLUSTER_SECRET)"
            )
        _check_strength(api_tokens, "an API token", "--api-tokens-file FILE or MESHNODE_API_TOKENS", host)
        _check_strength(secrets, "the cluster secret", "--cluster-secret-file FILE or MESHNODE_CLUSTER_SECRET", host)
        for name in ("api_tokens", "cluster_secret"):
            if getattr(args, name, None):
                flag = "--" + name.replace("_", "-")
                notes.append(
                    f"{flag} given on the command line: any local user can read it in /proc/<pid>/cmdline; "
                    f"use {flag}-file or MESHNODE_{name.upper()} instead"
                )
        if not o["tls_cert"]:
            notes.append(
                "no TLS: peer requests are signed (the cluster secret never crosses the wire) but not "
                "encrypted, and API tokens travel in clear; give --tls-cert, --tls-key (and --tls-ca) "
                "for confidentiality"
            )
    return api_tokens, secrets, notes


def _check_intervals(o: dict[str, Any]) -> None:
    """The gossip, transfer, job, replica and scrub timings within their bounds."""
    if o["gossip_interval"] <= 0 or o["probe_interval"] <= 0:
        raise ConfigError("gossip and probe intervals must be positive")
    if o["fanout"] < 1:
        raise ConfigError("fanout must be at least 1")
    for flag in ("chunk_stall", "source_wait", "job_node_wait", "job_keep", "replica_grace", "replica_interval",
                 "scrub_interval", "partial_keep"):
        if not 0 < o[flag] <= 86_400:  # also refuses nan
            raise ConfigError(f"--{flag.replace('_', '-')} must be between 0 and 86400 seconds")
    if not 0 <= o["verify_period"] <= 366 * 86_400:  # also refuses nan
        raise ConfigError("--verify-period must be between 0 (never) and 31622400 seconds (a year)")


def _watermarks(o: dict[str, Any]) -> dict[str, Watermarks]:
    watermarks = {}
    for tier in ("disk", "dram"):
        try:
            watermarks[tier] = Watermarks.parse(o[f"{tier}_watermarks"])
        except InvalidWatermarks as e:
            raise ConfigError(f"--{tier}-watermarks: {e}") from None
    return watermarks


def _engine_settings(o: dict[str, Any]) -> tuple[frozenset[str], dict[str, str], EnginePolicy]:
    """The engines enabled, their binaries, and what a serve may pass them."""
    engines = frozenset(_split(o["engines"]))
    if not engines or not engines <= set(ENGINES):
        raise ConfigError(f"--engines: a comma-separated list of {', '.join(ENGINES)}")
    binaries: dict[str, str] = {}
    for item in _split(o["engine_binaries"]):
        name, sep, path = item.partition("=")
        if not sep or name not in ENGINES or name == "command" or not path.startswith("/"):
            raise ConfigError(f"--engine-binaries: {item!r} is not ENGINE=/absolute/path "
                              f"(engines: {', '.join(e for e in ENGINES if e != 'command')})")
        binaries[name] = path
    try:
        engine_policy = EnginePolicy(env_allow=parse_env_allow(o["engine_env_allow"]),
                                     env_pass=parse_env_pass(o["engine_env_pass"]),
                                     flags=parse_args_allow(o["engine_args_allow"], ENGINES))
    except ValueError as e:
        raise ConfigError(str(e)) from None
    for flag in ("engine_drain", "engine_startup"):
        if not 0 < o[flag] <= 86_400:
            raise ConfigError(f"--{flag.replace('_', '-')} must be between 0 and 86400 seconds")
    return engines, binaries, engine_policy


def _ingest_roots(text: str | None, data_dir: Path) -> tuple[Path, ...]:
    if not text:
        return (data_dir / "import",)
    roots = []
    for r in _split(text):
        p = Path(r).expanduser()
        if not p.is_absolute():
            raise ConfigError(f"--ingest-roots: {r!r} is not an absolute path")
        roots.append(p)
    return tuple(roots)


_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "t": 1000**4,
    "tb": 1000**4,
    "ki": 1024,
    "kib": 1024,
    "mi": 1024**2,
    "mib": 1024**2,
    "gi": 1024**3,
    "gib": 1024**3,
    "ti": 1024**4,
    "tib": 1024**4,
}


def parse_size(text: str) -> float:
    """``"16GiB"``, ``"16G"``, ``"500MB"``, ``"1500000"`` -> bytes; ValueError says why not."""
    raw = text.strip().lower().replace(" ", "").replace("_", "")
    number = raw.rstrip("kmgtib")
    unit = raw[len(number) :]
    if unit not in _SIZE_UNITS or not number:
        raise ValueError(f"not a size: {text!r} (try 16GiB or 17179869184)")
    try:
        value = float(number)
    except ValueError:
        raise ValueError(f"not a size: {text!r}") from None
    if value < 0:
        raise ValueError(f"size must not be negative: {text!r}")
    return value * _SIZE_UNITS[unit]


def parse_rate(text: str | None, what: str) -> float:
    """``500M``, ``1.5G``, ``800MiB`` (bytes per second; a trailing ``/s`` is fine)."""
    if not text:
        return 0.0
    try:
        return parse_size(text.strip().lower().removesuffix("/s"))
    except ValueError as e:
        raise ConfigError(f"bad {what} {text!r}: expected bytes per second like 500M or 1G ({e})") from None
