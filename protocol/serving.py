"""Serving: engine command lines, a service's life, its catalog record.

Theory of operation
-------------------
A service is one engine process (vLLM, llama.cpp's ``llama-server``,
SGLang, TGI, or an operator's ``command``) serving one model from the
node's own copy on some of its GPUs, on one port.  This module decides, and
``meshnode/serving.py`` does:

* ``pick_engine`` and ``engine_spec`` turn a request (the engine named by
  the step's ``config`` or the API body, else a ``.gguf`` file means
  llama.cpp, else vLLM) into an argv, the health and model-list paths to
  probe, and nothing else: no shell ever sees it.  ``validate_config``
  refuses unknown keys and anything unbounded.
* ``ServiceLife`` is the state machine of one service: ``starting`` until
  the engine is healthy (or its startup budget runs out), ``healthy``,
  ``unhealthy`` after ``failure_threshold`` failed probes in a row (a hung
  engine), ``restarting`` after a crash with a backoff of 10 s doubling to
  300 s (reset once healthy), ``error`` after ``crash_limit`` crashes within
  ``crash_window_s`` (it stays down), ``stopping`` then ``stopped`` when
  asked.  Each event returns what to do next; nothing here sleeps or spawns.
* ``choose_port`` picks the step's port or a free one from the node's range;
  ``vram_fits`` checks a GPU's free memory minus reservations in flight.
* ``ServiceRecord`` is ``svc/<model>@<node>:<port>`` in the catalog, written
  by the node that runs it.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

from .engines import EnginePolicy, ServeError, check_args, check_env_names, engine_env
from .keys import SVC_PREFIX
from .records import RecordError, field_int, field_map, field_str
from .units import human_bytes

__all__ = [
    "ENGINES",
    "LOAD_FORMATS",
    "EngineSpec",
    "LifePolicy",
    "Pool",
    "ServeError",
    "ServiceAction",
    "ServiceLife",
    "ServiceRecord",
    "ServiceState",
    "choose_port",
    "engine_spec",
    "parse_port_range",
    "parse_svc_key",
    "pick_engine",
    "pools",
    "svc_key",
    "validate_config",
    "vram_fits",
]

ENGINES = ("vllm", "llama.cpp", "sglang", "tgi", "command")
DEFAULT_BINARIES = {"vllm": "vllm", "llama.cpp": "llama-server", "sglang": "python3", "tgi": "text-generation-launcher"}
ARGS_MAX = 64
ARG_CHARS_MAX = 1000
CONFIG_KEYS = {"engine", "args", "flags", "command", "health_path", "models_path", "startup_timeout_s", "env",
               "completion_probe", "load_format"}
# Where each engine tells its load (protocol.routing.parse_load reads it); a command engine names its format.
LOAD_FORMATS = {"vllm": "/metrics", "llama.cpp": "/slots", "sglang": "/get_load"}
ENV_MAX = 32
LOG_TAIL_CHARS = 4000


# -- engines --------------------------------------------------------------------------------


def _str_list(v: Any, what: str) -> list[str]:
    if not isinstance(v, list) or len(v) > ARGS_MAX or not all(
            isinstance(x, str) and 0 < len(x) <= ARG_CHARS_MAX and "\x00" not in x for x in v):
        raise ServeError("INVALID_CONFIG", f"{what}: a list of at most {ARGS_MAX} non-empty strings")
    return list(v)


def validate_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """The serving part of a step's (or the API body's) ``config``: known keys
    only, every value bounded.  ``flags`` become ``--key value`` pairs
    (``true``: the bare flag; ``false`` or null: left out)."""
    unknown = set(config) - CONFIG_KEYS - {"port"}
    if unknown:
        raise ServeError("INVALID_CONFIG", f"unknown config keys: {', '.join(sorted(unknown))[:200]} "
                         f"(known: {', '.join(sorted(CONFIG_KEYS))})")
    out: dict[str, Any] = {}
    if "engine" in config:
        e = config["engine"]
        if e not in ENGINES:
            raise ServeError("UNKNOWN_ENGINE", f"unknown engine {str(e)[:40]!r}: one of {', '.join(ENGINES)}")
        out["engine"] = e
    args = _str_list(config.get("args", []), "config.args")
    flags = config.get("flags", {})
    if not isinstance(flags, dict) or len(flags) > ARGS_MAX:
        raise ServeError("INVALID_CONFIG", f"config.flags: a map of at most {ARGS_MAX} flags")
    for k, v in flags.items():
        if not isinstance(k, str) or not 0 < len(k) <= 100 or not k.replace("-", "").replace("_", "").isalnum():
            raise ServeError("INVALID_CONFIG", f"config.flags: {str(k)[:40]!r} is not a flag name")
        name = "--" + k.lstrip("-")
        if v is True:
            args.append(name)
        elif v is None or v is False:
            continue
        elif isinstance(v, int | float | str) and len(str(v)) <= ARG_CHARS_MAX:
            args += [name, str(v)]
        else:
            raise ServeError("INVALID_CONFIG", f"config.flags.{k}: a string, number or true")
    if len(args) > ARGS_MAX:
        raise ServeError("INVALID_CONFIG", f"config: at most {ARGS_MAX} engine arguments in all")
    out["args"] = args
    if "command" in config:
        out["command"] = _str_list(config["command"], "config.command")
        if not out["command"]:
            raise ServeError("INVALID_CONFIG", "config.command: the program and its arguments")
    for k in ("health_path", "models_path"):
        if k in config:
            v = config[k]
            if v is not None and (not isinstance(v, str) or not v.startswith("/") or len(v) > 200):
                raise ServeError("INVALID_CONFIG", f"config.{k}: a path starting with /")
            out[k] = v
    if "load_format" in config:
        if config["load_format"] not in LOAD_FORMATS:
            raise ServeError("INVALID_CONFIG", f"config.load_format: one of {', '.join(LOAD_FORMATS)}")
        out["load_format"] = config["load_format"]
    if "completion_probe" in config:
        if not isinstance(config["completion_probe"], bool):
            raise ServeError("INVALID_CONFIG", "config.completion_probe: true or false")
        out["completion_probe"] = config["completion_probe"]
    if "startup_timeout_s" in config:
        v = config["startup_timeout_s"]
        if isinstance(v, bool) or not isinstance(v, int | float) or not 1 <= v <= 86_400:
            raise ServeError("INVALID_CONFIG", "config.startup_timeout_s: 1 to 86400 seconds")
        out["startup_timeout_s"] = float(v)
    env = config.get("env", {})
    if not isinstance(env, dict) or len(env) > ENV_MAX or not all(
            isinstance(k, str) and k.isidentifier() and isinstance(v, str) and len(v) <= ARG_CHARS_MAX
            for k, v in env.items()):
        raise ServeError("INVALID_CONFIG", f"config.env: a map of at most {ENV_MAX} NAME: value strings")
    if "CUDA_VISIBLE_DEVICES" in env:
        raise ServeError("INVALID_CONFIG", "config.env: CUDA_VISIBLE_DEVICES comes from the step's GPUs")
    check_env_names(env, None)  # what no node allows; the serving node checks its own allow list
    out["env"] = dict(env)
    return out


def pick_engine(explicit: str | None, files: Iterable[str]) -> str:
    """The engine named, else llama.cpp for a model with a ``.gguf`` file, else vLLM."""
    if explicit is not None:
        if explicit not in ENGINES:
            raise ServeError("UNKNOWN_ENGINE", f"unknown engine {explicit[:40]!r}: one of {', '.join(ENGINES)}")
        return explicit
    return "llama.cpp" if any(f.lower().endswith(".gguf") for f in files) else "vllm"


@dataclass(frozen=True, slots=True)
class EngineSpec:
    engine: str
    argv: tuple[str, ...]
    env: Mapping[str, str]
    health_path: str
    models_path: str | None  # OpenAI-style engines list the model here when ready
    completion_probe: bool = False  # liveness also asks for one token (an engine alive but unable to generate)
    health_fallback: bool = False  # no health path was given: a 404 there means "ask models_path"
    load_format: str | None = None  # how the engine tells its load (a key of LOAD_FORMATS), None: it does not

    @property
    def load_path(self) -> str | None:
        return LOAD_FORMATS.get(self.load_format or "")


def engine_spec(engine: str, model: str, model_dir: str, files: Sequence[str], host: str, port: int,
                gpus: Sequence[int], config: Mapping[str, Any], binaries: Mapping[str, str],
                policy: EnginePolicy, node_env: Mapping[str, str]) -> EngineSpec:
    """The argv, environment and probes of ``engine`` serving ``model`` from
    ``model_dir`` (its ``files``, relative) on ``host:port`` with ``gpus``.
    ``config`` is what ``validate_config`` returned; ``binaries`` the node's
    engine paths; ``policy`` what the operator lets a caller add
    (``protocol.engines``: ``ServeError`` ENGINE_CONFIG_NOT_ALLOWED for
    anything else); ``node_env`` the node's environment, of which only the
    policy's passed names reach the engine."""
    args = check_args(engine, config.get("args", []), policy, model_dir)
    env = engine_env(config.get("env", {}), policy, node_env, gpus)
    tp = str(max(len(gpus), 1))
    health, models = config.get("health_path", "/health"), config.get("models_path", "/v1/models")
    if engine == "command":
        cmd = config.get("command")
        if not cmd:
            raise ServeError("INVALID_CONFIG", "the command engine needs config.command: [program, args...]")
        subs = {"model_dir": model_dir, "port": str(port), "host": host, "model_name": model,
                "gpus": ",".join(map(str, gpus))}
        try:
            argv = [part.format(**subs) for part in cmd] + args
        except (KeyError, IndexError, ValueError) as e:
            raise ServeError("INVALID_CONFIG", f"config.command: unknown placeholder {e} (known: "
                             f"{', '.join('{' + k + '}' for k in subs)})") from None
        return EngineSpec(engine, tuple(argv), env, health, models, bool(config.get("completion_probe", False)),
                          "health_path" not in config, config.get("load_format"))
    binary = binaries.get(engine, DEFAULT_BINARIES[engine])
    if engine == "vllm":
        argv = [binary, "serve", model_dir, "--host", host, "--port", str(port), "--served-model-name", model,
                "--tensor-parallel-size", tp]
    elif engine == "llama.cpp":
        ggufs = sorted(f for f in files if f.lower().endswith(".gguf"))
        if not ggufs:
            raise ServeError("INVALID_CONFIG", "llama.cpp serves a .gguf file; this model has none")
        # The first shard of a split model (``-00001-of-``) or the only file.
        first = next((f for f in ggufs if "-00001-of-" in f), ggufs[0])
        argv = [binary, "-m", str(PurePosixPath(model_dir) / first), "--host", host, "--port", str(port),
                "--alias", model]
        if gpus:
            argv += ["--n-gpu-layers", "999"]
    elif engine == "sglang":
        argv = [binary, "-m", "sglang.launch_server", "--model-path", model_dir, "--host", host, "--port", str(port),
                "--served-model-name", model, "--tp", tp]
    else:  # tgi: its OpenAI route serves the model as "tgi"; readiness is its /health
        argv = [binary, "--model-id", model_dir, "--hostname", host, "--port", str(port), "--num-shard", tp]
        models = config.get("models_path")
    return EngineSpec(engine, tuple(argv + args), env, health, models, bool(config.get("completion_probe", False)),
                      "health_path" not in config, engine if engine in LOAD_FORMATS else None)


