"""A copy's sha256 digest, as llama-orch's catalog names a model
(``sha256:<hex>``), and what the mesh says of a model's digests.

A copy of one file has that file's sha256 (what ``sha256sum model.gguf``
prints).  A copy of several files has the sha256 of the lines
``<file sha256>  <path>\\n`` sorted by path: what
``find . -type f | sort | xargs sha256sum | sha256sum`` prints inside it
(paths without the ``./``).  Every copy computes its own, once, from its
own bytes: a copy's digest checks that copy, it is not inherited.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

__all__ = ["DigestView", "is_digest", "model_digest", "tree_digest"]

_DIGEST = re.compile(r"sha256:[0-9a-f]{64}\Z")


def is_digest(text: str) -> bool:
    return bool(_DIGEST.match(text))


def tree_digest(files: Mapping[str, str]) -> str:
    """``files``: path -> hex sha256 of its bytes.  The copy's digest."""
    if len(files) == 1:
        (only,) = files.values()
        return "sha256:" + only
    lines = "".join(f"{files[p]}  {p}\n" for p in sorted(files))
    return "sha256:" + hashlib.sha256(lines.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class DigestView:
    """A model's digest as the catalog shows it."""

    digest: str | None  # the one every computed copy agrees on; None: none yet, or they differ
    computed: int  # copies whose node computed it
    copies: int
    conflict: bool  # two copies with different digests
    expected: str | None  # what the registration says it should be
    verified: bool | None  # every computed digest is the expected one (None: nothing to compare)


def model_digest(per_copy: Iterable[str | None], expected: str | None = None) -> DigestView:
    got = list(per_copy)
    known = {d for d in got if d is not None}
    digest = next(iter(known)) if len(known) == 1 else None
    verified = None if expected is None or not known else known == {expected}
    return DigestView(digest, sum(d is not None for d in got), len(got), len(known) > 1, expected, verified)
