"""The running VM: lifecycle, run state, and the control surface QMP drives."""

from __future__ import annotations

import os
import threading

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs an import at run time
    from typing import Any, Dict, List, Optional

from .logs import get_logger
from .config import VmConfig, check_id
from .devices.bus import Bus
from .errors import VmmError
from .kvm import Kvm, Vm
from .memory import GuestMemory
from .vcpu_thread import VcpuGroup

log = get_logger(__name__)

GUEST_REASONS = {"guest-reset", "guest-shutdown", "guest-panic"}
MAX_NAMED_FDS = 64      # getfd descriptors held at once (each is kept until used)


def _file_stamp(path: str) -> tuple:
    try:
        st = os.stat(path)
    except OSError:
        return ()
    return (st.st_ino, st.st_size, st.st_mtime_ns)


class Vmm:
    """Built by ``builder.create_vm`` (for boot or restore); implements ``qmp.machine.MachineControl``."""

    def __init__(self, cfg: VmConfig, kvm: Kvm, vm: Vm, memory: GuestMemory, events: Any):
        self.cfg = cfg
        self.kvm = kvm
        self.vm = vm
        self.memory = memory
        self.events = events
        self.pio_bus = Bus("port I/O")
        self.mmio_bus = Bus("MMIO")
        self.vcpus: List = []
        self.group: Optional[VcpuGroup] = None
        self.serial = None
        self.i8042 = None
        self.iothread = None
        self.virtio_slots: List = []  # devices.setup.VirtioSlot, in slot order
        self.fds: Dict[str, int] = {}
        self.chardev_backends: Dict[str, Any] = {}   # -chardev id -> open backend
        self.kernel_cmdline_extra: List[str] = []   # virtio_mmio.device=... announcements
        self.run_state = "prelaunch"
        self.exit_code: Optional[int] = None
        self.exit_message = ""
        self._exit_event = threading.Event()
        self._exit_lock = threading.Lock()
        self._state_lock = threading.RLock()
        self._migration = None         # migration.snapshot.SnapshotJob, made on first use
        self._hotplug_ctl = None       # devices.hotplug.Hotplug, made on first use
        self.restored_from = None      # the Template this VM was restored from
        self._template_stamp: Optional[tuple] = None   # its memory file, when we started
        self.cleanups: List = []       # callables run once at exit (terminal mode, sockets)

    # -- lifecycle --------------------------------------------------------------------
    def start(self, paused: bool = False) -> None:
        assert self.group is not None
        if self.iothread is not None:
            self.iothread.start()
        if self.restored_from is not None:
            self._template_stamp = _file_stamp(self.restored_from.memory_path)
            for slot in self.virtio_slots:
                slot.transport.resume_after_restore()
        self.group.start()
        if paused:
            self.run_state = "paused"
        else:
            self.run_state = "running"
            self.group.resume()

    def request_exit(self, reason: str, code: int, message: str = "") -> None:
        """End the VM (first caller wins): SHUTDOWN event, then the main thread exits."""
        if reason in ("guest-reset", "guest-panic") and self._template_changed():
            # Unmodified pages of a MAP_PRIVATE mapping show what the file holds now: a
            # template written in place makes its clones crash, which is no guest event.
            code = 1
            message = (f"the template's memory file {self.restored_from.memory_path} was "
                       f"changed while this VM mapped it (then: {message or reason}); a "
                       f"template must never be written after it was made")
        with self._exit_lock:
            if self.exit_code is not None:
                return
            self.exit_code = code
            self.exit_message = message
        if message:
            (log.error if code else log.info)("%s", message)
        self.run_state = "shutdown"
        if self.events is not None:
            self.events.emit("SHUTDOWN", {"guest": reason in GUEST_REASONS, "reason": reason})
        self._exit_event.set()

    def wait(self) -> int:
        while not self._exit_event.wait(3600):
            pass
        return self.exit_code or 0

    def _template_changed(self) -> bool:
        stamp = self._template_stamp
        return stamp is not None and _file_stamp(self.restored_from.memory_path) != stamp

    def shutdown(self) -> None:
        """Stop the threads and run the clean-ups (called once on the main thread)."""
        if self.group is not None:
            self.group.stop()
        if self.iothread is not None:
            try:
                self.iothread.stop()
            except Exception:  # already stopping; nothing left to save
                pass
        for fn in reversed(self.cleanups):
            try:
                fn()
            except Exception as e:
                log.debug("clean-up failed: %s", e)
        self.cleanups.clear()

    # -- MachineControl ------------------------------------------------------------------
    def pause(self) -> None:
        with self._state_lock:
            if self.run_state not in ("running", "paused"):
                raise VmmError(f"the VM cannot be paused in state '{self.run_state}'")
            if self.run_state == "paused":
                return
            self.group.pause()
            self.run_state = "paused"
            self.events.emit("STOP")

    def resume(self) -> None:
        with self._state_lock:
            if self.run_state == "running":
                return
            if self.run_state != "paused":
                raise VmmError(f"the VM cannot be resumed in state '{self.run_state}'")
            if self._migration is not None and self._migration.active:
                raise VmmError("a snapshot is being written; wait for it or cancel it first")
            self.run_state = "running"
            # A snapshot drains (and so pauses) the devices; they go on with the vCPUs.
            for slot in self.virtio_slots:
                slot.transport.resume()
            self.group.resume()
            self.events.emit("RESUME")

    def quit(self) -> None:
        self.request_exit("host-qmp-quit", 0)

    def system_reset(self) -> None:
        # A microVM ends on reset (as for a guest-requested reset); the orchestrator restarts it.
        self.events.emit("RESET", {"guest": False, "reason": "host-qmp-system-reset"})
        self.request_exit("host-qmp-system-reset", 0)

    def system_powerdown(self) -> None:
        self.events.emit("POWERDOWN")
        if self.i8042 is not None:
            self.i8042.send_ctrl_alt_del()

    def on_guest_reset(self) -> None:
        self.events.emit("RESET", {"guest": True, "reason": "guest-reset"})
        self.request_exit("guest-reset", 0, "guest requested a reset")

    def on_guest_poweroff(self) -> None:
        self.request_exit("guest-shutdown", 0, "guest powered off")

    def cpus(self) -> List[dict]:
        """Per vCPU, in query-cpus-fast's names (the QMP layer shapes them for query-cpus)."""
        tids = self.group.thread_ids if self.group else []
        return [{"cpu-index": i, "current": i == 0, "halted": False,
                 "thread-id": tids[i] if i < len(tids) else 0, "arch": "x86", "target": "x86_64",
                 "qom_path": f"/machine/unattached/device[{i}]",
                 "props": {"socket-id": 0, "core-id": i, "thread-id": 0}}
                for i in range(len(self.vcpus))]

    def hotpluggable_cpus(self) -> List[dict]:
        return [{"type": "host-x86-cpu", "vcpus-count": 1,
                 "qom-path": f"/machine/unattached/device[{i}]",
                 "props": {"socket-id": 0, "core-id": i, "thread-id": 0}}
                for i in range(len(self.vcpus))]

    # -- snapshots (migration/snapshot.py does the work) --------------------------------------
    # Snapshot and hot-plug machinery is built when first asked for, not before the
    # guest runs: a warm start does not wait for it.
    @property
    def migration(self):
        if self._migration is None:
            from .migration.snapshot import SnapshotJob
            self._migration = SnapshotJob(self)
        return self._migration

    def migrate(self, uri: str) -> None:
        self.migration.start(uri)

    def migrate_info(self) -> dict:
        return self.migration.info()

    def migrate_cancel(self) -> None:
        self.migration.cancel()

    # -- hot-replace (devices/hotplug.py does the work) ---------------------------------------
    def blockdev_add(self, args: dict) -> None:
        self._hotplug().blockdev_add(args)

    def netdev_add(self, args: dict) -> None:
        self._hotplug().netdev_add(args)

    def blockdev_del(self, node_name: str) -> None:
        self._hotplug().blockdev_del(node_name)

    def netdev_del(self, netdev_id: str) -> None:
        self._hotplug().netdev_del(netdev_id)

    def device_add(self, args: dict) -> None:
        self._hotplug().device_add(args)

    def device_del(self, dev_id: str) -> None:
        self._hotplug().device_del(dev_id)

    def _hotplug(self):
        if self._hotplug_ctl is None:
            from .devices.hotplug import Hotplug
            self._hotplug_ctl = Hotplug(self)
        return self._hotplug_ctl

    def add_fd(self, name: str, fd: int) -> None:
        # netdev_add names descriptors as NAME[:NAME...]: a name it cannot spell would
        # hold its descriptor for nothing.
        check_id("getfd: fdname", name)
        if ":" in name:
            raise VmmError(f"getfd: fdname '{name}' must not contain ':'")
        if name not in self.fds and len(self.fds) >= MAX_NAMED_FDS:
            raise VmmError(f"getfd: {MAX_NAMED_FDS} descriptors are held already; use "
                           "them (netdev_add) or replace one by its name")
        old = self.fds.pop(name, None)
        if old is not None:
            os.close(old)
        self.fds[name] = fd

    def balloon(self, value: int) -> None:
        raise VmmError("No balloon device has been activated")

    def query_balloon(self) -> dict:
        raise VmmError("No balloon device has been activated")
