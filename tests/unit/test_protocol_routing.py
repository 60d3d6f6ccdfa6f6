"""Where an inference request goes (``protocol.routing``): by load, and to
where its prefix is warm; every node alike."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.routing import AFFINITY_MIN_CHARS, SLACK, affinity_key, load_of, parse_load, route
from protocol.serving import ServiceRecord, ServiceState

SETTINGS = settings(max_examples=300, deadline=None, derandomize=True, database=None)


def svc(node: str, port: int = 8000, state: ServiceState = ServiceState.HEALTHY, model: str = "m",
        load: tuple[int, int] | None = None) -> ServiceRecord:
    return ServiceRecord(model, node, port, "vllm", (0,), state, 1, 0, load=load)


def test_healthy_reachable_least_loaded_first_local_among_equals() -> None:
    svcs = [svc("b"), svc("c"), svc("a", state=ServiceState.STARTING), svc("d"), svc("b", 2, model="x")]
    assert [s.node for s in route(svcs, "m", "a", {"b", "c"}, {})] == ["b", "c"]  # d unreachable
    assert [s.node for s in route(svcs, "m", "a", {"b", "c"}, {("b", 8000): 3})] == ["c", "b"]
    local = [*svcs, svc("a", 9)]
    assert route(local, "m", "a", {"b", "c"}, {})[0].node == "a"  # no hop among equals
    assert route(local, "m", "a", {"b", "c"}, {("a", 9): 50})[0].node == "b"  # a busy local engine loses
    assert route(svcs, "nope", "a", {"b"}, {}) == []


def test_the_engine_s_own_load_counts() -> None:
    svcs = [svc("b", load=(30, 10)), svc("c", load=(2, 0))]
    assert [s.node for s in route(svcs, "m", "a", {"b", "c"}, {})] == ["c", "b"]
    assert load_of(svcs[0], {("b", 8000): 2}) == 42


nodes = st.lists(st.sampled_from(list("abcdefgh")), min_size=1, max_size=8, unique=True)


@SETTINGS
@given(nodes, st.text(min_size=1, max_size=50), st.sampled_from(list("abcdefgh")),
       st.sampled_from(list("abcdefgh")))
def test_every_node_sends_a_key_to_the_same_service(ns: list[str], key: str, me1: str, me2: str) -> None:
    svcs = [svc(n) for n in ns]
    every = set(ns) | {me1, me2}
    assert route(svcs, "m", me1, every, {}, key)[0] == route(svcs, "m", me2, every, {}, key)[0]


@SETTINGS
@given(nodes, st.lists(st.text(min_size=1, max_size=20), min_size=1, max_size=30, unique=True))
def test_a_service_gone_moves_only_its_own_keys(ns: list[str], keys: list[str]) -> None:
    svcs = [svc(n) for n in ns]
    before = {k: route(svcs, "m", "z", set(ns), {}, k)[0].node for k in keys}
    gone = ns[0]
    after = {k: (route(svcs[1:], "m", "z", set(ns), {}, k) or [None])[0] for k in keys}
    for k in keys:
        if before[k] != gone:
            a = after[k]
            assert a is not None and a.node == before[k]


@SETTINGS
@given(nodes, st.text(min_size=1, max_size=20), st.integers(0, 40))
def test_a_warm_service_yields_to_load_only_past_the_slack(ns: list[str], key: str, extra: int) -> None:
    svcs = [svc(n) for n in ns]
    warm = route(svcs, "m", "z", set(ns), {}, key)[0]
    first = route(svcs, "m", "z", set(ns), {(warm.node, warm.port): extra}, key)[0]
    if extra <= SLACK or len(ns) == 1:
        assert first == warm
    else:
        assert first != warm and load_of(first, {}) == 0


loads = st.lists(st.integers(0, 30), min_size=1, max_size=8)


@SETTINGS
@given(loads, st.dictionaries(st.integers(0, 7), st.integers(0, 5), max_size=8), st.integers(0, 2**32 - 1),
       st.integers(1, 100), st.one_of(st.none(), st.text(min_size=1, max_size=20)))
def test_with_a_draw_the_pick_is_the_warm_one_within_slack_or_never_the_most_loaded(
        reported: list[int], own: dict[int, int], draw: int, routers: int, key: str | None) -> None:
    svcs = [svc(f"n{i}", load=(x, 0)) for i, x in enumerate(reported)]
    inflight = {(f"n{i}", 8000): v for i, v in own.items() if i < len(svcs)}
    order = route(svcs, "m", "z", {s.node for s in svcs}, inflight, key, draw=draw, routers=routers)
    assert sorted(s.node for s in order) == sorted(s.node for s in svcs)  # every candidate, once, for retries
    ls = [load_of(s, inflight, routers) for s in order]
    warm = key is not None and order[0] == route(svcs, "m", "z", {s.node for s in svcs}, {}, key)[0]
    if warm and ls[0] <= min(ls) + SLACK:
        return
    assert len(ls) == 1 or ls[0] <= max(ls[1:])
    if len(ls) < 3:
        assert ls[0] == min(ls)  # two services: the less loaded, as without a draw


def test_own_requests_stand_for_every_router_s_until_the_next_report() -> None:
    svcs = [svc("b", load=(3, 0)), svc("c", load=(4, 0))]
    # One request in flight from here to b: alone, b (4) and c (4) are equal;
    # with 8 nodes routing alike, b's 3 + 8 passes c's 4.
    assert load_of(svcs[0], {("b", 8000): 1}, routers=8) == 11
    assert route(svcs, "m", "a", {"b", "c"}, {("b", 8000): 1}, routers=8)[0].node == "c"


def test_draws_spread_requests_that_stale_equal_loads_would_herd() -> None:
    """Every node reads the same published loads: without a draw each sends
    every request to the same first service until the next report; with
    draws they spread over all of them."""
    svcs = [svc(f"n{i}", load=(2, 0)) for i in range(6)]
    every = {s.node for s in svcs}
    assert {route(svcs, "m", f"x{i}", every, {})[0].node for i in range(50)} == {"n0"}
    picks = [route(svcs, "m", "x", every, {}, draw=d)[0].node for d in range(600)]
    assert set(picks) == every and max(picks.count(n) for n in every) < 2 * 600 / 6


def test_the_key_is_the_session_else_a_long_prompt_s_start() -> None:
    long = "You are a helpful assistant. " * 20
    assert affinity_key({"prompt": "hi"}, None) is None
    assert affinity_key({"prompt": "hi"}, "user-7") == "s:user-7"
    a = affinity_key({"messages": [{"role": "system", "content": long}, {"role": "user", "content": "one"}]}, None)
    b = affinity_key({"messages": [{"role": "system", "content": long}, {"role": "user", "content": "two"}]}, None)
    assert a is not None and a == b  # the shared system prompt decides
    assert affinity_key({"prompt": "x" * AFFINITY_MIN_CHARS}, None) is not None
    assert affinity_key(["not", "a", "dict"], None) is None


def test_each_engine_s_load_is_read() -> None:
    vllm = ('# HELP x\nvllm:num_requests_running{model_name="m"} 3.0\n'
            'vllm:num_requests_waiting{model_name="m"} 2.0\n')
    assert parse_load("vllm", vllm) == (3, 2)
    assert parse_load("llama.cpp", '[{"id":0,"is_processing":true},{"id":1,"is_processing":false}]') == (1, 0)
    assert parse_load("sglang", '{"load": 7}') == (7, 0)
    assert parse_load("sglang", '[{"load": 2}, {"load": 3}]') == (5, 0)


@given(st.sampled_from(["vllm", "llama.cpp", "sglang", "tgi"]), st.text(max_size=300))
def test_no_engine_answer_breaks_the_reader(engine: str, text: str) -> None:
    got = parse_load(engine, text)
    assert got is None or (0 <= got[0] <= 1_000_000 and 0 <= got[1] <= 1_000_000)


def test_a_load_travels_in_the_record() -> None:
    r = svc("a", load=(4, 1))
    assert ServiceRecord.from_value(r.to_value()) == r
    assert ServiceRecord.from_value({**r.to_value(), "load": None}).load is None
