"""deploy/kubernetes/examples/vllm.yaml (issue 29), validated offline as the
other manifests are: Kubernetes's schema; the meshnode commands in it against
the CLI's own parser, and against the DaemonSet they talk to (its port, its
node ids, its data directory, its user's group); its init container's command
run against real nodes on loopback (the weights copied to the pod's node, the
path written for vLLM, a lease for the pod, released by the sidecar's
preStop); README's two lines against the stand-ins for kubectl."""

from __future__ import annotations

import os
import re
import shlex
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import trio
import yaml

from meshnode.cli.parser import build_parser

from .conftest import Mesh, all_alive, wait_for
from .test_bundles import ingest, make_model, tree
from .test_deploy import K8S_VERSION, daemonset

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "deploy" / "kubernetes" / "examples" / "vllm.yaml"
BIN = Path(sys.executable).parent


def example() -> list[dict[str, Any]]:
    return list(yaml.safe_load_all(EXAMPLE.read_text()))


def pod() -> dict[str, Any]:
    (d,) = [d for d in example() if d["kind"] == "Deployment"]
    spec: dict[str, Any] = d["spec"]["template"]["spec"]
    return spec


def container(name: str) -> dict[str, Any]:
    spec = pod()
    (c,) = [c for c in spec.get("initContainers", []) + spec["containers"] if c["name"] == name]
    return c


def env_of(c: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in c.get("env", [])}


def meshnode_calls(script: str) -> list[list[str]]:
    """The ``meshnode`` command lines of a ``sh -c`` script, with "$VAR" kept as $VAR."""
    calls = []
    for part in re.split(r";|&&|\|\||\bdo\b|\bdone\b", script):
        words = shlex.split(part.split(">")[0])
        if words and words[0] == "meshnode":
            calls.append(words)
    return calls


def test_the_example_validates_against_kubernetes_schema() -> None:
    for d in example():
        kubernetes_validate.validate(d, K8S_VERSION, strict=True)
    bad = example()[1]
    bad["spec"]["template"]["spec"]["initContainers"][0]["comand"] = ["x"]  # a typo the schema must catch
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSION, strict=True)