# -- ports and VRAM -------------------------------------------------------------------------


def parse_port_range(text: str) -> tuple[int, int]:
    """``8100-8199`` to (8100, 8199); ValueError with what is wrong."""
    lo_s, sep, hi_s = text.partition("-")
    try:
        lo, hi = int(lo_s), int(hi_s if sep else lo_s)
    except ValueError:
        raise ValueError(f"--service-ports: {text!r} is not LOW-HIGH (for instance 8100-8199)") from None
    if not 1024 <= lo <= hi <= 65535:
        raise ValueError(f"--service-ports: {text!r}: ports from 1024 to 65535, low first")
    return lo, hi


def choose_port(requested: int | None, port_range: tuple[int, int], taken: Iterable[int]) -> list[int]:
    """The ports to try in order: the one asked for (which must be in range and
    not ours already), or every free one of the range."""
    lo, hi = port_range
    used = set(taken)
    if requested is not None:
        if not lo <= requested <= hi:
            raise ServeError("PORT_OUT_OF_RANGE", f"port {requested} is outside this node's service ports {lo}-{hi}")
        if requested in used:
            raise ServeError("PORT_IN_USE", f"port {requested} is taken by another service on this node")
        return [requested]
    free = [p for p in range(lo, hi + 1) if p not in used]
    if not free:
        raise ServeError("NO_CAPACITY", f"every service port of {lo}-{hi} is taken")
    return free


