"""What a caller may put into an engine's process: only what the operator's
allow lists hold reaches its argv and environment (``protocol.engines``)."""

from __future__ import annotations

import fnmatch
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.engines import (
    DEFAULT_ENV_ALLOW,
    DEFAULT_FLAGS,
    FORBIDDEN_ENV,
    EnginePolicy,
    ServeError,
    parse_args_allow,
    parse_env_allow,
    parse_env_pass,
)
from protocol.serving import ENGINES, engine_spec, validate_config

NODE_ENV = {"PATH": "/usr/bin", "HOME": "/root", "LANG": "C.UTF-8", "MESHNODE_API_TOKENS": "tok",
            "MESHNODE_CLUSTER_SECRET": "sec", "HF_TOKEN": "hf", "AWS_SECRET_ACCESS_KEY": "aws",
            "AWS_ACCESS_KEY_ID": "id", "LD_PRELOAD": "/x.so", "PYTHONPATH": "/evil", "SOME_API_KEY": "k"}
ATTACKS: list[dict[str, Any]] = [
    {"env": {"PYTHONWARNINGS": "ignore::antigravity.x", "BROWSER": 'sh -c "id; head -c 60 /etc/shadow" #%s'}},
    {"env": {"LD_PRELOAD": "/tmp/x.so"}},
    {"env": {"PATH": "/tmp/evil"}},
    {"env": {"https_proxy": "http://evil"}},
    {"env": {"HOME": "/tmp"}},
    {"args": ["--trust-remote-code"]},
    {"args": ["--model", "/etc/shadow"]},
    {"args": ["--download-dir", "/etc"]},
    {"args": ["--chat-template", "/etc/passwd"]},
    {"flags": {"trust-remote-code": True}},
    {"flags": {"chat-template": "/etc/passwd"}},
    {"args": ["--max-model-len", "/etc/passwd"]},
    {"args": ["--max-model-len=../../etc/passwd"]},
    {"args": ["--max-model-len", "{model_dir}/../../etc/passwd"]},
    {"args": ["--host", "0.0.0.0"]},
    {"args": ["--port", "22"]},
]


def build(engine: str, config: dict[str, Any], policy: EnginePolicy | None = None) -> tuple[tuple[str, ...],
                                                                                               dict[str, str]]:
    files = ("m.gguf",) if engine == "llama.cpp" else ("m.safetensors",)
    s = engine_spec(engine, "org/m", "/data/copies/org/m", files, "127.0.0.1", 8101, (0,), validate_config(config),
                    {}, policy or EnginePolicy(), NODE_ENV)
    return s.argv, dict(s.env)


@pytest.mark.parametrize("config", ATTACKS)
@pytest.mark.parametrize("engine", ["vllm", "sglang", "llama.cpp", "tgi"])
def test_every_payload_the_attacker_used_is_refused(engine: str, config: dict[str, Any]) -> None:
    with pytest.raises(ServeError) as e:
        build(engine, config)
    assert e.value.code == "ENGINE_CONFIG_NOT_ALLOWED"


def test_the_node_env_reaches_an_engine_only_through_the_pass_list_and_never_a_secret() -> None:
    argv, env = build("vllm", {"env": {"OMP_NUM_THREADS": "4"}, "flags": {"max-model-len": 4096}})
    assert env == {"PATH": "/usr/bin", "HOME": "/root", "LANG": "C.UTF-8", "OMP_NUM_THREADS": "4",
                   "CUDA_VISIBLE_DEVICES": "0"}
    assert argv[-2:] == ("--max-model-len", "4096")


def test_the_operator_extends_the_lists() -> None:
    policy = EnginePolicy(env_allow=parse_env_allow("+MY_TUNING_*"),
                          flags=parse_args_allow("vllm:--trust-remote-code,*:--chat-template", ENGINES))
    argv, env = build("vllm", {"env": {"MY_TUNING_X": "1"}, "args": ["--trust-remote-code", "--chat-template",
                                                                     "{model_dir}/tpl/chat.jinja"]}, policy)
    assert env["MY_TUNING_X"] == "1" and "OMP_NUM_THREADS" in policy.env_allow
    assert argv[-3:] == ("--trust-remote-code", "--chat-template", "/data/copies/org/m/tpl/chat.jinja")
    with pytest.raises(ServeError):  # a path still must stay inside the copy
        build("vllm", {"args": ["--chat-template", "/etc/passwd"]}, policy)
    with pytest.raises(ServeError):  # sglang was not given it
        build("sglang", {"args": ["--trust-remote-code"]}, policy)


