"""A VM started through ``stratovirt-pool`` lives where its launcher lives, and the pool's
life does not touch it: network and mount namespaces, cgroups, user, limits, cwd, umask,
environment; a pool restarted under running VMs; a launcher that finds no pool, or a
socket that is not a pool, runs the VM itself."""

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
import tempfile
import uuid
from pathlib import Path

import pytest

from test_net import Wire, frames_both_ways_then_quit, netns, quit_vm, vm_args  # noqa: F401
from vmtools import PoolProcess, VmProcess, stratovirt_cmd

pytestmark = pytest.mark.kvm


@pytest.fixture
def pool(tmp_path):
    p = PoolProcess(str(tmp_path / "pool.sock"))
    yield p
    p.stop()


def vm_pid(tmp_path, name="vm.pid", timeout=20.0) -> int:
    path = tmp_path / name
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            text = path.read_text()
            if text.endswith("\n"):
                return int(text)
        except (FileNotFoundError, ValueError):
            pass
        time.sleep(0.02)
    raise AssertionError("the VM never wrote its pidfile")


def proc_status(pid: int) -> dict:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            out[key] = value.strip()
    return out


def heartbeat_args(guest, extra=()):
    return ["-m", "128", "-kernel", str(guest), "-append", "sv.hb=20", *extra]


def test_tap_by_name_inside_the_launchers_netns(kvm, netns, guest_elf, tmp_path, pool):  # noqa: F811
    """``ip netns exec NS stratovirt ... ifname=svtap0``: the tap is NS's, frames cross."""
    wire = Wire(netns, "svtap0")
    try:
        vm = VmProcess(vm_args(guest_elf, "ifname=svtap0", extra=["-pidfile", str(tmp_path / "vm.pid")]),
                       tmp_path, env=pool.env, prefix=["ip", "netns", "exec", netns])
        with vm:
            pid = vm_pid(tmp_path)
            assert pid != vm.proc.pid, "the VM should run in a pool process"
            assert os.readlink(f"/proc/{pid}/ns/net") == os.readlink(f"/proc/{vm.proc.pid}/ns/net")
            assert os.readlink(f"/proc/{pid}/ns/mnt") == os.readlink(f"/proc/{vm.proc.pid}/ns/mnt")
            frames_both_ways_then_quit(vm, wire)
    finally:
        wire.close()


@contextlib.contextmanager
def launcher_cgroup():
    """A new cgroup in each writable hierarchy (v2, v1 pids): (its name, the prefix that
    starts a command inside it); the cgroups are removed afterwards."""
    if os.geteuid() != 0:
        pytest.skip("creating cgroups needs root")
    name = f"svtest-{uuid.uuid4().hex[:8]}"
    made = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            pre, _, post = line.partition(" - ")
            point, fstype = pre.split()[4], post.split()[0]
            if fstype == "cgroup2" or (fstype == "cgroup" and ",pids" in "," + post.split()[2]):
                try:
                    os.mkdir(os.path.join(point, name))
                    made.append(os.path.join(point, name))
                except OSError:
                    pass
    if not made:
        pytest.skip("no writable cgroup hierarchy")
    procs = " ".join(f"{p}/cgroup.procs" for p in made)
    try:
        yield name, ["sh", "-c", f'for f in {procs}; do echo $$ > $f; done; exec "$@"', "sh"]
    finally:
        for path in made:
            deadline = time.monotonic() + 10
            while os.path.exists(path):
                try:
                    os.rmdir(path)
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)


def test_vm_joins_the_launchers_cgroups(kvm, guest_elf, tmp_path, pool):
    with launcher_cgroup() as (name, prefix):
        with VmProcess(heartbeat_args(guest_elf, ["-pidfile", str(tmp_path / "vm.pid")]), tmp_path,
                       env=pool.env, prefix=prefix) as vm:
            pid = vm_pid(tmp_path)
            assert pid != vm.proc.pid
            with open(f"/proc/{vm.proc.pid}/cgroup") as f:
                launcher = f.read()
            with open(f"/proc/{pid}/cgroup") as f:
                theirs = f.read()
            assert f"/{name}\n" in launcher and theirs == launcher
            vm.wait_for(r"^heartbeat 2$")
            quit_vm(vm)


