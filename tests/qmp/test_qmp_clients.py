"""Real clients: ncat as the documentation uses it, qemu.qmp, Kata's conversation,
and a property test throwing random bytes and JSON at the server."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import uuid

import pytest

from stratovirt_py.qmp import COMMANDS

try:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
    from fuzz_harness import examples
except ImportError:  # pragma: no cover - hypothesis is a test dependency
    given = None


# ------------------------------------------------------------------ ncat
def _ncat() -> str:
    path = shutil.which("ncat")
    if path is None:
        if os.environ.get("STRATOVIRT_REQUIRE_KVM"):
            pytest.fail("ncat is required (apt-get install -y ncat)")
        pytest.skip("ncat not installed (apt-get install -y ncat)")
    return path


def _ncat_session(path: str, text: str) -> list:
    out = subprocess.run([_ncat(), "-U", path], input=text.encode(),
                         capture_output=True, timeout=20, check=True).stdout
    assert out.endswith(b"\r\n")
    return [json.loads(line) for line in out.split(b"\r\n") if line]


def test_ncat_echo_capabilities(server, qmp_path):
    # echo '{"execute":"qmp_capabilities"}' | ncat -U SOCKET
    msgs = _ncat_session(qmp_path, '{"execute":"qmp_capabilities"}\n')
    assert msgs[0]["QMP"]["version"]["StratoVirt"] == {"micro": 1, "minor": 0, "major": 0}
    assert msgs[1:] == [{"return": {}}]


def test_ncat_snapshot_conversation_from_the_docs(server, qmp_path, machine):
    # docs/snapshot: pause with `stop`, then `migrate`, then `query-migrate`
    msgs = _ncat_session(qmp_path, '{"execute":"stop"}\n')
    assert msgs[1]["event"] == "STOP" and msgs[2] == {"return": {}}
    msgs = _ncat_session(qmp_path,
                         '{"execute":"migrate", "arguments":{"uri":"file:/tmp/template"}}\n'
                         '{"execute":"query-migrate"}\n')
    assert msgs[1:] == [{"return": {}}, {"return": {"status": "completed"}}]
    assert ("migrate", "file:/tmp/template") in machine.calls


# ------------------------------------------------------------------ qemu.qmp
def test_qemu_qmp_client(server, qmp_path, bus):
    qmp_mod = pytest.importorskip("qemu.qmp")

    async def session() -> None:
        qmp = qmp_mod.QMPClient("stratovirt-py-test")
        await qmp.connect(qmp_path)
        try:
            assert qmp.greeting.QMP.version["qemu"]["major"] == 5
            status = await qmp.execute("query-status")
            assert status == {"running": True, "singlestep": False, "status": "running"}
            with pytest.raises(qmp_mod.ExecuteError, match="has not been found"):
                await qmp.execute("no-such-command")
            await qmp.execute("stop")
            event = await asyncio.wait_for(qmp.events.get(), 5)
            assert event["event"] == "STOP"
            bus.emit("DEVICE_DELETED", {"device": "blk1", "path": "/machine/peripheral/blk1"})
            event = await asyncio.wait_for(qmp.events.get(), 5)
            assert event["data"]["device"] == "blk1"
            assert (await qmp.execute("query-status"))["status"] == "paused"
        finally:
            await qmp.disconnect()

    asyncio.run(asyncio.wait_for(session(), 20))


# ------------------------------------------------------------------ Kata
@pytest.mark.parametrize("aio", [False, True])
def test_kata_block_hotplug_conversation(client, machine, aio):
    """What kata-containers' stratovirt.go (through govmm) sends, in order."""
    greeting = json.loads(client.greeting_line)
    assert greeting["QMP"]["version"]["qemu"]["major"] == 5   # > 2: node-name format
    assert client.cmd("qmp_capabilities") == {"return": {}}
    file_opts = {"driver": "file", "filename": "/dev/loop7"}
    if aio:
        file_opts["aio"] = "native"
    blockdev = {"node-name": "drive-abc", "driver": "raw", "read-only": False,
                "file": file_opts}
    assert client.cmd("blockdev-add", blockdev) == {"return": {}}
    device = {"id": "drive-abc", "driver": "virtio-blk-mmio", "drive": "drive-abc",
              "addr": "0x1"}
    assert client.cmd("device_add", device) == {"return": {}}
    assert machine.blockdevs["drive-abc"] == blockdev and machine.devices["drive-abc"] == device
    assert client.cmd("device_del", {"id": "drive-abc"}) == {"return": {}}
    deleted = [e for e in client.events if e["event"] == "DEVICE_DELETED"]
    assert deleted and deleted[0]["data"]["device"] == "drive-abc"
    assert "drive-abc" not in machine.devices


def test_kata_netdev_add_shape(client, machine):
    args = {"id": "eth0", "type": "tap", "ifname": "tap0_kata", "fds": "fd0:fd1",
            "vhost": True, "vhostfds": "vfd0"}
    assert client.cmd("netdev_add", args) == {"return": {}}
    dev = {"id": "eth0", "driver": "virtio-net-mmio", "netdev": "eth0",
           "mac": "02:42:ac:11:00:02", "addr": "0x2"}
    assert client.cmd("device_add", dev) == {"return": {}}
    assert machine.netdevs["eth0"] == args


# ------------------------------------------------------------------ property test
def _probe(client) -> None:
    """Resynchronise and check the server still answers this connection."""
    probe_id = uuid.uuid4().hex
    client.send(b'\n{"execute":"query-status","id":"' + probe_id.encode() + b'"}\n')
    while True:
        reply = client.read_reply()
        if reply.get("id") == probe_id:
            assert reply["return"]["singlestep"] is False
            return


if given is not None:
    json_values = st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False,
                                                               allow_infinity=False)
        | st.text(),
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner,
                                                                    max_size=4),
        max_leaves=12)
    # Commands that keep the fake machine usable (quit would not hurt either).
    command_names = st.sampled_from(sorted(COMMANDS) + ["nope", ""])
    requests = st.fixed_dictionaries(
        {"execute": command_names},
        optional={"arguments": json_values | st.dictionaries(
            st.sampled_from(["id", "uri", "value", "fdname", "node-name", "file", "driver",
                             "addr", "drive", "read-only"]), json_values, max_size=4),
            "id": json_values})

    FUZZ = settings(max_examples=examples(100), deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])

    @FUZZ
    @given(payload=st.binary(max_size=512))
    def test_random_bytes_never_break_the_server(connect, payload):
        c = connect()
        try:
            c.send(payload)
            _probe(c)
        finally:
            c.close()

    @FUZZ
    @given(values=st.lists(json_values | requests, min_size=1, max_size=5))
    def test_random_json_never_breaks_the_server(connect, values):
        c = connect()
        try:
            for value in values:
                c.send(json.dumps(value).encode() + b"\n")
            _probe(c)
        finally:
            c.close()
