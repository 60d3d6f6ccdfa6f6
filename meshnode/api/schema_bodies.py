"""What the API takes, as JSON Schema: each request body the app checks
before a handler runs (``validate.py``), and the answers that belong to
them (leases, bundles)."""

from __future__ import annotations

from protocol.leases import HOLDER_PATTERN, LEASE_MAX_S, LEASE_MIN_S
from protocol.names import (
    DEVICE_KIND_PATTERN,
    NODE_ID_PATTERN,
    SEGMENT_PATTERN,
)
from protocol.pipeline import ACTION_TYPES, LIMITS
from protocol.registry import METADATA_FILES_MAX
from protocol.serving import (
    ARG_CHARS_MAX,
    ARGS_MAX,
    CONFIG_KEYS,
    ENGINES,
    ENV_MAX,
    LOAD_FORMATS,
)
from protocol.sources import SCHEMES as SOURCE_SCHEMES
from protocol.sources import URL_MAX as SOURCE_URL_MAX
from protocol.sources import SourceKind

from .schema_answers import POLICY_BODY, TRANSFER
from .schema_common import (
    ANY,
    BOOL,
    GPU_DEVICE,
    GPU_KIND,
    GSWARM_GPU,
    INT,
    INT63,
    IPV6,
    MODEL_NAME,
    NO_DOUBLE_DOT,
    NODE_ID,
    STORE_DEVICE,
    STR,
    Schema,
    array,
    coded,
    desc,
    map_of,
    nullable,
    obj,
)

# -- request bodies ----------------------------------------------------------------------------

_PRIORITY = desc("taken, not used yet", ANY)
_SAME_DEVICE = "from_device and to_device differ (else 400 SAME_DEVICE)"

COPY_BODY = obj(
    {"to_device": STORE_DEVICE},
    {"from_device": desc("the copy to read; left out or null: any holder serves", nullable(STORE_DEVICE)),
     "keep_source": desc("a move that keeps its source is a copy", BOOL), "priority": _PRIORITY},
    closed=True, description=_SAME_DEVICE,
)
MOVE_BODY = obj(
    {"from_device": desc("the copy to move", STORE_DEVICE), "to_device": STORE_DEVICE},
    {"keep_source": desc("true makes the move a copy", BOOL), "priority": _PRIORITY},
    closed=True, description=_SAME_DEVICE,
)
def _any_case(word: str) -> str:
    return "".join(f"[{c.upper()}{c.lower()}]" if c.isalpha() else c for c in word)


# A source outside the mesh or on the target node (``protocol.sources.classify``): an absolute path,
# or a URL of a scheme it knows (any case); a file:// URL names no host but localhost, and no NUL.
assert all(s.isalnum() for s in SOURCE_SCHEMES)  # no character a pattern reads otherwise
# A host in brackets is an IPv6 address (a zone too) or IPvFuture, and a bracket is never alone (as
# urllib.parse.urlsplit reads a URL): said as what may not follow, which generators need not build.
_NETLOC = ("(?!//(?:[^\\[/?#]*\\][^\\[/?#]*(?:[/?#]|$)|[^\\[/?#]*\\[(?!(?:" + IPV6
           + "(?:%[^%\\]/?#]+)?|v[0-9A-Fa-f]+\\.[^\\]/?#]+)\\])))")
# No NUL; no tab or line break, and no control character or space before it (urlsplit would drop them).
_SOURCE = ("(?![\\s\\S]*[\\x00\\t\\n\\r])(?:/|" + "|".join(
    _any_case(s) + (":(?![\\s\\S]*%00)(?:/(?!/)|//(?:localhost)?/)" if kind is SourceKind.LOCAL else ":" + _NETLOC)
    for s, kind in SOURCE_SCHEMES.items()) + ")")
SOURCE_URL: Schema = desc(
    "hf://owner/name[@revision], http(s)://host[:port]/path (no user info; the host a public address unless "
    "--allow-private-sources, else 403 PRIVATE_SOURCE), s3://bucket/prefix[?endpoint_url=...&region=...], or "
    "file:///path or /path on the target node (in its --ingest-roots, else 403)",
    {"type": "string", "minLength": 1, "maxLength": SOURCE_URL_MAX, "pattern": f"^{_SOURCE}"})
