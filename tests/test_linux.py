"""Boot a real Linux kernel (built by tools/build-linux-guest) on the VMM.

Opt-in: these tests run only with ``STRATOVIRT_LINUX_TESTS=1``; they need the guest
built by ``tools/build-linux-guest`` (or a directory named by ``STRATOVIRT_LINUX_DIR``
holding vmlinux, bzImage, initramfs.cpio.gz and rootfs.ext4).

What is checked depends on the host:
- always: the kernel's banner ``Linux version 6.1`` reaches the serial port (through
  ``earlyprintk``), i.e. the VMM loaded the kernel, built the boot parameters and ran it;
- with ``STRATOVIRT_LINUX_FULL=1`` (a host with hardware virtualization): the busybox
  init's marker ``STRATOVIRT-LINUX-INIT OK`` from the initramfs and from an ext4 root on
  virtio-blk, and a clean exit through ``reboot -f`` (keyboard-controller reset);
- where a ``--emulated-kvm`` build exists (``STRATOVIRT_LINUX_EMULATED_DIR``, default
  ``~/.cache/stratovirt-py/linux-emulated``): the whole kernel boot up to starting init,
  from the initramfs and from the ext4 root on virtio-blk, then a clean end of the VMM
  (status 0 from the guest's reset: init's ``reboot -f``, or ``panic=1`` when init
  crashes; on an emulating KVM, whose guest user space cannot make system calls, also
  the VMM's one-line "KVM internal error" exit). About two minutes each there.

On a host whose /dev/kvm emulates CPL0 code (docs/linux-guest.md) the kernel runs a
few million instructions per second, so only the banner check is realistic there;
the extra command-line options below keep the kernel off instructions that emulator
lacks.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import List, Optional, Sequence

import pytest

from vmtools import VmProcess

ENABLED = os.environ.get("STRATOVIRT_LINUX_TESTS") == "1"
pytestmark = [
    pytest.mark.linux,
    pytest.mark.skipif(not ENABLED, reason="real-Linux boot tests are opt-in: set "
                       "STRATOVIRT_LINUX_TESTS=1 (after tools/build-linux-guest)"),
]
FULL = os.environ.get("STRATOVIRT_LINUX_FULL") == "1"
# The emulation workarounds on the command line: on by default unless FULL.
EMULATED = os.environ.get("STRATOVIRT_LINUX_EMULATED", "0" if FULL else "1") == "1"
BANNER_TIMEOUT = float(os.environ.get("STRATOVIRT_LINUX_BANNER_TIMEOUT", "120"))
INIT_TIMEOUT = float(os.environ.get("STRATOVIRT_LINUX_INIT_TIMEOUT", "60"))
EMULATED_TIMEOUT = float(os.environ.get("STRATOVIRT_LINUX_EMULATED_TIMEOUT", "400"))
MARKER = "STRATOVIRT-LINUX-INIT OK"

BASE_CMDLINE = "console=ttyS0 earlyprintk=serial,ttyS0 reboot=k panic=1 pci=off acpi=off"
# Keeps a kernel off xsave/popcnt/SMAP instructions, which an emulating KVM may lack;
# harmless on hardware KVM. Left out with STRATOVIRT_LINUX_FULL=1 unless
# STRATOVIRT_LINUX_EMULATED=1.
EMULATION_CMDLINE = "noxsave clearcpuid=popcnt,smap,smep nosmap nosmep"


def _cache() -> Path:
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "stratovirt-py"


def guest_dir() -> Path:
    d = os.environ.get("STRATOVIRT_LINUX_DIR")
    return Path(d) if d else _cache() / "linux"


@pytest.fixture(scope="module")
def linux_emulated() -> Path:
    d = Path(os.environ.get("STRATOVIRT_LINUX_EMULATED_DIR") or _cache() / "linux-emulated")
    missing = [n for n in ("vmlinux", "initramfs.cpio", "rootfs.ext4") if not (d / n).is_file()]
    if missing:
        pytest.skip(f"no --emulated-kvm guest in {d} ({', '.join(missing)} missing): "
                    "run tools/build-linux-guest --emulated-kvm")
    return d


@pytest.fixture(scope="module")
def linux() -> Path:
    d = guest_dir()
    missing = [n for n in ("vmlinux", "bzImage", "initramfs.cpio.gz", "rootfs.ext4")
               if not (d / n).is_file()]
    if missing:
        pytest.fail(f"STRATOVIRT_LINUX_TESTS=1 but {', '.join(missing)} missing in {d}; "
                    "run tools/build-linux-guest (or set STRATOVIRT_LINUX_DIR)")
    return d


@pytest.fixture
def full() -> None:
    if not FULL:
        pytest.skip("boots to userspace only with hardware KVM: set STRATOVIRT_LINUX_FULL=1")


def cmdline(*extra: str) -> str:
    parts: List[str] = [BASE_CMDLINE]
    if EMULATED:
        parts.append(EMULATION_CMDLINE)
    parts.extend(e for e in extra if e)
    return " ".join(parts)


def boot_args(kernel: Path, append: str, initrd: Optional[Path] = None, mem: str = "256M",
              extra: Sequence[str] = ()) -> List[str]:
    args = ["-machine", "microvm", "-m", mem, "-smp", "1", "-kernel", str(kernel),
            "-append", append]
    if initrd is not None:
        args += ["-initrd", str(initrd)]
    return args + list(extra)


def assert_vmm_healthy(vm: VmProcess) -> None:
    """The VMM must not have died with an error or a traceback while the guest ran."""
    rc = vm.proc.poll()
    err = vm.stderr
    assert "Traceback" not in err, err
    assert rc is None or rc == 0, f"stratovirt exited with {rc}\n{err}"


@pytest.mark.parametrize("image", ["vmlinux", "bzImage"])
def test_kernel_banner(kvm, linux: Path, tmp_path: Path, image: str) -> None:
    """The kernel starts and prints its banner on the 8250 serial port."""
    with VmProcess(boot_args(linux / image, cmdline(), linux / "initramfs.cpio.gz"),
                   tmp_path) as vm:
        m = vm.wait_for(r"Linux version 6\.1\.\d+", timeout=BANNER_TIMEOUT)
        assert m.group(0).startswith("Linux version 6.1")
        assert "Command line: " + BASE_CMDLINE in vm.wait_for(r"Command line: .*", timeout=30).group(0)
        assert_vmm_healthy(vm)


@pytest.mark.parametrize("image", ["vmlinux", "bzImage"])
def test_initramfs_init_and_reboot(kvm, full: None, linux: Path, tmp_path: Path, image: str) -> None:
    """busybox /init runs from the initramfs and `reboot -f` (i8042 reset) ends the VM."""
    with VmProcess(boot_args(linux / image, cmdline("sv.poweroff"), linux / "initramfs.cpio.gz"),
                   tmp_path) as vm:
        vm.wait_for(MARKER, timeout=INIT_TIMEOUT)
        vm.wait_for("STRATOVIRT-LINUX-INIT reboot", timeout=10)
        assert vm.wait(timeout=30) == 0, vm.stderr
        assert "Traceback" not in vm.stderr


def test_smp_cpus_seen(kvm, full: None, linux: Path, tmp_path: Path) -> None:
    """Both vCPUs from the MP table come up."""
    args = boot_args(linux / "vmlinux", cmdline("sv.poweroff"), linux / "initramfs.cpio.gz")
    args[args.index("-smp") + 1] = "2"
    with VmProcess(args, tmp_path) as vm:
        vm.wait_for(r"cpus: 2,", timeout=INIT_TIMEOUT)
        assert vm.wait(timeout=30) == 0, vm.stderr


def test_ext4_root_on_virtio_blk(kvm, full: None, linux: Path, tmp_path: Path) -> None:
    """The ext4 rootfs on virtio-blk (virtio-mmio, announced on the command line) mounts."""
    disk = tmp_path / "rootfs.ext4"
    disk.write_bytes((linux / "rootfs.ext4").read_bytes())  # the guest writes to it
    extra = ["-drive", f"id=rootfs,file={disk}",
             "-device", "virtio-blk-device,drive=rootfs,id=rootfs"]
    with VmProcess(boot_args(linux / "vmlinux", cmdline("root=/dev/vda rw sv.poweroff"),
                             extra=extra), tmp_path) as vm:
        vm.wait_for(r"virtio_blk virtio\d+: .*\[vda\]", timeout=INIT_TIMEOUT)
        vm.wait_for(r"EXT4-fs \(vda\): mounted", timeout=INIT_TIMEOUT)
        vm.wait_for(MARKER, timeout=INIT_TIMEOUT)
        assert vm.wait(timeout=30) == 0, vm.stderr



def assert_guest_ended(vm: VmProcess) -> None:
    """After init started: the guest reset itself (VMM status 0), or, on an emulating
    KVM, the emulator gave up on the guest's user space (a clean one-line error)."""
    rc = vm.wait(timeout=120)
    err = vm.stderr
    assert "Traceback" not in err, err
    if rc != 0:
        assert EMULATED and rc == 1 and "stratovirt: vCPU 0: KVM internal error" in err, \
            f"stratovirt exited with {rc}\n{err}"


