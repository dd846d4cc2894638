"""Seccomp: the production filter stops what it must, covers every thread, and
``-disable-seccomp`` leaves the VMM unfiltered.  (That the list is complete is shown by
the rest of the suite, which runs every VM with the filter on.)"""

import errno
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from stratovirt_py import seccomp
from test_snapshot import hb_args
from vmtools import PoolProcess, VmProcess

# Runs in its own process: a filter cannot be taken off again.
FILTERED_CHILD = r"""
import errno, json, os, threading
from stratovirt_py import seccomp
go, done = threading.Event(), threading.Event()
seen = {}
parent = os.getppid()
def older_thread():
    go.wait()
    try:
        os.execv("/bin/true", ["true"])
    except OSError as e:
        seen["execv in a thread started before the filter"] = e.errno
    done.set()
t = threading.Thread(target=older_thread); t.start()
seccomp.install()
tasks = os.listdir("/proc/self/task")
seen["tasks filtered"] = [open(f"/proc/self/task/{n}/status").read().split("Seccomp:")[1].split()[0]
                          for n in tasks]
go.set(); done.wait(); t.join()
try:
    os.fork()
except OSError as e:
    seen["fork"] = e.errno
try:
    os.sched_setaffinity(parent, os.sched_getaffinity(parent))
except OSError as e:
    seen["another process's affinity"] = e.errno
try:
    os.kill(parent, 0)
except OSError as e:
    seen["kill"] = e.errno
os.sched_setaffinity(0, os.sched_getaffinity(0))
try:
    os.posix_spawn("/bin/true", ["true"], {})
except OSError as e:
    seen["posix_spawn"] = e.errno
later = threading.Thread(target=lambda: seen.__setitem__("new thread", "ran")); later.start(); later.join()
import ctypes  # a lazy import after start still works
print(json.dumps(seen))
"""


def test_the_production_filter_stops_fork_and_exec_on_every_thread():
    r = subprocess.run([sys.executable, "-c", FILTERED_CHILD], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    seen = json.loads(r.stdout)
    assert seen["tasks filtered"] == ["2", "2"]        # main and the thread already running
    assert seen["execv in a thread started before the filter"] == errno.EPERM
    assert seen["fork"] == errno.EPERM
    assert seen["another process's affinity"] == errno.EPERM
    assert seen["kill"] == errno.EPERM
    assert seen["posix_spawn"] in (errno.EPERM, errno.ENOSYS)
    assert seen["new thread"] == "ran"


def test_the_list_lets_threads_but_not_processes_be_made():
    names = set(seccomp.ALLOWED)
    for forbidden in ("execve", "execveat", "fork", "vfork", "ptrace", "process_vm_writev", "kexec_load",
                      "init_module", "mount", "bpf", "setns", "unshare", "kill", "tkill"):
        assert forbidden not in names
    clone = [args for name, action, args in seccomp.rules() if name == "clone"]
    assert clone == [[(0, 7, seccomp.CLONE_THREAD, seccomp.CLONE_THREAD)]]
    assert [a for name, a, _ in seccomp.rules() if name == "clone3"] == [seccomp.act_errno(errno.ENOSYS)]


def _seccomp_modes(pid):
    modes = set()
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/status") as f:
            modes.add(f.read().split("Seccomp:")[1].split()[0])
    return modes


def _wait_stderr(vm, text, timeout=30.0):
    deadline = time.monotonic() + timeout
    while text not in vm.stderr:
        assert time.monotonic() < deadline and vm.proc.poll() is None, vm.stderr
        time.sleep(0.02)


@pytest.mark.kvm
@pytest.mark.parametrize("disable", [False, True])
def test_filters_are_on_by_default_and_off_with_disable_seccomp(kvm, guest_elf, tmp_path, disable):
    args = hb_args(guest_elf) + ["-D"] + (["-disable-seccomp"] if disable else [])
    with VmProcess(args, tmp_path) as vm:
        _wait_stderr(vm, "seccomp: filters off (-disable-seccomp)" if disable else "seccomp: filters on")
        vm.wait_for(r"^heartbeat 2$")
        assert _seccomp_modes(vm.proc.pid) == ({"0"} if disable else {"2"})
        q = vm.qmp()
        assert q.cmd("query-status")["return"]["status"] == "running"
        q.cmd("quit")
        assert vm.wait() == 0


@pytest.mark.kvm
def test_a_pool_started_vm_is_filtered_and_the_pool_is_not(kvm, guest_elf, tmp_path):
    pool = PoolProcess(str(tmp_path / "pool.sock"))
    try:
        with VmProcess(hb_args(guest_elf) + ["-D"], tmp_path, env=pool.env) as vm:
            _wait_stderr(vm, "seccomp: filters on")
            tid = vm.qmp().cmd("query-cpus")["return"][0]["thread_id"]
            with open(f"/proc/{tid}/status") as f:
                vmm_pid = int(f.read().split("Tgid:")[1].split()[0])
            assert vmm_pid not in (vm.proc.pid, pool.proc.pid)     # really forked by the pool
            assert _seccomp_modes(vmm_pid) == {"2"}
            assert _seccomp_modes(pool.proc.pid) == {"0"}
    finally:
        pool.stop()


def test_with_kill_as_the_default_a_forbidden_call_ends_the_process():
    child = ("import os; from stratovirt_py import seccomp; "
             "seccomp.install(seccomp.ACT_KILL_PROCESS); os.fork(); print('survived')")
    r = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=60)
    assert r.returncode == -signal.SIGSYS and "survived" not in r.stdout
