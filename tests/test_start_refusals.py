"""Hostile or careless start-up input: each is refused in one line with exit status 1,
before the guest runs, and never hangs the VMM (special files, sizes, ids, numbers)."""

import os
import struct

import pytest

from test_cli import assert_clean_error, qmp
from vmtools import run_cli

from stratovirt_py.cmdline import parse_args
from stratovirt_py.errors import ConfigError


def refused(argv, *fragments):
    with pytest.raises(ConfigError) as info:
        parse_args(argv + ["-kernel", "/k", "-qmp", "unix:/tmp/x.sock,server,nowait"])
    for f in fragments:
        assert f in str(info.value), str(info.value)


# -- the command line ---------------------------------------------------------------------
@pytest.mark.parametrize("argv, fragment", [
    (["-netdev", "tap,id=n0,ifname=a", "-netdev", "tap,id=n0,ifname=b"], "-netdev: id 'n0' is used twice"),
    (["-object", "rng-random,id=r,filename=/dev/urandom", "-object", "iothread,id=r"],
     "-object: id 'r' is used twice"),
    (["-chardev", "pty,id=c", "-chardev", "stdio,id=c"], "-chardev: id 'c' is used twice"),
    (["-iothread", "id=t", "-iothread", "id=t"], "-iothread: id 't' is used twice"),
    (["-device", "virtio-rng-device,id=a\tb,rng=r"], "invalid id"),
    (["-drive", "id=d\nx,file=/f"], "invalid id"),
    (["-pidfile", ""], "-pidfile: the path is empty"),
    (["-initrd", ""], "-initrd: the path is empty"),
])
def test_ids_and_paths(argv, fragment):
    refused(argv, fragment)


@pytest.mark.parametrize("argv", [
    ["-smp", "\u0663"],                 # ARABIC-INDIC DIGIT THREE: int() takes it
    ["-smp", "\uff12"],                 # FULLWIDTH DIGIT TWO
    ["-smp", "1_0"],
    ["-smp", " 2"],
    ["-m", "\u0662\u0665\u0666"],
    ["-netdev", "tap,id=n0,fd=\u0663"],
])
def test_numbers_are_ascii(argv):
    refused(argv, "invalid")


def test_a_refusal_is_one_line_at_the_edge(tmp_path):
    r = run_cli(["-kernel", "/k", "-pidfile", ""] + qmp(tmp_path))
    assert_clean_error(r, "-pidfile: the path is empty")


# -- kernel and initrd --------------------------------------------------------------------
@pytest.fixture
def fifo(tmp_path):
    path = tmp_path / "fifo"
    os.mkfifo(path)
    return str(path)


@pytest.mark.parametrize("which", ["-kernel", "-initrd"])
@pytest.mark.parametrize("special", ["fifo", "/dev/zero", "/dev/null"])
def test_special_files_are_refused_without_hanging(kvm, guest_elf, tmp_path, fifo, which, special):
    path = fifo if special == "fifo" else special
    args = ["-kernel", str(guest_elf)] if which == "-initrd" else []
    r = run_cli(args + [which, path] + qmp(tmp_path), timeout=20)
    assert_clean_error(r, f"{which[1:]} file {path} is not a regular file")


def test_images_larger_than_ram_are_refused_unread(kvm, guest_elf, tmp_path):
    big = tmp_path / "big"
    with open(big, "wb") as f:
        f.truncate(8 << 30)              # sparse: would take 8 GiB of VMM memory to read
    r = run_cli(["-m", "128", "-kernel", str(guest_elf), "-initrd", str(big)] + qmp(tmp_path))
    assert_clean_error(r, "initrd file", "is too big", f"limit is {128 << 20} bytes")
    r = run_cli(["-m", "128", "-kernel", str(big)] + qmp(tmp_path))
    assert_clean_error(r, "kernel file", "is too big")


def test_kernel_entry_outside_ram(kvm, guest_elf, tmp_path):
    data = bytearray(guest_elf.read_bytes())
    struct.pack_into("<Q", data, 24, 0x7FFF_FFFF_0000)    # e_entry
    k = tmp_path / "far-entry.elf"
    k.write_bytes(bytes(data))
    r = run_cli(["-kernel", str(k)] + qmp(tmp_path))
    assert_clean_error(r, "entry point 0x7fffffff0000 is outside guest RAM")


def test_more_memory_than_the_host_has(kvm, guest_elf, tmp_path):
    r = run_cli(["-m", "512G", "-kernel", str(guest_elf), "-append", "sv.hb=0"] + qmp(tmp_path),
                timeout=20)
    if r.returncode == 0:
        pytest.skip("this host maps 512 GiB of guest RAM (overcommit allowed)")
    assert_clean_error(r, "cannot map 524288 MiB of guest RAM")


# -- devices this VMM does not have -------------------------------------------------------
@pytest.mark.parametrize("device", [
    "vhost-vsock-device,id=vsock0,guest-cid=3",
    "virtio-balloon-device,id=balloon0",
    "vhost-user-fs-device,id=fs0,chardev=c0,tag=shared",
])
def test_unsupported_devices_are_refused_not_dropped(kvm, guest_elf, tmp_path, device):
    r = run_cli(["-kernel", str(guest_elf), "-chardev", f"socket,id=c0,path={tmp_path}/fs.sock",
                 "-device", device] + qmp(tmp_path))
    assert_clean_error(r, f"-device {device.split(',')[0]},id={device.split('id=')[1].split(',')[0]}",
                       "not supported")
