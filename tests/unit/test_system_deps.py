"""README's test command sets the machine up itself: ``scripts/system-deps``
installs the Debian packages the suite needs as root with apt, says how
otherwise, and ``.ci/run`` only calls ``scripts/test``."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests import needs

ROOT = Path(__file__).resolve().parents[2]


def bare_path(tmp_path: Path, uid: int) -> Path:
    """A PATH with none of the packages: the shell's basics, a fake ``id``, and an ``apt-get`` that records."""
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    for tool in ("bash", "sort", "cat", "mkdir"):
        found = shutil.which(tool)
        assert found is not None
        (bin_ / tool).symlink_to(found)
    (bin_ / "id").write_text(f"#!{shutil.which('bash')}\necho {uid}\n")
    (bin_ / "apt-get").write_text(f"#!{shutil.which('bash')}\necho \"$@\" >> {tmp_path}/apt-calls\n")
    for f in ("id", "apt-get"):
        (bin_ / f).chmod(0o755)
    return bin_


def run(tmp_path: Path, uid: int) -> subprocess.CompletedProcess[str]:
    env = {"PATH": str(bare_path(tmp_path, uid)), "SYSTEM_DEPS_SBIN": str(tmp_path / "sbin")}
    return subprocess.run([shutil.which("bash") or "bash", str(ROOT / "scripts" / "system-deps")],
                          capture_output=True, text=True, env=env, timeout=60)


def test_as_root_it_installs_every_missing_package(tmp_path: Path) -> None:
    r = run(tmp_path, 0)
    assert r.returncode == 0, r.stderr
    calls = (tmp_path / "apt-calls").read_text().splitlines()
    assert calls[0] == "update -qq"
    installed = set(calls[1].split()) - {"install", "-y", "-qq"}
    assert installed == {"iproute2", "curl", "nginx-light", "cmake", "g++", "systemd", "chromium", "chromium-driver"}


def test_as_a_user_it_says_what_is_missing_and_how_to_install_it(tmp_path: Path) -> None:
    r = run(tmp_path, 1000)
    assert r.returncode == 0
    assert not (tmp_path / "apt-calls").exists()
    assert "missing Debian packages:" in r.stderr and "sudo scripts/system-deps" in r.stderr


def test_ci_calls_readme_s_test_command_which_sets_up_first() -> None:
    ci = (ROOT / ".ci" / "run").read_text()
    assert "exec scripts/test" in ci and "apt-get" not in ci
    test = (ROOT / "scripts" / "test").read_text()
    assert test.index("scripts/system-deps") < test.index("pytest")
    assert "./scripts/test" in (ROOT / "README.md").read_text().split("\n## ")[0]


def test_a_missing_package_skips_with_the_command_unless_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(pytest.skip.Exception, match="sudo scripts/system-deps"):
        needs.unavailable("chromium is not installed")
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    with pytest.raises(pytest.fail.Exception, match="running as root"):
        needs.unavailable("chromium is not installed")
