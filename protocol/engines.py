"""What an API caller may put into an engine's process: the operator's allow lists.

Theory of operation
-------------------
An API token chooses which registered model is served, where, on which port
and with which engine the operator enabled (``--engines``).  It never
chooses what code runs or which files the engine reads.  So everything a
caller sends that reaches the engine's ``execve`` passes an allow list that
the operator owns, on the node that starts the engine:

* **Environment.**  The engine's environment is built, never inherited:
  the names of the node's own environment the operator passes
  (``--engine-env-pass``, default ``DEFAULT_ENV_PASS``: PATH, HOME, locale,
  the CUDA libraries' paths; never a secret: ``SECRET_ENV``), then the
  caller's ``config.env`` names the operator allows (``--engine-env-allow``,
  default ``DEFAULT_ENV_ALLOW``: the engines' own tuning variables), then
  ``CUDA_VISIBLE_DEVICES`` from the service's GPUs.  Names that make a
  program load or run other code (``LD_*``, ``PYTHON*``, ``PATH``,
  ``BROWSER``, ``*_PROXY``, ``HOME``, ...: ``FORBIDDEN_ENV``) cannot be
  allowed at all: the node refuses to start with them listed.
* **Arguments.**  ``config.args`` and ``config.flags`` are read as flags
  (``--name``, ``--name=value``, ``-n``) and their values.  Each flag must be
  in the engine's allow list (``DEFAULT_FLAGS``, extended with
  ``--engine-args-allow ENGINE:--flag``); flags that make an engine run code
  from the model (``--trust-remote-code``) are in none by default.  A value
  is a plain word (``SAFE_VALUE``: letters, digits, ``._,:=+@%-``) or a path
  inside the model's own copy written ``{model_dir}/relative/path``; nothing
  else names a file.
* **``command``.**  The ``command`` engine runs the program the caller
  names: it is the one way to run any program, and only on a node whose
  operator lists ``command`` in ``--engines``.  Its environment passes the
  same allow list.

Anything refused is ``ServeError("ENGINE_CONFIG_NOT_ALLOWED")`` naming the
key, raised before a process starts.  Pure: the caller reads the node's
environment and passes it in.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import PurePosixPath

__all__ = [
    "DEFAULT_ENV_ALLOW",
    "DEFAULT_ENV_PASS",
    "DEFAULT_FLAGS",
    "FORBIDDEN_ENV",
    "MODEL_DIR",
    "SECRET_ENV",
    "EnginePolicy",
    "ServeError",
    "check_args",
    "check_env_names",
    "engine_env",
    "parse_args_allow",
    "parse_env_allow",
    "parse_env_pass",
]

MODEL_DIR = "{model_dir}"


class ServeError(Exception):
    """A request the node cannot serve: ``code`` as the API's error codes."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


# Names no caller may set, whatever the operator allows: each makes a program load, run or
# reach something else (the loader, the interpreter, a browser, a proxy, the home directory's
# rc files), or is the node's own (its secrets, the GPUs it chose).  Matched case-insensitively.
FORBIDDEN_ENV = (
    "LD_*", "DYLD_*", "PYTHON*", "PATH", "BROWSER", "*_PROXY", "HOME", "SHELL", "ENV", "BASH_ENV", "IFS",
    "NODE_OPTIONS", "PERL5*", "PERLLIB", "RUBYOPT", "RUBYLIB", "GCONV_PATH", "LOCPATH", "NLSPATH", "TMPDIR",
    "XDG_*", "EDITOR", "VISUAL", "PAGER", "GIT_*", "SSL_CERT_*", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE",
    "HF_*", "HUGGING_FACE_*", "TRANSFORMERS_*", "TORCH_HOME", "MESHNODE_*", "AWS_*", "CUDA_VISIBLE_DEVICES",
    "*TOKEN*", "*SECRET*", "*PASSWORD*", "*CREDENTIAL*", "*_KEY", "*_KEY_ID",
)
# Names of the node's own environment that never pass to an engine: its secrets.
SECRET_ENV = ("MESHNODE_*", "AWS_*", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "*TOKEN*", "*SECRET*", "*PASSWORD*",
              "*CREDENTIAL*", "*_KEY", "*_KEY_ID", "*_PROXY")
