"""The stratovirt-snapshot command: info and verify."""

import os
import subprocess
import sys

import pytest

from tplhelpers import MiB
from stratovirt_py.migration import inspect as cli
from stratovirt_py.migration.format import write_template

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SECTIONS = {
    "cpu": (1, {"regs": (1, 2), "xsave": b"\x00\x01" * 100}),
    "config": (1, {"mem_size": 64 * MiB, "nr_cpus": 2, "machine": "microvm",
                   "devices": [{"type": "virtio-blk-device", "id": "rootfs", "file": "/img"},
                               {"type": "virtio-net-device", "id": "net0",
                                "mac": "52:54:00:12:34:56"}, "odd"]}),
}


# What a restore accepts (field types and ranges; KVM would judge the blob contents):
# verify says OK only for such a template.
_VCPU = {"index": 0, "mp_state": b"\0" * 4, "regs": b"\0" * 144, "sregs": b"\0" * 312,
         "fpu": b"\0" * 416, "xsave": b"\0" * 4096, "xcrs": b"\0" * 392,
         "debugregs": b"\0" * 128, "lapic": b"\0" * 1024, "msrs": [(0x10, 5)],
         "vcpu_events": b"\0" * 64, "tsc_khz": 0}
RESTORABLE = {
    "config": (1, {"machine": "microvm", "mem_size": 64 * MiB, "nr_cpus": 1, "devices": []}),
    "vm": (1, {"pic_master": b"\0" * 520, "pic_slave": b"\0" * 520, "ioapic": b"\0" * 520,
               "pit": b"\0" * 112, "clock": 1}),
    "vcpus": (1, [_VCPU]),
    "serial": (1, {"ier": 0, "lcr": 3, "mcr": 8, "fcr": 0, "scr": 0, "dll": 12, "dlh": 0,
                   "thre_pending": False, "rx": b""}),
}


@pytest.fixture
def tpl(tmp_path, guest):
    d = tmp_path / "tpl"
    write_template(str(d), {"kvm_api_version": 12}, SECTIONS, guest)
    return d


@pytest.fixture
def restorable(tmp_path, guest):
    d = tmp_path / "restorable"
    write_template(str(d), {"kvm_api_version": 12}, RESTORABLE, guest)
    return d


def test_info(tpl, capsys):
    assert cli.main(["info", str(tpl)]) == 0
    out = capsys.readouterr().out
    assert "kvm api:        12" in out
    assert "size:         67108864 (64.0 MiB)" in out
    assert "on disk:" in out and "%" in out
    assert "cpu                  version 1" in out
    assert "config               version 1" in out
    assert "nr_cpus: 2" in out
    assert "devices: 3" in out
    assert "type=virtio-net-device id=net0 mac=52:54:00:12:34:56" in out
    assert "machine: microvm" in out


def test_verify_ok(restorable, capsys):
    assert cli.main(["verify", str(restorable)]) == 0
    out = capsys.readouterr()
    assert out.out == "OK\n" and out.err == ""


def test_verify_refuses_what_a_restore_would(tmp_path, guest, capsys):
    """Intact (every checksum right), but not restorable: verify says so."""
    for name, sections, words in [
            ("unknown", dict(RESTORABLE, cpu=(1, {})), "has a section 'cpu' this version does not know"),
            ("newer", dict(RESTORABLE, vm=(2, RESTORABLE["vm"][1])), "section 'vm' has version 2"),
            ("field", dict(RESTORABLE, serial=(1, dict(RESTORABLE["serial"][1], dll=1 << 40))),
             "section 'serial': field 'dll' is 1099511627776, out of range"),
            ("missing", {"config": RESTORABLE["config"]}, "has no 'vm' section")]:
        d = tmp_path / name
        write_template(str(d), {"kvm_api_version": 12}, sections, guest)
        assert cli.main(["verify", str(d)]) == 1
        assert words in capsys.readouterr().err


def test_verify_corrupt(tpl, capsys):
    path = os.path.realpath(tpl / "memory")
    with open(path, "r+b") as f:
        f.seek(5 * MiB + 4096 * 3 + 1)
        f.write(b"\xaa")
    assert cli.main(["verify", str(tpl)]) == 1
    out = capsys.readouterr()
    assert out.out == ""
    assert out.err.startswith("stratovirt-snapshot: memory file ")
    assert "chunk 2" in out.err and "Traceback" not in out.err


def test_verify_host_check(tmp_path, guest, capsys):
    d = tmp_path / "tpl"
    write_template(str(d), {"kvm_api_version": 12, "cpu_vendor": "SomeOtherVendor"}, RESTORABLE,
                   guest)
    assert cli.main(["verify", str(d)]) == 1
    assert "SomeOtherVendor CPU" in capsys.readouterr().err
    assert cli.main(["verify", "--no-host-check", str(d)]) == 0
    assert cli.main(["info", str(d)]) == 0  # info shows any template


def test_subprocess_errors_have_no_traceback(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT)
    for args in (["verify", str(tmp_path / "missing")], ["info", str(tmp_path)]):
        r = subprocess.run([sys.executable, "-m", "stratovirt_py.migration.inspect", *args],
                           capture_output=True, text=True, env=env)
        assert r.returncode == 1
        assert r.stderr.startswith("stratovirt-snapshot: ")
        assert "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "stratovirt_py.migration.inspect"],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 2 and "Traceback" not in r.stderr
