"""Templates and warm start with real guests: snapshot, restore, and every refusal."""

import hashlib
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vmtools import VmProcess, run_cli

pytestmark = pytest.mark.kvm

MEM = "128"


def hb_args(guest, extra=""):
    return ["-m", MEM, "-kernel", str(guest), "-append", f"console=ttyS0 sv.hb=20 {extra}".strip()]


def wait_migrate(q, timeout=30.0):
    deadline = time.monotonic() + timeout
    while True:
        info = q.cmd("query-migrate")["return"]
        if info["status"] not in ("setup", "active") or time.monotonic() > deadline:
            return info
        time.sleep(0.01)


def take_template(guest, tmp_path, tpl, args=None, beats=3):
    """Boot, run to a heartbeat, stop, snapshot; return the heartbeat value at the snapshot."""
    args = args or hb_args(guest)
    with VmProcess(args, tmp_path) as vm:
        vm.wait_for(rf"^heartbeat {beats}$")
        q = vm.qmp()
        assert q.cmd("query-migrate")["return"] == {"status": "none"}
        assert q.cmd("stop") == {"return": {}}
        assert q.cmd("migrate", uri=f"file:{tpl}") == {"return": {}}
        assert wait_migrate(q) == {"status": "completed", **_total(q)}
        at = int(re.findall(r"heartbeat (\d+)", vm.output)[-1])
        q.cmd("quit")
        assert vm.wait() == 0
    return at


def _total(q):
    info = q.cmd("query-migrate")["return"]
    return {k: v for k, v in info.items() if k == "total-time"}


def hb_addr(output):
    return int(re.search(r"hb-addr: (0x[0-9a-f]+)", output).group(1), 16)