DEFAULT_ENV_ALLOW = (
    "OMP_NUM_THREADS", "TOKENIZERS_PARALLELISM", "NCCL_DEBUG", "NCCL_P2P_DISABLE", "NCCL_IB_DISABLE",
    "CUDA_DEVICE_MAX_CONNECTIONS", "CUDA_LAUNCH_BLOCKING", "PYTORCH_CUDA_ALLOC_CONF", "VLLM_ATTENTION_BACKEND",
    "VLLM_LOGGING_LEVEL", "VLLM_USE_V1", "VLLM_WORKER_MULTIPROC_METHOD", "VLLM_ENGINE_ITERATION_TIMEOUT_S",
    "SGLANG_LOG_LEVEL", "LLAMA_LOG_VERBOSITY",
)
DEFAULT_ENV_PASS = ("PATH", "HOME", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "TMPDIR", "USER", "LOGNAME",
                    "LD_LIBRARY_PATH", "CUDA_HOME", "HF_HOME", "HF_HUB_OFFLINE", "NVIDIA_DRIVER_CAPABILITIES")
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}\Z")
ENV_PATTERN = re.compile(r"[A-Za-z0-9_*]{1,128}\Z")

# Flags a caller may give each engine by default: tuning, none that names a path or runs model code.
DEFAULT_FLAGS: Mapping[str, frozenset[str]] = {
    "vllm": frozenset({
        "--max-model-len", "--gpu-memory-utilization", "--dtype", "--max-num-seqs", "--max-num-batched-tokens",
        "--enable-prefix-caching", "--no-enable-prefix-caching", "--enforce-eager", "--kv-cache-dtype",
        "--quantization", "--swap-space", "--seed", "--block-size", "--enable-chunked-prefill",
        "--disable-log-requests", "--disable-log-stats", "--pipeline-parallel-size", "--cpu-offload-gb",
        "--max-seq-len-to-capture", "--tokenizer-mode", "--uvicorn-log-level", "--max-logprobs",
        "--enable-auto-tool-choice", "--tool-call-parser", "--reasoning-parser"}),
    "llama.cpp": frozenset({
        "--ctx-size", "-c", "--n-gpu-layers", "-ngl", "--parallel", "-np", "--threads", "-t", "--threads-batch",
        "--batch-size", "-b", "--ubatch-size", "-ub", "--flash-attn", "-fa", "--cont-batching", "--n-predict",
        "--cache-type-k", "--cache-type-v", "-ctk", "-ctv", "--mlock", "--no-mmap", "--seed", "--temp", "--jinja",
        "--split-mode", "--main-gpu", "--tensor-split", "--rope-scaling", "--rope-freq-base", "--defrag-thold",
        "--no-webui", "--metrics", "--slots"}),
    "sglang": frozenset({
        "--mem-fraction-static", "--context-length", "--max-running-requests", "--dtype", "--quantization",
        "--chunked-prefill-size", "--enable-torch-compile", "--attention-backend", "--kv-cache-dtype",
        "--max-total-tokens", "--schedule-policy", "--disable-radix-cache", "--random-seed", "--log-level",
        "--enable-metrics"}),
    "tgi": frozenset({
        "--max-input-length", "--max-input-tokens", "--max-total-tokens", "--max-batch-prefill-tokens",
        "--max-batch-total-tokens", "--quantize", "--dtype", "--max-concurrent-requests", "--max-best-of",
        "--max-stop-sequences", "--cuda-memory-fraction"}),
    "command": frozenset(),
}
FLAG = re.compile(r"--?[A-Za-z0-9][A-Za-z0-9_.-]{0,99}\Z")
SAFE_VALUE = re.compile(r"[A-Za-z0-9_.,:=+@%-]{1,200}\Z")
NUMBER = re.compile(r"-?[0-9][0-9_.eE+-]*\Z")
_REL_PATH = re.compile(r"[A-Za-z0-9_.+@%-]{1,200}(/[A-Za-z0-9_.+@%-]{1,200}){0,15}\Z")