# A download's: a source, or (empty, or not a string) the registration's URL, else hf://owner/name for an
# owner/name model with none (else 400).
_DOWNLOAD_URL = desc(f"{SOURCE_URL['description']}; empty or not a string: the registration's URL, or "
                      "hf://owner/name for an owner/name model with none (else 400)",
                      {"maxLength": SOURCE_URL_MAX, "pattern": f"^(?:$|{_SOURCE})"})
# Which fields count depends on the source: another node's copy (or null: any holder's) takes
# only the devices; the web (the default) reads source_url, revision and the patterns.  What a
# download does not read it does not check, so neither does the schema.
_GLOBS = nullable({"anyOf": [{"type": "string", "minLength": 1, "maxLength": 256},
                          array({"type": "string", "minLength": 1, "maxLength": 256}, maxItems=64)]})
_WEB_FIELDS: dict[str, Schema] = {
    "source_url": _DOWNLOAD_URL,
    "revision": desc("a branch, tag or commit of a hub repository",
                      nullable({"type": "string", "minLength": 1, "maxLength": 256})),
    "allow_patterns": desc("glob patterns of the files to fetch: one, or a list", _GLOBS),
    "ignore_patterns": desc("glob patterns of the files to leave: one, or a list", _GLOBS),
}
DOWNLOAD_BODY = obj(
    {"target_device": STORE_DEVICE},
    {"source": desc("\"web\" (the default: source_url), or another node's copy (node:device; null: any holder's)",
                     nullable({"anyOf": [{"const": "web"}, STORE_DEVICE]})),
     **{k: desc(f"{v['description']} (read from the web only)", ANY) for k, v in _WEB_FIELDS.items()},
     "priority": _PRIORITY},
    closed=True, description="source, when a device, differs from target_device (else 400 SAME_DEVICE)",
    # From the web (source "web" or left out) the web's fields are read, and checked; from a copy
    # (source a device, or null) they are not, so they take anything.
    anyOf=[{"properties": {"source": {"const": "web"}, **_WEB_FIELDS}},
           {"required": ["source"], "properties": {"source": {"not": {"const": "web"}}}}],
)

_SHORT = {"type": "string", "minLength": 1, "maxLength": 64}
_COUNT = {"type": "integer", "minimum": 0, "maximum": INT63}
REGISTER_BODY = nullable(obj({}, {
    "replicas": nullable(desc("keep this many copies (as POST /models/{name}/pin)", POLICY_BODY)),
    "model_type": nullable(_SHORT),
    "source_url": nullable({"type": "string", "maxLength": 2048}),
    "metadata": nullable(obj({}, {
        "description": nullable({"type": "string", "maxLength": 4096}),
        "tags": nullable(array(_SHORT, maxItems=64)),
        "requirements": nullable(obj({}, {
            "min_memory": desc("bytes", nullable(_COUNT)),
            "min_vram": desc("bytes", nullable(_COUNT)),
            "gpu_arch": nullable({"anyOf": [_SHORT, array(_SHORT, minItems=1, maxItems=16)]}),
        }, closed=True)),
        "revision": nullable({"type": "string", "maxLength": 64}),
        "files": nullable(array({"type": "string", "minLength": 1, "maxLength": 1024}, maxItems=METADATA_FILES_MAX)),
        "file_count": nullable(_COUNT),
        "engine": desc("the engine its serves use unless a step names another", nullable({"enum": list(ENGINES)})),
        "digest": desc("the sha256 digest its copies must have (llama-orch's); sha256:<hex>",
                        nullable({"type": "string", "pattern": "^sha256:[0-9a-f]{64}$"})),
    }, closed=True)),
}, closed=True))

# A serve's config (``protocol.serving.validate_config``), refused with the engine layer's own
# codes (INVALID_CONFIG, UNKNOWN_ENGINE).  What the node decides (its engines, their allowed
# arguments and variables: 403; its --service-ports: 400 PORT_OUT_OF_RANGE) the descriptions say.
GSWARM_FRAMEWORKS = ("llamacpp", "llama_cpp")  # requests._serve_config reads them as llama.cpp
_ENGINE = coded("UNKNOWN_ENGINE", desc("one of " + ", ".join(ENGINES) + " (the node's --engines, else 403)",
                                         {"enum": list(ENGINES)}))
