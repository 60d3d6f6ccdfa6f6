"""deploy/: the systemd unit and its files, checked by systemd's own tools, and
the notification protocol the unit relies on, spoken by a real node."""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import kubernetes_validate
import pytest
import yaml

from meshnode.config import ConfigError, add_start_arguments, config_from_args
from tests.integration.test_process import FAST, Proc, free_port
from tests.needs import unavailable

ROOT = Path(__file__).resolve().parents[2]
SYSTEMD = ROOT / "deploy" / "systemd"
UNIT = SYSTEMD / "meshnode.service"
MESHNODE = Path(sys.executable).parent / "meshnode"


def need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        unavailable(f"{tool} is not installed (Debian: apt install systemd)")
    return path


def unit_settings() -> dict[str, list[str]]:
    """Every ``Key=value`` of the unit, in order (a key may repeat)."""
    out: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.lstrip().startswith("#"):
            k, v = line.split("=", 1)
            out.setdefault(k.strip(), []).append(v.strip())
    return out


def test_the_unit_verifies_and_its_exposure_is_what_readme_says(tmp_path: Path) -> None:
    analyze = need("systemd-analyze")
    # verify checks that ExecStart is an executable: point it at this checkout's.
    unit = tmp_path / "meshnode.service"
    unit.write_text(UNIT.read_text().replace("/opt/meshnode/.venv/bin/meshnode", str(MESHNODE)))
    r = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stderr.strip() == "", r.stderr
    r = subprocess.run([analyze, "security", "--offline=yes", "--no-pager", str(UNIT)],
                       capture_output=True, text=True, timeout=60)
    m = re.search(r"Overall exposure level for meshnode\.service: (\d+\.\d)", r.stdout)
    assert m is not None, r.stdout[-2000:] + r.stderr
    score = float(m.group(1))
    assert score <= 3.0, r.stdout
    readme = (ROOT / "README.md").read_text()
    assert f"exposure score **{score}**" in readme, f"README.md must record the score {score}"
    assert f"scores this unit {score}" in UNIT.read_text()


def test_the_unit_keeps_gpus_reachable_and_does_not_loop_on_a_bad_config() -> None:
    s = unit_settings()
    assert s["Type"] == ["notify"] and s["NotifyAccess"] == ["main"] and float(s["WatchdogSec"][0]) > 0
    assert s["RestartPreventExitStatus"] == ["2"] and s["Restart"] == ["on-failure"]
    assert s["CapabilityBoundingSet"] == [""] and s["PrivateDevices"] == ["yes"] and s["UMask"] == ["0027"]
    allowed = {v.split()[0] for v in s["DeviceAllow"]}
    assert {"char-nvidiactl", "char-nvidia-uvm", "char-nvidia"} <= allowed
    bound = " ".join(s["BindPaths"]).split()
    assert "-/dev/nvidiactl" in bound and "-/dev/nvidia-uvm" in bound and "-/dev/nvidia0" in bound


