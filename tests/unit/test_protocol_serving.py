"""Serving decisions: engine command lines, config bounds, ports, VRAM, and
the life of a service (readiness, liveness, restart backoff, giving up)."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.engines import EnginePolicy
from protocol.serving import (
    LifePolicy,
    ServeError,
    ServiceAction,
    ServiceLife,
    ServiceRecord,
    ServiceState,
    choose_port,
    engine_spec,
    parse_port_range,
    parse_svc_key,
    pick_engine,
    svc_key,
    validate_config,
    vram_fits,
)

GiB = 2**30
BIN: dict[str, str] = {}
POLICY = EnginePolicy()


def spec(engine: str, files: tuple[str, ...] = ("model.safetensors",), gpus: tuple[int, ...] = (0, 1),
         **config: Any) -> tuple[str, ...]:
    return engine_spec(engine, "org/m", "/data/copies/org/m", files, "127.0.0.1", 8101, gpus,
                       validate_config(config), BIN, POLICY, {}).argv


def test_each_engine_gets_its_command_line() -> None:
    assert spec("vllm", flags={"max-model-len": 4096, "enforce-eager": True, "trust-remote-code": False}) == (
        "vllm", "serve", "/data/copies/org/m", "--host", "127.0.0.1", "--port", "8101", "--served-model-name",
        "org/m", "--tensor-parallel-size", "2", "--max-model-len", "4096", "--enforce-eager")
    assert spec("llama.cpp", files=("a/m-00002-of-00002.gguf", "a/m-00001-of-00002.gguf"), args=["-c", "2048"]) == (
        "llama-server", "-m", "/data/copies/org/m/a/m-00001-of-00002.gguf", "--host", "127.0.0.1", "--port", "8101",
        "--alias", "org/m", "--n-gpu-layers", "999", "-c", "2048")
    assert spec("sglang", gpus=(3,))[:3] == ("python3", "-m", "sglang.launch_server")
    assert "--num-shard" in spec("tgi")
    cmd = spec("command", command=["my-engine", "--weights", "{model_dir}", "--port={port}", "--gpus", "{gpus}"])
    assert cmd == ("my-engine", "--weights", "/data/copies/org/m", "--port=8101", "--gpus", "0,1")
    s = engine_spec("vllm", "m", "/d", (), "h", 1, (), validate_config({}), {"vllm": "/opt/vllm/bin/vllm"}, POLICY, {})
    assert s.argv[0] == "/opt/vllm/bin/vllm" and s.health_path == "/health" and s.models_path == "/v1/models"
    assert engine_spec("tgi", "m", "/d", (), "h", 1, (), validate_config({}), {}, POLICY, {}).models_path is None


def test_the_engine_is_picked_by_name_else_by_files() -> None:
    assert pick_engine(None, ["x.safetensors"]) == "vllm"
    assert pick_engine(None, ["sub/X.GGUF"]) == "llama.cpp"
    assert pick_engine("sglang", ["x.gguf"]) == "sglang"
    with pytest.raises(ServeError) as e:
        pick_engine("tensorrt", [])
    assert e.value.code == "UNKNOWN_ENGINE"


@pytest.mark.parametrize(("config", "code"), [
    ({"engine": "nope"}, "UNKNOWN_ENGINE"),
    ({"shell": "rm -rf /"}, "INVALID_CONFIG"),
    ({"args": "--x"}, "INVALID_CONFIG"),
    ({"args": ["x"] * 65}, "INVALID_CONFIG"),
    ({"args": ["a\x00b"]}, "INVALID_CONFIG"),
    ({"flags": {"a b": 1}}, "INVALID_CONFIG"),
    ({"flags": {"x": [1]}}, "INVALID_CONFIG"),
    ({"command": []}, "INVALID_CONFIG"),
    ({"health_path": "health"}, "INVALID_CONFIG"),
    ({"startup_timeout_s": 0}, "INVALID_CONFIG"),
    ({"startup_timeout_s": True}, "INVALID_CONFIG"),
    ({"env": {"CUDA_VISIBLE_DEVICES": "3"}}, "INVALID_CONFIG"),
    ({"env": {"not a name": "x"}}, "INVALID_CONFIG"),
])
def test_bad_config_is_refused(config: dict[str, Any], code: str) -> None:
    with pytest.raises(ServeError) as e:
        validate_config(config)
    assert e.value.code == code


def test_a_bad_placeholder_or_a_gguf_less_llama_is_refused() -> None:
    with pytest.raises(ServeError, match="unknown placeholder"):
        spec("command", command=["x", "{secret}"])
    with pytest.raises(ServeError, match="this model has none"):
        spec("llama.cpp")


def test_ports() -> None:
    assert parse_port_range("8100-8102") == (8100, 8102)
    assert parse_port_range("9000") == (9000, 9000)
    for bad in ("80-90", "9000-8000", "x", "8000-70000"):
        with pytest.raises(ValueError):
            parse_port_range(bad)
    assert choose_port(None, (8100, 8102), [8100]) == [8101, 8102]
    assert choose_port(8101, (8100, 8102), []) == [8101]
    for requested, taken, code in ((9000, [], "PORT_OUT_OF_RANGE"), (8101, [8101], "PORT_IN_USE"),
                                   (None, [8100, 8101, 8102], "NO_CAPACITY")):
        with pytest.raises(ServeError) as e:
            choose_port(requested, (8100, 8102), taken)
        assert e.value.code == code


def test_vram_counts_reservations_in_flight() -> None:
    assert vram_fits(20 * GiB, [0], {0: 24 * GiB}, {}) == []
    assert "held by services starting" in vram_fits(20 * GiB, [0], {0: 24 * GiB}, {0: 8 * GiB})[0]
    assert vram_fits(40 * GiB, [0, 1], {0: 24 * GiB, 1: 24 * GiB}, {}) == []  # split over two
    assert vram_fits(1, [2], {0: GiB}, {}) == ["gpu2: no such GPU on this node"]


def test_a_healthy_engine_that_crashes_backs_off_then_gives_up() -> None:
    life = ServiceLife(LifePolicy(crash_limit=4, crash_window_s=10_000))
    life.spawned(0)
    assert life.probe_failed(1, "refused") is ServiceAction.NOTHING and life.state is ServiceState.STARTING
    assert life.probe_ok(2) is ServiceAction.REPORT_READY and life.state is ServiceState.HEALTHY
    waits = []
    t = 10.0
    for _ in range(3):
        assert life.exited(t, -9) is ServiceAction.SPAWN and life.state is ServiceState.RESTARTING
        assert life.restart_at is not None
        waits.append(life.restart_at - t)
        t = life.restart_at
        life.spawned(t)
        assert life.probe_ok(t + 1) is ServiceAction.NOTHING  # ready once; a restart reports nothing new
        t += 5
    assert waits == [10, 10, 10]  # healthy in between: the backoff starts over each time
    assert life.exited(t, 1) is ServiceAction.GIVE_UP and life.state is ServiceState.ERROR  # the 4th crash in the window
    assert life.restarts == 3


def test_crash_loops_double_the_backoff_to_its_cap() -> None:
    life = ServiceLife(LifePolicy(crash_limit=100))
    life.spawned(0)
    life.probe_ok(1)
    waits, t = [], 2.0
    for _ in range(8):
        life.exited(t, 1)
        assert life.restart_at is not None
        waits.append(life.restart_at - t)
        t = life.restart_at
        life.spawned(t)  # ... and it dies again before it is healthy
    assert waits == [10, 20, 40, 80, 160, 300, 300, 300]


def test_a_hung_engine_is_killed_after_the_threshold() -> None:
    life = ServiceLife(LifePolicy(failure_threshold=3))
    life.spawned(0)
    life.probe_ok(1)
    assert life.probe_failed(4, "timed out") is ServiceAction.NOTHING and life.state is ServiceState.UNHEALTHY
    assert life.probe_failed(7, "timed out") is ServiceAction.NOTHING
    assert life.probe_failed(10, "timed out") is ServiceAction.KILL and life.state is ServiceState.RESTARTING
    assert life.exited(10.1, -9) is ServiceAction.NOTHING  # the exit of the process we killed


def test_an_engine_never_healthy_fails_with_no_restart() -> None:
    life = ServiceLife(LifePolicy(startup_timeout_s=30))
    life.spawned(0)
    assert life.exited(2, 3) is ServiceAction.GIVE_UP and life.state is ServiceState.ERROR
    slow = ServiceLife(LifePolicy(startup_timeout_s=30))
    slow.spawned(0)
    assert slow.probe_failed(29, "503") is ServiceAction.NOTHING
    assert slow.probe_failed(30, "503") is ServiceAction.KILL and slow.state is ServiceState.ERROR
    assert "startup budget of 30 s" in (slow.error or "")


events = st.lists(st.tuples(st.sampled_from(["ok", "fail", "exit", "spawn", "stop"]), st.floats(0.1, 100)),
                  max_size=60)


@settings(max_examples=300)
@given(events)
def test_life_invariants(evs: list[tuple[str, float]]) -> None:
    p = LifePolicy()
    life = ServiceLife(p)
    life.spawned(0)
    t = 0.0
    stopped = False
    for kind, dt in evs:
        t += dt
        before = life.state
        if kind == "ok":
            a = life.probe_ok(t)
        elif kind == "fail":
            a = life.probe_failed(t, "x")
        elif kind == "exit":
            a = life.exited(t, 1)
        elif kind == "stop":
            life.stop()
            stopped = True
            a = ServiceAction.NOTHING
        else:
            if life.state is ServiceState.RESTARTING and life.restart_at is not None and t >= life.restart_at:
                life.spawned(t)
            a = ServiceAction.NOTHING
        assert life.backoff_s == 0 or p.backoff_initial_s <= life.backoff_s <= p.backoff_max_s
        assert (life.restart_at is not None) == (life.state is ServiceState.RESTARTING)
        if stopped:
            assert a is not ServiceAction.SPAWN and life.state in (ServiceState.STOPPING, ServiceState.STOPPED)
        if before is ServiceState.ERROR and not stopped:
            assert life.state is ServiceState.ERROR
        assert len(life.crashes) <= p.crash_limit


def test_records_round_trip_and_refuse_junk() -> None:
    r = ServiceRecord("org/m", "n1", 8101, "vllm", (0, 1), ServiceState.HEALTHY, 4242, 1_000, 2, 30 * GiB, "j1",
                      None, None)
    assert ServiceRecord.from_value(r.to_value()) == r
    assert r.device == "n1:gpu0,n1:gpu1"
    assert parse_svc_key(svc_key("org/m", "n1", 8101)) == ("org/m", "n1", 8101)
    assert parse_svc_key("svc/x") is None
    for bad in (None, {**r.to_value(), "state": "zombie"}, {**r.to_value(), "port": 0},
                {**r.to_value(), "gpus": [True]}, {**r.to_value(), "engine": "x"},
                {**r.to_value(), "error": "x" * 5000}, {**r.to_value(), "pid": -1}):
        with pytest.raises(Exception, match="service"):
            ServiceRecord.from_value(bad)


def _svc(node: str, port: int, state: ServiceState = ServiceState.HEALTHY, model: str = "m") -> ServiceRecord:
    return ServiceRecord(model, node, port, "vllm", (0,), state, 1, 0)


def test_pools_one_per_gpu_ready_where_a_healthy_engine_serves() -> None:
    from protocol.serving import ServiceRecord, ServiceState, pools

    def svc(model: str, gpus: tuple[int, ...], state: ServiceState, node: str = "n1") -> ServiceRecord:
        return ServiceRecord(model, node, 8000 + len(model), "vllm", gpus, state, 1, 0)

    got = pools("n1", [0, 1], [svc("a", (0,), ServiceState.HEALTHY), svc("bb", (0, 3), ServiceState.STARTING),
                               svc("ccc", (1,), ServiceState.STOPPED), svc("dddd", (1,), ServiceState.HEALTHY, "n2")])
    assert [(p.pool_id, p.ready, p.models) for p in got] == [
        ("pool-gpu0", True, ("a",)), ("pool-gpu1", False, ()), ("pool-gpu3", False, ())]
    assert pools("n1", [], []) == []