_ARG = {"type": "string", "minLength": 1, "maxLength": ARG_CHARS_MAX, "pattern": "^[^\\x00]*$"}
_ARGS = array(_ARG, maxItems=ARGS_MAX)
_PATH = nullable({"type": "string", "maxLength": 200, "pattern": "^/"})
SERVE_CONFIG = coded("INVALID_CONFIG", obj({}, {
    "engine": _ENGINE,
    "args": desc("the engine's arguments (its allow list, else 403)", _ARGS),
    "flags": desc("--name value pairs (true: the bare flag; false or null: left out)",
                   {**map_of({"anyOf": [{"type": "string", "maxLength": ARG_CHARS_MAX},
                                      {"type": ["number", "boolean", "null"]}]}),
                    "propertyNames": {"maxLength": 100, "pattern": "^[-_]*[A-Za-z0-9][-_A-Za-z0-9]*$"},
                    "maxProperties": ARGS_MAX}),
    "command": desc("the command engine's program and arguments ({port}, {host}, {model_dir}, {model_name}, "
                     "{gpus} filled in)", {**_ARGS, "minItems": 1}),
    "env": desc("variables for the engine (the node's --engine-env-allow, else 403)",
                 {**map_of({"type": "string", "maxLength": ARG_CHARS_MAX}), "maxProperties": ENV_MAX,
                  "propertyNames": {"pattern": "^[A-Za-z_][A-Za-z0-9_]*$",
                                    "not": {"const": "CUDA_VISIBLE_DEVICES"}}}),
    "health_path": _PATH, "models_path": _PATH,
    "startup_timeout_s": {"type": "number", "minimum": 1, "maximum": 86400},
    "completion_probe": BOOL,
    "load_format": desc("how the command engine tells its load, as vllm (/metrics), llama.cpp (/slots) or "
                         "sglang (/get_load) do; routing reads it", {"enum": list(LOAD_FORMATS)}),
    "port": desc("not read here (the body's port is)", ANY),
    "framework": coded("UNKNOWN_ENGINE", desc("gswarm's name for engine (llamacpp is llama.cpp)",
                                                {"enum": [*ENGINES, *GSWARM_FRAMEWORKS]})),
}, closed=True, description=f"args and flags make at most {ARGS_MAX} arguments in all (else 400 INVALID_CONFIG)"))
assert set(SERVE_CONFIG["properties"]) == CONFIG_KEYS | {"port", "framework"}
_SERVE_PORT = desc("1 to 65535, inside the node's --service-ports (else 400 PORT_OUT_OF_RANGE)",
                    nullable({"type": "integer", "minimum": 1, "maximum": 65535}))
# ``body.get("config") or {}``: a value Python reads as false is no config.
_SERVE_CONFIG_OR_NONE = {"anyOf": [SERVE_CONFIG, {"enum": [None, False, 0, "", []]}]}
_GPUS_OF_A_NODE = desc("GPUs of one node (else 400 INVALID_DEVICE)", array(GPU_DEVICE, minItems=1, maxItems=64))
SERVE_BODY = obj({}, {
    "device": desc("node:gpuN (node:gpu is node:gpu0); read when neither target_nodes nor devices is given", ANY),
    "devices": desc(f"{_GPUS_OF_A_NODE['description']}; read when target_nodes is not given", ANY),
    "target_nodes": desc("gswarm's form: nodes, each serving on its freest GPU that fits",
                          array(NODE_ID, minItems=1, maxItems=64)),
    "port": _SERVE_PORT,
    "config": _SERVE_CONFIG_OR_NONE,
    "engine": desc("the config's engine, given beside it", _ENGINE),
}, closed=True, anyOf=[
    {"required": ["target_nodes"]},
    {"required": ["devices"], "not": {"required": ["target_nodes"]}, "properties": {"devices": _GPUS_OF_A_NODE}},
    {"required": ["device"], "not": {"anyOf": [{"required": ["target_nodes"]}, {"required": ["devices"]}]},
     "properties": {"device": GPU_DEVICE}},
])
GSWARM_SERVE_BODY = obj({"device": GSWARM_GPU}, {"port": _SERVE_PORT, "config": _SERVE_CONFIG_OR_NONE}, closed=True)

# A pipeline (``protocol.pipeline.parse_pipeline``).  What each action type takes is said
# per type; what needs the whole pipeline (ids named once, dependencies that name another action
# and go round no cycle, a device named twice in a move or copy, a serve's GPUs on one node) or
# the mesh (the nodes and models it names) the descriptions say: 422 INVALID_PIPELINE.
_TEXT = {"type": "string", "maxLength": LIMITS.text}
_ACTION_ID = desc("1 to 128 letters, digits, '.', '_' or '-', starting with a letter or digit",
                   {"type": "string", "maxLength": 128, "pattern": f"^(?:{SEGMENT_PATTERN})$"})