def test_sysusers_and_tmpfiles_make_the_user_and_private_directories(tmp_path: Path) -> None:
    sysusers, tmpfiles = need("systemd-sysusers"), need("systemd-tmpfiles")
    root = tmp_path / "root"
    for kind in ("sysusers.d", "tmpfiles.d"):
        (root / "usr" / "lib" / kind).mkdir(parents=True)
        shutil.copy(SYSTEMD / kind / "meshnode.conf", root / "usr" / "lib" / kind / "meshnode.conf")
    (root / "etc").mkdir()
    r = subprocess.run([sysusers, f"--root={root}"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    (entry,) = [ln for ln in (root / "etc" / "passwd").read_text().splitlines() if ln.startswith("meshnode:")]
    uid = int(entry.split(":")[2])
    assert entry.endswith(":/var/lib/meshnode:/usr/sbin/nologin")
    r = subprocess.run([tmpfiles, f"--root={root}", "--create"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    for path, owner in (("var/lib/meshnode", uid), ("dev/shm/meshnode", uid), ("etc/meshnode", 0)):
        st = (root / path).stat()
        assert (st.st_mode & 0o777, st.st_uid) == (0o750, owner), path


def test_the_environment_file_is_a_configuration_the_node_takes(tmp_path: Path) -> None:
    env = {}
    for line in (SYSTEMD / "meshnode.env").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            k, v = line.split("=", 1)
            env[k] = v
    known = {a.dest.upper() for a in _start_parser()._actions}
    assert {k.removeprefix("MESHNODE_") for k in env} <= known
    for k in ("MESHNODE_API_TOKENS_FILE", "MESHNODE_CLUSTER_SECRET_FILE"):
        secret = tmp_path / k.lower()
        secret.write_text(os.urandom(24).hex())
        env[k] = str(secret)
    cfg = config_from_args(_start_parser().parse_args([]), env=env)
    assert cfg.port == 7420 and cfg.cluster == "prod" and cfg.host == "0.0.0.0" and cfg.secrets.api_tokens
    env["MESHNODE_API_TOKENS_FILE"] = str(tmp_path / "missing")
    with pytest.raises(ConfigError):
        config_from_args(_start_parser().parse_args([]), env=env)


def _start_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    add_start_arguments(p)
    return p


def test_a_configuration_error_exits_2_which_the_unit_does_not_restart(tmp_path: Path) -> None:
    r = subprocess.run([str(MESHNODE), "start", "--data-dir", str(tmp_path / "d"),
                        "--api-tokens-file", str(tmp_path / "missing")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "cannot read the API token file" in r.stderr, r.stderr


def test_ready_after_the_seeds_are_tried_a_watchdog_while_the_loop_runs_and_stopping(tmp_path: Path) -> None:
    """A node started as systemd starts it (NOTIFY_SOCKET, WATCHDOG_USEC)
    with one live seed and one that refuses: READY=1 comes once both were
    tried, with the node already answering; WATCHDOG=1 follows at a third of
    the period; SIGTERM says STOPPING=1 before the node leaves."""
    seed = Proc("seed", tmp_path).start()
    sock_path = tmp_path / "notify"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(sock_path))
    listener.settimeout(15)
    dead = f"127.0.0.1:{free_port()}"
    port = free_port()
    log = tmp_path / "node.log"
    env = {**os.environ, "NOTIFY_SOCKET": str(sock_path), "WATCHDOG_USEC": "600000"}
    with open(log, "wb") as out:
        p = subprocess.Popen([str(MESHNODE), "start", "--node-id", "unit", "--port", str(port),
                              "--data-port", str(free_port()), "--data-dir", str(tmp_path / "unit"),
                              "--dram-dir", str(tmp_path / "unit-shm"), "--join", f"{seed.address},{dead}", *FAST],
                             stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        first = listener.recv(4096).decode()
        fields = dict(line.split("=", 1) for line in first.splitlines())
        assert fields["READY"] == "1", first
        assert f"joined through {seed.address}" in fields["STATUS"], first
        assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200
        text = log.read_text()
        assert f"join seed {seed.address} answered" in text and f"join seed {dead} unreachable" in text, text
        t0 = time.monotonic()
        pets = [listener.recv(4096).decode() for _ in range(3)]
        assert pets == ["WATCHDOG=1"] * 3 and time.monotonic() - t0 < 3.0
        p.send_signal(signal.SIGTERM)
        while (msg := listener.recv(4096).decode()) == "WATCHDOG=1":
            pass
        assert msg.startswith("STOPPING=1"), msg
        assert p.wait(timeout=30) == 0
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        listener.close()
        seed.kill()


CHECK = r"""
import grp, json, os, pwd, stat, subprocess, sys
def st(p):
    s = os.stat(p)
    return [oct(stat.S_IMODE(s.st_mode)), pwd.getpwuid(s.st_uid).pw_name, grp.getgrgid(s.st_gid).gr_name]
out = {p: st(p) for p in ("/etc/meshnode", "/var/lib/meshnode", "/dev/shm/meshnode", "/etc/meshnode/meshnode.env",
                          "/etc/meshnode/api-tokens", "/etc/meshnode/cluster-secret")}
out["env"] = open("/etc/meshnode/meshnode.env").read()
out["secrets"] = [open("/etc/meshnode/" + n).read() for n in ("api-tokens", "cluster-secret")]
out["unit"] = open("/etc/systemd/system/meshnode.service").read()
r = subprocess.run(["systemd-analyze", "verify", "/etc/systemd/system/meshnode.service"], capture_output=True, text=True)
out["verify"] = [r.returncode, r.stderr]
r = subprocess.run(["/opt/meshnode/.venv/bin/meshnode", "--version"], capture_output=True, text=True,
                   env={**os.environ, "PYTHONPATH": sys.argv[1]})
out["version"] = [r.returncode, r.stdout + r.stderr]
print("RESULT " + json.dumps(out), flush=True)
"""


def install_block() -> list[str]:
    block = re.search(r"```sh\n(sudo deploy/install.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert block is not None, "README's install block"
    return [ln.split("#")[0].strip() for ln in block.group(1).splitlines() if ln.strip()]


def test_the_install_runs_as_readme_writes_it(tmp_path: Path) -> None:
    """README's two install lines, exactly as written, in a private mount
    namespace: tmpfs on /opt, /var/lib, /run (no systemd to start) and
    /dev/shm, a copy of /etc.  First node, then a second host (its /etc and
    /opt wiped) given the first one's secrets, then the first line again (an
    upgrade keeps the configuration and the secrets).  Offline, pip installs
    meshnode without its dependencies; the installed command then runs with
    this checkout's."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        unavailable("a private mount namespace needs root and unshare")
    need("systemd-sysusers")
    need("systemd-analyze")
    first, second = install_block()
    secrets_dir = re.search(r"--secrets-from (\S+)", second).group(1)  # type: ignore[union-attr]
    made_mountpoint = not os.path.exists(secrets_dir)
    os.makedirs(secrets_dir, exist_ok=True)  # where a tmpfs goes in the namespace; removed below
    site = next(p for p in sys.path if p.endswith("site-packages"))
    check = tmp_path / "check.py"
    check.write_text(CHECK)
    script = f"""
set -e
command -v sudo >/dev/null || sudo() {{ "$@"; }}
mount --make-rprivate /
cp -a /etc {tmp_path}/etc && mount --bind {tmp_path}/etc /etc
for d in /opt /var/lib /run /dev/shm {secrets_dir}; do mount -t tmpfs -o mode=0755 tmpfs $d; done
chmod 0700 {secrets_dir}
# Offline: no index, no dependencies, and the build tools (setuptools, wheel) from this venv.
export PIP_NO_INDEX=1 PIP_NO_DEPS=1 PIP_NO_BUILD_ISOLATION=0 PYTHONPATH={site}  # pip reads NO_BUILD_ISOLATION inverted
cd {ROOT}
{first}
env -u PYTHONPATH {sys.executable} {check} {site}
cp /etc/meshnode/api-tokens /etc/meshnode/cluster-secret {secrets_dir}/
rm -rf /etc/meshnode /etc/systemd/system/meshnode.service /opt/meshnode /var/lib/meshnode /dev/shm/meshnode
{second}
env -u PYTHONPATH {sys.executable} {check} {site}
echo '# an operator edit' >> /etc/meshnode/meshnode.env
{first}
env -u PYTHONPATH {sys.executable} {check} {site}
"""
    try:
        r = subprocess.run(["unshare", "--mount", "bash", "-c", script], capture_output=True, text=True, timeout=300)
    finally:
        if made_mountpoint:
            os.rmdir(secrets_dir)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    results = [json.loads(ln[len("RESULT "):]) for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
    assert len(results) == 3, r.stdout
    one, two, again = results
    for res in results:
        assert res["/etc/meshnode"] == ["0o750", "root", "meshnode"]
        assert res["/var/lib/meshnode"] == res["/dev/shm/meshnode"] == ["0o750", "meshnode", "meshnode"]
        for f in ("meshnode.env", "api-tokens", "cluster-secret"):
            assert res[f"/etc/meshnode/{f}"] == ["0o640", "root", "meshnode"], f
        assert "ExecStart=/opt/meshnode/.venv/bin/meshnode start" in res["unit"]
        assert res["verify"] == [0, ""], res["verify"]
        assert res["version"][0] == 0 and "meshnode" in res["version"][1], res["version"]
    assert "MESHNODE_ADVERTISE=gpu1:7420" in one["env"] and "\nMESHNODE_JOIN=\n" in one["env"]
    assert "MESHNODE_ADVERTISE=gpu2:7420" in two["env"] and "MESHNODE_JOIN=gpu1:7420" in two["env"]
    assert len(one["secrets"][1].strip()) >= 43 and one["secrets"] == two["secrets"]  # 32 random bytes, shared
    assert again["env"] == two["env"] + "# an operator edit\n" and again["secrets"] == two["secrets"]
    assert "systemd is not running on this host" in r.stdout


# -- Kubernetes -------------------------------------------------------------------------

K8S = ROOT / "deploy" / "kubernetes"
K8S_VERSION = "1.30"


def k8s_docs() -> list[dict[str, Any]]:
    return [d for f in ("namespace", "service", "daemonset") for d in yaml.safe_load_all((K8S / f"{f}.yaml").read_text())]


def daemonset() -> dict[str, Any]:
    (ds,) = [d for d in k8s_docs() if d["kind"] == "DaemonSet"]
    return ds


def test_the_manifests_validate_against_kubernetes_schema() -> None:
    for d in k8s_docs():
        kubernetes_validate.validate(d, K8S_VERSION, strict=True)
    bad = daemonset()
    bad["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = {}  # a typo the schema must catch
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSION, strict=True)


def test_the_daemonset_says_what_the_node_takes() -> None:
    """Its variables are the node's own, its probes name real routes on the
    port the node listens on, its id is the Kubernetes node's name, and its
    data directories are the host paths mounted there."""
    spec = daemonset()["spec"]["template"]["spec"]
    (c,) = spec["containers"]
    env = {e["name"]: e for e in c["env"]}
    known = {a.dest.upper() for a in _start_parser()._actions} | {"LOG_FORMAT"}
    assert {k.removeprefix("MESHNODE_") for k in env if k.startswith("MESHNODE_")} <= known
    assert env["MESHNODE_NODE_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    assert spec["hostNetwork"] is True and env["MESHNODE_ADVERTISE"]["value"] == "$(HOST_IP):7420"
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"api": int(env["MESHNODE_PORT"]["value"]), "data": int(env["MESHNODE_DATA_PORT"]["value"])}
    probes = {k: c[k]["httpGet"] for k in ("startupProbe", "livenessProbe", "readinessProbe")}
    assert {p["path"] for p in probes.values()} == {"/health", "/ready"} and {p["port"] for p in probes.values()} == {"api"}
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    for var in ("MESHNODE_DATA_DIR", "MESHNODE_DRAM_DIR"):
        path = env[var]["value"]
        assert volumes[mounts[path]]["hostPath"]["path"] == path
    sc = c["securityContext"]
    assert sc["runAsNonRoot"] and sc["readOnlyRootFilesystem"] and sc["capabilities"]["drop"] == ["ALL"]


def test_a_node_with_the_daemonsets_environment_answers_its_probes(tmp_path: Path) -> None:
    """The container's environment, as the kubelet would expand it (the
    node's name, the host's address), on loopback: the node starts, reads its
    secrets from the mounted files, logs JSON, and its probes answer 200."""
    (c,) = daemonset()["spec"]["template"]["spec"]["containers"]
    fields = {"spec.nodeName": "k8s-node-1", "status.hostIP": "127.0.0.1"}
    env: dict[str, str] = {}
    for e in c["env"]:
        value = fields[e["valueFrom"]["fieldRef"]["fieldPath"]] if "valueFrom" in e else e["value"]
        env[e["name"]] = re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], value)
    secrets_dir = tmp_path / "etc-meshnode"
    secrets_dir.mkdir()
    for var in ("MESHNODE_API_TOKENS_FILE", "MESHNODE_CLUSTER_SECRET_FILE"):
        f = secrets_dir / Path(env[var]).name
        f.write_text(os.urandom(32).hex())
        env[var] = str(f)
    port, data_port = free_port(), free_port()
    env.update(MESHNODE_HOST="127.0.0.1", MESHNODE_PORT=str(port), MESHNODE_DATA_PORT=str(data_port),
               MESHNODE_ADVERTISE=f"127.0.0.1:{port}", MESHNODE_JOIN="",  # the first node: no cluster DNS here
               MESHNODE_DATA_DIR=str(tmp_path / "data"), MESHNODE_DRAM_DIR=str(tmp_path / "shm"), HOME=str(tmp_path))
    log = tmp_path / "node.log"
    with open(log, "wb") as out:
        p = subprocess.Popen([str(MESHNODE), *c["args"]], stdout=out, stderr=subprocess.STDOUT,
                             env={**os.environ, **env})
    try:
        deadline = time.monotonic() + 20
        for path in ("/health", "/ready"):
            while True:
                try:
                    r = httpx.get(f"http://127.0.0.1:{port}{path}", timeout=2)
                    if r.status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                assert p.poll() is None and time.monotonic() < deadline, log.read_text()
                time.sleep(0.1)
            assert r.json()["node_id"] == "k8s-node-1"
        r = httpx.get(f"http://127.0.0.1:{port}/nodes", timeout=2)
        assert r.status_code == 401  # the token from the Secret's file is required
        p.send_signal(signal.SIGTERM)
        assert p.wait(timeout=30) == 0
        lines = [json.loads(ln) for ln in log.read_text().splitlines() if ln.strip()]
        assert any("listening on" in ln["message"] for ln in lines)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def k8s_block() -> str:
    block = re.search(r"```sh\n(docker build -f deploy/kubernetes.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert block is not None, "README's Kubernetes block"
    return block.group(1)


def test_the_kubernetes_lines_run_as_written_against_stand_ins(tmp_path: Path) -> None:
    """README's Kubernetes lines, run as written in a copy of the checkout's
    layout, with ``docker`` and ``kubectl`` the checking stand-ins of
    k8s_shims.py (no cluster in CI).  One mistake each, to show they catch it."""
    work = tmp_path / "checkout"
    work.mkdir()
    for name in ("deploy", "protocol", "meshnode", "sim", "pyproject.toml", "README.md"):
        (work / name).symlink_to(ROOT / name)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for prog in ("docker", "kubectl"):
        shim = bin_dir / prog
        shim.write_text(f"#!/bin/sh\nexec {sys.executable} {ROOT / 'tests/integration/k8s_shims.py'} {prog} \"$@\"\n")
        shim.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SHIM_K8S_VERSION": K8S_VERSION,
           "SHIM_STATE": str(tmp_path / "state.json")}
    script = k8s_block()
    r = subprocess.run(["bash", "-e", "-c", script], cwd=work, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert 'daemon set "meshnode" validated' in r.stdout
    state = json.loads((tmp_path / "state.json").read_text())
    assert state["secrets"] == {"meshnode/meshnode": ["api-tokens", "cluster-secret"]}
    assert len((work / "cluster-secret").read_text().strip()) == 43

    # The stand-ins fail where the real commands would.
    for wrong, says in ((script.replace("--from-file=cluster-secret", "--from-file=api-tokens"), "has no key"),
                        (script.replace("docker push", "true"), "was never pushed"),
                        (script.replace("kubectl apply -f deploy/kubernetes/namespace.yaml", "true"), "not found")):
        (tmp_path / "state.json").unlink()
        r = subprocess.run(["bash", "-e", "-c", wrong], cwd=work, env=env, capture_output=True, text=True, timeout=120)
        assert r.returncode != 0 and says in r.stderr, r.stderr
