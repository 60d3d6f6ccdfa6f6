"""One ``classify(url)`` decides a source's kind, for the API, pipelines and the fetchers."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocol.actions import WEB_SCHEMES
from protocol.pipeline import parse_pipeline
from protocol.sources import InvalidSource, SourceKind, classify


@pytest.mark.parametrize(("url", "kind"), [
    ("hf://meta-llama/Llama-3.1-8B", SourceKind.HUB),
    ("https://huggingface.co/meta-llama/Llama-3.1-8B", SourceKind.HUB),
    ("https://example.org/tiny.bin", SourceKind.HTTP),
    ("http://mirror.local/w.bin", SourceKind.HTTP),
    ("s3://bucket/prefix/model", SourceKind.S3),
    ("S3://bucket/p", SourceKind.S3),
    ("file:///srv/models/gpt2", SourceKind.LOCAL),
    ("/srv/models/gpt2", SourceKind.LOCAL),
])
def test_each_kind(url: str, kind: SourceKind) -> None:
    assert classify(url).kind is kind


def test_a_hub_of_ones_own_is_the_hub() -> None:
    assert classify("http://127.0.0.1:9/org/m", hub_hosts=("127.0.0.1",)).kind is SourceKind.HUB


@pytest.mark.parametrize("url", ["ftp://x/y", "gs://bucket/x", "file://otherhost/p", "file:relative", "", "x" * 3000,
                                 "javascript:alert(1)"])
def test_what_cannot_be_fetched_is_refused_with_what_can(url: str) -> None:
    with pytest.raises(InvalidSource):
        classify(url)


def test_the_web_schemes_are_the_outside_kinds() -> None:
    assert set(WEB_SCHEMES) == {"hf://", "https://", "http://", "s3://"}


@given(st.text(max_size=300))
def test_any_text_is_a_kind_or_a_clear_refusal(text: str) -> None:
    try:
        src = classify(text)
    except InvalidSource as e:
        assert str(e)
        return
    assert src.kind in SourceKind and (src.path is not None) == (src.kind is SourceKind.LOCAL)


def test_a_pipeline_downloads_from_s3() -> None:
    """The download API could; the pipeline's validation allowed only https, http, hf and file."""
    pipe = parse_pipeline({"name": "s3", "actions": [
        {"action_id": "d", "action_type": "download", "model_name": "org/m", "source_url": "s3://bucket/org/m",
         "devices": ["node1:disk"]}]})
    assert pipe.actions[0].source_url == "s3://bucket/org/m"