def vram_fits(need: int, gpus: Sequence[int], free: Mapping[int, int], reserved: Mapping[int, int]) -> list[str]:
    """Why ``need`` bytes split over ``gpus`` do not fit (empty: they fit);
    ``free`` is NVML's figure, ``reserved`` what starting services hold."""
    out = []
    share = math.ceil(need / max(len(gpus), 1))
    for g in gpus:
        if g not in free:
            out.append(f"gpu{g}: no such GPU on this node")
            continue
        room = free[g] - reserved.get(g, 0)
        if room < share:
            out.append(f"gpu{g}: needs {human_bytes(share)}, has {human_bytes(max(room, 0))} free "
                       f"({human_bytes(reserved.get(g, 0))} held by services starting)")
    return out


# -- a service's life -------------------------------------------------------------------------


class ServiceState(enum.Enum):
    STARTING = "starting"
    HEALTHY = "healthy"
    UNHEALTHY = "unhealthy"
    RESTARTING = "restarting"
    STOPPING = "stopping"
    ERROR = "error"
    STOPPED = "stopped"

    @property
    def up(self) -> bool:
        return self in (ServiceState.STARTING, ServiceState.HEALTHY, ServiceState.UNHEALTHY)


class ServiceAction(enum.Enum):
    """What ``ServiceLife`` tells the engine's supervisor to do now (not a
    peer action, ``actions.PeerAction``, nor a pipeline step)."""

    NOTHING = "nothing"
    KILL = "kill"  # end the process group (it is hung, or its startup ran out)
    SPAWN = "spawn"  # start the engine (again), at ``ServiceLife.restart_at``
    REPORT_READY = "ready"  # the first time healthy: a serve step completes
    GIVE_UP = "give_up"  # error: it stays down; a waiting serve step fails


