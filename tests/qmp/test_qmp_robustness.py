"""Bad input and bad clients: the server answers or drops one client, never dies."""

from __future__ import annotations

import json
import os
import socket
import struct
import threading
import time

import pytest

from stratovirt_py.qmp.protocol import MAX_MESSAGE_BYTES
from stratovirt_py.qmp import server as server_module
from stratovirt_py.qmp.server import MAX_BAD_IN_A_ROW


def _alive(c) -> None:
    assert c.cmd("query-status")["return"]["status"] == "running"


@pytest.mark.parametrize("line, words", [
    (b'{"execute": "query-status"', "JSON parse error"),
    (b"{]", "JSON parse error"),
    (b"hello", "JSON parse error"),
    (b"42", "must be a JSON object"),
    (b'["execute", "stop"]', "must be a JSON object"),
    (b'{"arguments": {}}', "lacks member 'execute'"),
    (b'{"execute": ["stop"]}', "'execute' must be a string"),
    (b'{"execute": null}', "'execute' must be a string"),
    (b'{"execute": "stop", "arguments": "now"}', "'arguments' must be an object"),
    (b'{"execute": "device_del", "arguments": {"id": 1}}',
     "Invalid parameter type for 'id', expected: string"),
    (b'{"execute": "balloon", "arguments": {"value": "1G"}}', "'value', expected: unsigned"),
    (b'{"execute": "balloon", "arguments": {"value": true}}', "'value', expected: unsigned"),
    (b'{"execute": "stop", "arguments": {"now": true}}', "Parameter 'now' is unexpected"),
    (b'{"execute": "device_add", "arguments": {"id": "x"}}', "Parameter 'driver' is missing"),
    (b'{"execute": "query-status", "arguments": {"x": Infinity}}', "JSON parse error"),
    (b"\xc3\x28\xff", "not valid UTF-8"),
    (b'{"execute": "query-status\xff"}', "not valid UTF-8"),
])
def test_bad_input_gets_a_generic_error_and_the_connection_stays(client, line, words):
    client.send(line + b"\n")
    reply = client.read_reply()
    assert reply["error"]["class"] == "GenericError", reply
    assert words in reply["error"]["desc"]
    _alive(client)


def test_unknown_command_is_command_not_found(client):
    assert client.cmd("human-monitor-command", {"command-line": "info"})["error"] == {
        "class": "CommandNotFound",
        "desc": "The command human-monitor-command has not been found"}
    _alive(client)


def test_several_commands_in_one_write(client):
    client.send(b'{"execute":"query-status","id":1}\n{"execute":"query-version","id":2}\n'
                b'{"execute":"nope","id":3}{"execute":"query-migrate","id":4}\r\n')
    replies = [client.read_reply() for _ in range(4)]
    assert [r["id"] for r in replies] == [1, 2, 3, 4]
    assert "error" in replies[2] and replies[3]["return"] == {"status": "none"}


def test_a_line_split_across_writes(client):
    msg = b'{"execute":"query-status","id":"split"}\n'
    for i in range(len(msg)):
        client.send(msg[i:i + 1])
        time.sleep(0.0005 if i % 7 else 0)
    assert client.read_reply()["id"] == "split"


def test_very_long_line_errors_then_resyncs(client, server):
    big = b'{"execute":"device_del","arguments":{"id":"' + b"x" * (MAX_MESSAGE_BYTES + 10)
    client.send(big + b'"}}\n{"execute":"query-status","id":"after"}\n')
    reply = client.read_reply()
    assert reply["error"]["class"] == "GenericError"
    assert "too long" in reply["error"]["desc"]
    assert client.read_reply()["id"] == "after"
    # an endless line without a newline stays bounded and the server keeps going
    client.send(b"a" * (3 * MAX_MESSAGE_BYTES) + b"\n")
    assert "too long" in client.read_reply()["error"]["desc"]
    _alive(client)


def test_client_vanishing_mid_reply_does_not_hurt_others(server, connect, wait, bus):
    other = connect()
    other.cmd("qmp_capabilities")
    for _ in range(5):
        gone = connect()
        gone.cmd("qmp_capabilities")
        gone.send(b'{"execute":"query-commands"}\n' * 500)
        # RST instead of FIN: writes to it fail with ECONNRESET/EPIPE
        gone.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        gone.close()
        bus.emit("TICK")
    assert other.cmd("query-status")["return"]["running"] is True
    assert wait(lambda: server.client_count == 1)
    assert sum(1 for e in other.events if e["event"] == "TICK") == 5