def _matches(name: str, patterns: Iterable[str]) -> str | None:
    up = name.upper()
    return next((p for p in patterns if fnmatch.fnmatchcase(up, p.upper())), None)


@dataclass(frozen=True, slots=True)
class EnginePolicy:
    """The operator's allow lists: caller env names (exact or ``PREFIX_*``),
    and per engine the flags a caller may give (``*`` names every engine)."""

    env_allow: tuple[str, ...] = DEFAULT_ENV_ALLOW
    env_pass: tuple[str, ...] = DEFAULT_ENV_PASS
    flags: Mapping[str, frozenset[str]] = field(default_factory=lambda: dict(DEFAULT_FLAGS))

    def flags_of(self, engine: str) -> frozenset[str]:
        return self.flags.get(engine, frozenset()) | self.flags.get("*", frozenset())


def parse_env_allow(text: str | None) -> tuple[str, ...]:
    """``--engine-env-allow``: names or ``PREFIX_*`` patterns, comma-separated;
    ``+NAME,...`` adds to the default.  ValueError for a name no allow list may hold."""
    if text is None:
        return DEFAULT_ENV_ALLOW
    text = text.strip()
    base: tuple[str, ...] = ()
    if text.startswith("+"):
        base, text = DEFAULT_ENV_ALLOW, text[1:]
    out = list(base)
    for item in (x.strip() for x in text.split(",")):
        if not item:
            continue
        if not ENV_PATTERN.match(item):
            raise ValueError(f"--engine-env-allow: {item[:60]!r} is not a variable name or NAME_* pattern")
        bad = _matches(item.rstrip("*") or "*", FORBIDDEN_ENV) or (
            "*" if item.endswith("*") and len(item.rstrip("*")) < 3 else None)
        if bad:
            raise ValueError(f"--engine-env-allow: {item} would let an API caller set {bad}, which can make the "
                             "engine run other code or read the node's secrets; it can never be allowed")
        out.append(item)
    return tuple(dict.fromkeys(out))


def parse_env_pass(text: str | None) -> tuple[str, ...]:
    """``--engine-env-pass``: names of the node's own environment every engine
    gets.  ValueError for a name that looks like a secret."""
    if text is None:
        return DEFAULT_ENV_PASS
    out = []
    for item in (x.strip() for x in text.split(",")):
        if not item:
            continue
        if not ENV_NAME.match(item):
            raise ValueError(f"--engine-env-pass: {item[:60]!r} is not a variable name")
        bad = _matches(item, SECRET_ENV)
        if bad:
            raise ValueError(f"--engine-env-pass: {item} looks like a secret ({bad}); the node's secrets never "
                             "reach an engine")
        out.append(item)
    return tuple(dict.fromkeys(out))


def parse_args_allow(text: str | None, engines: Iterable[str]) -> dict[str, frozenset[str]]:
    """``--engine-args-allow ENGINE:--flag,...`` (``*:--flag`` for every engine)
    added to ``DEFAULT_FLAGS``.  ValueError with what is wrong."""
    known = set(engines) | {"*"}
    out = {k: set(v) for k, v in DEFAULT_FLAGS.items()}
    for item in (x.strip() for x in (text or "").split(",")):
        if not item:
            continue
        engine, sep, flag = item.partition(":")
        if not sep or engine not in known or not FLAG.match(flag):
            raise ValueError(f"--engine-args-allow: {item[:80]!r} is not ENGINE:--flag (engines: "
                             f"{', '.join(sorted(known))})")
        out.setdefault(engine, set()).add(flag)
    return {k: frozenset(v) for k, v in out.items()}


