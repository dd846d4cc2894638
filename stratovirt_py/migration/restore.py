"""``-incoming file:DIR``: build the VM from a template instead of booting a kernel.

Everything the template could be refused for (format, host, configuration) is
checked before a KVM object exists.  Guest RAM is the template's memory file
mapped MAP_PRIVATE, so restore time does not grow with memory size and the
template is never written.
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs an import at run time
    from typing import Any, Dict

from ..logs import get_logger
from ..config import VmConfig
from ..devices.serial import SerialState
from ..errors import SnapshotError
from ..memory import GuestMemory
from . import compat
from .snapshot import check_sections
from .vmstate import VcpuState, VmState, restore_vcpu, restore_vm

log = get_logger(__name__)


def _state(cls, data: Dict[str, Any], what: str):
    try:
        return cls(**data)
    except TypeError as e:
        raise SnapshotError(f"the template's {what} state is malformed: {e}") from None


def restore_vmm(cfg: VmConfig, events: Any):
    from ..builder import create_vm
    from ..kvm.system import API_VERSION
    from .format import read_template
    tpl_dir = cfg.incoming.path
    # Memory data is checked (or found in the verification cache) before the
    # configuration, so that one message lists every configuration difference.
    template = read_template(tpl_dir, verify=True, kvm_api_version=API_VERSION,
                             stamp_later=True)
    check_sections(template)        # unknown or newer sections, every field's type and range
    saved_cfg = template.section("config")
    compat.place_like(cfg, saved_cfg)
    compat.check(compat.describe(cfg), saved_cfg)

    memory = GuestMemory.from_file(template.memory_path, cfg.mem_size, mapped=cfg.incoming.mapped)
    vmm = create_vm(cfg, events, memory)
    vcpu_states = template.section("vcpus")
    if len(vcpu_states) != len(vmm.vcpus):
        raise SnapshotError(f"template has {len(vcpu_states)} vCPUs, the VM {len(vmm.vcpus)}")
    restore_vm(vmm.vm, _state(VmState, template.section("vm"), "VM"))
    for vcpu, data in zip(vmm.vcpus, vcpu_states):
        data = dict(data, msrs=[tuple(m) for m in data["msrs"]])
        restore_vcpu(vcpu, _state(VcpuState, data, f"vCPU {vcpu.index}"))
    vmm.serial.restore(_state(SerialState, template.section("serial"), "serial"))
    for slot in vmm.virtio_slots:
        if slot.section not in template.sections:
            raise SnapshotError(f"template {tpl_dir} has no state for virtio slot {slot.index}")
        slot.restore(template.section(slot.section))
    vmm.restored_from = template
    log.info("restored from template %s (%s)", tpl_dir, template.template_id)
    return vmm
