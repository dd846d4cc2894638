"""The critical path of a warm start (and of a cold boot) is a budget that cannot
silently grow: the modules a real ``stratovirt`` process has imported when its first
vCPU enters KVM_RUN must stay within the lists below.

The VMM is started exactly as the ``stratovirt`` front end starts it (``python -I -S
_start.py``), with one change made from outside: a wrapper stops the process at its
first ``Vcpu.run_once`` and prints ``sys.modules``.  Adding an import to that path
(directly, or by importing something that imports it) fails this test; move the work
after the vCPU runs, or make it lazy.  Shrinking the path only needs the list shrunk.
"""

import os
import subprocess
import sys

import pytest

import stratovirt_py
from test_snapshot import hb_args, take_template

pytestmark = pytest.mark.kvm

START = os.path.join(os.path.dirname(stratovirt_py.__file__), "_start.py")

# What the interpreter itself has loaded with -I -S, and what the VMM may add.
STDLIB = {
    "__future__", "_bisect", "_cffi_backend", "_collections", "_collections_abc", "_functools",
    "_heapq", "_json", "_operator", "_sha256", "_stat", "_struct", "_weakrefset", "binascii",
    "bisect", "collections", "errno", "fcntl", "functools", "genericpath", "heapq", "itertools",
    "keyword", "mmap", "operator", "os", "os.path", "posixpath", "reprlib", "select", "stat",
    "struct", "threading", "types", "zlib",
}
COMMON = {
    "stratovirt_py", "stratovirt_py.boot", "stratovirt_py.boot.cpu", "stratovirt_py.boot.layout",
    "stratovirt_py.builder", "stratovirt_py.cli", "stratovirt_py.cmdline", "stratovirt_py.config",
    "stratovirt_py.devices", "stratovirt_py.devices.bus", "stratovirt_py.devices.chardev",
    "stratovirt_py.devices.i8042", "stratovirt_py.devices.iothread", "stratovirt_py.devices.power",
    "stratovirt_py.devices.serial", "stratovirt_py.devices.setup", "stratovirt_py.devices.tap",
    "stratovirt_py.devices.virtio", "stratovirt_py.devices.virtio.blk",
    "stratovirt_py.devices.virtio.device", "stratovirt_py.devices.virtio.mmio",
    "stratovirt_py.devices.virtio.net", "stratovirt_py.devices.virtio.queue", "stratovirt_py.errors",
    "stratovirt_py.kvm", "stratovirt_py.kvm._kvm_cffi", "stratovirt_py.kvm._kvm_cffi.lib",
    "stratovirt_py.kvm.errors", "stratovirt_py.kvm.ioctls", "stratovirt_py.kvm.system",
    "stratovirt_py.kvm.vcpu", "stratovirt_py.kvm.vm", "stratovirt_py.logs", "stratovirt_py.memory",
    "stratovirt_py.qmp", "stratovirt_py.qmp.address", "stratovirt_py.qmp.events",
    "stratovirt_py.qmp.listen", "stratovirt_py.pinning", "stratovirt_py.record", "stratovirt_py.vcpu_thread",
    "stratovirt_py.vmm",
}
RESTORE = STDLIB | COMMON | {
    "_socket", "stratovirt_py.jsonread", "stratovirt_py.migration", "stratovirt_py.migration.codec",
    "stratovirt_py.migration.compat", "stratovirt_py.migration.digest",
    "stratovirt_py.migration.format", "stratovirt_py.migration.memfile",
    "stratovirt_py.migration.restore", "stratovirt_py.migration.snapshot",
    "stratovirt_py.migration.vcache", "stratovirt_py.migration.vmstate",
}
BOOT = STDLIB | COMMON | {
    "_socket", "stratovirt_py.boot.loader", "stratovirt_py.boot.mptable", "stratovirt_py.boot.params",
}

# Loads _start.py as the front end would run it, stops at the first KVM_RUN.
PROBE = """
import os, sys
start = {start!r}
sys.argv = [start] + sys.argv[1:]
ns = {{"__name__": "probe", "__file__": start}}
exec(compile(open(start).read(), start, "exec"), ns)
ns["_paths"]()
from stratovirt_py.kvm import vcpu
def stop(self, *args):
    os.write(1, ("\\n".join(sorted(sys.modules)) + "\\n").encode())
    os._exit(0)
vcpu.Vcpu.run_once = stop
from stratovirt_py.cli import main
main(sys.argv[1:])
"""


