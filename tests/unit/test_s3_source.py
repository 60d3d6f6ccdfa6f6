"""The S3 source's URL and key checks (the fetch itself: tests/integration/test_s3.py)."""

from __future__ import annotations

import pytest

from meshnode.copies.sources import SourceError
from meshnode.copies.sources.s3 import S3Location, _safe_rel, parse_s3_url


def test_urls() -> None:
    assert parse_s3_url("s3://models/llama") == S3Location("models", "llama")
    assert parse_s3_url("s3://models/") == S3Location("models", "")
    assert parse_s3_url("s3://models/a%20b/c?endpoint_url=https://nyc3.digitaloceanspaces.com&region=nyc3") == \
        S3Location("models", "a b/c", "https://nyc3.digitaloceanspaces.com", "nyc3")
    for bad in ("s3://Models/x", "s3://ab/x", "s3://key:secret@models/x", "s3://models/x?X-Amz-Credential=a",
                "s3://models/x?endpoint_url=http://u:p@h", "s3://models/x?region=US East", "http://models/x",
                "s3://models/x?endpoint_url=file:///etc"):
        with pytest.raises(SourceError) as e:
            parse_s3_url(bad)
        assert e.value.code == "INVALID_REQUEST" and "secret" not in e.value.message, bad


def test_keys_become_safe_file_names_or_are_refused() -> None:
    assert _safe_rel("llama/sub/w.bin", "llama/") == "sub/w.bin"
    assert _safe_rel("llama/w.bin", "llama/w.bin") == "w.bin"
    assert _safe_rel("w.bin", "") == "w.bin"
    for hostile in ("llama/../../etc/passwd", "llama//abs", "llama/a/./b"):
        with pytest.raises(SourceError) as e:
            _safe_rel(hostile, "llama/")
        assert e.value.code == "INVALID_REQUEST"
