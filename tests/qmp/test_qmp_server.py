"""The server over raw sockets: every command, events, ordering, lifecycle."""

from __future__ import annotations

import array
import json
import os
import socket
import threading

import pytest

from stratovirt_py.errors import ConfigError
from stratovirt_py.qmp import COMMANDS, QmpServer
from stratovirt_py.qmp.protocol import GREETING_LINE


def test_greeting_bytes(client):
    assert client.greeting_line == GREETING_LINE
    assert json.loads(client.greeting_line)["QMP"]["version"]["qemu"]["major"] == 5


def test_capabilities_and_query_status(client, machine):
    assert client.cmd("qmp_capabilities") == {"return": {}}
    assert client.cmd("qmp_capabilities", {}) == {"return": {}}   # repeated: fine, as StratoVirt
    assert client.cmd("query-status") == {
        "return": {"running": True, "singlestep": False, "status": "running"}}
    machine.run_state = "inmigrate"
    assert client.cmd("query-status")["return"] == {
        "running": False, "singlestep": False, "status": "inmigrate"}


def test_stop_emits_stop_before_its_reply_and_cont_resume(client, machine):
    client.cmd("qmp_capabilities")
    client.send(b'{"execute":"stop"}\n')
    first = client.read_msg()
    assert first["event"] == "STOP" and first["data"] == {}
    assert set(first["timestamp"]) == {"seconds", "microseconds"}
    assert client.read_msg() == {"return": {}}
    assert client.cmd("query-status")["return"]["status"] == "paused"
    # stop while paused: plain success, as StratoVirt (its vCPU pause is a no-op)
    assert client.cmd("stop") == {"return": {}}
    client.send(b'{"execute":"cont"}\n')
    assert client.read_msg()["event"] == "RESUME"
    assert client.read_msg() == {"return": {}}
    assert client.cmd("cont") == {"return": {}}                   # cont while running
    assert machine.calls.count(("pause",)) == 2


def test_reset_and_powerdown_events(client, machine):
    client.cmd("qmp_capabilities")
    assert client.cmd("system_reset") == {"return": {}}
    assert client.cmd("system_powerdown") == {"return": {}}
    assert [e["event"] for e in client.events] == ["RESET", "POWERDOWN"]


def test_query_cpus_shapes(client):
    cpus = client.cmd("query-cpus")["return"]
    assert cpus[0] == {"CPU": 0, "thread_id": 1000, "arch": "x86", "current": True,
                       "halted": False, "qom_path": "/machine/unattached/device[0]",
                       "props": {"socket-id": 0, "core-id": 0, "thread-id": 0}}
    hot = client.cmd("query-hotpluggable-cpus")["return"]
    assert hot[1]["props"]["core-id"] == 1 and hot[1]["vcpus-count"] == 1


def test_query_version_and_commands(client):
    v = client.cmd("query-version")["return"]
    assert v == {"qemu": {"micro": 1, "minor": 0, "major": 5},
                 "StratoVirt": {"micro": 1, "minor": 0, "major": 0}, "package": ""}
    names = [c["name"] for c in client.cmd("query-commands")["return"]]
    assert names == list(COMMANDS)
    for needed in ("qmp_capabilities", "stop", "cont", "quit", "system_reset",
                   "system_powerdown", "query-status", "query-cpus",
                   "query-hotpluggable-cpus", "query-version", "query-commands", "getfd",
                   "migrate", "query-migrate", "migrate_cancel", "blockdev-add",
                   "netdev_add", "device_add", "device_del", "balloon", "query-balloon"):
        assert needed in names


def test_id_is_echoed_whatever_its_type(client):
    assert client.cmd("query-status", id="a")["id"] == "a"
    assert client.cmd("query-status", id=7)["id"] == 7
    assert client.cmd("query-status", id={"x": [1]})["id"] == {"x": [1]}
    assert client.cmd("nope", id=3) == {
        "error": {"class": "CommandNotFound", "desc": "The command nope has not been found"},
        "id": 3}
    assert client.cmd("device_del", {}, id="e")["id"] == "e"
    assert "id" not in client.cmd("query-status")


def test_migrate_commands(client, machine):
    assert client.cmd("query-migrate") == {"return": {"status": "none"}}
    assert client.cmd("migrate", {"uri": "file:/tmp/tpl"}) == {"return": {}}
    assert client.cmd("query-migrate") == {"return": {"status": "completed"}}
    assert client.cmd("migrate", {"uri": "tcp:1.2.3.4:5"})["error"] == {
        "class": "GenericError", "desc": "Invalid uri: tcp:1.2.3.4:5"}
    assert client.cmd("migrate_cancel") == {"return": {}}
    assert client.cmd("migrate", {"uri": 5})["error"]["desc"] == (
        "Invalid parameter type for 'uri', expected: string")
    assert ("migrate", "file:/tmp/tpl") in machine.calls


