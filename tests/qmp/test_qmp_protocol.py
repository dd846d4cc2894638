"""Unit tests: framing, request parsing, schemas, the event bus, -qmp parsing."""

from __future__ import annotations

import json
import threading

import pytest

from stratovirt_py.errors import ConfigError
from stratovirt_py.qmp import EventBus, parse_qmp_address
from stratovirt_py.qmp.protocol import (GREETING_LINE, MAX_NESTING, MessageSplitter, QmpInputError,
                                        RequestError, TooLong, parse_request)
from stratovirt_py.qmp.schema import BLOCKDEV_ADD, DEVICE_ADD, DEVICE_DEL, validate


# ------------------------------------------------------------------ greeting
def test_greeting_is_exact_and_crlf_terminated():
    assert GREETING_LINE == (
        b'{"QMP":{"version":{"qemu":{"micro":1,"minor":0,"major":5},'
        b'"StratoVirt":{"micro":1,"minor":0,"major":0},"package":""},"capabilities":[]}}\r\n')


# ------------------------------------------------------------------ framing
def test_lines_and_several_in_one_chunk():
    s = MessageSplitter()
    assert s.feed(b'{"execute":"a"}\n{"execute":"b"}\r\n{"exe') == [
        b'{"execute":"a"}', b'{"execute":"b"}']
    assert s.feed(b'cute":"c"}\n') == [b'{"execute":"c"}']


def test_byte_by_byte():
    s = MessageSplitter()
    out = []
    for b in b'{"execute":"query-status","arguments":{}}\n':
        out += s.feed(bytes([b]))
    assert out == [b'{"execute":"query-status","arguments":{}}']


def test_object_without_newline_ends_at_its_closing_brace():
    # qemu.qmp writes commands with no newline at all.
    s = MessageSplitter()
    assert s.feed(b'{"execute":"a"}{"execute":"b"}') == [b'{"execute":"a"}', b'{"execute":"b"}']


def test_braces_and_escapes_inside_strings():
    s = MessageSplitter()
    msg = rb'{"execute":"x","arguments":{"s":"}{[\"\\"}}'
    assert s.feed(msg) == [msg]
    # a backslash at the very end of a chunk escapes the first byte of the next
    s2 = MessageSplitter()
    assert s2.feed(b'{"a":"\\') == []   # ends with ONE backslash
    assert s2.feed(b'"}') == []           # the quote was escaped: still in the string
    assert s2.feed(b'"}') == [b'{"a":"\\"}"}']


def test_newline_ends_an_unfinished_message():
    s = MessageSplitter()
    assert s.feed(b'{"execute":\n{"execute":"b"}\n') == [b'{"execute":', b'{"execute":"b"}']
    assert s.feed(b'{"a":"unterminated\n') == [b'{"a":"unterminated']
    assert s.feed(b"garbage } more\n   \n") == [b"garbage } more"]


def test_too_long_message_is_dropped_without_being_stored():
    s = MessageSplitter(limit=100)
    out = s.feed(b'{"execute":"' + b"x" * 1000)
    assert out == [] and s.pending <= 100
    out = s.feed(b"y" * 5000 + b'"}{"execute":"ok"}\n')
    assert isinstance(out[0], TooLong) and out[0].size > 5000
    assert out[1:] == [b'{"execute":"ok"}']
    out = s.feed(b"z" * 500 + b"\n" + b'{"execute":"ok2"}')
    assert isinstance(out[0], TooLong) and out[1:] == [b'{"execute":"ok2"}']


def test_deep_nesting_is_skipped_to_the_newline():
    s = MessageSplitter()
    deep = b"[" * (MAX_NESTING + 1)
    out = s.feed(b'{"a":' + b"[" * (MAX_NESTING - 1) + b"]" * (MAX_NESTING - 1) + b"}\n")
    assert len(out) == 1 and isinstance(out[0], bytes)          # at the limit: a message
    out = s.feed(deep + b"]" * 10 + b'{"execute":"hidden"}')
    assert out == [] and s.pending == 0                           # nothing kept, still skipping
    out = s.feed(b"[" * (4 << 20) + b'\n{"execute":"ok"}')
    assert isinstance(out[0], TooLong) and out[0].too_deep and "nested" in out[0].reason()
    assert out[1:] == [b'{"execute":"ok"}']