def tree_hash(path: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(Path(path).rglob("*")):
        if p.is_file() and not p.is_symlink():
            h.update(p.name.encode())
            h.update(p.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def template(tmp_path_factory, guest_elf):
    """One template shared by the read-only tests of this module."""
    tmp = tmp_path_factory.mktemp("tpl")
    tpl = tmp / "template"
    at = take_template(guest_elf, tmp, tpl)
    return tpl, at


def test_template_holds_state_and_memory(template, guest_elf):
    tpl, at = template
    assert (tpl / "state").is_file() and (tpl / "memory").is_file()
    assert os.path.getsize(tpl / "memory") == int(MEM) << 20
    # Zero pages are holes: a 128 MiB guest that touched little costs little disk.
    assert os.stat(tpl / "memory").st_blocks * 512 < 16 << 20


def test_heartbeat_continues_after_restore(kvm, template, guest_elf, tmp_path):
    tpl, at = template
    with VmProcess(hb_args(guest_elf) + ["-incoming", f"file:{tpl}"], tmp_path) as vm:
        vm.wait_for(rf"^heartbeat {at + 2}$")
        beats = [int(n) for n in re.findall(r"heartbeat (\d+)", vm.output)]
        assert beats[0] == at + 1, beats
        assert "SVGUEST v1 booted" not in vm.output, "restore must not boot the kernel again"
        q = vm.qmp()
        assert q.cmd("query-status")["return"]["status"] == "running"
        assert q.cmd("query-migrate")["return"]["status"] == "none"
        q.cmd("quit")
        assert vm.wait() == 0


def test_counter_in_template_memory_matches(template, guest_elf, tmp_path):
    tpl, at = template
    # The guest prints hb-addr at boot; a fresh boot tells us where the counter lives.
    with VmProcess(hb_args(guest_elf, "sv.hbmax=1"), tmp_path) as vm:
        addr = hb_addr(vm.wait_for(r"^hb-addr: 0x[0-9a-f]+$").string)
        vm.wait()
    with open(tpl / "memory", "rb") as f:
        f.seek(addr)
        assert int.from_bytes(f.read(8), "little") == at


def test_restore_unmapped(kvm, template, guest_elf, tmp_path):
    tpl, at = template
    with VmProcess(hb_args(guest_elf) + ["-incoming", f"file:{tpl},mapped=off"], tmp_path) as vm:
        vm.wait_for(rf"^heartbeat {at + 1}$")


def test_five_concurrent_clones_and_template_unchanged(kvm, template, guest_elf, tmp_path):
    tpl, at = template
    before = tree_hash(tpl)
    vms = []
    try:
        for _ in range(5):
            vms.append(VmProcess(hb_args(guest_elf) + ["-incoming", f"file:{tpl}"], tmp_path))
        for vm in vms:
            vm.wait_for(rf"^heartbeat {at + 3}$", timeout=60)
        # Each clone runs on its own: pausing one leaves the others going.
        q0 = vms[0].qmp()
        q0.cmd("stop")
        n0 = len(re.findall("heartbeat", vms[0].output))
        n1 = len(re.findall("heartbeat", vms[1].output))
        time.sleep(0.3)
        assert len(re.findall("heartbeat", vms[0].output)) == n0
        assert len(re.findall("heartbeat", vms[1].output)) > n1
    finally:
        for vm in vms:
            vm.kill()
    assert tree_hash(tpl) == before, "restored VMs must never write to the template"


def test_restore_twice_in_a_row(kvm, template, guest_elf, tmp_path):
    tpl, at = template
    for _ in range(2):
        with VmProcess(hb_args(guest_elf) + ["-incoming", f"file:{tpl}"], tmp_path) as vm:
            vm.wait_for(rf"^heartbeat {at + 1}$")
            vm.qmp().cmd("quit")
            assert vm.wait() == 0


def test_snapshot_of_running_vm_pauses_it(kvm, guest_elf, tmp_path):
    tpl = tmp_path / "t"
    with VmProcess(hb_args(guest_elf), tmp_path) as vm:
        vm.wait_for(r"^heartbeat 2$")
        q = vm.qmp()
        assert q.cmd("migrate", uri=f"file:{tpl}") == {"return": {}}
        assert q.events and q.events[0]["event"] == "STOP"
        assert wait_migrate(q)["status"] == "completed"
        assert q.cmd("query-status")["return"]["status"] == "paused"
        at = int(re.findall(r"heartbeat (\d+)", vm.output)[-1])
        time.sleep(0.2)
        assert int(re.findall(r"heartbeat (\d+)", vm.output)[-1]) == at, "stays paused"
        # ... and can go on afterwards.
        q.cmd("cont")
        vm.wait_for(rf"^heartbeat {at + 1}$")
    with VmProcess(hb_args(guest_elf) + ["-incoming", f"file:{tpl}"], tmp_path) as vm:
        vm.wait_for(rf"^heartbeat {at + 1}$")


def test_snapshot_twice_replaces_template(kvm, guest_elf, tmp_path):
    tpl = tmp_path / "t"
    with VmProcess(hb_args(guest_elf), tmp_path) as vm:
        q = vm.qmp()
        vm.wait_for(r"^heartbeat 2$")
        q.cmd("migrate", uri=f"file:{tpl}")
        assert wait_migrate(q)["status"] == "completed"
        q.cmd("cont")
        vm.wait_for(r"^heartbeat 6$")
        q.cmd("migrate", uri=f"file:{tpl}")
        assert wait_migrate(q)["status"] == "completed"
        at = int(re.findall(r"heartbeat (\d+)", vm.output)[-1])
    with VmProcess(hb_args(guest_elf) + ["-incoming", f"file:{tpl}"], tmp_path) as vm:
        vm.wait_for(rf"^heartbeat {at + 1}$")
    assert sorted(p.name for p in tpl.iterdir() if not p.name.startswith(".")) in (
        ["current", "gen-" + os.readlink(tpl / "current")[4:], "memory", "state"],
        ["memory", "state"])


@pytest.mark.parametrize("change, fragment", [
    (["-m", "256"], "-m is 256 MiB but the template has 128 MiB"),
    (["-smp", "2"], "-smp is 2 but the template has 1"),
])
def test_mismatched_configuration_refused(kvm, template, guest_elf, tmp_path, change, fragment):
    tpl, _ = template
    args = hb_args(guest_elf) + change + ["-incoming", f"file:{tpl}",
                                          "-qmp", f"unix:{tmp_path}/s,server,nowait"]
    r = run_cli(args)
    assert r.returncode == 1
    assert fragment in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def _copy(tpl, dst):
    shutil.copytree(tpl, dst, symlinks=False, ignore=shutil.ignore_patterns(".lock", "gen-*", "current"))
    return dst


@pytest.mark.parametrize("damage, fragment", [
    ("flip-state", "checksum"),
    ("flip-memory", "memory"),
    ("truncate-memory", "memory"),
    ("missing-state", "state"),
    ("missing-memory", "memory"),
])
def test_damaged_template_refused(kvm, template, guest_elf, tmp_path, damage, fragment):
    tpl, _ = template
    bad = _copy(tpl, tmp_path / "bad")
    state, memory = bad / "state", bad / "memory"
    if damage == "flip-state":
        data = bytearray(state.read_bytes())
        data[len(data) // 2] ^= 0x01
        state.write_bytes(bytes(data))
    elif damage == "flip-memory":
        with open(memory, "r+b") as f:
            f.seek(0x100010)          # inside the guest image: a page that holds data
            b = f.read(1)
            f.seek(0x100010)
            f.write(bytes([b[0] ^ 0x80]))
    elif damage == "truncate-memory":
        os.truncate(memory, os.path.getsize(memory) // 2)
    elif damage == "missing-state":
        state.unlink()
    elif damage == "missing-memory":
        memory.unlink()
    r = run_cli(hb_args(guest_elf) + ["-incoming", f"file:{bad}",
                                      "-qmp", f"unix:{tmp_path}/s,server,nowait"])
    assert r.returncode == 1, r
    err = r.stderr.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert fragment in err, err


@pytest.mark.parametrize("change, fragment", [
    ("arch", "created on aarch64; this host is"),
    ("format", "format version 2, newer than"),
    ("section", "section 'vcpus' has version 99, newer than"),
])
def test_foreign_or_newer_template_refused(kvm, template, guest_elf, tmp_path, change, fragment):
    sys.path.insert(0, str(Path(__file__).parent / "migration"))
    from tplhelpers import rewrite_state
    tpl, _ = template
    bad = _copy(tpl, tmp_path / "bad")

    def mutate(header):
        if change == "arch":
            header["arch"] = "aarch64"
        elif change == "section":
            for sec in header["sections"]:
                if sec["name"] == "vcpus":
                    sec["version"] = 99
    rewrite_state(bad, mutate_header=mutate, version=2 if change == "format" else None)
    r = run_cli(hb_args(guest_elf) + ["-incoming", f"file:{bad}",
                                      "-qmp", f"unix:{tmp_path}/s,server,nowait"])
    assert r.returncode == 1
    err = r.stderr.strip()
    assert fragment in err and len(err.splitlines()) == 1 and "Traceback" not in err, err


def test_unsupported_feature_refused_and_vm_unchanged(kvm, guest_elf, tmp_path):
    with VmProcess(hb_args(guest_elf) + ["-machine", "microvm,mem-share=on"], tmp_path) as vm:
        vm.wait_for(r"^heartbeat 1$")
        q = vm.qmp()
        r = q.cmd("migrate", uri=f"file:{tmp_path}/t")
        assert r["error"]["class"] == "GenericError"
        assert "mem-share" in r["error"]["desc"]
        assert q.cmd("query-status")["return"]["status"] == "running"
        assert not (tmp_path / "t" / "state").exists()


def test_bad_migrate_uri(kvm, guest_elf, tmp_path):
    with VmProcess(hb_args(guest_elf), tmp_path) as vm:
        q = vm.qmp()
        r = q.cmd("migrate", uri="tcp:1.2.3.4:5")
        assert "error" in r and "file:DIR" in r["error"]["desc"]
        assert q.cmd("query-status")["return"]["status"] == "running"


def test_failed_snapshot_keeps_previous_template(kvm, guest_elf, tmp_path):
    """A full disk half-way: query-migrate says failed, the old template still restores."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6M", "tmpfs", str(mnt)]).returncode:
        pytest.skip("cannot mount a tmpfs here (not root?)")
    try:
        tpl = mnt / "t"
        with VmProcess(hb_args(guest_elf), tmp_path) as vm:
            vm.wait_for(r"^heartbeat 2$")
            q = vm.qmp()
            q.cmd("migrate", uri=f"file:{tpl}")
            assert wait_migrate(q)["status"] == "completed"
            at = int(re.findall(r"heartbeat (\d+)", vm.output)[-1])
            before = tree_hash(tpl)
            # Fill the disk so that the next template cannot fit.
            filler = mnt / "filler"
            free = os.statvfs(mnt).f_bavail * os.statvfs(mnt).f_frsize
            filler.write_bytes(b"\1" * max(free - 64 * 1024, 0))
            q.cmd("cont")
            vm.wait_for(rf"^heartbeat {at + 2}$")
            q.cmd("migrate", uri=f"file:{tpl}")
            info = wait_migrate(q)
            assert info["status"] == "failed", info
            assert "space" in info.get("error-desc", "").lower(), info
            q.cmd("quit")
        filler.unlink()
        assert tree_hash(tpl) == before
        with VmProcess(hb_args(guest_elf) + ["-incoming", f"file:{tpl}"], tmp_path) as vm:
            vm.wait_for(rf"^heartbeat {at + 1}$")
    finally:
        subprocess.run(["umount", "-l", str(mnt)])


def test_snapshot_restore_smp(kvm, guest_elf, tmp_path):
    """Every vCPU's state goes into the template: a 2-vCPU guest (AP halted) restores."""
    tpl = tmp_path / "tpl"
    args = ["-m", MEM, "-smp", "2", "-kernel", str(guest_elf), "-append", "sv.smp sv.hb=20"]
    with VmProcess(args, tmp_path) as vm:
        vm.wait_for(r"^smp: 2 cpus online$", timeout=60)
        vm.wait_for(r"^heartbeat 2$")
        q = vm.qmp()
        q.cmd("migrate", uri=f"file:{tpl}")
        assert wait_migrate(q)["status"] == "completed"
        at = int(re.findall(r"^heartbeat (\d+)$", vm.output, re.M)[-1])
        q.cmd("quit")
    with VmProcess(args + ["-incoming", f"file:{tpl}"], tmp_path) as vm:
        vm.wait_for(rf"^heartbeat {at + 2}$")
        q = vm.qmp()
        assert len(q.cmd("query-cpus")["return"]) == 2
        q.cmd("quit")
        assert vm.wait() == 0


@pytest.mark.parametrize("same_dir", [False, True])
def test_snapshot_of_a_restored_vm(kvm, template, guest_elf, tmp_path, same_dir):
    """A clone can itself become a template (into a new directory, or replacing the one
    it was restored from while it still maps it)."""
    tpl, at = template
    src = _copy(tpl, tmp_path / "src")
    dst = src if same_dir else tmp_path / "dst"
    with VmProcess(hb_args(guest_elf) + ["-incoming", f"file:{src}"], tmp_path) as vm:
        vm.wait_for(rf"^heartbeat {at + 3}$")
        q = vm.qmp()
        q.cmd("migrate", uri=f"file:{dst}")
        assert wait_migrate(q)["status"] == "completed"
        at2 = int(re.findall(r"^heartbeat (\d+)$", vm.output, re.M)[-1])
        q.cmd("cont")
        vm.wait_for(rf"^heartbeat {at2 + 2}$")       # still running on its old mapping
        q.cmd("quit")
    with VmProcess(hb_args(guest_elf) + ["-incoming", f"file:{dst}"], tmp_path) as vm:
        vm.wait_for(rf"^heartbeat {at2 + 1}$")
        assert int(re.findall(r"^heartbeat (\d+)$", vm.output, re.M)[0]) == at2 + 1


def test_template_written_in_place_is_named_when_a_clone_dies(kvm, guest_elf, tmp_path):
    """The format promises a template is never written after it was made; a clone whose
    template was changed under it crashes, and says why instead of exiting 0."""
    tpl = tmp_path / "tpl"
    take_template(guest_elf, tmp_path, tpl)
    with VmProcess(hb_args(guest_elf) + ["-incoming", f"file:{tpl}", "-S"], tmp_path) as vm:
        q = vm.qmp()
        mem = os.path.realpath(tpl / "memory")
        with open(mem, "r+b") as f:          # page tables and code, not yet touched by the clone
            for off in range(0, 16 << 20, 1 << 20):
                f.seek(off)
                f.write(b"\xff" * (1 << 20))
        q.cmd("cont")
        assert vm.wait() == 1
        last = vm.stderr.strip().splitlines()[-1]
        assert last.startswith("stratovirt: the template's memory file") and "was changed" in last