@dataclass(frozen=True, slots=True)
class LifePolicy:
    probe_interval_s: float = 3.0
    probe_timeout_s: float = 2.0
    failure_threshold: int = 3
    startup_timeout_s: float = 600.0
    backoff_initial_s: float = 10.0
    backoff_max_s: float = 300.0
    crash_limit: int = 5
    crash_window_s: float = 600.0


@dataclass
class ServiceLife:
    """One service's state.  Feed it events; do what they return."""

    policy: LifePolicy
    state: ServiceState = ServiceState.STARTING
    started_at: float = 0.0
    failures: int = 0  # failed probes in a row
    crashes: list[float] = field(default_factory=list)  # within the window
    restarts: int = 0
    backoff_s: float = 0.0
    restart_at: float | None = None
    ever_healthy: bool = False
    error: str | None = None

    def spawned(self, now: float) -> None:
        self.state = ServiceState.STARTING
        self.started_at = now
        self.failures = 0
        self.restart_at = None

    def probe_ok(self, now: float) -> ServiceAction:
        if self.state not in (ServiceState.STARTING, ServiceState.HEALTHY, ServiceState.UNHEALTHY):
            return ServiceAction.NOTHING
        first = not self.ever_healthy
        self.state = ServiceState.HEALTHY
        self.failures = 0
        self.backoff_s = 0.0  # healthy again: the next crash waits the initial backoff
        self.ever_healthy = True
        self.error = None
        return ServiceAction.REPORT_READY if first else ServiceAction.NOTHING

    def probe_failed(self, now: float, why: str) -> ServiceAction:
        if self.state is ServiceState.STARTING:
            if now - self.started_at >= self.policy.startup_timeout_s:
                return self._crashed(now, f"not healthy within its startup budget of "
                                          f"{self.policy.startup_timeout_s:g} s: {why}", kill=True)
            return ServiceAction.NOTHING
        if self.state not in (ServiceState.HEALTHY, ServiceState.UNHEALTHY):
            return ServiceAction.NOTHING
        self.failures += 1
        if self.failures < self.policy.failure_threshold:
            self.state = ServiceState.UNHEALTHY
            return ServiceAction.NOTHING
        return self._crashed(now, f"{self.failures} probes failed in a row: {why}", kill=True)

    def exited(self, now: float, code: int | None) -> ServiceAction:
        if self.state in (ServiceState.STOPPING, ServiceState.STOPPED):
            self.state = ServiceState.STOPPED
            return ServiceAction.NOTHING
        if self.state in (ServiceState.ERROR, ServiceState.RESTARTING):
            return ServiceAction.NOTHING  # the exit of a process we killed
        return self._crashed(now, f"the engine exited (code {code})", kill=False)

    def _crashed(self, now: float, why: str, *, kill: bool) -> ServiceAction:
        self.error = why
        self.crashes = [t for t in self.crashes if now - t < self.policy.crash_window_s] + [now]
        if len(self.crashes) >= self.policy.crash_limit or not self.ever_healthy:
            # Never healthy: a broken model or flags; restarting would only repeat it.
            self.state = ServiceState.ERROR
            self.restart_at = None
            return ServiceAction.GIVE_UP if not kill else ServiceAction.KILL
        self.state = ServiceState.RESTARTING
        p = self.policy
        self.backoff_s = p.backoff_initial_s if self.backoff_s == 0 else min(self.backoff_s * 2, p.backoff_max_s)
        self.restart_at = now + self.backoff_s
        self.restarts += 1
        return ServiceAction.KILL if kill else ServiceAction.SPAWN

    def stop(self) -> None:
        if self.state is not ServiceState.STOPPED:
            self.state = ServiceState.STOPPING
        self.restart_at = None