def test_machine_error_classes_pass_through(client):
    assert client.cmd("balloon", {"value": 1 << 30})["error"] == {
        "class": "DeviceNotActive", "desc": "No balloon device has been activated"}
    assert client.cmd("query-balloon")["error"]["class"] == "DeviceNotActive"
    assert client.cmd("device_del", {"id": "ghost"})["error"] == {
        "class": "DeviceNotFound", "desc": "Device 'ghost' not found"}
    assert client.cmd("balloon", {"value": -1})["error"]["class"] == "GenericError"


def test_unexpected_exception_becomes_generic_error(client, machine, caplog):
    machine.explode = ZeroDivisionError("bug")
    reply = client.cmd("query-balloon")
    assert reply["error"]["class"] == "GenericError"
    assert "ZeroDivisionError" in reply["error"]["desc"]
    assert "unexpected error" in caplog.text
    assert client.cmd("query-status")["return"]["running"] is True   # still serving


def test_getfd_takes_the_fd_passed_with_scm_rights(client, machine):
    r, w = os.pipe()
    try:
        msg = b'{"execute":"getfd","arguments":{"fdname":"tap0"}}\n'
        client.sock.sendmsg([msg], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                     array.array("i", [w]).tobytes())])
        assert client.read_reply() == {"return": {}}
        os.write(machine.fds["tap0"], b"hi")     # the machine got a working dup of w
        assert os.read(r, 2) == b"hi"
    finally:
        os.close(r)
        os.close(w)


def test_getfd_without_an_fd_fails(client, machine):
    assert client.cmd("getfd", {"fdname": "x"})["error"] == {
        "class": "GenericError", "desc": "Invalid SCM message"}
    assert client.cmd("getfd")["error"]["desc"] == "Parameter 'fdname' is missing"
    assert "x" not in machine.fds


def test_unclaimed_fds_are_closed_on_disconnect(server, connect, wait):
    c = connect()
    r, w = os.pipe()
    c.sock.sendmsg([b'{"execute":"query-status"}\n'],
                   [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [w]).tobytes())])
    c.read_reply()
    os.close(w)
    c.close()
    # once the server closes its copy, the pipe has no writer left: read sees EOF
    assert wait(lambda: server.client_count == 0)
    assert os.read(r, 1) == b""
    os.close(r)


def test_quit_replies_first_then_asks_the_machine(client, machine):
    client.cmd("qmp_capabilities")
    reply_seen = threading.Event()
    order = []
    # quit() blocks until the client has the reply: if the server called quit()
    # before sending it, the reply would never come and the wait would fail.
    machine.quit_hook = lambda: order.append(reply_seen.wait(5))
    client.send(b'{"execute":"quit","id":"q"}\n')
    assert client.read_msg() == {"return": {}, "id": "q"}
    reply_seen.set()
    assert machine.quit_called.wait(5)
    assert order == [True]
    shutdown = client.read_msg()
    assert shutdown["event"] == "SHUTDOWN"
    assert shutdown["data"] == {"guest": False, "reason": "host-qmp-quit"}


def test_events_reach_every_client(server, connect, bus):
    a, b = connect(), connect()
    a.cmd("qmp_capabilities")
    b.cmd("qmp_capabilities")
    bus.emit("DEVICE_DELETED", {"device": "d", "path": "/machine/peripheral/d"})
    for c in (a, b):
        ev = c.read_msg()
        assert ev["event"] == "DEVICE_DELETED" and ev["data"]["device"] == "d"


def test_no_events_before_negotiation_for_a_negotiating_client(server, connect, bus):
    c = connect()
    bus.emit("EARLY")
    assert c.cmd("qmp_capabilities") == {"return": {}}   # no event ahead of it
    bus.emit("LATE")
    assert c.read_msg()["event"] == "LATE"


def test_a_client_that_never_negotiates_still_sees_stop(server, connect):
    # StratoVirt's documentation: ncat, {"execute":"stop"}, STOP event, {"return":{}}
    c = connect()
    c.send(b'{"execute":"stop"}\n')
    assert c.read_msg()["event"] == "STOP"
    assert c.read_msg() == {"return": {}}


