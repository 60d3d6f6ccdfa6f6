"""Stand-ins for ``docker`` and ``kubectl`` that README's Kubernetes lines run
against in ``test_deploy.py``: there is no container engine or cluster in CI.
They do not pretend to deploy.  Each checks what the real command would be
given and fails (exit 1, a line on stderr) where the real one would:

- ``docker build -f F -t TAG CTX``: F parses; every ``COPY`` source lies in
  CTX; the image runs ``meshnode`` as a non-root user; remembers TAG.
- ``docker push TAG``: TAG was built.
- ``kubectl apply -f FILE`` / ``apply -k DIR``: every object validates
  against Kubernetes's schema (kubernetes-validate, strict); with ``-k``, the
  kustomization's images are applied first, the namespace must have been
  applied, the DaemonSet's image must be one pushed, and the Secret it mounts
  must exist with the keys its ``*_FILE`` variables read.
- ``kubectl -n NS create secret generic NAME --from-file=KEY...``: NS was
  applied; the files exist and hold something; remembers NAME and its keys.
- ``kubectl -n NS rollout status daemonset/NAME``: NAME was applied.

State lives in ``$SHIM_STATE`` (a JSON file); ``$SHIM_K8S_VERSION`` is the
Kubernetes version validated against.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import yaml


def fail(msg: str) -> None:
    print(f"{Path(sys.argv[1]).name}: {msg}", file=sys.stderr)
    raise SystemExit(1)


def load_state() -> dict[str, Any]:
    p = Path(os.environ["SHIM_STATE"])
    return json.loads(p.read_text()) if p.exists() else {"built": [], "pushed": [], "objects": {}, "secrets": {}}


def save_state(st: dict[str, Any]) -> None:
    Path(os.environ["SHIM_STATE"]).write_text(json.dumps(st))


def docker(args: list[str], st: dict[str, Any]) -> None:
    if args[:1] == ["build"]:
        opts, rest = _options(args[1:], {"-f", "-t"})
        if len(rest) != 1 or "-f" not in opts or "-t" not in opts:
            fail(f"usage: docker build -f FILE -t TAG CONTEXT (got {shlex.join(args)})")
        ctx, dockerfile = Path(rest[0]), Path(opts["-f"])
        if not dockerfile.is_file() or not ctx.is_dir():
            fail(f"no {dockerfile} or no context {ctx}")
        lines = _instructions(dockerfile.read_text())
        if not lines or lines[0][0] != "FROM":
            fail("a Dockerfile starts with FROM")
        for op, arg in lines:
            if op == "COPY" and not arg.startswith("--from"):
                *sources, _dest = arg.split()
                for s in sources:
                    if not (ctx / s).exists():
                        fail(f"COPY {s}: not in the build context {ctx}")
        users = [a for op, a in lines if op == "USER"]
        entry = [a for op, a in lines if op == "ENTRYPOINT"]
        if not users or users[-1].split(":")[0] in ("0", "root"):
            fail("the image must run as a non-root user")
        if not entry or json.loads(entry[-1]) != ["meshnode"]:
            fail("the image's entry point must be meshnode")
        st["built"].append(opts["-t"])
    elif args[:1] == ["push"] and len(args) == 2:
        if args[1] not in st["built"]:
            fail(f"{args[1]}: no such image built")
        st["pushed"].append(args[1])
    else:
        fail(f"unexpected: docker {shlex.join(args)}")


def kubectl(args: list[str], st: dict[str, Any]) -> None:
    opts, rest = _options(args, {"-n", "-f", "-k"})
    version = os.environ.get("SHIM_K8S_VERSION", "1.30")
    if rest[:1] == ["apply"] and ("-f" in opts) != ("-k" in opts):
        docs = _kustomize(Path(opts["-k"])) if "-k" in opts else list(yaml.safe_load_all(Path(opts["-f"]).read_text()))
        for d in docs:
            try:
                kubernetes_validate.validate(d, version, strict=True)
            except kubernetes_validate.ValidationError as e:
                fail(f"{d.get('kind')} {d.get('metadata', {}).get('name')}: {e.message} at {list(e.path)}")
            ns = d["metadata"].get("namespace")
            if ns is not None and f"Namespace/{ns}" not in st["objects"]:
                fail(f'namespaces "{ns}" not found')
            st["objects"][f"{d['kind']}/{d['metadata']['name']}"] = d
            if d["kind"] == "DaemonSet":
                _check_daemonset(d, st)
    elif rest[:3] == ["create", "secret", "generic"] and len(rest) == 4 and "-n" in opts:
        if f"Namespace/{opts['-n']}" not in st["objects"]:
            fail(f'namespaces "{opts["-n"]}" not found')
        keys = []
        for a in args:
            if a.startswith("--from-file="):
                f = Path(a.split("=", 1)[1])
                if not f.is_file() or not f.read_text().strip():
                    fail(f"error reading {f}: no such file or it is empty")
                keys.append(f.name)
        if not keys:
            fail("create secret generic: no --from-file")
        st["secrets"][f"{opts['-n']}/{rest[3]}"] = keys
    elif rest[:2] == ["rollout", "status"] and len(rest) == 3 and "-n" in opts:
        kind, name = rest[2].split("/", 1)
        if not (kind.lower() == "daemonset" and f"DaemonSet/{name}" in st["objects"]):
            fail(f'daemonsets.apps "{name}" not found')
        print(f'daemon set "{name}" validated (this is a stand-in: no cluster was deployed to)')
    else:
        fail(f"unexpected: kubectl {shlex.join(args)}")


def _check_daemonset(d: dict[str, Any], st: dict[str, Any]) -> None:
    spec = d["spec"]["template"]["spec"]
    for c in spec.get("initContainers", []) + spec["containers"]:
        if c["image"] not in st["pushed"]:
            fail(f"container {c['name']}: image {c['image']} was never pushed")
    ns = d["metadata"]["namespace"]
    for v in spec["volumes"]:
        if "secret" not in v:
            continue
        name = v["secret"]["secretName"]
        keys = st["secrets"].get(f"{ns}/{name}")
        if keys is None:
            fail(f'secret "{name}" not found in {ns}')
        (c,) = spec["containers"]
        (mount,) = [m for m in c["volumeMounts"] if m["name"] == v["name"]]
        for e in c["env"]:
            if e["name"].endswith("_FILE") and e.get("value", "").startswith(mount["mountPath"] + "/"):
                key = e["value"][len(mount["mountPath"]) + 1:]
                if key not in keys:
                    fail(f"{e['name']}={e['value']}: secret {name} has no key {key} (it has {keys})")


def _kustomize(d: Path) -> list[dict[str, Any]]:
    k = yaml.safe_load((d / "kustomization.yaml").read_text())
    docs = [doc for r in k["resources"] for doc in yaml.safe_load_all((d / r).read_text())]
    images = {i["name"]: f"{i['newName']}:{i['newTag']}" for i in k.get("images", [])}
    for doc in docs:
        if doc["kind"] == "DaemonSet":
            spec = doc["spec"]["template"]["spec"]
            for c in spec.get("initContainers", []) + spec["containers"]:
                name = c["image"].rsplit(":", 1)[0]
                c["image"] = images.get(name, c["image"])
    return docs


def _options(args: list[str], with_value: set[str]) -> tuple[dict[str, str], list[str]]:
    opts: dict[str, str] = {}
    rest: list[str] = []
    it = iter(args)
    for a in it:
        if a in with_value:
            opts[a] = next(it, "")
        elif not a.startswith("-"):
            rest.append(a)
    return opts, rest


def _instructions(text: str) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    for line in text.replace("\\\n", " ").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, arg = line.partition(" ")
            out.append((op.upper(), arg.strip()))
    return out


def main() -> None:
    prog, args = Path(sys.argv[1]).name, sys.argv[2:]
    st = load_state()
    {"docker": docker, "kubectl": kubectl}[prog](args, st)
    save_state(st)


if __name__ == "__main__":
    main()
