"""The small modules the warm-start path uses instead of dataclasses, logging and json."""

from __future__ import annotations

import io
import json
import logging
import time
from typing import ClassVar, List

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stratovirt_py import jsonread, logs
from stratovirt_py.record import FrozenInstanceError, asdict, field, is_record, record, replace


@record
class Inner:
    a: int
    b: str = "x"


@record(frozen=True)
class Outer:
    VERSION: ClassVar[int] = 3
    name: str
    items: List[int] = field(default_factory=list)
    inner: Inner = field(default_factory=lambda: Inner(1))
    secret: bytes = field(default=b"", repr=False)


@record(frozen=True)
class Point:
    x: int
    y: int


def test_record_construction_defaults_and_errors():
    o = Outer("n")
    assert (o.name, o.items, o.inner, o.secret) == ("n", [], Inner(1, "x"), b"")
    assert Outer("n").items is not Outer("n").items      # a fresh default each time
    assert Outer(name="m", items=[1]).items == [1]
    assert Outer.VERSION == 3 and [f[0] for f in Outer.__record_fields__] == ["name", "items", "inner", "secret"]
    with pytest.raises(TypeError, match="missing required argument 'name'"):
        Outer()
    with pytest.raises(TypeError, match="unexpected keyword argument 'nope'"):
        Outer("n", nope=1)
    with pytest.raises(TypeError, match="multiple values"):
        Outer("n", name="m")
    with pytest.raises(TypeError, match="takes 4 arguments"):
        Outer("n", [], Inner(1), b"", 5)


def test_record_equality_hash_frozen_repr():
    assert Outer("n", [1]) == Outer("n", [1]) and Outer("n") != Outer("m")
    assert Inner(1) != (1, "x")
    with pytest.raises(FrozenInstanceError):
        Outer("n").name = "m"
    with pytest.raises(TypeError):
        hash(Inner(1))                       # mutable records are unhashable, as dataclasses
    assert hash(Point(1, 2)) == hash(Point(1, 2)) and len({Point(1, 2), Point(1, 2)}) == 1
    assert "secret" not in repr(Outer("n", secret=b"s")) and "name='n'" in repr(Outer("n"))
    inner = Inner(1)
    inner.a = 2
    assert inner.a == 2


def test_record_asdict_and_replace():
    o = Outer("n", [1, 2], Inner(5, "y"), b"z")
    assert is_record(o) and not is_record({})
    d = asdict(o)
    assert d == {"name": "n", "items": [1, 2], "inner": {"a": 5, "b": "y"}, "secret": b"z"}
    d["items"].append(3)
    assert o.items == [1, 2]                  # a copy
    assert replace(o, name="m") == Outer("m", [1, 2], Inner(5, "y"), b"z")


def test_logs_are_kept_until_start_then_replayed_in_order(monkeypatch):
    stream = io.StringIO()
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    try:
        logs.configure(True, stream)
        log = logs.get_logger("sv.test")
        log.debug("dropped: below INFO")
        log.info("first %d", 1)
        t_kept = time.time()
        try:
            raise ValueError("boom")
        except ValueError:
            log.exception("second")
        assert stream.getvalue() == ""          # nothing written before start()
        time.sleep(0.3)
        t_start = time.time()
        logs.start()
        out = stream.getvalue().splitlines()
        assert "first 1" in out[0] and "second" in out[1] and "ValueError: boom" in stream.getvalue()
        assert "dropped" not in stream.getvalue()
        day_time, ms = out[0].split(" ")[0] + " " + out[0].split(" ")[1].split(",")[0], \
            int(out[0].split(" ")[1].split(",")[1])
        logged = time.mktime(time.strptime(day_time, "%Y-%m-%d %H:%M:%S")) + ms / 1000
        # the time it was logged, not the time it was replayed (0.3 s later)
        assert logged <= t_kept + 0.05 and logged < t_start - 0.2, (logged, t_kept, t_start)
        log.warning("after start")
        assert "after start" in stream.getvalue()
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: st.lists(children) | st.dictionaries(st.text(), children), max_leaves=30)


@settings(max_examples=300, deadline=None)
@given(json_values)
def test_jsonread_reads_what_json_writes(value):
    text = json.dumps(value)
    assert jsonread.loads(text) == json.loads(text)
    assert jsonread.loads(text.encode()) == json.loads(text)


@pytest.mark.parametrize("bad", ["", " ", "[1", "[1] 2", "{'a': 1}", "{\"a\":1,}", "nul", "\"\\x\""])
def test_jsonread_refuses_what_json_refuses(bad):
    with pytest.raises(ValueError):
        json.loads(bad)
    with pytest.raises(ValueError):
        jsonread.loads(bad)
