"""Least privilege: once the VM runs, every thread of the VMM holds no capability, has
an empty bounding set and no_new_privs, with the seccomp filter on or off; creating a tap
by name (CAP_NET_ADMIN) is then refused with the reason."""

import os

import pytest

from test_net import MEM, NetVm, netns  # noqa: F401  (netns is a fixture)
from test_seccomp import _wait_stderr
from test_snapshot import hb_args
from vmtools import VmProcess

pytestmark = pytest.mark.kvm

CAP_SETS = ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")


def _fields(path):
    with open(path) as f:
        return dict(line.split(":\t", 1) for line in f.read().splitlines() if ":\t" in line)


def _kernel_worker(pid, tid):
    """KVM's kvm-nx-lpage-recovery runs in the VMM's thread group but only in the kernel."""
    with open(f"/proc/{pid}/task/{tid}/stat") as f:
        flags = int(f.read().rsplit(")", 1)[1].split()[6])
    return bool(flags & 0x4000)         # PF_USER_WORKER


@pytest.fixture
def privileged():
    caps = _fields("/proc/self/status")
    if int(caps["CapEff"], 16) == 0 or int(caps["CapBnd"], 16) == 0:
        pytest.skip("the suite runs without capabilities: nothing to see dropped")


@pytest.mark.parametrize("disable", [False, True])
def test_every_thread_gives_up_its_capabilities(kvm, privileged, guest_elf, tmp_path, disable):
    args = hb_args(guest_elf) + ["-D", "-smp", "2"] + (["-disable-seccomp"] if disable else [])
    with VmProcess(args, tmp_path) as vm:
        _wait_stderr(vm, "seccomp: filters")
        vm.wait_for(r"^heartbeat 2$")
        q = vm.qmp()
        vcpus = {c["thread_id"] for c in q.cmd("query-cpus")["return"]}
        tasks = {int(t) for t in os.listdir(f"/proc/{vm.proc.pid}/task")
                 if not _kernel_worker(vm.proc.pid, t)}
        assert vcpus <= tasks and len(tasks) >= len(vcpus) + 3     # main, I/O, QMP too
        for tid in tasks:
            status = _fields(f"/proc/{vm.proc.pid}/task/{tid}/status")
            assert {s: int(status[s], 16) for s in CAP_SETS} == dict.fromkeys(CAP_SETS, 0), (tid, status)
            assert status["NoNewPrivs"].strip() == "1", (tid, status)
            assert status["Seccomp"].strip() == ("0" if disable else "2")
        assert q.cmd("query-status")["return"]["status"] == "running"
        q.cmd("quit")
        assert vm.wait() == 0


def test_a_tap_is_not_created_by_name_once_the_vm_runs(kvm, privileged, netns, guest_elf, tmp_path):
    args = ["-m", MEM, "-kernel", str(guest_elf), "-append", "sv.hb=50"]
    with NetVm(args, tmp_path, ns=netns) as vm:
        q = vm.qmp()
        assert q.cmd("netdev_add", id="new", ifname="svnew0") == {"return": {}}
        r = q.cmd("device_add", id="net1", driver="virtio-net-mmio", netdev="new")
        desc = r["error"]["desc"]
        assert "CAP_NET_ADMIN" in desc and "ip tuntap add svnew0 mode tap" in desc, r
        assert "gives up" in desc, r
        # a tap that exists (made without an owner, or owned by the VMM's user) still attaches
        assert q.cmd("netdev_add", id="old", ifname="svtap1") == {"return": {}}
        assert q.cmd("device_add", id="net2", driver="virtio-net-mmio", netdev="old") == {"return": {}}
        q.cmd("quit")
        assert vm.wait() == 0