_STEP_KIND = f"(?:{DEVICE_KIND_PATTERN}|gpu)"  # parse_step_device: node:gpu is node:gpu0
_STEP_NODE = f"(?:{NODE_ID_PATTERN}):"


def _step_device(pattern: str, description: str) -> Schema:
    return {"type": "string", "maxLength": 100, "pattern": f"^{NO_DOUBLE_DOT}{pattern}$", "description": description}


STEP_DEVICE = _step_device(f"(?:{_STEP_NODE})?{_STEP_KIND}",
                           "node:disk, node:dram, node:gpuN, node:gpu (gpu0), or any:<kind> or <kind>: placement picks")
_STEP_ON_NODE = _step_device(f"(?!any:){_STEP_NODE}{_STEP_KIND}", "a device of a named node (not any:)")
_STEP_GPU = _step_device(f"(?:{_STEP_NODE})?(?:{GPU_KIND})",
                         "a GPU: node:gpuN, node:gpu, any:gpu or gpu")
_PORT_NUMBER = ("(?:0{0,4}[1-9]|0{0,3}[1-9][0-9]|0{0,2}[1-9][0-9]{2}|0?[1-9][0-9]{3}|[1-5][0-9]{4}|6[0-4][0-9]{3}"
                "|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5])")  # 1 to 65535, in at most 5 digits
# protocol.healthcheck.parse_target: printable ASCII without spaces, quotes or backslashes; a
# host name (no '..') or [IPv6] (no zone), a port 1 to 65535; no user info.
_TARGET = desc(
    "http(s)://host[:port][/path][?query]: the host a node's id, a name or an address ([IPv6]); printable ASCII "
    "without spaces, quotes, backslashes, <>^`{|}",
    {"type": "string", "maxLength": LIMITS.text,
     "pattern": (f"^https?://(?:\\[{IPV6}\\]|(?![^/?#:]*\\.\\.)[A-Za-z0-9_][A-Za-z0-9_.-]{{0,252}})"
                 f"(?::{_PORT_NUMBER})?(?:[/?#][!#-;=?-\\[\\]_a-z~]*)?$")})
_URL_PREFIX = {"type": "string", "maxLength": LIMITS.text}
_ACTION = obj(
    {"action_id": _ACTION_ID, "action_type": {"enum": list(ACTION_TYPES)}},
    {"model_name": desc("all but a health_check name one", nullable(MODEL_NAME)),
     "devices": array(STEP_DEVICE, maxItems=LIMITS.devices),
     "dependencies": desc("action_ids of this pipeline, no cycle", array(_ACTION_ID, maxItems=LIMITS.dependencies,
                                                                           uniqueItems=True)),
     "source_url": desc("a download's", nullable(SOURCE_URL)),
     "target_url": desc("a health_check's (see there); http:// or https://",
                         nullable({**_URL_PREFIX, "pattern": "^https?://"})),
     "port": nullable({"type": "integer", "minimum": 1, "maximum": 65535}),
     "keep_source": desc("a move's: keep the source", BOOL),
     "config": nullable({"type": "object", "maxProperties": LIMITS.config_items}),
     "retries": {"type": "integer", "minimum": 0, "maximum": LIMITS.retries},
     "backoff_s": {"type": "number", "minimum": 0, "maximum": LIMITS.backoff_s},
     "timeout_s": nullable({"type": "number", "minimum": 0.001, "maximum": LIMITS.timeout_s})},
    closed=True,
)


