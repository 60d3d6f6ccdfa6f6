"""Pipelines: gswarm's format parsed, every problem listed at once."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.pipeline import (
    LIMITS,
    InvalidPipeline,
    StepDevice,
    check_against,
    parse_pipeline,
    parse_step_device,
)

ROOT = Path(__file__).resolve().parents[2]
SETTINGS = settings(max_examples=200, deadline=None, derandomize=True, database=None)


def doc(*actions: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"name": "p", "description": "", "actions": list(actions), **extra}


def dl(aid: str, deps: list[str] | None = None, model: str = "m", dev: str = "node1:disk") -> dict[str, Any]:
    return {"action_id": aid, "action_type": "download", "model_name": model, "source_url": "https://x/y",
            "devices": [dev], "dependencies": deps or []}


def problems(d: Any) -> list[tuple[str | None, str, str]]:
    with pytest.raises(InvalidPipeline) as e:
        parse_pipeline(d)
    return [(p.action_id, p.field, p.message) for p in e.value.problems]


@pytest.mark.parametrize("name", ["deployment", "multi-model", "distributed-70b", "migration"])
def test_the_seed_pipelines_load_unchanged_and_validate(name: str) -> None:
    pipe = parse_pipeline(yaml.safe_load((ROOT / "examples" / f"{name}.yaml").read_text()))
    assert pipe.actions and pipe.fail_fast
    check_against(pipe, known_node=lambda n: n in ("node1", "node2"), registered=lambda m: m == "llama-7b")


def test_the_deployment_example_reads_as_gswarm_wrote_it() -> None:
    pipe = parse_pipeline(yaml.safe_load((ROOT / "examples" / "deployment.yaml").read_text()))
    assert [a.action_id for a in pipe.actions] == ["download_llama", "move_to_gpu", "serve_model", "health_check"]
    move = pipe.action("move_to_gpu")
    assert move.devices == (StepDevice("node1", "disk"), StepDevice("node1", "gpu0")) and move.keep_source
    assert pipe.action("serve_model").port == 8080
    assert pipe.action("health_check").target_url == "http://node1:8080/health"


def test_devices_take_gswarms_forms() -> None:
    assert parse_step_device("node1:gpu") == StepDevice("node1", "gpu0")
    assert parse_step_device("node1:gpu3") == StepDevice("node1", "gpu3")
    assert parse_step_device("any:disk") == StepDevice(None, "disk")
    assert parse_step_device("gpu") == StepDevice(None, "gpu")
    assert parse_step_device("dram") == StepDevice(None, "dram")
    for bad in ("node1:tape", "", "node 1:disk", ":disk", "node1:gpu01", 7, None):
        with pytest.raises(ValueError):
            parse_step_device(bad)


def test_every_problem_is_listed_at_once_with_its_action() -> None:
    got = problems(doc(
        dl("a", ["b"]),
        dl("a"),
        {"action_id": "c", "action_type": "teleport", "model_name": "m", "devices": []},
        {"action_id": "d", "action_type": "serve", "model_name": "m", "devices": ["node1:disk"], "colour": 1,
         "config": {"engine": "command", "command": ["my-engine", "--weights", "{model_dir}"]}},
        {"action_id": "e", "action_type": "health_check", "devices": []},
        dl("f", ["nowhere"]),
    ))
    fields = {(a, f) for a, f, _ in got}
    assert ("a", "dependencies") in fields  # b does not exist
    assert ("a", "action_id") in fields  # used twice
    assert ("c", "action_type") in fields
    assert ("d", "colour") in fields and ("d", "port") in fields and ("d", "devices") in fields
    assert ("e", "target_url") in fields
    assert ("f", "dependencies") in fields


def test_a_cycle_is_found_whatever_its_length() -> None:
    n = 200
    actions = [dl(f"s{i}", [f"s{(i + 1) % n}"]) for i in range(n)]
    got = problems(doc(*actions))
    assert any("cycle" in m for _, _, m in got)
    assert any("depends on itself" in m for _, _, m in problems(doc(dl("x", ["x"]))))


def test_bounds_give_one_clear_problem() -> None:
    got = problems(doc(*[dl(f"a{i}") for i in range(LIMITS.actions + 1)]))
    assert got == [(None, "actions", f"{LIMITS.actions + 1} actions: at most {LIMITS.actions} in one pipeline")]
    many = [dl(f"a{i}", model="not a name") for i in range(LIMITS.actions)]
    with pytest.raises(InvalidPipeline) as e:
        parse_pipeline(doc(*many))
    assert len(e.value.problems) == LIMITS.problems and e.value.total == LIMITS.actions
    assert "(and " in str(e.value)


def test_types_need_what_gswarm_says() -> None:
    bad = [
        ({"action_type": "download", "devices": []}, "devices"),
        ({"action_type": "copy", "devices": ["node1:disk"]}, "devices"),
        ({"action_type": "copy", "devices": ["disk", "node2:disk"]}, "devices[0]"),
        ({"action_type": "serve", "devices": ["node1:gpu0", "node2:gpu0"], "port": 80}, "devices"),
        ({"action_type": "delete", "devices": []}, "devices"),
        ({"action_type": "copy", "devices": ["node1:disk", "node2:disk"], "keep_source": True}, "keep_source"),
        ({"action_type": "move", "devices": ["node1:disk", "node2:disk"], "keep_source": "yes"}, "keep_source"),
        ({"action_type": "download", "devices": ["node1:disk"], "retries": 99}, "retries"),
        ({"action_type": "download", "devices": ["node1:disk"], "timeout_s": float("nan")}, "timeout_s"),
        ({"action_type": "download", "devices": ["node1:disk"], "port": True}, "port"),
    ]
    for extra, fld in bad:
        got = problems(doc({"action_id": "x", "model_name": "m", "dependencies": [], **extra}))
        assert ("x", fld) in {(a, f) for a, f, _ in got}, (extra, got)


def test_check_against_the_mesh_names_unknown_nodes_and_models() -> None:
    pipe = parse_pipeline(doc(
        {"action_id": "c", "action_type": "copy", "model_name": "ghost", "devices": ["node1:disk", "node9:disk"]},
        {"action_id": "d", "action_type": "download", "model_name": "plain", "devices": ["node1:disk"]},
        {"action_id": "h", "action_type": "download", "model_name": "acme/hub", "devices": ["node1:disk"]},
        {"action_id": "u", "action_type": "copy", "model_name": "acme/hub", "devices": ["node1:disk", "disk"],
         "dependencies": ["h"]},
    ))
    with pytest.raises(InvalidPipeline) as e:
        check_against(pipe, known_node=lambda n: n == "node1", registered=lambda m: False)
    got = {(p.action_id, p.field) for p in e.value.problems}
    assert got == {("c", "devices[1]"), ("c", "model_name"), ("d", "source_url")}


def test_a_gpu_its_node_does_not_report_is_refused_at_submit_with_every_other_problem() -> None:
    """gswarm's ``gpu1:gpu2`` on a 2-GPU node was accepted and failed later;
    a file with 3 problems reported 2."""
    pipe = parse_pipeline(doc(
        {"action_id": "s", "action_type": "serve", "model_name": "ghost", "devices": ["gpu1:gpu2"]},
        {"action_id": "t", "action_type": "serve", "model_name": "m", "devices": ["gpu9:gpu0"]},
        {"action_id": "u", "action_type": "serve", "model_name": "m", "devices": ["gpu3:gpu5"]},
    ))
    gpus = {"gpu1": [0, 1], "gpu3": None}
    with pytest.raises(InvalidPipeline) as e:
        check_against(pipe, known_node=lambda n: n in ("gpu1", "gpu3"), registered=lambda m: m == "m",
                      gpus_of=lambda n: gpus.get(n))
    got = {(p.action_id, p.field): p.message for p in e.value.problems}
    assert set(got) == {("s", "devices[0]"), ("s", "model_name"), ("t", "devices[0]")}
    assert got[("s", "devices[0]")] == "gpu1 has no GPU 2 (it reports gpu0, gpu1)"


@st.composite
def dags(draw: st.DrawFn) -> list[dict[str, Any]]:
    n = draw(st.integers(1, 30))
    return [dl(f"a{i}", sorted({f"a{j}" for j in draw(st.lists(st.integers(0, i - 1), max_size=4))}) if i else [])
            for i in range(n)]


@SETTINGS
@given(dags(), st.data())
def test_a_dag_validates_and_one_back_edge_makes_a_cycle(actions: list[dict[str, Any]], data: st.DataObject) -> None:
    pipe = parse_pipeline(doc(*actions))
    assert [a.action_id for a in pipe.actions] == [a["action_id"] for a in actions]
    if len(actions) < 2:
        return
    # Make an edge from an earlier action to a later one that reaches it: a cycle.
    j = data.draw(st.integers(1, len(actions) - 1))
    chain = [dict(a) for a in actions]
    chain[j]["dependencies"] = sorted(set(chain[j]["dependencies"]) | {"a0"} if j else [])
    chain[0]["dependencies"] = [f"a{j}"]
    assert any("cycle" in m for _, _, m in problems(doc(*chain)))


@SETTINGS
@given(st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=5),
                    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
                    max_leaves=30))
def test_any_document_is_a_pipeline_or_a_list_of_problems(raw: Any) -> None:
    for d in (raw, {"name": "p", "actions": raw}, {"name": "p", "actions": [raw]}):
        try:
            parse_pipeline(d)
        except InvalidPipeline as e:
            assert e.problems and all(p.message for p in e.problems)


def test_a_health_check_names_its_url_or_its_model() -> None:
    from protocol.pipeline import InvalidPipeline, parse_pipeline

    ok = parse_pipeline({"name": "x", "actions": [{"action_id": "h", "action_type": "health_check", "model_name": "org/m"}]})
    assert ok.actions[0].model_name == "org/m" and ok.actions[0].target_url is None
    with pytest.raises(InvalidPipeline) as e:
        parse_pipeline({"name": "x", "actions": [{"action_id": "h", "action_type": "health_check"}]})
    assert [p.field for p in e.value.problems] == ["target_url"]


def test_a_registration_may_name_its_engine() -> None:
    from protocol.registry import InvalidInput, parse_registration

    assert parse_registration({"metadata": {"engine": "llama.cpp"}}).metadata["engine"] == "llama.cpp"
    with pytest.raises(InvalidInput, match=r"metadata\.engine"):
        parse_registration({"metadata": {"engine": "tensorrt"}})
