"""stratovirt-pool: VMs forked from a warm interpreter behave like VMs run directly."""

import os
import signal
import subprocess
import sys
import time

import pytest

from vmtools import PoolProcess, VmProcess

pytestmark = pytest.mark.kvm


@pytest.fixture
def pool(tmp_path):
    p = PoolProcess(str(tmp_path / "pool.sock"))
    yield p.path
    p.stop()


def pool_env(path):
    return dict(os.environ, STRATOVIRT_POOL=path)


def test_boot_through_pool(kvm, guest_elf, tmp_path, pool):
    with VmProcess(["-kernel", str(guest_elf), "-append", "sv.hbmax=2"], tmp_path,
                   env=pool_env(pool)) as vm:
        vm.wait_for(r"^heartbeat 2$")
        assert vm.wait() == 0


def test_errors_and_exit_status_come_through(kvm, guest_elf, tmp_path, pool):
    env = pool_env(pool)
    r = subprocess.run([os.path.join(os.path.dirname(sys.executable), "stratovirt"),
                        "-kernel", str(tmp_path / "missing"), "-qmp", f"unix:{tmp_path}/q,server,nowait"],
                       capture_output=True, text=True, env=env, timeout=30)
    assert r.returncode == 1 and "does not exist" in r.stderr and "Traceback" not in r.stderr


def test_snapshot_and_restore_through_pool(kvm, guest_elf, tmp_path, pool):
    tpl = tmp_path / "tpl"
    args = ["-m", "128", "-kernel", str(guest_elf), "-append", "sv.hb=20"]
    with VmProcess(args, tmp_path, env=pool_env(pool)) as vm:
        vm.wait_for(r"^heartbeat 2$")
        q = vm.qmp()
        q.cmd("migrate", uri=f"file:{tpl}")
        while q.cmd("query-migrate")["return"]["status"] in ("setup", "active"):
            time.sleep(0.01)
        import re
        at = int(re.findall(r"^heartbeat (\d+)$", vm.output, re.M)[-1])
        q.cmd("quit")
        assert vm.wait() == 0
    with VmProcess(args + ["-incoming", f"file:{tpl}"], tmp_path, env=pool_env(pool)) as vm:
        vm.wait_for(rf"^heartbeat {at + 1}$")
        assert "SVGUEST v1 booted" not in vm.output


def test_killing_the_launcher_ends_the_vm(kvm, guest_elf, tmp_path, pool):
    with VmProcess(["-kernel", str(guest_elf), "-append", "sv.hb=20"], tmp_path,
                   env=pool_env(pool)) as vm:
        vm.wait_for(r"^heartbeat 1$")
        q = vm.qmp()
        vm.proc.kill()              # as Kata stops StratoVirt
        vm.proc.wait()
        deadline = time.time() + 10
        while time.time() < deadline:
            try:
                q.cmd("query-status")
            except (ConnectionError, OSError, ValueError):
                break
            time.sleep(0.05)
        else:
            pytest.fail("the VM outlived its launcher")


def test_sigterm_is_forwarded(kvm, guest_elf, tmp_path, pool):
    with VmProcess(["-kernel", str(guest_elf), "-append", "sv.hb=20"], tmp_path,
                   env=pool_env(pool)) as vm:
        vm.wait_for(r"^heartbeat 1$")
        q = vm.qmp()
        vm.proc.send_signal(signal.SIGTERM)
        assert q.wait_event("SHUTDOWN")["data"]["reason"] == "host-signal"
        assert vm.wait() == 0


def test_without_pool_socket_runs_directly(kvm, guest_elf, tmp_path):
    with VmProcess(["-kernel", str(guest_elf), "-append", "sv.hbmax=1"], tmp_path,
                   env=pool_env(str(tmp_path / "no-such.sock"))) as vm:
        assert vm.wait() == 0
        assert "heartbeat 1" in vm.output


def test_pool_leaves_no_process_behind(tmp_path):
    path = str(tmp_path / "p.sock")
    proc = subprocess.Popen([sys.executable, "-m", "stratovirt_py.pool", "--socket", path],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "stratovirt-pool: ready"
    children = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    assert children, "the pool keeps a spare VM process"
    proc.terminate()
    proc.wait(10)
    deadline = time.time() + 10
    while time.time() < deadline:
        alive = [c for c in children if os.path.exists(f"/proc/{c}")]
        if not alive:
            break
        time.sleep(0.05)
    assert not alive, "spare VM processes outlived the pool"
    assert not os.path.exists(path)
