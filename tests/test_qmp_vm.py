"""QMP against a real VM: lifecycle commands, events to every client, ncat as documented."""

import array
import json
import os
import shutil
import socket
import subprocess
import time

import pytest

from vmtools import VmProcess

from stratovirt_py.vmm import MAX_NAMED_FDS

pytestmark = pytest.mark.kvm


def test_system_reset_ends_the_microvm(kvm, guest_elf, tmp_path):
    with VmProcess(["-kernel", str(guest_elf)], tmp_path) as vm:
        vm.wait_for(r"^heartbeat 1$")
        q = vm.qmp()
        assert q.cmd("system_reset") == {"return": {}}
        assert q.wait_event("RESET")["data"]["guest"] is False
        assert q.wait_event("SHUTDOWN")["data"] == {"guest": False, "reason": "host-qmp-system-reset"}
        assert vm.wait() == 0


def test_system_powerdown_and_events_reach_every_client(kvm, guest_elf, tmp_path):
    with VmProcess(["-kernel", str(guest_elf), "-append", "sv.hb=30"], tmp_path) as vm:
        vm.wait_for(r"^heartbeat 1$")
        a, b = vm.qmp(), vm.qmp()
        assert a.cmd("system_powerdown") == {"return": {}}
        for c in (a, b):
            ev = c.wait_event("POWERDOWN")
            assert set(ev["timestamp"]) == {"seconds", "microseconds"}
            assert abs(ev["timestamp"]["seconds"] - time.time()) < 60
        # The test guest ignores Ctrl+Alt+Del: it keeps running.
        assert a.cmd("query-status")["return"]["status"] == "running"
        a.cmd("stop")
        assert b.wait_event("STOP")
        a.cmd("cont")
        assert b.wait_event("RESUME")
        a.cmd("quit")
        assert b.wait_event("SHUTDOWN")["data"]["reason"] == "host-qmp-quit"


def test_query_commands(kvm, guest_elf, tmp_path):
    with VmProcess(["-smp", "2", "-kernel", str(guest_elf)], tmp_path) as vm:
        q = vm.qmp()
        v = q.cmd("query-version")["return"]
        assert v["qemu"]["major"] == 5 and "package" in v
        names = {c["name"] for c in q.cmd("query-commands")["return"]}
        assert {"stop", "cont", "migrate", "query-migrate", "device_add", "getfd"} <= names
        hp = q.cmd("query-hotpluggable-cpus")["return"]
        assert len(hp) == 2
        cpus = q.cmd("query-cpus")["return"]
        assert [c["CPU"] for c in cpus] == [0, 1]
        r = q.cmd("no-such-command")
        assert r["error"]["class"] == "CommandNotFound"
        q.cmd("quit")


def test_getfd_passes_a_descriptor(kvm, guest_elf, tmp_path):
    with VmProcess(["-kernel", str(guest_elf)], tmp_path) as vm:
        q = vm.qmp()
        r, w = os.pipe()
        inode = os.fstat(r).st_ino
        msg = json.dumps({"execute": "getfd", "arguments": {"fdname": "fd-test"}}).encode() + b"\n"
        q.sock.sendmsg([msg], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [r]))])
        assert q.reply() == {"return": {}}
        os.close(r)
        os.close(w)
        # The VMM holds the descriptor under its name (netdev_add fd=fd-test would take it).
        held = [os.readlink(f"/proc/{vm.proc.pid}/fd/{n}") for n in os.listdir(f"/proc/{vm.proc.pid}/fd")]
        assert f"pipe:[{inode}]" in held
        r = q.cmd("getfd", fdname="no-fd")
        assert "error" in r                  # an fd must come with the request
        # A bounded number of names: descriptors are held until used, so each one costs.
        for i in range(MAX_NAMED_FDS + 1):
            r, w = os.pipe()
            msg = json.dumps({"execute": "getfd", "arguments": {"fdname": f"n{i}"}}).encode()
            q.sock.sendmsg([msg + b"\n"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [r]))])
            reply = q.reply()
            os.close(r)
            os.close(w)
        assert f"{MAX_NAMED_FDS} descriptors are held already" in reply["error"]["desc"]
        for bad in ("", "a:b", "a\nb"):        # names netdev_add could not take
            r, w = os.pipe()
            msg = json.dumps({"execute": "getfd", "arguments": {"fdname": bad}}).encode()
            q.sock.sendmsg([msg + b"\n"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [r]))])
            assert "fdname" in q.reply()["error"]["desc"], bad
            os.close(r)
            os.close(w)
        held = [os.readlink(f"/proc/{vm.proc.pid}/fd/{n}") for n in os.listdir(f"/proc/{vm.proc.pid}/fd")]
        assert sum(1 for h in held if h.startswith("pipe:")) <= MAX_NAMED_FDS + 4
        q.cmd("quit")


@pytest.mark.skipif(not shutil.which("ncat") and os.environ.get("STRATOVIRT_REQUIRE_KVM") != "1",
                    reason="ncat is not installed (tools/test installs it)")
def test_snapshot_with_ncat_as_documented(kvm, guest_elf, tmp_path):
    tpl = tmp_path / "tpl"
    with VmProcess(["-kernel", str(guest_elf), "-append", "sv.hb=20"], tmp_path) as vm:
        vm.wait_for(r"^heartbeat 2$")
        vm.qmp().close()
        script = ('{"execute":"qmp_capabilities"}\n{"execute":"stop"}\n'
                  f'{{"execute":"migrate","arguments":{{"uri":"file:{tpl}"}}}}\n')
        out = subprocess.run(["ncat", "-U", vm.qmp_path], input=script, capture_output=True,
                             text=True, timeout=20).stdout
        lines = [json.loads(x) for x in out.splitlines() if x.strip()]
        assert "QMP" in lines[0]
        assert lines[1] == {"return": {}}
        assert any(m.get("event") == "STOP" for m in lines)
        assert [m for m in lines if "return" in m] == [{"return": {}}] * 3
        q = vm.qmp()
        deadline = time.time() + 20
        while q.cmd("query-migrate")["return"]["status"] != "completed" and time.time() < deadline:
            time.sleep(0.02)
        assert (tpl / "state").exists() and (tpl / "memory").exists()
        q.cmd("quit")


def test_migrate_cancel_leaves_previous_template(kvm, guest_elf, tmp_path):
    tpl = tmp_path / "tpl"
    with VmProcess(["-m", "1G", "-kernel", str(guest_elf), "-append", "sv.hb=20"], tmp_path) as vm:
        vm.wait_for(r"^heartbeat 1$")
        q = vm.qmp()
        q.cmd("migrate", uri=f"file:{tpl}")
        while q.cmd("query-migrate")["return"]["status"] in ("setup", "active"):
            time.sleep(0.01)
        state = (tpl / "state").read_bytes()
        q.cmd("cont")
        # Both requests in one write: the cancel lands while the 1 GiB is being scanned.
        q.send_raw(json.dumps({"execute": "migrate", "arguments": {"uri": f"file:{tpl}"}}).encode()
                   + b"\n" + b'{"execute":"migrate_cancel"}\n')
        assert q.reply() == {"return": {}} and q.reply() == {"return": {}}
        info = q.cmd("query-migrate")["return"]
        assert info["status"] == "cancelled", info
        assert (tpl / "state").read_bytes() == state
        assert not [p for p in tpl.iterdir() if p.name.startswith(".tmp")]
        q.cmd("quit")