# ------------------------------------------------------------------ requests
def test_parse_request_ok():
    r = parse_request(b'{"execute":"stop","id":7}')
    assert (r.command, r.arguments, r.msg_id, r.has_id) == ("stop", {}, 7, True)
    assert r.reply({}) == {"return": {}, "id": 7}
    r = parse_request(b'{"execute":"device_del","arguments":{"id":"d"}}')
    assert r.arguments == {"id": "d"} and not r.has_id
    assert r.reply(1) == {"return": 1}


@pytest.mark.parametrize("raw, words", [
    (b'{"execute":', "JSON parse error"),
    (b"\xff\xfe{}", "UTF-8"),
    (b"[1,2]", "must be a JSON object"),
    (b'"stop"', "must be a JSON object"),
    (b'{"arguments":{}}', "lacks member 'execute'"),
    (b'{"execute":5}', "'execute' must be a string"),
    (b'{"execute":"stop","arguments":[]}', "'arguments' must be an object"),
    (b'{"execute":"stop","bogus":1}', "'bogus' is unexpected"),
    (b'{"execute":"stop","arguments":{"x":NaN}}', "JSON parse error"),
    (b"[" * 100000 + b"]" * 100000, "JSON parse error"),
])
def test_parse_request_errors(raw, words):
    with pytest.raises(RequestError, match=words):
        parse_request(raw)


def test_parse_request_error_keeps_id():
    with pytest.raises(RequestError) as info:
        parse_request(b'{"execute":1,"id":"x"}')
    assert info.value.has_id and info.value.msg_id == "x"


# ------------------------------------------------------------------ schemas
KATA_BLOCKDEV = {"node-name": "drive-1", "driver": "raw", "read-only": False,
                 "file": {"driver": "file", "filename": "/dev/loop0"}}


def test_kata_shapes_are_accepted():
    assert validate(KATA_BLOCKDEV, BLOCKDEV_ADD) == KATA_BLOCKDEV
    with_aio = json.loads(json.dumps(KATA_BLOCKDEV))
    with_aio["file"]["aio"] = "native"
    assert validate(with_aio, BLOCKDEV_ADD) == with_aio
    dev = {"id": "drive-1", "driver": "virtio-blk-mmio", "drive": "drive-1", "addr": "0x1"}
    assert validate(dev, DEVICE_ADD) == dev
    assert validate({"id": "drive-1"}, DEVICE_DEL) == {"id": "drive-1"}


@pytest.mark.parametrize("args, words", [
    ({**KATA_BLOCKDEV, "readonly": True}, "Parameter 'readonly' is unexpected"),
    ({"driver": "raw", "file": KATA_BLOCKDEV["file"]}, "Parameter 'node-name' is missing"),
    ({**KATA_BLOCKDEV, "read-only": "yes"}, "'read-only', expected: boolean"),
    ({**KATA_BLOCKDEV, "file": "/dev/loop0"}, "'file', expected: object"),
    ({**KATA_BLOCKDEV, "file": {"driver": "file"}}, "'file.filename' is missing"),
    ({**KATA_BLOCKDEV, "file": {"driver": "file", "filename": "f", "x": 1}},
     "'file.x' is unexpected"),
    ({**KATA_BLOCKDEV, "throttling.iops-total": True}, "expected: unsigned integer"),
    ({**KATA_BLOCKDEV, "throttling.iops-total": -1}, "expected: unsigned integer"),
])
def test_schema_errors_name_the_argument(args, words):
    with pytest.raises(QmpInputError, match=words.replace(".", r"\.").replace("'", "'")):
        validate(args, BLOCKDEV_ADD)