# -- the catalog record -------------------------------------------------------------------------


def svc_key(model: str, node: str, port: int) -> str:
    return f"{SVC_PREFIX}{model}@{node}:{port}"


def parse_svc_key(key: str) -> tuple[str, str, int] | None:
    if not key.startswith(SVC_PREFIX):
        return None
    model, sep, where = key[len(SVC_PREFIX):].rpartition("@")
    node, sep2, port = where.rpartition(":")
    if not (sep and sep2 and model and node and port.isdigit()):
        return None
    return model, node, int(port)


def _text(v: Mapping[str, Any], k: str, optional: bool = False) -> Any:
    return field_str(v.get(k), f"service {k}", optional=optional, max_chars=LOG_TAIL_CHARS)


def _load(v: Any) -> tuple[int, int] | None:
    if v is None:
        return None
    if not isinstance(v, list) or len(v) != 2 or not all(
            isinstance(x, int) and not isinstance(x, bool) and 0 <= x <= 1_000_000 for x in v):
        raise RecordError("service load: [running, waiting]")
    return v[0], v[1]


def _health_path(v: Any) -> str:
    if not isinstance(v, str) or not v.startswith("/") or len(v) > 200:
        raise RecordError("service health_path: a path starting with /")
    return v


@dataclass(frozen=True, slots=True)
class ServiceRecord:
    """``svc/<model>@<node>:<port>``: one engine, as its node reports it."""

    model: str
    node: str
    port: int
    engine: str
    gpus: tuple[int, ...]
    state: ServiceState
    pid: int | None
    started_ms: int
    restarts: int = 0
    vram_bytes: int = 0
    job_id: str | None = None
    error: str | None = None
    log_tail: str | None = None
    health_path: str = "/health"
    load: tuple[int, int] | None = None  # the engine's own (running, waiting), as its node last read it

    @property
    def device(self) -> str:
        return ",".join(f"{self.node}:gpu{g}" for g in self.gpus) or f"{self.node}:cpu"

    def to_value(self) -> dict[str, Any]:
        return {"model": self.model, "node": self.node, "port": self.port, "engine": self.engine,
                "gpus": list(self.gpus), "state": self.state.value, "pid": self.pid, "started_ms": self.started_ms,
                "restarts": self.restarts, "vram_bytes": self.vram_bytes, "job_id": self.job_id,
                "error": self.error, "log_tail": self.log_tail, "health_path": self.health_path,
                "load": list(self.load) if self.load is not None else None}

    @classmethod
    def from_value(cls, raw: Any) -> ServiceRecord:
        raw = field_map(raw, "service")
        gpus = raw.get("gpus")
        if not isinstance(gpus, list) or len(gpus) > 64 or not all(
                isinstance(g, int) and not isinstance(g, bool) and 0 <= g < 64 for g in gpus):
            raise RecordError("service gpus: a list of GPU indexes")
        engine = _text(raw, "engine")
        if engine not in ENGINES:
            raise RecordError("service engine: unknown")
        try:
            state = ServiceState(raw.get("state"))
        except ValueError:
            raise RecordError("service state: unknown") from None
        return cls(
            model=_text(raw, "model"), node=_text(raw, "node"),
            port=field_int(raw.get("port"), "service port", lo=1, hi=65535),
            engine=engine, gpus=tuple(gpus), state=state, pid=field_int(raw.get("pid"), "service pid", optional=True),
            started_ms=field_int(raw.get("started_ms"), "service started_ms"),
            restarts=field_int(raw.get("restarts"), "service restarts"),
            vram_bytes=field_int(raw.get("vram_bytes"), "service vram_bytes"),
            job_id=_text(raw, "job_id", optional=True),
            error=_text(raw, "error", optional=True),
            log_tail=_text(raw, "log_tail", optional=True),
            health_path=_health_path(raw.get("health_path", "/health")),
            load=_load(raw.get("load")),
        )


