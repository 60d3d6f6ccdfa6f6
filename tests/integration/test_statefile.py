"""The state file and its log on their own: replay, torn tails, compaction, a full disk."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshnode import persist
from meshnode.persist import LOG_NAME, SavedState, StateFile


def _own(state: SavedState | None, node: str = "n") -> dict[str, Any]:
    """key -> value of the live own keys."""
    assert state is not None
    return {e[0]: e[2] for e in state.catalog[node]["entries"] if not e[3]}


def test_log_replays_onto_the_snapshot(tmp_path: Path) -> None:
    sf = StateFile(tmp_path)
    sf.save(SavedState("n", 5, 100, {"n": {"generation": 5, "max_version": 2, "last_gc_version": 0,
                                           "entries": [["a", 1, {"v": 1}, False], ["b", 2, {"v": 2}, False]]}}, ["h:1"]))
    sf.append([("a", {"v": 10}, False), ("c", {"v": 3}, False)], 5, 200)
    sf.append([("b", None, True)], 6, 300)
    state = StateFile(tmp_path).load("n")
    assert state is not None and _own(state) == {"a": {"v": 10}, "c": {"v": 3}}
    assert (state.generation, state.hlc_wall_ms, state.peers) == (6, 300, ["h:1"])
    versions = sorted(e[1] for e in state.catalog["n"]["entries"])
    assert len(set(versions)) == len(versions) and state.catalog["n"]["max_version"] == max(versions)


@pytest.mark.parametrize("damage", ["torn", "crc", "garbage"])
def test_a_damaged_tail_is_dropped_and_cut_off(tmp_path: Path, damage: str) -> None:
    sf = StateFile(tmp_path)
    sf.append([("a", 1, False)], 1, 1)
    good = (tmp_path / LOG_NAME).stat().st_size
    sf.append([("b", 2, False)], 1, 2)
    log = tmp_path / LOG_NAME
    data = log.read_bytes()
    if damage == "torn":
        log.write_bytes(data[:-3])  # a kill -9 in the middle of a write
    elif damage == "crc":
        log.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    else:
        log.write_bytes(data[:good] + os.urandom(40))
    state = StateFile(tmp_path).load("n")
    assert _own(state) == {"a": 1}
    assert log.stat().st_size == good  # the damaged record is cut off: the next append follows the last good one
    StateFile(tmp_path).append([("c", 3, False)], 1, 3)
    assert _own(StateFile(tmp_path).load("n")) == {"a": 1, "c": 3}


def test_a_write_of_several_keys_is_replayed_whole_or_not_at_all(tmp_path: Path) -> None:
    sf = StateFile(tmp_path)
    sf.append([("reg/m", 1, False)], 1, 1)
    good = (tmp_path / LOG_NAME).stat().st_size
    sf.append([("loc/m@a:disk", None, True), ("loc/m@b:disk", None, True), ("reg/m", None, True)], 1, 2)
    log = tmp_path / LOG_NAME
    log.write_bytes(log.read_bytes()[:-5])  # cut short: the unregister with its purge never happened
    assert _own(StateFile(tmp_path).load("n")) == {"reg/m": 1}
    assert log.stat().st_size == good


def test_a_full_disk_leaves_the_log_as_it_was(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sf = StateFile(tmp_path)
    sf.append([("a", 1, False)], 1, 1)
    before = (tmp_path / LOG_NAME).read_bytes()
    real_write = os.write
    calls = 0

    def full(fd: int, data: Any) -> int:
        nonlocal calls
        calls += 1
        if calls == 1:
            return real_write(fd, bytes(data)[:7])  # part of it fits...
        raise OSError(errno.ENOSPC, "No space left on device")  # ...then the disk is full

    monkeypatch.setattr(persist.os, "write", full)
    with pytest.raises(OSError) as e:
        sf.append([("b", "x" * 1000, False)], 1, 2)
    assert e.value.errno == errno.ENOSPC
    monkeypatch.undo()
    assert (tmp_path / LOG_NAME).read_bytes() == before
    assert _own(StateFile(tmp_path).load("n")) == {"a": 1}


def test_compaction_folds_the_log_into_the_snapshot(tmp_path: Path) -> None:
    sf = StateFile(tmp_path)
    for i in range(200):
        sf.append([(f"k{i % 10}", "v" * 10_000 + str(i), False)], 1, i)
    assert sf.needs_compaction()
    state = StateFile(tmp_path).load("n")
    assert state is not None
    sf.save(state)
    assert (tmp_path / LOG_NAME).stat().st_size == 0 and not sf.needs_compaction()
    assert _own(StateFile(tmp_path).load("n")) == _own(state)


@settings(max_examples=60, deadline=None, derandomize=True, database=None)
@given(st.lists(st.tuples(st.sampled_from(["set", "del", "compact", "reload"]), st.sampled_from("abcde"), st.integers(0, 9)), max_size=40))
def test_what_was_appended_is_what_loads(ops: list[tuple[str, str, int]]) -> None:
    """Any mix of writes, deletes, compactions and restarts: the loaded state
    is the last value written of every key."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        sf = StateFile(root)
        model: dict[str, int] = {}
        for op, key, v in ops:
            if op == "set":
                sf.append([(key, v, False)], 1, v)
                model[key] = v
            elif op == "del":
                sf.append([(key, None, True)], 1, v)
                model.pop(key, None)
            elif op == "compact":
                state = sf.load("n") or SavedState("n", 1)
                sf.save(state)
            else:
                sf = StateFile(root)
        loaded = sf.load("n")
        assert (_own(loaded) if loaded is not None and "n" in loaded.catalog else {}) == model
