"""Section payload encoding: lossless for plain data, refuses everything else."""

import dataclasses
import math
from typing import ClassVar, Tuple

import pytest

from stratovirt_py.errors import SnapshotError
from stratovirt_py.migration import codec

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings, strategies as st  # noqa: E402


def roundtrip(value):
    return codec.decode(codec.encode(value))


def test_nested_data_with_bytes_and_tuples():
    value = {
        "regs": (1, 2, 0xFFFF_FFFF_FFFF_FFFF, -5),
        "xsave": bytes(range(256)) * 16,
        "empty": b"",
        "flag": True,
        "zero": 0,
        "none": None,
        "name": "ünïcødé \x00 \ud800",
        "ratio": 0.1,
        "queues": [{"desc": 0x1000, "ring": (b"\x01\x02", [b"", (b"x",)])}, []],
        "v": "v", "b": ["b"], "t": {"t": ()},  # user keys equal to the envelope's
        "$b": "not bytes",
        "big": 1 << 200,
    }
    out = roundtrip(value)
    assert out == value
    assert type(out["regs"]) is tuple
    assert type(out["queues"][0]["ring"]) is tuple
    assert type(out["queues"][0]["ring"][1][1]) is tuple
    assert type(out["queues"][0]["ring"][1]) is list
    assert type(out["xsave"]) is bytes
    assert out["flag"] is True and type(out["zero"]) is int
    assert type(out["t"]["t"]) is tuple


def test_top_level_values():
    for v in (b"raw", (), (b"a", 1), None, 7, "s", [], {}):
        out = roundtrip(v)
        assert out == v and type(out) is type(v)
    assert roundtrip(bytearray(b"xy")) == b"xy"
    assert math.isnan(roundtrip(float("nan")))


def test_dataclasses_are_stored_as_dicts():
    @dataclasses.dataclass(frozen=True)
    class Inner:
        data: bytes

    @dataclasses.dataclass(frozen=True)
    class State:
        VERSION: ClassVar[int] = 1
        regs: Tuple[int, ...]
        inner: Inner

    s = State((1, 2), Inner(b"\x00\xff"))
    assert roundtrip(s) == dataclasses.asdict(s)
    assert roundtrip([s])[0]["inner"]["data"] == b"\x00\xff"


@pytest.mark.parametrize("bad", [{1: "x"}, {"a": {(1, 2): 3}}, {1, 2}, object(), [complex(1, 2)]])
def test_refuses_non_plain_data(bad):
    with pytest.raises(SnapshotError, match="section 'cpu'"):
        codec.encode(bad, "section 'cpu'")


@pytest.mark.parametrize("payload", [
    b"", b"not json", b"[1]", b'{"x":1}', b'{"v":"!!","b":[[]]}', b'{"v":[1],"b":[[5]]}',
    b'{"v":{"a":1},"t":[["a"]]}', b'{"v":[1],"b":[["k"]]}', b'{"v":1,"b":7}', b"\xff\xfe",
])
def test_decode_refuses_malformed(payload):
    with pytest.raises(SnapshotError, match="malformed"):
        codec.decode(payload)


plain = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text() | st.binary()
    | st.floats(allow_nan=False),
    lambda children: st.lists(children, max_size=4)
    | st.tuples(children, children)
    | st.dictionaries(st.text(max_size=5), children, max_size=4),
    max_leaves=20,
)


def _same(a, b):
    if type(a) is not type(b):
        return False
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b


@settings(max_examples=200, deadline=None)
@given(plain)
def test_roundtrip_property(value):
    assert _same(roundtrip(value), value)