def test_emulated_kernel_boots_to_init(kvm, linux_emulated: Path, tmp_path: Path) -> None:
    """The --emulated-kvm kernel goes through every driver (serial, virtio-mmio slots,
    i8042) to init from the initramfs, and the VMM ends cleanly."""
    args = boot_args(linux_emulated / "vmlinux", cmdline("sv.poweroff"),
                     linux_emulated / "initramfs.cpio")  # uncompressed: faster to unpack
    with VmProcess(args, tmp_path) as vm:
        vm.wait_for(r"Serial: 8250/16550 driver", timeout=EMULATED_TIMEOUT)
        vm.wait_for(r"Run /init as init process", timeout=EMULATED_TIMEOUT)
        assert_guest_ended(vm)


def test_emulated_kernel_mounts_ext4_root(kvm, linux_emulated: Path, tmp_path: Path) -> None:
    """The --emulated-kvm kernel mounts the ext4 root file system from virtio-blk."""
    disk = tmp_path / "rootfs.ext4"
    disk.write_bytes((linux_emulated / "rootfs.ext4").read_bytes())
    extra = ["-drive", f"id=rootfs,file={disk}",
             "-device", "virtio-blk-device,drive=rootfs,id=rootfs"]
    args = boot_args(linux_emulated / "vmlinux", cmdline("root=/dev/vda rw sv.poweroff"),
                     extra=extra)
    with VmProcess(args, tmp_path) as vm:
        vm.wait_for(r"virtio_blk virtio0: \[vda\] 65536 512-byte logical blocks",
                    timeout=EMULATED_TIMEOUT)
        vm.wait_for(r"EXT4-fs \(vda\): mounted filesystem", timeout=EMULATED_TIMEOUT)
        vm.wait_for(r"Run /sbin/init as init process", timeout=EMULATED_TIMEOUT)
        assert_guest_ended(vm)