@pytest.mark.parametrize("text", ["LD_PRELOAD", "PYTHON*", "PATH", "BROWSER", "HTTP_PROXY", "https_proxy", "HOME",
                                  "MESHNODE_API_TOKENS", "HF_TOKEN", "AWS_*", "*", "L*", "MY_SECRET"])
def test_the_operator_cannot_allow_what_runs_code_or_reads_secrets(text: str) -> None:
    with pytest.raises(ValueError, match=r"never be allowed|not a variable"):
        parse_env_allow(text)


@pytest.mark.parametrize("text", ["MESHNODE_CLUSTER_SECRET", "HF_TOKEN", "AWS_SECRET_ACCESS_KEY", "GITHUB_TOKEN",
                                  "https_proxy"])
def test_no_secret_is_passed_from_the_node(text: str) -> None:
    with pytest.raises(ValueError, match="secret"):
        parse_env_pass(text)


def test_bad_allow_flags_are_refused() -> None:
    for text in ("vllm", "nope:--x", "vllm:x", "vllm:--a b"):
        with pytest.raises(ValueError):
            parse_args_allow(text, ENGINES)


def test_the_command_engine_runs_the_callers_program_only_where_listed_yet_its_env_is_filtered() -> None:
    argv, _ = build("command", {"command": ["my-engine", "{model_dir}"], "args": ["--whatever"]})
    assert argv == ("my-engine", "/data/copies/org/m", "--whatever")
    with pytest.raises(ServeError):
        build("command", {"command": ["my-engine"], "env": {"LD_PRELOAD": "/x.so"}})


names = st.one_of(st.sampled_from(sorted(set(NODE_ENV) | set(DEFAULT_ENV_ALLOW) | {"BROWSER", "PYTHONWARNINGS",
                                                                                   "http_proxy", "NCCL_X"})),
                  st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,20}", fullmatch=True))
flags = st.sampled_from([*sorted(set().union(*DEFAULT_FLAGS.values())), "--trust-remote-code", "--model",
                         "--download-dir", "--chat-template", "--host", "--port", "-m", "--x=1"])
values = st.one_of(st.sampled_from(["4096", "0.9", "auto", "/etc/passwd", "../x", "{model_dir}/a.json",
                                    "{model_dir}/../x", "-1", "a b", "$(id)", "~/x"]),
                   st.text(min_size=1, max_size=12).filter(lambda v: "\x00" not in v))


@settings(max_examples=400, deadline=None)
@given(engine=st.sampled_from(["vllm", "llama.cpp", "sglang", "tgi"]),
       env=st.dictionaries(names, st.text(max_size=8), max_size=4),
       args=st.lists(st.one_of(flags, values), max_size=8))
def test_nothing_outside_the_allow_lists_reaches_execve(engine: str, env: dict[str, str], args: list[str]) -> None:
    """For any env and argument list: refused, or the argv's added part has
    only allowed flags and plain or in-copy values, and the environment only
    passed, allowed and the GPU names."""
    policy = EnginePolicy()
    try:
        argv, out = build(engine, {"env": env, "args": args}, policy)
    except ServeError as e:
        assert e.code in ("ENGINE_CONFIG_NOT_ALLOWED", "INVALID_CONFIG")
        return
    base, _ = build(engine, {}, policy)
    added = argv[len(base):]
    allowed = policy.flags_of(engine)
    for a in added:
        if a.startswith("-") and not a.lstrip("-")[:1].isdigit():
            assert a.partition("=")[0] in allowed
        else:
            assert a.startswith("/data/copies/org/m") or (".." not in a and "/" not in a and "$" not in a)
    for k in out:
        assert k == "CUDA_VISIBLE_DEVICES" or k in policy.env_pass or any(
            fnmatch.fnmatchcase(k.upper(), p.upper()) for p in policy.env_allow)
        assert not any(fnmatch.fnmatchcase(k.upper(), p.upper()) for p in FORBIDDEN_ENV) or k in policy.env_pass \
            or k == "CUDA_VISIBLE_DEVICES"
    for secret in ("MESHNODE_API_TOKENS", "MESHNODE_CLUSTER_SECRET", "HF_TOKEN", "AWS_SECRET_ACCESS_KEY",
                   "AWS_ACCESS_KEY_ID", "LD_PRELOAD", "PYTHONPATH", "SOME_API_KEY"):
        assert out.get(secret) in (None, env.get(secret)) and secret not in out