_NAMED = {"model_name": MODEL_NAME}  # required, and a name (not null)
_NO_KEEP = {"keep_source": {"const": False}}  # only a move keeps its source
_NO_SOURCE = {"source_url": {"type": "null"}}  # only a download has a source URL
_GPUS = {"devices": {"items": _STEP_GPU}}
# What each action type takes beyond the fields' own rules: one branch a type (a generator picks one).
_BY_TYPE: dict[str, tuple[list[str], Schema]] = {
    "download": (["model_name", "devices"], {**_NAMED, **_NO_KEEP, "devices": {"minItems": 1, "maxItems": 1}}),
    "move": (["model_name", "devices"], {**_NAMED, **_NO_SOURCE,
                                         "devices": {"minItems": 2, "prefixItems": [_STEP_ON_NODE]}}),
    "copy": (["model_name", "devices"], {**_NAMED, **_NO_KEEP, **_NO_SOURCE,
                                         "devices": {"minItems": 2, "prefixItems": [_STEP_ON_NODE]}}),
    "delete": (["model_name", "devices"], {**_NAMED, **_NO_KEEP, **_NO_SOURCE,
                                           "devices": {"minItems": 1, "items": _STEP_ON_NODE}}),
    "serve": (["model_name"], {**_NAMED, **_NO_KEEP, **_NO_SOURCE, **_GPUS}),
    "stop_serve": (["model_name"], {**_NAMED, **_NO_KEEP, **_NO_SOURCE, **_GPUS}),
    # A health check checks a URL, or the service of a model.
    "health_check": ([], {**_NO_KEEP, **_NO_SOURCE, "devices": {"maxItems": 0}, "target_url": nullable(_TARGET)}),
}
assert set(_BY_TYPE) == set(ACTION_TYPES)
_ACTION["anyOf"] = [{"required": ["action_type", *required], "properties": {"action_type": {"const": t}, **props}}
                    for t, (required, props) in _BY_TYPE.items()]
_ACTION["allOf"] = [
    {"anyOf": [{"properties": {"action_type": {"not": {"const": "health_check"}}}},
               {"required": ["target_url"], "properties": {"target_url": {"type": "string"}}},
               {"required": ["model_name"], "properties": {"model_name": {"type": "string"}}}]},
    # A command engine that takes no {port} needs the port it listens on.
    {"if": {"required": ["action_type", "config"], "properties": {"action_type": {"const": "serve"}, "config": {
        "required": ["engine", "command"],
        "properties": {"engine": {"const": "command"},
                       "command": {"type": "array", "not": {"contains": {"type": "string", "pattern": "\\{port\\}"}}}}}}},
     "then": {"required": ["port"], "properties": {"port": {"type": "integer"}}}},
]
PIPELINE = obj(
    {"name": {**_TEXT, "minLength": 1}, "actions": array(_ACTION, minItems=1, maxItems=LIMITS.actions)},
    {"description": nullable(_TEXT), "fail_fast": BOOL,
     "priority": desc("higher runs first", {"type": "integer", "minimum": -1000, "maximum": 1000})},
    closed=True, description="action ids are named once; dependencies name other actions of the pipeline and go "
                             "round no cycle; a move or copy names no device twice; a serve's GPUs share a node; the "
                             "nodes named are in the mesh, and each model is registered or downloaded by an earlier "
                             "action (else 422 INVALID_PIPELINE, with every problem)",
)

INFERENCE_BODY = obj({"model": {"type": "string", "minLength": 1, "maxLength": 200}},
                      description="an OpenAI-style request: every field but model goes to the engine as it is")

HOLDER: Schema = {"type": "string", "pattern": f"^(?:{HOLDER_PATTERN})$",
                  "description": "who holds a lease (a pod's name): letters, digits, '.', '_', ':', '-'"}
LEASE = obj({"model_name": STR, "device": STR, "holder": STR, "until_ms": INT, "granted_ms": INT, "left_s": INT})
ENSURE_BODY = obj(
    {"model": MODEL_NAME, "device": STORE_DEVICE},
    {"holder": desc("who holds the lease (default: ensure); the same holder renews its own", HOLDER),
     "lease_s": desc("how long the lease holds", {"type": "number", "minimum": LEASE_MIN_S,
                                                   "maximum": LEASE_MAX_S})}, closed=True)
ENSURED = obj({"status": {"const": "ready"}, "model_name": STR, "device": STR, "path": STR, "manifest_hash": STR,
                "size": INT, "lease": LEASE})
ENSURING = obj({"status": {"const": "copying"}, "model_name": STR, "device": STR, "why": STR,
                 "transfer_id": nullable(STR), "transfer": TRANSFER})
BUNDLE_IMPORTED = obj({"node_id": STR, "device": STR, "bytes": INT, "models": array(obj(
    {"model_name": STR, "device": STR, "manifest_hash": STR, "size": INT, "files": INT, "chunks": INT,
     "chunks_resumed": INT, "chunks_written": INT,
     "status": {"enum": ["imported", "already present", "would import"]},
     "path": nullable(STR), "digest": nullable(STR)}))})
