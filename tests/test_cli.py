"""Command-line errors: one readable line on stderr, exit status 1, never a traceback."""

import os
import subprocess
import sys

import pytest

from vmtools import run_cli


def assert_clean_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 1, result
    err = result.stderr.strip()
    assert "Traceback" not in err
    assert len(err.splitlines()) == 1, err
    assert err.startswith("stratovirt: ")
    for f in fragments:
        assert f in err, err


@pytest.fixture
def kernel(tmp_path):
    k = tmp_path / "vmlinux"
    k.write_bytes(b"\x7fELF" + b"\0" * 100)
    return str(k)


def qmp(tmp_path):
    return ["-qmp", f"unix:{tmp_path}/q.sock,server,nowait"]


@pytest.mark.parametrize("args, fragments", [
    (["-frobnicate"], ["unknown option '-frobnicate'"]),
    (["--frobnicate", "1"], ["unknown option '--frobnicate'"]),
    (["-kernel"], ["option '-kernel' needs a value"]),
    (["-m", "12X"], ["invalid memory size '12X'"]),
    (["-m", "64"], ["out of range"]),
    (["-m", "1024G"], ["out of range"]),
    (["-smp", "0"], ["'cpus' must be between 1 and 254"]),
    (["-smp", "255"], ["'cpus' must be between 1 and 254"]),
    (["-smp", "two"], ["invalid number 'two'"]),
    (["-machine", "q35"], ["machine type 'q35' is not supported"]),
    (["-drive", "file=/tmp/x"], ["'id' is missing for 'blk' device."]),
    (["-device", "virtio-blk-device,id=b,drive=d,bus=pcie.0"], ["'bus' is not supported"]),
    (["-device", "virtio-gpu,id=g"], ["unsupported device type 'virtio-gpu'"]),
    (["-incoming", "ftp:/x"], ["Invalid incoming uri."]),
    (["-serial", "telnet"], ["unsupported backend 'telnet'"]),
    (["stray"], ["unexpected argument 'stray'"]),
])
def test_bad_options(args, fragments):
    assert_clean_error(run_cli(args), *fragments)


def test_missing_kernel(tmp_path):
    assert_clean_error(run_cli(qmp(tmp_path)),
                       "kernel file is required for microvm machine type, which is not provided")


def test_missing_qmp(kernel):
    assert_clean_error(run_cli(["-kernel", kernel]), "QMP socket is required")


def test_device_references_undefined_drive(tmp_path, kernel):
    r = run_cli(["-kernel", kernel, "-device", "virtio-blk-device,id=b,drive=nope"] + qmp(tmp_path))
    assert_clean_error(r, "drive 'nope' is not defined")


@pytest.mark.parametrize("make, fragment", [
    (lambda p: p / "nothing-here", "does not exist"),
    (lambda p: p, "is a directory"),
])
def test_bad_kernel_path(tmp_path, make, fragment):
    require = os.path.exists("/dev/kvm")
    if not require:
        pytest.skip("the kernel is checked after /dev/kvm is opened")
    r = run_cli(["-kernel", str(make(tmp_path))] + qmp(tmp_path))
    assert_clean_error(r, fragment)


def test_kernel_not_an_image(tmp_path, kvm):
    k = tmp_path / "notes.txt"
    k.write_text("hello, this is not a kernel\n" * 100)
    assert_clean_error(run_cli(["-kernel", str(k)] + qmp(tmp_path)), "neither an ELF vmlinux nor a bzImage")


def test_truncated_elf(tmp_path, kvm, kernel):
    assert_clean_error(run_cli(["-kernel", kernel] + qmp(tmp_path)), "kernel file")


def test_kvm_missing(tmp_path, kernel):
    env = dict(os.environ, STRATOVIRT_KVM_DEVICE=str(tmp_path / "no-kvm"))
    r = subprocess.run([sys.executable, "-m", "stratovirt_py", "-kernel", kernel] + qmp(tmp_path),
                       capture_output=True, text=True, env=env, timeout=30)
    assert_clean_error(r, "KVM is not available")


def test_kvm_device_is_not_kvm(tmp_path, kernel):
    fake = tmp_path / "kvm"
    fake.write_text("")
    env = dict(os.environ, STRATOVIRT_KVM_DEVICE=str(fake))
    r = subprocess.run([sys.executable, "-m", "stratovirt_py", "-kernel", kernel] + qmp(tmp_path),
                       capture_output=True, text=True, env=env, timeout=30)
    assert_clean_error(r, "is not a KVM device")


def test_help_and_version():
    r = run_cli(["-help"])
    assert r.returncode == 0 and "-kernel" in r.stdout
    r = run_cli(["-h"])
    assert r.returncode == 0 and "Usage" in r.stdout
    r = run_cli(["-version"])
    assert r.returncode == 0 and "StratoVirt" in r.stdout


def test_kata_command_line_parses():
    """Every option Kata Containers passes must be understood (parsing only)."""
    from stratovirt_py.cmdline import parse_args
    argv = ("-name sandbox-abc -uuid 3f1c0c3e-8b4d-4a8a-9a53-111111111111 -smp 2 -m 2048 "
            "-kernel /k -append").split() + [
        "tsc=reliable no_timer_check rcupdate.rcu_expedited=1 i8042.direct=1 reboot=k panic=1 "
        "pci=off iommu=off acpi=off quiet 8250.nr_uarts=0 agent.log=debug"] + (
        "-qmp unix:/run/vc/sbs/abc/qmp.socket,server,nowait -D -disable-seccomp "
        "-machine type=microvm,dump-guest-core=off,mem-share=on -initrd /i "
        "-object rng-random,id=objrng0,filename=/dev/urandom "
        "-device virtio-rng-device,rng=objrng0,id=virtio-rng0 "
        "-drive id=rootfs,file=/img,readonly=on,direct=off "
        "-device virtio-blk-device,drive=rootfs,id=virtio-blk0 "
        "-netdev tap,id=eth0,fds=3:4 -device virtio-net-device,netdev=eth0,id=eth0,mac=02:42:ac:11:00:02 "
        "-device vhost-vsock-device,id=vsock-123,guest-cid=3,vhostfd=5 "
        "-device virtio-serial-device,id=virtio-serial0 "
        "-chardev socket,id=charconsole0,path=/run/console.sock,server,nowait "
        "-device virtconsole,chardev=charconsole0,id=virtio-console0,nr=0 "
        "-chardev socket,id=virtio_fs,path=/run/vhost-fs.sock,server,nowait "
        "-device vhost-user-fs-device,chardev=virtio_fs,tag=kataShared,id=virtio-fs0").split()
    cfg, show = parse_args(argv)
    assert show is None
    assert cfg.nr_cpus == 2 and cfg.mem_size == 2048 << 20 and cfg.mem_share
    assert cfg.log_enabled and cfg.log_file is None and cfg.disable_seccomp
    assert cfg.netdevs["eth0"].fds == [3, 4]
    assert cfg.drives["rootfs"].readonly and not cfg.drives["rootfs"].direct
    assert [d.driver for d in cfg.devices] == [
        "virtio-rng-device", "virtio-blk-device", "virtio-net-device", "vhost-vsock-device",
        "virtio-serial-device", "virtconsole", "vhost-user-fs-device"]
    assert "8250.nr_uarts=0" in cfg.cmdline