def check_env_names(requested: Iterable[str], policy: EnginePolicy | None) -> None:
    """``ServeError`` ENGINE_CONFIG_NOT_ALLOWED for the first name a caller may
    not set: one ``FORBIDDEN_ENV`` names (anywhere), or, given the node's
    ``policy``, one its allow list lacks."""
    for name in requested:
        if not ENV_NAME.match(name) or _matches(name, FORBIDDEN_ENV):
            raise ServeError("ENGINE_CONFIG_NOT_ALLOWED", f"config.env.{name[:60]}: no node lets an API caller set "
                             "this variable (it can make the engine run other code or read the node's secrets)")
        if policy is not None and _matches(name, policy.env_allow) is None:
            raise ServeError("ENGINE_CONFIG_NOT_ALLOWED",
                             f"config.env.{name[:60]}: not a variable this node lets an API caller set "
                             f"(the operator's --engine-env-allow: {', '.join(policy.env_allow)[:300]})")


def engine_env(requested: Mapping[str, str], policy: EnginePolicy, node_env: Mapping[str, str],
               gpus: Sequence[int]) -> dict[str, str]:
    """The engine's whole environment: the passed names of ``node_env`` (no
    secret among them), the caller's allowed names, ``CUDA_VISIBLE_DEVICES``."""
    check_env_names(requested, policy)
    env = {k: node_env[k] for k in policy.env_pass if k in node_env and not _matches(k, SECRET_ENV)}
    env.update(requested)
    env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, gpus))
    return env


def _model_path(value: str, model_dir: str | None) -> str | None:
    """``{model_dir}/rel``: the path inside the copy (None: not such a value)."""
    if not value.startswith(MODEL_DIR):
        return None
    rel = value[len(MODEL_DIR):].lstrip("/")
    if rel and (not _REL_PATH.match(rel) or any(p in (".", "..") for p in rel.split("/"))):
        raise ServeError("ENGINE_CONFIG_NOT_ALLOWED", f"config.args: {value[:80]!r} leaves the model's copy")
    if model_dir is None:
        return value  # checked; placed once the copy is known
    return str(PurePosixPath(model_dir) / rel) if rel else model_dir


def check_args(engine: str, args: Sequence[str], policy: EnginePolicy, model_dir: str | None) -> list[str]:
    """``args`` as they may reach the engine (``{model_dir}`` placed), or
    ``ServeError`` ENGINE_CONFIG_NOT_ALLOWED naming the first refused one.
    The ``command`` engine's own argv is the operator's choice (it enabled
    ``command``); its extra args pass as they are."""
    if engine == "command":
        return list(args)
    allowed = policy.flags_of(engine)
    out = []
    for a in args:
        if a.startswith("-") and not NUMBER.match(a):
            flag, eq, value = a.partition("=")
            if not FLAG.match(flag) or flag not in allowed:
                raise ServeError("ENGINE_CONFIG_NOT_ALLOWED",
                                 f"config.args: {flag[:80]!r} is not a flag this node lets an API caller give "
                                 f"{engine} (the operator adds flags with --engine-args-allow {engine}:{flag[:60]})")
            if eq:
                out.append(f"{flag}={_value(value, model_dir)}")
            else:
                out.append(flag)
        else:
            out.append(_value(a, model_dir))
    return out


def _value(v: str, model_dir: str | None) -> str:
    placed = _model_path(v, model_dir)
    if placed is not None:
        return placed
    if not SAFE_VALUE.match(v) or ".." in v:
        raise ServeError("ENGINE_CONFIG_NOT_ALLOWED",
                         f"config.args: the value {v[:80]!r} is not a plain word (letters, digits, ._,:=+@%-); "
                         f"a file inside the model's copy is written {MODEL_DIR}/path")
    return v