def test_a_flooding_client_does_not_starve_another(server, connect):
    flooder = connect()
    stop = threading.Event()

    def flood():
        try:
            while not stop.is_set():
                flooder.send(b'{"execute":"query-status"}\n' * 200)
        except OSError:
            pass

    t = threading.Thread(target=flood, daemon=True)
    t.start()
    try:
        polite = connect()
        start = time.monotonic()
        for i in range(50):
            assert polite.cmd("query-status", id=i)["id"] == i
        assert time.monotonic() - start < 10
    finally:
        stop.set()
        flooder.sock.shutdown(socket.SHUT_RDWR)
        t.join(5)


def test_a_client_that_never_reads_is_bounded(server, connect, bus, wait):
    deaf = connect()
    deaf.cmd("qmp_capabilities")
    deaf.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    payload = {"blob": "x" * 60000}
    for _ in range(400):      # ~24 MiB of events, more than the server will hold for it
        bus.emit("BIG", payload)
    polite = connect()
    assert wait(lambda: server.client_count == 1, timeout=10)   # the deaf one was dropped
    assert polite.cmd("query-status")["return"]["running"] is True


def test_half_closed_client_still_gets_its_replies(server, connect):
    c = connect()
    c.send(b'{"execute":"query-status","id":1}\n{"execute":"query-version","id":2}')
    c.sock.shutdown(socket.SHUT_WR)    # what `echo ... | ncat -U` does at end of input
    assert c.read_reply()["id"] == 1
    assert c.read_reply()["id"] == 2
    with pytest.raises(EOFError):
        c.read_line()


def test_many_clients_at_once(server, connect):
    clients = [connect() for _ in range(20)]
    for i, c in enumerate(clients):
        c.send(json.dumps({"execute": "query-status", "id": i}).encode() + b"\n")
    for i, c in enumerate(clients):
        assert c.read_reply()["id"] == i


def _thread_cpu_seconds(native_id: int) -> float:
    with open(f"/proc/self/task/{native_id}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_a_client_that_sends_but_never_reads_costs_no_cpu(server, connect, wait):
    """Replies pile up to the high-water mark, then the server stops reading that client
    and waits for it to become writable; it must not poll it in a busy loop."""
    deaf = connect()
    deaf.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    deaf.sock.setblocking(False)
    try:
        for _ in range(2000):          # ~2000 query-commands replies: well past HIGH_WATER
            deaf.sock.send(b'{"execute":"query-commands"}\n' * 4)
    except BlockingIOError:
        pass                           # the server stopped reading us: that is the point
    time.sleep(0.5)                    # let it reach the steady state
    tid = server._thread.native_id
    before = _thread_cpu_seconds(tid)
    time.sleep(1.0)
    assert _thread_cpu_seconds(tid) - before < 0.2
    polite = connect()
    assert polite.cmd("query-status")["return"]["running"] is True


@pytest.mark.parametrize("flood", [b"[" * (8 << 20), b"{" * (8 << 20), b"[]" * (4 << 20)])
def test_bracket_floods_are_rejected_fast(server, connect, wait, flood):
    """Megabytes of brackets: one error for a too-deep message, or the connection closed
    after a run of malformed ones; seconds, not minutes, and others are served meanwhile."""
    c = connect(timeout=10)
    polite = connect()
    start = time.monotonic()

    def send():
        try:
            c.send(flood + b"\n")
        except OSError:
            pass                   # closed on us mid-flood: fine
    t = threading.Thread(target=send, daemon=True)
    t.start()
    if flood.startswith(b"[]"):
        replies = []
        try:
            while True:
                replies.append(c.read_reply())
        except (EOFError, OSError):
            pass
        assert len(replies) == MAX_BAD_IN_A_ROW + 1
        assert "malformed messages in a row" in replies[-1]["error"]["desc"]
    else:
        assert "nested more than" in c.read_reply()["error"]["desc"]
        assert c.cmd("query-status")["return"]["running"] is True
    t.join(10)
    assert time.monotonic() - start < 10
    assert polite.cmd("query-status")["return"]["running"] is True


def test_idle_connections_do_not_lock_the_orchestrator_out(server, connect, wait, monkeypatch):
    monkeypatch.setattr(server_module, "IDLE_EVICT_SECONDS", 0.5)
    idle = [connect() for _ in range(server_module.MAX_CLIENTS)]
    assert wait(lambda: server.client_count == server_module.MAX_CLIENTS)
    with pytest.raises((EOFError, OSError)):
        connect(timeout=2).read_line()    # all of them fresh: the newcomer is refused
    time.sleep(0.6)
    idle[-1].cmd("query-status")          # one is busy now: it is not the one closed
    orchestrator = connect()
    assert orchestrator.cmd("query-status")["return"]["running"] is True
    with pytest.raises((EOFError, OSError)):
        idle[0].read_line()               # the longest-idle one made room
    assert idle[-1].cmd("query-status")["return"]["running"] is True
