"""Names: model names (Hugging Face repo ids), node ids and devices."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.errors import InvalidName, LocalProtocolError
from protocol.names import (
    ADDRESS_MAX,
    MODEL_NAME_MAX,
    NODE_ID_MAX,
    Device,
    parse_device,
    split_address,
    validate_address,
    validate_model_name,
    validate_node_id,
)

SETTINGS = settings(max_examples=200, deadline=None, derandomize=True, database=None)

_SEG_FIRST = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
_SEG_REST = _SEG_FIRST + "._-"


@pytest.mark.parametrize(
    "name",
    [
        "llama-7b",
        "meta-llama/Llama-3.1-8B-Instruct",
        "gpt2",
        "a",
        "0",
        "Org_1/model.v2",
        "a" * MODEL_NAME_MAX,
        "o/" + "m" * (MODEL_NAME_MAX - 2),
    ],
)
def test_model_name_accepts(name: str) -> None:
    assert validate_model_name(name) == name


@pytest.mark.parametrize(
    "name",
    [
        "",
        "..",
        ".",
        "a/../b",
        "../a",
        "a/..",
        "a/.",
        "a..b",
        "org/a..b",
        "/llama",
        "/",
        "llama/",
        "a//b",
        "a/b/c",
        "a/b/",
        "-abc",
        ".hidden",
        "_x",
        "org/-x",
        "has space",
        "tab\there",
        "new\nline",
        "nul\x00",
        "del\x7f",
        "bell\x07/x",
        "a\\b",
        "a:b",
        "a@b",
        "ünicode",
        "a" * (MODEL_NAME_MAX + 1),
        "o/" + "m" * (MODEL_NAME_MAX - 1),
    ],
)
def test_model_name_rejects(name: str) -> None:
    with pytest.raises(InvalidName):
        validate_model_name(name)


@pytest.mark.parametrize("name", [None, 7, b"llama-7b", ["llama"], 1.5, object()])
def test_model_name_rejects_non_str(name: object) -> None:
    with pytest.raises(InvalidName):
        validate_model_name(name)


def test_invalid_name_is_local_and_value_error() -> None:
    with pytest.raises(LocalProtocolError):
        validate_model_name("..")
    with pytest.raises(ValueError):
        validate_model_name("..")


_segment = st.builds(
    lambda first, rest: first + rest,
    st.sampled_from(_SEG_FIRST),
    st.text(alphabet=_SEG_REST, max_size=40),
).filter(lambda s: ".." not in s)


@SETTINGS
@given(owner=st.none() | _segment, name=_segment)
def test_model_name_generated_valid(owner: str | None, name: str) -> None:
    full = name if owner is None else f"{owner}/{name}"
    assert validate_model_name(full) == full


@SETTINGS
@given(st.text(max_size=250))
def test_model_name_any_text_valid_or_invalid_name(text: str) -> None:
    """Any string either validates to itself or raises InvalidName, nothing else;
    a valid name never escapes a directory or carries control characters."""
    try:
        out = validate_model_name(text)
    except InvalidName:
        return
    assert out == text
    assert 0 < len(text) <= MODEL_NAME_MAX
    assert not text.startswith("/")
    assert text.count("/") <= 1
    assert ".." not in text
    assert all(0x20 < ord(c) < 0x7F for c in text)
    assert all(seg not in ("", ".", "..") for seg in text.split("/"))


# -- node ids -----------------------------------------------------------------


@pytest.mark.parametrize("node_id", ["n1", "node-1", "a.b_c-d", "0", "N" * NODE_ID_MAX])
def test_node_id_accepts(node_id: str) -> None:
    assert validate_node_id(node_id) == node_id


@pytest.mark.parametrize(
    "node_id",
    [
        "",
        "-n",
        ".n",
        "_n",
        "n..1",
        "n 1",
        "n:1",
        "n/1",
        "n\n",
        "N" * (NODE_ID_MAX + 1),
        None,
        3,
        b"n1",
    ],
)
def test_node_id_rejects(node_id: object) -> None:
    with pytest.raises(InvalidName):
        validate_node_id(node_id)


# -- devices ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "node", "kind", "gpu"),
    [
        ("n1:disk", "n1", "disk", None),
        ("n1:dram", "n1", "dram", None),
        ("n1:gpu0", "n1", "gpu0", 0),
        ("n1:gpu12", "n1", "gpu12", 12),
        ("n1:gpu999", "n1", "gpu999", 999),
        ("host.example-1:gpu7", "host.example-1", "gpu7", 7),
    ],
)
def test_parse_device_node_kinds(text: str, node: str, kind: str, gpu: int | None) -> None:
    d = parse_device(text)
    assert d == Device(node, kind)
    assert d.node_id == node
    assert d.kind == kind
    assert d.gpu_index == gpu
    assert not d.is_web
    assert str(d) == text


def test_parse_device_web() -> None:
    d = parse_device("web")
    assert d.is_web
    assert d.node_id is None
    assert d.gpu_index is None
    assert str(d) == "web"


@pytest.mark.parametrize(
    "text",
    [
        "n1:gpu",
        "n1:tape",
        ":disk",
        "disk",
        "n1:gpu01",
        "n1:gpu00",
        "n1:gpu1000",
        "n1:gpu-1",
        "n1:GPU0",
        "n1:Disk",
        "n1:",
        "n1:disk ",
        "n1:disk\n",
        "n1:web",
        "a:b:disk",
        "n..1:disk",
        "-n:disk",
        "WEB",
        "",
        "n1:gpu 1",
        ("x" * (NODE_ID_MAX + 1)) + ":disk",
    ],
)
def test_parse_device_rejects(text: str) -> None:
    with pytest.raises(InvalidName):
        parse_device(text)


@pytest.mark.parametrize("text", [None, 1, b"n1:disk", ("n1", "disk")])
def test_parse_device_rejects_non_str(text: object) -> None:
    with pytest.raises(InvalidName):
        parse_device(text)


@SETTINGS
@given(
    node=st.builds(
        lambda first, rest: first + rest,
        st.sampled_from(_SEG_FIRST),
        st.text(alphabet=_SEG_REST, max_size=20),
    ).filter(lambda s: ".." not in s),
    kind=st.sampled_from(["disk", "dram"]) | st.integers(0, 999).map(lambda i: f"gpu{i}"),
)
def test_parse_device_roundtrips_str(node: str, kind: str) -> None:
    d = parse_device(f"{node}:{kind}")
    assert str(d) == f"{node}:{kind}"
    assert parse_device(str(d)) == d


@SETTINGS
@given(st.text(max_size=80))
def test_parse_device_any_text_device_or_invalid_name(text: str) -> None:
    try:
        d = parse_device(text)
    except InvalidName:
        return
    assert str(d) == text


# -- peer addresses --------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "host", "port"),
    [
        ("gpu1:7420", "gpu1", 7420),
        ("127.0.0.1:1", "127.0.0.1", 1),
        ("node-3.cluster.local:65535", "node-3.cluster.local", 65535),
        ("[::1]:7420", "::1", 7420),
        ("[fd00::12:34]:80", "fd00::12:34", 80),
        ("0.0.0.0:7420", "0.0.0.0", 7420),
        ("a" * 63 + ".b:1", "a" * 63 + ".b", 1),
    ],
)
def test_address_accepts(text: str, host: str, port: int) -> None:
    assert validate_address(text) == text
    assert split_address(text) == (host, port)


@pytest.mark.parametrize(
    "text",
    [
        "999.1.1.1:80",  # the address that took a mesh down: not an IPv4 address
        "host:abc",
        "1.2.3:4",
        "01.2.3.4:80",
        "h:0",
        "h:65536",
        "h:080",
        "h:",
        ":80",
        "h",
        "",
        "h:80:81",
        "[::1]",
        "[::1:80",
        "::1:80",
        "[fe80::1%eth0]:80",
        "[not-v6]:80",
        "a_b:80",
        "-a:80",
        "a-:80",
        "a..b:80",
        "a.b.:80",
        "a.123:80",
        "host name:80",
        "h\x00:80",
        "h/x:80",
        "user@h:80",
        "a" * 64 + ":80",
        ("a" * 60 + ".") * 5 + "b:80",
        "h:" + "9" * 300,
        None,
        80,
        ["h", 80],
    ],
)
def test_address_refuses(text: object) -> None:
    with pytest.raises(InvalidName):
        validate_address(text)


@SETTINGS
@given(st.text(max_size=ADDRESS_MAX + 5))
def test_any_text_is_an_address_or_invalid_name(text: str) -> None:
    try:
        host, port = split_address(text)
    except InvalidName:
        return
    assert 0 < port < 65536 and host


_labels = st.from_regex(r"[a-zA-Z0-9]([a-zA-Z0-9-]{0,20}[a-zA-Z0-9])?", fullmatch=True)
_hosts = st.one_of(
    st.lists(_labels, min_size=1, max_size=5).filter(lambda ls: not ls[-1].isdigit()).map(".".join),
    st.ip_addresses(v=4).map(str),
    st.ip_addresses(v=6).map(lambda a: f"[{a}]"),
)


@SETTINGS
@given(_hosts, st.integers(1, 65535))
def test_every_accepted_address_makes_a_url(host: str, port: int) -> None:
    """What the validator accepts, the HTTP client takes: no peer address can
    reach httpx and fail there (that is how a forged one killed nodes)."""
    import httpx

    text = f"{host}:{port}"
    assert validate_address(text) == text
    url = httpx.URL(f"http://{text}/mesh/v1/msg")
    assert (url.port or 80) == port  # httpx drops the scheme's default port
    assert url.host == split_address(text)[0].lower()


def test_sub_resource_names_are_reserved_as_a_second_segment() -> None:
    from protocol.names import RESERVED_SEGMENTS

    for word in RESERVED_SEGMENTS:
        with pytest.raises(InvalidName, match="reserves"):
            validate_model_name(f"acme/{word}")
        assert validate_model_name(word) == word  # one segment: no route is confused
        assert validate_model_name(f"acme/{word}-v2") == f"acme/{word}-v2"