@dataclass(frozen=True, slots=True)
class Pool:
    """llama-orch's pool, one per GPU of a node: ready while a healthy engine
    serves from it, with the models its engines serve."""

    pool_id: str
    gpu: int
    ready: bool
    models: tuple[str, ...]
    engines: tuple[str, ...]

    def to_value(self) -> dict[str, Any]:
        return {"pool_id": self.pool_id, "gpu": self.gpu, "ready": self.ready, "models": list(self.models),
                "engines": list(self.engines)}


def pools(node: str, gpu_indexes: Iterable[int], services: Iterable[ServiceRecord]) -> list[Pool]:
    """A node's pools: one per GPU it reports, and one for any GPU an engine
    of the node names that the node's GPU record lacks (stale figures)."""
    by_gpu: dict[int, list[ServiceRecord]] = {g: [] for g in gpu_indexes}
    for s in services:
        if s.node != node or not s.state.up:
            continue
        for g in s.gpus:
            by_gpu.setdefault(g, []).append(s)
    out = []
    for g in sorted(by_gpu):
        healthy = [s for s in by_gpu[g] if s.state is ServiceState.HEALTHY]
        out.append(Pool(f"pool-gpu{g}", g, bool(healthy), tuple(sorted({s.model for s in healthy})),
                        tuple(sorted({s.engine for s in healthy}))))
    return out
