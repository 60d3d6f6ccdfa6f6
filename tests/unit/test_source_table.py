"""A source's kind is decided once (``protocol.sources.classify``) and each
kind fetched by one entry of ``meshnode.copies.sources.FETCHERS``; record
checks are public (``protocol.records``), never borrowed privately."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from meshnode.copies.sources import FETCHERS, SourceError, fetcher_for, hub_hosts, is_hf_source
from protocol.sources import SourceKind, is_outside

ROOT = Path(__file__).resolve().parents[2]


def test_every_outside_kind_has_one_fetcher() -> None:
    assert set(FETCHERS) == {k for k in SourceKind if k.outside}
    assert len({f.label for f in FETCHERS.values()}) == len(FETCHERS)


@pytest.mark.parametrize(("url", "label"), [
    ("hf://org/m", "hf"), ("https://huggingface.co/org/m", "hf"), ("https://hf.co/org/m", "hf"),
    ("https://example.org/w.bin", "http"), ("s3://bucket/org/m", "s3"), ("S3://bucket/m", "s3"),
])
def test_the_fetcher_follows_the_kind(url: str, label: str) -> None:
    assert fetcher_for(url).label == label


@pytest.mark.parametrize("url", ["file:///srv/m", "/srv/m", "ftp://x/y", ""])
def test_what_is_not_fetched_is_refused(url: str) -> None:
    with pytest.raises(SourceError) as e:
        fetcher_for(url)
    assert e.value.code == "INVALID_REQUEST"


def test_the_node_s_hub_mirror_is_the_hub_where_the_node_asks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_ENDPOINT", "http://mirror.internal:8080")
    assert "mirror.internal" in hub_hosts()
    assert fetcher_for("http://mirror.internal:8080/org/m", hub_hosts()).label == "hf"
    # fetch_source's own default: a plain URL there is one file, as before
    assert fetcher_for("http://mirror.internal:8080/files/w.bin").label == "http"
    assert is_hf_source("hf://org/m") and not is_hf_source("https://example.org/org/m")


def test_outside_is_what_classify_says() -> None:
    assert is_outside("hf://a/b") and is_outside("S3://b/p") and is_outside("https://x/y")
    assert not is_outside("file:///x") and not is_outside("/x") and not is_outside(None)
    assert not is_outside("node1:disk") and not is_outside("gs://b/p")


def test_no_protocol_module_imports_another_s_private_names() -> None:
    bad = [f"{p.relative_to(ROOT).as_posix()}: {a.name}" for p in sorted((ROOT / "protocol").rglob("*.py"))
           for node in ast.walk(ast.parse(p.read_text())) if isinstance(node, ast.ImportFrom)
           for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
    assert bad == []
