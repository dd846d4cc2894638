"""A template is checksummed, not trusted: anyone who can write one can recompute the
checksums.  Each crafted field below is refused by a restore in one line naming the
section and the field, before anything is built, and ``stratovirt-snapshot verify``
refuses exactly the same templates."""

import copy

import pytest

from test_snapshot import hb_args, take_template
from vmtools import VmProcess, run_cli

from stratovirt_py.memory import GuestMemory
from stratovirt_py.migration import inspect
from stratovirt_py.migration.format import read_template, write_template

pytestmark = pytest.mark.kvm


@pytest.fixture(scope="module")
def template(tmp_path_factory, guest_elf):
    tmp = tmp_path_factory.mktemp("fields")
    take_template(guest_elf, tmp, tmp / "tpl")
    return tmp / "tpl"


def crafted(tpl, dst, mutate):
    """The template with its sections changed, written with valid checksums."""
    t = read_template(str(tpl), verify=False)
    sections = copy.deepcopy({name: [v, data] for name, (v, data) in t.sections.items()})
    mutate(sections)
    mem = GuestMemory.from_file(t.memory_path, t.mem_size)
    try:
        write_template(str(dst), {"kvm_api_version": t.header["kvm_api_version"]},
                       {name: tuple(vd) for name, vd in sections.items()}, mem)
    finally:
        mem.close()
    return dst


def _set(name, path, value):
    def mutate(sections):
        obj = sections[name][1]
        for key in path[:-1]:
            obj = obj[key]
        if value is _DELETE:
            del obj[path[-1]]
        else:
            obj[path[-1]] = value
    return mutate


_DELETE = object()
BLK_DEV = {"id": "x", "driver": "virtio-blk-device", "slot": 10 ** 12, "serial": None,
           "readonly": False, "drive_size": 0}

CASES = [
    (_set("config", ["devices"], [BLK_DEV]),
     "section 'config': field 'devices[0].slot' is 1000000000000, out of range"),
    (_set("config", ["mem_size"], "128M"), "section 'config': field 'mem_size' is str"),
    (lambda s: s.__setitem__("config", [1, ["not", "a", "dict"]]),
     "section 'config': field '(all)' is list, not a mapping"),
    (_set("serial", ["ier"], "x"), "section 'serial': field 'ier' is str, not an integer"),
    (_set("serial", ["lcr"], 300), "section 'serial': field 'lcr' is 300, out of range"),
    (_set("serial", ["evil"], 1), "section 'serial': field 'evil' is not a field"),
    (_set("vm", ["clock"], -1), "section 'vm': field 'clock' is -1, out of range"),
    (_set("vm", ["pit"], "AAAA"), "section 'vm': field 'pit' is str, not bytes"),
    (_set("vcpus", [0, "msrs", 0], [0x10, 1 << 70]), "section 'vcpus': field '[0].msrs[0][1]'"),
    (_set("vcpus", [0, "tsc_khz"], _DELETE), "section 'vcpus': field '[0].tsc_khz' is missing"),
    (_set("virtio:slot0", ["transport", "queues", 0, "size"], 1 << 20),
     "section 'virtio:slot0': field 'transport.queues[0].size'"),
    (_set("virtio:slot0", ["transport", "config_generation"], True),
     "field 'transport.config_generation' is bool, not an integer"),
    (_set("virtio:slot0", ["device", "capacity"], "big"), "field 'device.capacity' is str"),
    (_set("virtio:slot4", ["device", "pending_rx"], b"x" * (1 << 20)),
     "section 'virtio:slot4': field 'device.pending_rx' is 1048576 long"),
    (_set("virtio:slot4", ["driver"], "virtio-gpu"), "field 'driver' names no virtio device"),
    (lambda s: s.__setitem__("evil", [1, {}]), "has a section 'evil' this version does not know"),
    (lambda s: s["serial"].__setitem__(0, 7), "section 'serial' has version 7, newer than"),
    (lambda s: s.pop("serial"), "has no 'serial' section"),
]


@pytest.mark.parametrize("mutate, fragment", CASES, ids=[c[1][:40] for c in CASES])
def test_crafted_fields_are_refused_by_restore_and_verify(kvm, template, guest_elf, tmp_path,
                                                          capsys, mutate, fragment):
    bad = crafted(template, tmp_path / "bad", mutate)
    r = run_cli(hb_args(guest_elf) + ["-incoming", f"file:{bad}",
                                      "-qmp", f"unix:{tmp_path}/s,server,nowait"])
    err = r.stderr.strip()
    assert r.returncode == 1 and len(err.splitlines()) == 1, err
    assert fragment in err and "Traceback" not in err and "internal error" not in err, err
    assert inspect.main(["verify", str(bad)]) == 1
    out = capsys.readouterr()
    assert out.out == "" and fragment in out.err, out.err


def test_the_untouched_template_passes_both(kvm, template, guest_elf, tmp_path, capsys):
    same = crafted(template, tmp_path / "same", lambda s: None)
    assert inspect.main(["verify", str(same)]) == 0
    assert capsys.readouterr().out == "OK\n"
    with VmProcess(hb_args(guest_elf) + ["-incoming", f"file:{same}"], tmp_path) as vm:
        vm.wait_for(r"^heartbeat \d+$")
        vm.qmp().cmd("quit")
        assert vm.wait() == 0
