"""Property test of the section checks: whatever one field of a restorable template is
replaced with (or dropped), ``check_sections`` either refuses it with a SnapshotError or
lets through only what the state classes can be built from, with the types the code
expects (no TypeError/KeyError later, on the restore path or on a vCPU thread).  And the
same for one field of the state header, checksums recomputed: ``read_template`` reads
it or refuses it with a SnapshotError."""

import copy
import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fuzz_harness import fuzz_settings
from stratovirt_py.devices.serial import SerialState
from stratovirt_py.devices.virtio.blk import BlkState
from stratovirt_py.devices.virtio.mmio import MmioTransportState
from stratovirt_py.devices.virtio.net import NetState
from stratovirt_py.errors import SnapshotError
from stratovirt_py.migration.snapshot import check_sections
from stratovirt_py.migration.vmstate import VcpuState, VmState
from test_template_cli import RESTORABLE

QUEUE = {"max_size": 256, "size": 256, "ready": True, "desc_table": 0x1000, "avail_ring": 0x2000,
         "used_ring": 0x3000, "next_avail": 5, "next_used": 5, "event_idx": True, "indirect": False}
TRANSPORT = {"device_id": 2, "device_features": 1 << 32, "acked_features": 1 << 32,
             "device_features_sel": 0, "driver_features_sel": 1, "queue_sel": 0, "status": 15,
             "interrupt_status": 0, "config_generation": 1, "queues": [QUEUE]}
SECTIONS = dict(
    {name: list(vd) for name, vd in RESTORABLE.items()},
    **{"virtio:slot0": [1, {"driver": "virtio-blk-device", "id": "disk0", "transport": TRANSPORT,
                            "device": {"path": "/img", "capacity": 8, "serial": "",
                                       "readonly": False}}],
       "virtio:slot4": [1, {"driver": "virtio-net-device", "id": None,
                            "transport": dict(TRANSPORT, device_id=1, queues=[QUEUE, QUEUE]),
                            "device": {"mac": "", "offloads": 0, "pending_rx": b""}}]})


class FakeTemplate:
    dir = "/tpl"

    def __init__(self, sections):
        self.sections = {name: tuple(vd) for name, vd in sections.items()}

    def section(self, name, supported_version=None):
        if name not in self.sections:
            raise SnapshotError(f"no {name}")
        version, data = self.sections[name]
        if supported_version is not None and version > supported_version:
            raise SnapshotError("newer")
        return data


def _leaves(value, path=()):
    yield path
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _leaves(v, path + (k,))
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            yield from _leaves(v, path + (i,))


PATHS = [(name,) + p for name, (_, data) in SECTIONS.items() for p in _leaves(data)]
VALUES = st.one_of(st.none(), st.booleans(), st.integers(), st.integers(-1, 300),
                   st.floats(allow_nan=False), st.text(max_size=20), st.binary(max_size=40),
                   st.lists(st.integers(), max_size=3), st.tuples(st.integers(), st.integers()),
                   st.dictionaries(st.text(max_size=5), st.integers(), max_size=3))


def _build(sections):
    """What the restore path constructs from the sections."""
    VmState(**sections["vm"][1])
    SerialState(**sections["serial"][1])
    for v in sections["vcpus"][1]:
        VcpuState(**dict(v, msrs=[tuple(m) for m in v["msrs"]]))
    for name in ("virtio:slot0", "virtio:slot4"):
        slot = sections[name][1]
        MmioTransportState.from_dict(slot["transport"])
        (BlkState if slot["driver"] == "virtio-blk-device" else NetState)(**slot["device"])


def test_the_base_sections_pass():
    check_sections(FakeTemplate(SECTIONS))
    _build(SECTIONS)


@fuzz_settings(400)
@given(path=st.sampled_from(PATHS), value=VALUES, drop=st.booleans())
def test_one_crafted_field_is_refused_or_harmless(path, value, drop):
    sections = copy.deepcopy(SECTIONS)
    parent = sections[path[0]]
    key = 1
    for p in path[1:]:
        parent, key = parent[key], p
    if isinstance(parent, tuple):
        return                            # tuples are rebuilt by the codec, not stored
    original = parent[key]
    if drop and isinstance(parent, dict):
        del parent[key]
    else:
        parent[key] = value
    try:
        check_sections(FakeTemplate(sections))
    except SnapshotError:
        return
    _build(sections)
    # What passed has the type the code expects (None only where a field allows it).
    if not drop:
        same = (type(value) is type(original)
                or (isinstance(original, tuple) and isinstance(value, list))
                or (original is None and isinstance(value, str)))      # an optional string
        assert same or (value is None and path[-1] in ("id", "slot", "serial", "mac",
                                                         "drive_size")), (path, value)


# -- the state header, with valid checksums -----------------------------------------------------
HEADER_VALUES = st.one_of(st.none(), st.booleans(), st.integers(), st.integers(-2, 1 << 40),
                          st.text(max_size=12), st.lists(st.integers(), max_size=3),
                          st.dictionaries(st.text(max_size=6), st.integers(), max_size=2))


@pytest.fixture(scope="module")
def small_template(tmp_path_factory):
    from stratovirt_py.memory import GuestMemory
    from stratovirt_py.migration.format import write_template
    d = tmp_path_factory.mktemp("hdr") / "tpl"
    mem = GuestMemory.anonymous(16 << 20)
    try:
        write_template(str(d), {"kvm_api_version": 12}, RESTORABLE, mem)
    finally:
        mem.close()
    return d


@fuzz_settings(300)
@given(data=st.data(), value=HEADER_VALUES, drop=st.booleans())
def test_a_crafted_header_field_is_read_or_refused(small_template, tmp_path_factory, data, value,
                                                   drop):
    """Any one header field replaced (checksum recomputed): SnapshotError or a template."""
    import json
    import shutil
    from stratovirt_py.migration.format import read_template
    from tplhelpers import rewrite_state
    d = tmp_path_factory.getbasetemp() / "hdr-case"
    shutil.rmtree(d, ignore_errors=True)
    shutil.copytree(small_template, d, symlinks=True)
    state = os.path.realpath(d / "state")
    os.chmod(state, 0o600)
    blob = open(state, "rb").read()
    from stratovirt_py.migration.format import PREAMBLE
    hlen = PREAMBLE.unpack_from(blob)[2]
    header = json.loads(blob[PREAMBLE.size:PREAMBLE.size + hlen])
    path = data.draw(st.sampled_from(list(_leaves(header))[1:]))

    def mutate(h):
        parent = h
        for p in path[:-1]:
            parent = parent[p]
        if drop and isinstance(parent, dict):
            del parent[path[-1]]
        else:
            parent[path[-1]] = value
    rewrite_state(d, mutate_header=mutate)
    for verify in (False, "full"):
        try:
            read_template(str(d), verify=verify, check_host=False)
        except SnapshotError:
            pass
