"""Every README section that a comment in deploy/ cites exists."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_deploy_comments_cite_sections_that_exist() -> None:
    headings = {m.group(1).strip() for m in re.finditer(r"^#{2,4} (.+)$", (ROOT / "README.md").read_text(), re.M)}
    cited = []
    for path in sorted((ROOT / "deploy").rglob("*")):
        if not path.is_file():
            continue
        text = re.sub(r"\n#\s*", " ", path.read_text(errors="replace"))  # a citation may wrap over comment lines
        for m in re.finditer(r"README(?:\.md)?[,:]? \"([^\"]+)\"", text):
            cited.append((path.name, m.group(1)))
    assert len(cited) >= 3
    missing = [(f, name) for f, name in cited if name not in headings]
    assert not missing, f"README has no such section: {missing}"


def test_every_start_flag_is_in_readme_s_flag_table() -> None:
    from meshnode.config import _OPTIONS

    readme = (ROOT / "README.md").read_text()
    missing = [f"--{name.replace('_', '-')}" for name, *_ in _OPTIONS
               if f"`--{name.replace('_', '-')}`" not in readme]
    assert not missing, f"flags README does not document: {missing}"