def test_events_from_another_thread(client, bus):
    client.cmd("qmp_capabilities")
    t = threading.Thread(target=lambda: [bus.emit("VCPU", {"i": i}) for i in range(100)])
    t.start()
    t.join()
    got = [client.read_msg()["data"]["i"] for _ in range(100)]
    assert got == list(range(100))


def test_unix_socket_file_lifecycle(machine, bus, qmp_path):
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(qmp_path)          # a leftover socket file from an earlier run
    stale.close()
    srv = QmpServer(machine, bus, [f"unix:{qmp_path},server,nowait"])
    srv.start()
    try:
        assert os.stat(qmp_path).st_mode & 0o777 == 0o600
        c = socket.socket(socket.AF_UNIX)
        c.connect(qmp_path)        # bound before start() returned
        c.close()
    finally:
        srv.close()
    assert not os.path.exists(qmp_path)
    srv.close()                    # idempotent


def test_a_regular_file_is_not_replaced(machine, bus, qmp_path):
    with open(qmp_path, "w") as f:
        f.write("mine")
    with pytest.raises(ConfigError, match="exists and is not a socket"):
        QmpServer(machine, bus, [f"unix:{qmp_path},server,nowait"]).start()
    with pytest.raises(ConfigError, match="cannot listen for QMP"):
        QmpServer(machine, bus, ["unix:/nonexistent-dir/q.sock,server,nowait"]).start()
    assert open(qmp_path).read() == "mine"


def test_tcp_and_unix_at_once(machine, bus, qmp_path):
    srv = QmpServer(machine, bus, ["tcp:127.0.0.1:0,server,nowait",
                                   f"unix:{qmp_path},server,nowait"])
    srv.start()
    try:
        tcp_addr = srv.bound_addresses[0]
        port = int(tcp_addr.rsplit(":", 1)[1])
        assert port > 0
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        f = s.makefile("rb")
        assert f.readline() == GREETING_LINE
        s.sendall(b'{"execute":"query-status"}')   # no newline, like qemu.qmp
        assert json.loads(f.readline())["return"]["status"] == "running"
        s.close()
    finally:
        srv.close()


def test_tcp_off_loopback_warns_that_qmp_has_no_authentication(machine, bus, caplog):
    for host, warned in (("127.0.0.1", False), ("0.0.0.0", True)):
        caplog.clear()
        srv = QmpServer(machine, bus, [f"tcp:{host}:0,server,nowait"])
        srv.start()
        srv.close()
        assert ("no authentication" in caplog.text) == warned, (host, caplog.text)


def test_close_with_clients_connected(machine, bus, qmp_path):
    srv = QmpServer(machine, bus, [f"unix:{qmp_path},server,nowait"])
    srv.start()
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(5)
    s.connect(qmp_path)
    f = s.makefile("rb")
    assert f.readline() == GREETING_LINE
    srv.close()
    assert f.readline() == b""   # the server hung up
    s.close()


def test_close_from_inside_quit_does_not_deadlock(machine, bus, qmp_path):
    srv = QmpServer(machine, bus, [f"unix:{qmp_path},server,nowait"])
    srv.start()
    machine.quit_hook = srv.close   # a VMM that closes QMP from quit()
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(5)
    s.connect(qmp_path)
    f = s.makefile("rb")
    f.readline()
    s.sendall(b'{"execute":"quit"}\n')
    assert json.loads(f.readline()) == {"return": {}}
    assert machine.quit_called.wait(5)
    assert json.loads(f.readline())["event"] == "SHUTDOWN"
    assert f.readline() == b""
    s.close()
    srv._thread.join(5)
    assert not srv._thread.is_alive() and not os.path.exists(qmp_path)


def test_too_many_fds_at_once_are_closed_not_leaked(client, machine):
    pipes = [os.pipe() for _ in range(40)]
    try:
        writers = array.array("i", [w for _r, w in pipes])
        client.sock.sendmsg([b'{"execute":"getfd","arguments":{"fdname":"a"}}\n'],
                           [(socket.SOL_SOCKET, socket.SCM_RIGHTS, writers.tobytes())])
        assert client.read_reply() == {"return": {}}
        for _r, w in pipes:
            os.close(w)
        # the machine holds one; the others are either queued for later getfd
        # calls (at most 16) or already closed by the server
        open_writers = sum(1 for r, _w in pipes if _has_writer(r))
        assert 1 <= open_writers <= 1 + 16
        assert client.cmd("query-status")["return"]["running"] is True
    finally:
        for r, _w in pipes:
            os.close(r)


def _has_writer(r: int) -> bool:
    os.set_blocking(r, False)
    try:
        return os.read(r, 1) != b""
    except BlockingIOError:
        return True
