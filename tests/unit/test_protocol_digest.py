"""protocol/digest.py: a copy's digest as sha256sum would say, and a model's from its copies'."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.digest import is_digest, model_digest, tree_digest

D = ["sha256:" + c * 64 for c in "0123"]


def test_a_tree_digest_is_what_sha256sum_prints(tmp_path: Path) -> None:
    files = {"config.json": b"{}", "sub/w.bin": b"x" * 1000, "a.txt": b""}
    for rel, data in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(data)
    hexes = {rel: hashlib.sha256(data).hexdigest() for rel, data in files.items()}
    shell = subprocess.run("find . -type f | sed 's|^./||' | sort | xargs sha256sum | sha256sum", shell=True,
                           cwd=tmp_path, capture_output=True, text=True, check=True).stdout.split()[0]
    assert tree_digest(hexes) == "sha256:" + shell
    assert tree_digest({"m.gguf": hexes["sub/w.bin"]}) == "sha256:" + hexes["sub/w.bin"]  # one file: its own
    assert is_digest(tree_digest(hexes)) and not is_digest("sha256:" + "A" * 64)


@settings(max_examples=200, deadline=None, derandomize=True, database=None)
@given(st.lists(st.sampled_from([None, *D[:2]]), max_size=6), st.sampled_from([None, *D[:3]]))
def test_a_model_digest_is_the_one_its_copies_agree_on(copies: list[str | None], expected: str | None) -> None:
    v = model_digest(copies, expected)
    known = {c for c in copies if c is not None}
    assert v.computed == len(copies) - copies.count(None) and v.copies == len(copies)
    assert v.conflict == (len(known) > 1)
    assert v.digest == (next(iter(known)) if len(known) == 1 else None)
    if expected is None or not known:
        assert v.verified is None
    else:
        assert v.verified == (known == {expected})
