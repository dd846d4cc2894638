"""The VMM run by an unprivileged user who may use /dev/kvm: boot, snapshot, restore.

Root makes /dev/kvm usable by others for the test's duration, as a kvm group would.
The venv's interpreter may live where other users cannot reach it (pyenv under /root),
so the VMM runs under the system's python3 of the same version, with this checkout and
the venv's site-packages on its path: the same code, the same compiled modules.
"""

import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

import stratovirt_py
from test_snapshot import wait_migrate
from vmtools import VmProcess

pytestmark = pytest.mark.kvm

UID = GID = 4242
SYSTEM_PYTHON = "/usr/bin/python3"
PATHS = [str(Path(stratovirt_py.__file__).resolve().parent.parent),
         f"{sys.prefix}/lib/python{sys.version_info[0]}.{sys.version_info[1]}/site-packages"]


@pytest.fixture
def user_dir(guest_elf):
    if os.geteuid() != 0 or not shutil.which("setpriv") or not os.path.exists(SYSTEM_PYTHON):
        pytest.skip("needs root (to become another user), setpriv and a system python3")
    version = subprocess.run([SYSTEM_PYTHON, "-c", "import sys; print(sys.version_info[:2])"],
                             capture_output=True, text=True).stdout.strip()
    if version != str(tuple(sys.version_info[:2])):
        pytest.skip(f"the system python3 is {version}, the compiled modules are for another")
    kvm_dev = os.environ.get("STRATOVIRT_KVM_DEVICE") or "/dev/kvm"
    mode = stat.S_IMODE(os.stat(kvm_dev).st_mode)
    os.chmod(kvm_dev, mode | 0o006)
    work = Path(tempfile.mkdtemp(prefix="sv-unpriv-"))
    os.chown(work, UID, GID)
    shutil.copy(guest_elf, work / "guest.elf")
    try:
        yield work
    finally:
        os.chmod(kvm_dev, mode)
        shutil.rmtree(work, ignore_errors=True)


def as_user():
    # VmProcess puts the stratovirt command after this prefix: this stands in for it
    boot = f"import sys; sys.path[:0] = {PATHS!r}; from stratovirt_py.cli import main; main(sys.argv[2:])"
    return ["setpriv", f"--reuid={UID}", f"--regid={GID}", "--clear-groups",
            SYSTEM_PYTHON, "-I", "-S", "-c", boot]


def args(work):
    return ["-m", "128", "-kernel", str(work / "guest.elf"), "-append", "sv.hb=20"]


def test_boot_snapshot_restore_as_an_unprivileged_user(kvm, user_dir):
    tpl = user_dir / "tpl"
    with VmProcess(args(user_dir), user_dir, prefix=as_user()) as vm:
        vm.wait_for(r"^heartbeat 3$")
        with open(f"/proc/{vm.proc.pid}/status") as f:
            status = f.read()
        assert re.search(rf"^Uid:\s+{UID}\s+{UID}\s+{UID}", status, re.M), status
        q = vm.qmp()
        q.cmd("stop")
        assert q.cmd("migrate", uri=f"file:{tpl}") == {"return": {}}
        assert wait_migrate(q)["status"] == "completed"
        at = int(re.findall(r"^heartbeat (\d+)$", vm.output, re.M)[-1])
        q.cmd("quit")
        assert vm.wait() == 0, vm.stderr
    assert os.stat(tpl / "current" / "memory").st_uid == UID
    with VmProcess(args(user_dir) + ["-incoming", f"file:{tpl}"], user_dir,
                   prefix=as_user()) as vm:
        vm.wait_for(rf"^heartbeat {at + 1}$")
        assert "SVGUEST v1 booted" not in vm.output
        vm.qmp().cmd("quit")
        assert vm.wait() == 0, vm.stderr


def test_without_kvm_access_one_clear_error(kvm, user_dir):
    kvm_dev = os.environ.get("STRATOVIRT_KVM_DEVICE") or "/dev/kvm"
    os.chmod(kvm_dev, stat.S_IMODE(os.stat(kvm_dev).st_mode) & ~0o006)
    with VmProcess(args(user_dir), user_dir, prefix=as_user()) as vm:
        assert vm.wait() == 1
        assert "no permission to use KVM" in vm.stderr and "Traceback" not in vm.stderr