def test_user_limits_cwd_umask_and_environment(kvm, guest_elf, tmp_path, pool):
    """gid/groups, an rlimit, cwd and umask come from the launcher."""
    if os.geteuid() != 0 or not shutil.which("setpriv") or not shutil.which("prlimit"):
        pytest.skip("needs root, setpriv and prlimit")
    # somewhere the other user can reach (pytest's tmp_path is root's alone)
    work = Path(tempfile.mkdtemp(prefix="sv-pool-user-"))
    os.chmod(work, 0o777)
    kvm_dev = os.environ.get("STRATOVIRT_KVM_DEVICE") or "/dev/kvm"
    st = os.stat(kvm_dev)
    # uid stays root's: the interpreter of this venv may sit under /root, where no other
    # user can reach it; the groups, and everything else, change
    uid, gid = 0, 4243
    os.chmod(kvm_dev, st.st_mode | 0o060)       # let the group use KVM for this test
    try:
        env = pool.env
        prefix = ["prlimit", "--nofile=900:1000", "setpriv", f"--reuid={uid}", f"--regid={gid}",
                  "--groups=4244,4245", "sh", "-c", f"umask 027; cd {work} && exec \"$@\"", "sh"]
        args = heartbeat_args(guest_elf, ["-pidfile", str(work / "vm.pid")])
        with VmProcess(args, work, env=env, prefix=prefix) as vm:
            try:
                pid = vm_pid(work)
            except AssertionError:
                raise AssertionError(vm.stderr) from None
            assert pid != vm.proc.pid, vm.stderr
            status = proc_status(pid)
            assert status["Uid"].split() == [str(uid)] * 4
            assert status["Gid"].split() == [str(gid)] * 4
            assert sorted(status["Groups"].split()) == ["4244", "4245"]
            assert status["Umask"] == "0027"
            assert os.readlink(f"/proc/{pid}/cwd") == str(work)
            with open(f"/proc/{pid}/limits") as f:
                line = next(l for l in f if l.startswith("Max open files"))
            assert line.split()[3:5] == ["900", "1000"]
            vm.wait_for(r"^heartbeat 2$")
            quit_vm(vm)
    finally:
        os.chmod(kvm_dev, st.st_mode)
        shutil.rmtree(work, ignore_errors=True)


def test_the_vm_runs_with_the_launchers_environment(kvm, guest_elf, tmp_path, pool):
    env = dict(pool.env, STRATOVIRT_KVM_DEVICE=str(tmp_path / "no-kvm-here"))
    with VmProcess(heartbeat_args(guest_elf), tmp_path, env=env) as vm:
        assert vm.wait() == 1
        assert "no-kvm-here" in vm.stderr and "KVM is not available" in vm.stderr


def test_a_pool_restart_leaves_running_vms_alone(kvm, guest_elf, tmp_path):
    path = str(tmp_path / "pool.sock")
    first = PoolProcess(path)
    with VmProcess(heartbeat_args(guest_elf), tmp_path, env=first.env) as vm:
        vm.wait_for(r"^heartbeat 2$")
        first.stop(signal.SIGKILL)
        second = PoolProcess(path)
        try:
            at = len(vm.output)
            vm.wait_for(r"^heartbeat \d+$", start=at)
            assert vm.qmp().cmd("query-status")["return"]["status"] == "running"
            with VmProcess(heartbeat_args(guest_elf), tmp_path, env=second.env) as vm2:
                vm2.wait_for(r"^heartbeat 2$")
                quit_vm(vm2)
            second.stop(signal.SIGTERM)
            at = len(vm.output)
            vm.wait_for(r"^heartbeat \d+$", start=at)
            quit_vm(vm)
        finally:
            second.stop()


def _fake_pool(path, behaviour):
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(4)

    def serve():
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            if behaviour == "garbage":
                conn.recv(65536)
                conn.sendall(b"HTTP/1.0 400 Bad Request\r\n\r\n")
            conn.close()
    threading.Thread(target=serve, daemon=True).start()
    return srv