def modules_before_first_run(args, tmp_path):
    """Run the VMM as the front end does; the modules loaded when the first vCPU runs."""
    wrapper = tmp_path / "probe.py"
    wrapper.write_text(PROBE.format(start=START))
    python = os.path.join(os.path.dirname(sys.executable), "python3")
    base = subprocess.run([python, "-I", "-S", "-c", "import sys; print('\\n'.join(sys.modules))"],
                          capture_output=True, text=True, check=True).stdout.split()
    r = subprocess.run([python, "-I", "-S", str(wrapper), *args,
                        "-qmp", f"unix:{tmp_path}/probe.sock,server,nowait", "-serial", "none"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    loaded = set(r.stdout.split())
    return loaded - set(base)


def _check(loaded, allowed, what):
    extra = sorted(loaded - allowed)
    assert not extra, (f"the {what} path now imports {extra} before the vCPU runs: make it lazy, "
                       f"or move it after Vmm.start (see tests/test_critical_path.py)")


def test_restore_imports_stay_within_budget(kvm, guest_elf, tmp_path):
    tpl = tmp_path / "tpl"
    take_template(guest_elf, tmp_path, tpl)
    # the steady state of warm starts: a template whose data was verified once already
    # (a first restore verifies it, with ctypes, and that is on its critical path)
    verify = os.path.join(os.path.dirname(sys.executable), "stratovirt-snapshot")
    subprocess.run([verify, "verify", str(tpl)], check=True, capture_output=True, timeout=60)
    loaded = modules_before_first_run(hb_args(guest_elf) + ["-incoming", f"file:{tpl}"], tmp_path)
    _check(loaded, RESTORE, "restore")
    assert "stratovirt_py.migration.restore" in loaded      # the probe really saw a restore


def test_boot_imports_stay_within_budget(kvm, guest_elf, tmp_path):
    loaded = modules_before_first_run(hb_args(guest_elf), tmp_path)
    _check(loaded, BOOT, "boot")
    assert "stratovirt_py.boot.loader" in loaded


def _allowed(pid, tid):
    with open(f"/proc/{pid}/task/{tid}/status") as f:
        for line in f:
            if line.startswith("Cpus_allowed_list:"):
                return line.split(":", 1)[1].strip()
    raise AssertionError("no Cpus_allowed_list")


def test_kvm_pvm_data_planes_spread_over_cpus(kvm, guest_elf, tmp_path):
    """On kvm_pvm the vCPU and I/O threads of a VM share one CPU (see pinning.py), the
    main thread floats, and VMs started one after another get different CPUs."""
    from vmtools import VmProcess
    if not os.path.exists("/sys/module/kvm_pvm") or len(os.sched_getaffinity(0)) < 2:
        pytest.skip("only kvm_pvm hosts with 2+ CPUs pin the data plane")
    all_cpus = _allowed(os.getpid(), os.getpid())
    vms, cpus = [], []
    try:
        for i in range(3):      # three: another VM of this user starting meanwhile cannot
                                # make all of them share a CPU
            vm = VmProcess(hb_args(guest_elf), tmp_path)
            vms.append(vm)
            vm.wait_for(r"^heartbeat 1$")
            tid = vm.qmp().cmd("query-cpus")["return"][0]["thread_id"]
            cpu = _allowed(vm.proc.pid, tid)
            assert "," not in cpu and "-" not in cpu, cpu     # one CPU
            assert _allowed(vm.proc.pid, vm.proc.pid) == all_cpus
            cpus.append(cpu)
        assert len(set(cpus)) >= 2, cpus
    finally:
        for vm in vms:
            vm.kill()


def test_qmp_listens_before_the_guest_runs_and_serves_early_clients(kvm, guest_elf, tmp_path):
    """The QMP socket is bound before the VM is built: a client that connects while the
    restore is under way waits in the backlog and gets its greeting, never a refusal."""
    import socket
    import time
    from vmtools import QmpClient, VmProcess
    tpl = tmp_path / "tpl"
    take_template(guest_elf, tmp_path, tpl)
    vm = VmProcess(hb_args(guest_elf) + ["-incoming", f"file:{tpl}"], tmp_path)
    try:
        deadline = time.monotonic() + 20
        while not os.path.exists(vm.qmp_path):
            assert time.monotonic() < deadline, "no QMP socket"
            time.sleep(0.0002)
        seen_running = "heartbeat" in vm.output
        s = socket.socket(socket.AF_UNIX)
        s.connect(vm.qmp_path)          # a refusal would raise here
        s.close()
        assert not seen_running, "the QMP socket appeared only after the guest ran"
        q = QmpClient(vm.qmp_path)
        assert q.cmd("query-status")["return"]["status"] == "running"
        q.cmd("quit")
        assert vm.wait() == 0
    finally:
        vm.kill()