def test_device_add_addr_must_be_a_string():
    with pytest.raises(QmpInputError, match="'addr', expected: string"):
        validate({"id": "a", "driver": "virtio-blk-mmio", "addr": 1}, DEVICE_ADD)


# ------------------------------------------------------------------ events
def test_event_shape_and_timestamp():
    bus = EventBus()
    seen = []
    bus.subscribe(seen.append)
    ev = bus.emit("STOP")
    assert seen == [ev]
    assert ev["event"] == "STOP" and ev["data"] == {}
    ts = ev["timestamp"]
    assert set(ts) == {"seconds", "microseconds"} and 0 <= ts["microseconds"] < 1_000_000
    assert ts["seconds"] > 1_600_000_000   # wall clock, not monotonic
    assert bus.emit("DEVICE_DELETED", {"device": "x"})["data"] == {"device": "x"}


def test_event_bus_survives_a_bad_subscriber_and_unsubscribes():
    bus = EventBus()
    seen = []

    def bad(_ev):
        raise RuntimeError("boom")

    bus.subscribe(bad)
    bus.subscribe(seen.append)
    bus.emit("A")
    bus.unsubscribe(seen.append)
    bus.unsubscribe(seen.append)   # unknown: ignored
    bus.emit("B")
    assert [e["event"] for e in seen] == ["A"]


def test_event_bus_is_thread_safe():
    bus = EventBus()
    seen_a, seen_b = [], []
    bus.subscribe(seen_a.append)
    bus.subscribe(seen_b.append)

    def emitter(n):
        for i in range(500):
            bus.emit("E", {"t": n, "i": i})

    threads = [threading.Thread(target=emitter, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(seen_a) == 4000
    assert seen_a == seen_b  # every subscriber sees the same total order


# ------------------------------------------------------------------ -qmp parsing
def test_parse_qmp_address_forms():
    a = parse_qmp_address("unix:/run/vm/qmp.sock,server,nowait")
    assert (a.kind, a.path, str(a)) == ("unix", "/run/vm/qmp.sock", "unix:/run/vm/qmp.sock")
    a = parse_qmp_address("tcp:127.0.0.1:4444,nowait,server")
    assert (a.kind, a.host, a.port) == ("tcp", "127.0.0.1", 4444)
    a = parse_qmp_address("tcp:[::1]:4444,server,nowait")
    assert (a.host, str(a)) == ("::1", "tcp:[::1]:4444")


@pytest.mark.parametrize("spec, words", [
    ("unix:/x.sock", "needs both 'server' and 'nowait'"),
    ("unix:/x.sock,server", "needs both"),
    ("unix:/x.sock,server,nowait,wait=off", "invalid QMP option 'wait=off'"),
    ("unix:,server,nowait", "empty path"),
    ("tcp:localhost:4444,server,nowait", "invalid IP address 'localhost'"),
    ("tcp:127.0.0.1:99999,server,nowait", "invalid port '99999'"),
    ("tcp:127.0.0.1,server,nowait", "lacks a port"),
    ("stdio,server,nowait", "invalid QMP socket 'stdio,server,nowait'"),
])
def test_parse_qmp_address_errors(spec, words):
    with pytest.raises(ConfigError, match=words.replace("[", r"\[")):
        parse_qmp_address(spec)


@pytest.mark.parametrize("raw", [b'{"\\nexecute":"cont"}', b'{"execute":"x\\u001b[31m\\r\\nforged"}',
                                 b'{"execute":"device_add","arguments":{"\\n":1}}'])
def test_names_with_control_characters_are_echoed_escaped(raw):
    """Found by fuzzing: a name with a JSON-escaped newline came back (and into the log)
    as a second line, so a client could forge log lines."""
    from stratovirt_py.qmp.commands import Dispatcher
    try:
        desc = Dispatcher(None).dispatch(parse_request(raw)).reply["error"]["desc"]
    except QmpInputError as err:
        desc = str(err)
    assert desc.isprintable() and ("\\n" in desc or "\\x1b" in desc), desc