@pytest.mark.parametrize("behaviour", ["none", "closes", "garbage"])
def test_without_a_pool_the_launcher_runs_the_vm(kvm, guest_elf, tmp_path, behaviour):
    """No socket, a socket that hangs up, another program's socket: the VM runs anyway."""
    path = str(tmp_path / "not-a-pool.sock")
    srv = _fake_pool(path, behaviour) if behaviour != "none" else None
    try:
        env = dict(os.environ, STRATOVIRT_POOL=path)
        with VmProcess(heartbeat_args(guest_elf, ["-pidfile", str(tmp_path / "vm.pid")]), tmp_path,
                       env=env) as vm:
            assert vm_pid(tmp_path) == vm.proc.pid
            vm.wait_for(r"^heartbeat 2$")
            quit_vm(vm)
            if behaviour == "garbage":
                assert "did not answer as a stratovirt-pool" in vm.stderr
            elif behaviour == "none":
                assert vm.stderr == ""
            assert "Traceback" not in vm.stderr
    finally:
        if srv is not None:
            srv.close()


def test_a_vm_the_pool_cannot_place_runs_in_the_launcher(kvm, guest_elf, tmp_path):
    """A pool that cannot join the launcher's cgroup leaves the VM to the launcher."""
    if os.geteuid() != 0:
        pytest.skip("needs root")
    sockdir = tempfile.mkdtemp(prefix="sv-pool-other-")     # reachable by the other user
    os.chmod(sockdir, 0o777)
    path = os.path.join(sockdir, "pool.sock")
    # a pool running as another user cannot write the launcher's cgroup.procs
    exe = os.path.join(os.path.dirname(os.sys.executable), "stratovirt-pool")
    kvm_dev = os.environ.get("STRATOVIRT_KVM_DEVICE") or "/dev/kvm"
    mode = os.stat(kvm_dev).st_mode
    os.chmod(kvm_dev, mode | 0o006)
    proc = subprocess.Popen(["setpriv", "--reuid=4242", "--regid=4242", "--clear-groups", exe,
                             "--socket", path], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "stratovirt-pool: ready"
        os.chmod(path, 0o666)
        with launcher_cgroup() as (_name, prefix):
            with VmProcess(heartbeat_args(guest_elf, ["-pidfile", str(tmp_path / "vm.pid")]), tmp_path,
                           env=dict(os.environ, STRATOVIRT_POOL=path), prefix=prefix) as vm:
                assert vm_pid(tmp_path) == vm.proc.pid
                vm.wait_for(r"^heartbeat 2$")
                quit_vm(vm)
                assert "the VM runs in the launcher instead" in vm.stderr
    finally:
        os.chmod(kvm_dev, mode)
        proc.terminate()
        proc.wait(10)
        shutil.rmtree(sockdir, ignore_errors=True)


def test_descriptors_keep_their_numbers(kvm, guest_elf, tmp_path, pool):
    """An inherited descriptor is in the VM process under the number it had in the launcher."""
    r, w = os.pipe()
    target = 57
    os.dup2(w, target)
    try:
        with VmProcess(heartbeat_args(guest_elf, ["-pidfile", str(tmp_path / "vm.pid")]), tmp_path,
                       env=pool.env, pass_fds=(target,)) as vm:
            pid = vm_pid(tmp_path)
            assert pid != vm.proc.pid
            assert os.readlink(f"/proc/{pid}/fd/{target}") == os.readlink(f"/proc/self/fd/{w}")
            for fd in (0, 1, 2):
                assert os.readlink(f"/proc/{pid}/fd/{fd}") == os.readlink(f"/proc/{vm.proc.pid}/fd/{fd}")
            vm.wait_for(r"^heartbeat 1$")
            quit_vm(vm)
    finally:
        for fd in (r, w, target):
            os.close(fd)


def test_pool_off_and_version_run_in_the_launcher(kvm, guest_elf, tmp_path, pool):
    env = dict(pool.env, STRATOVIRT_POOL="off")
    with VmProcess(heartbeat_args(guest_elf, ["-pidfile", str(tmp_path / "vm.pid")]), tmp_path,
                   env=env) as vm:
        assert vm_pid(tmp_path) == vm.proc.pid
        vm.wait_for(r"^heartbeat 1$")
        quit_vm(vm)
    r = subprocess.run(stratovirt_cmd() + ["-version"], env=pool.env, capture_output=True,
                       text=True, timeout=30)
    assert r.returncode == 0 and "StratoVirt" in r.stdout