def test_its_commands_are_the_clis_and_fit_the_daemonset() -> None:
    spec = pod()
    ds = daemonset()["spec"]["template"]["spec"]
    (node,) = ds["containers"]
    node_env = {e["name"]: e for e in node["env"]}
    parser = build_parser()
    weights, lease, vllm = container("weights"), container("lease"), container("vllm")
    # ensure, then the lease renewed, then released: each a command the CLI takes.
    seen = []
    for c, script in ((weights, weights["command"][2]), (lease, lease["command"][2]),
                      (lease, lease["lifecycle"]["preStop"]["exec"]["command"][2])):
        assert c["command"][:2] == ["sh", "-c"]
        for argv in meshnode_calls(script):
            args = parser.parse_args(argv[1:])
            assert args.name == "$MODEL" and args.on == "$NODE_NAME:disk", argv
            seen.append(args.command)
        env = env_of(c)
        # Its node: the one on this host (the DaemonSet's id is the Kubernetes node's name; its API
        # listens on the host's network at MESHNODE_PORT).
        assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == \
            node_env["MESHNODE_NODE_ID"]["valueFrom"]["fieldRef"]["fieldPath"]
        assert env["HOST_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.hostIP"
        assert env["MESHNODE_PEER"]["value"] == f"http://$(HOST_IP):{node_env['MESHNODE_PORT']['value']}"
        assert ds["hostNetwork"] is True
        mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
        assert env["MESHNODE_TOKEN_FILE"]["value"].startswith(mounts["token"] + "/")
    assert seen == ["ensure", "ensure", "release"]
    assert "--wait" in weights["command"][2] and lease["restartPolicy"] == "Always"  # a native sidecar
    # The path ensure prints is under the node's copies, mounted at the same path for vLLM, read-only,
    # and readable by the node user's group.
    volumes = {v["name"]: v for v in spec["volumes"]}
    data_dir = node_env["MESHNODE_DATA_DIR"]["value"]
    (copies,) = [m for m in vllm["volumeMounts"] if m["name"] == "copies"]
    assert volumes["copies"]["hostPath"]["path"] == copies["mountPath"] == f"{data_dir}/copies"
    assert copies["readOnly"] is True
    assert node["securityContext"]["runAsGroup"] in spec["securityContext"]["supplementalGroups"]
    (out,) = [m for m in weights["volumeMounts"] if m["name"] == "model"]
    assert f"> {out['mountPath']}/path" in weights["command"][2]
    assert f"$$(cat {out['mountPath']}/path)" in vllm["command"][2]  # $$: kubelet leaves $( ) to the shell


async def test_the_init_container_waits_for_the_weights_on_real_nodes(mesh: Mesh, tmp_path: Path) -> None:
    weights, lease = container("weights"), container("lease")
    model = env_of(weights)["MODEL"]["value"]
    holder = make_model(tmp_path, "w")
    n1 = await mesh.start("k8s-node-1")
    n2 = await mesh.start("k8s-node-2", join=[n1])
    await all_alive(mesh, [n1, n2])
    await ingest(mesh, n1, model, holder)
    await wait_for(lambda: n2.node.registry is not None and n2.node.registry.find(model) is not None
                   and bool(n2.node.registry.find(model).copies), what="the copy gossiped")  # type: ignore[union-attr]

    token = tmp_path / "api-tokens"
    token.write_text("x" * 43)
    run = tmp_path / "run-model"
    run.mkdir()
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "MODEL": model, "NODE_NAME": "k8s-node-2",
           "MESHNODE_PEER": n2.url, "MESHNODE_TOKEN_FILE": str(token), "XDG_STATE_HOME": str(tmp_path / "state")}
    script = weights["command"][2].replace("/run/model", str(run))

    async def sh(text: str) -> subprocess.CompletedProcess[bytes]:
        return await trio.run_process(["sh", "-c", text], env=env, capture_stdout=True, capture_stderr=True,
                                      check=False)

    r = await sh(script)
    assert r.returncode == 0, r.stderr.decode()
    c = n2.node.store.get(model, "disk")
    assert c is not None and tree(c.path) == tree(holder)  # copied to the pod's own node
    assert (run / "path").read_text() == f"{c.path}\n"
    leases = (await mesh.client.get(n2.url + "/leases")).json()["leases"]
    me = socket.gethostname().split(".")[0]  # in a pod, its name
    assert [(x["model_name"], x["holder"]) for x in leases] == [(model, me)]

    r = await sh(lease["lifecycle"]["preStop"]["exec"]["command"][2])  # the pod stops
    assert r.returncode == 0, r.stderr.decode()
    assert (await mesh.client.get(n2.url + "/leases")).json()["leases"] == []


def test_the_readme_lines_run_against_the_stand_ins(tmp_path: Path) -> None:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Pods that start when their weights are there"):]
    block = re.search(r"```sh\n(kubectl apply -f deploy/kubernetes/examples.*?)```", section, re.S)
    assert block is not None, "README's example block"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shim = bin_dir / "kubectl"
    shim.write_text(f"#!/bin/sh\nexec {sys.executable} {ROOT / 'tests/integration/k8s_shims.py'} kubectl \"$@\"\n")
    shim.chmod(0o755)
    work = tmp_path / "checkout"
    work.mkdir()
    (work / "deploy").symlink_to(ROOT / "deploy")
    (work / "api-tokens").write_text("t" * 43)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SHIM_K8S_VERSION": K8S_VERSION,
           "SHIM_STATE": str(tmp_path / "state.json")}
    r = subprocess.run(["bash", "-e", "-c", block.group(1)], cwd=work, env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    # The stand-in fails where kubectl would: the Secret before its namespace exists.
    (tmp_path / "state.json").unlink()
    swapped = "\n".join(reversed(block.group(1).strip().splitlines()))
    r = subprocess.run(["bash", "-e", "-c", swapped], cwd=work, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and 'namespaces "inference" not found' in r.stderr, r.stderr
