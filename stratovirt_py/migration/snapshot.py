"""``migrate {"uri":"file:DIR"}``: write the paused VM as a template.

The QMP thread validates the request and pauses the VM (``STOP`` goes out before
the reply); a worker thread drains the block devices, collects every component's
state and hands it with guest RAM to ``writer.write_template``, which makes the
template appear atomically.  ``query-migrate`` follows ``status``.
"""

from __future__ import annotations

import threading
import time

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs an import at run time
    from typing import Any, Dict, List, Optional

    from .format import Template

from ..logs import get_logger
from ..errors import ConfigError, SnapshotError, VmmError, check_fields, field_error
from . import compat
from .vmstate import VcpuState, VmState, save_vcpu, save_vm, saveable_msrs

log = get_logger(__name__)

# Section name -> newest version this code writes and reads.
SECTION_VERSIONS = {"config": compat.VERSION, "vm": VmState.VERSION, "vcpus": VcpuState.VERSION,
                    "serial": 1}
VIRTIO_SECTION_VERSION = 1


def check_sections(template: Template) -> None:
    """What a restore would refuse in the sections, found before anything is built: an
    unknown section, a newer version, a field of the wrong type or out of range.
    ``stratovirt-snapshot verify`` runs the same checks."""
    from ..devices.serial import SerialState
    from ..devices.setup import VirtioSlot
    for name in SECTION_VERSIONS:
        template.section(name)          # refuses a missing one
    for name, (version, data) in template.sections.items():
        virtio = name.startswith("virtio:slot")
        limit = VIRTIO_SECTION_VERSION if virtio else SECTION_VERSIONS.get(name)
        if limit is None:
            raise SnapshotError(f"template {template.dir} has a section '{name}' this "
                                f"version does not know")
        template.section(name, limit)
        if virtio:
            VirtioSlot.check(name, data)
        elif name == "config":
            compat.check_config(name, data)
        elif name == "vm":
            check_fields(name, data, VmState.FIELDS)
        elif name == "serial":
            check_fields(name, data, SerialState.FIELDS)
        elif name == "vcpus":
            if not isinstance(data, list) or len(data) > 1024:
                raise field_error(name, "(all)", "is not a list of vCPU states")
            for i, vcpu in enumerate(data):
                VcpuState.check(name, vcpu, i)


def parse_uri(uri: str) -> str:
    kind, _, path = uri.partition(":")
    if kind != "file" or not path:
        raise ConfigError(f"Invalid migration uri '{uri}': snapshots are written with file:DIR")
    return path


def collect_sections(vmm, msr_indices: List[int]) -> Dict[str, Any]:
    """Every component's state; the vCPUs must be parked."""
    sections: Dict[str, Any] = {
        "config": (compat.VERSION, compat.describe(vmm.cfg)),
        "vm": (VmState.VERSION, save_vm(vmm.vm)),
        "vcpus": (VcpuState.VERSION, [save_vcpu(v, msr_indices) for v in vmm.vcpus]),
        "serial": (1, vmm.serial.save()),
    }
    for slot in vmm.virtio_slots:
        sections[slot.section] = (VIRTIO_SECTION_VERSION, slot.save())
    return sections


class SnapshotJob:
    def __init__(self, vmm) -> None:
        self.vmm = vmm
        self.status = "none"
        self.error: Optional[str] = None
        self.total_time_ms: Optional[int] = None
        self._cancel = threading.Event()
        self._msr_indices: Optional[List[int]] = None
        self._thread: Optional[threading.Thread] = None
        self._lock = threading.Lock()

    @property
    def active(self) -> bool:
        return self.status in ("setup", "active")

    def start(self, uri: str) -> None:
        path = parse_uri(uri)
        with self._lock:
            if self.active:
                raise VmmError("a snapshot is already being written")
            bad = compat.unsupported_features(self.vmm.cfg)
            if bad:
                raise SnapshotError("snapshot is not supported with " + ", ".join(bad))
            self.vmm.pause()
            self.status = "setup"
            self.error = None
            self._cancel.clear()
            started = threading.Event()
            self._thread = threading.Thread(target=self._run, args=(path, started),
                                            name="snapshot", daemon=True)
            self._thread.start()
            # Waiting hands the GIL over now, instead of after a 5 ms switch interval.
            started.wait(1.0)

    def cancel(self) -> None:
        if self.active:
            self._cancel.set()
            if self._thread is not None:
                self._thread.join(30)

    def _run(self, path: str, started: Optional[threading.Event] = None) -> None:
        if started is not None:
            started.set()
        from .writer import SnapshotCancelled, stamp_template, write_template
        t0 = time.perf_counter()
        try:
            self.status = "active"
            for slot in self.vmm.virtio_slots:
                slot.transport.drain()
            if self._msr_indices is None:
                # One KVM_GET_MSRS per listed MSR to find the readable ones: once per VM.
                self._msr_indices = saveable_msrs(self.vmm.kvm, self.vmm.vcpus[0])
            sections = collect_sections(self.vmm, self._msr_indices)
            header = {"kvm_api_version": self.vmm.kvm.api_version,
                      "vm_name": self.vmm.cfg.name or ""}
            # The verification-cache stamp waits for file timestamps to settle; it is
            # written after "completed" so that the snapshot does not wait for it.
            report = write_template(path, header, sections, self.vmm.memory,
                                    cancel=self._cancel, stamp=False)
            self.total_time_ms = int((time.perf_counter() - t0) * 1000)
            self.status = "completed"
            log.info("snapshot written to %s in %d ms", path, self.total_time_ms)
            stamp_template(path, report.template_id)
        except SnapshotCancelled:
            self.status = "cancelled"
            self.error = "the snapshot was cancelled"
            log.warning("snapshot to %s cancelled; any previous template is intact", path)
        except VmmError as e:
            self.status = "failed"
            self.error = str(e)
            log.error("snapshot to %s failed: %s", path, e)
        except Exception as e:  # never leave query-migrate stuck in 'active'
            self.status = "failed"
            self.error = f"{type(e).__name__}: {e}"
            log.exception("snapshot to %s failed", path)

    def info(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {"status": self.status}
        if self.error:
            out["error-desc"] = self.error
        if self.total_time_ms is not None and self.status == "completed":
            out["total-time"] = self.total_time_ms
        return out
