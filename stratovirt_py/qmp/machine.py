"""What the QMP server needs from the running VM.

The server is written against this Protocol, not against ``stratovirt_py.vmm``, so
that it can be tested with a fake machine and so that the VM's internals can change
without touching the protocol code.  Methods report failure by raising ``VmmError``
(or a subclass); the dispatcher turns that into a QMP error reply in one place.
Events (STOP, RESUME, SHUTDOWN, RESET, POWERDOWN, DEVICE_DELETED) are emitted by the
machine through the ``EventBus``, never by the server, so that a guest-initiated
change and a QMP-initiated one produce the same event.
"""

from __future__ import annotations

from typing import Any, Dict, List, Protocol


class MachineControl(Protocol):
    """The VM as seen from QMP (implemented by ``stratovirt_py.vmm``)."""

    #: "running" | "paused" | "shutdown" | "inmigrate" | ... (query-status "status")
    run_state: str

    def pause(self) -> None:
        """Stop every vCPU; emits STOP before returning; no-op when already paused."""

    def resume(self) -> None:
        """Let the vCPUs run again; emits RESUME."""

    def quit(self) -> None:
        """Ask the process to exit with status 0; emits SHUTDOWN (host-qmp-quit).

        Called by the QMP server on its own thread after the ``quit`` reply has been
        written, so it must not wait for the QMP server thread to finish.
        """

    def system_reset(self) -> None:
        """Reset the guest; emits RESET."""

    def system_powerdown(self) -> None:
        """Ask the guest to power down; emits POWERDOWN."""

    def cpus(self) -> List[Dict[str, Any]]:
        """One dict per vCPU: cpu-index, thread-id, arch, props, current, halted, qom_path."""

    def hotpluggable_cpus(self) -> List[Dict[str, Any]]:
        """query-hotpluggable-cpus entries, returned to the client as they are."""

    def migrate(self, uri: str) -> None:
        """Start a snapshot to ``uri`` (``file:DIR``)."""

    def migrate_info(self) -> Dict[str, Any]:
        """query-migrate's reply: ``{"status": "none"|"setup"|"active"|"completed"|"failed"
        |"cancelled"}``, with ``error-desc`` when it failed (StratoVirt reports "none", not {})."""

    def migrate_cancel(self) -> None:
        """Cancel a snapshot in progress."""

    def blockdev_add(self, args: Dict[str, Any]) -> None:
        """Register a block backend (arguments already validated by the schema)."""

    def netdev_add(self, args: Dict[str, Any]) -> None:
        """Register a network backend."""

    def blockdev_del(self, node_name: str) -> None:
        """Forget a block backend no device uses, freeing its node-name."""

    def netdev_del(self, netdev_id: str) -> None:
        """Forget a network backend no device uses (closing descriptors it still holds)."""

    def device_add(self, args: Dict[str, Any]) -> None:
        """Plug a device into an empty virtio-mmio slot."""

    def device_del(self, dev_id: str) -> None:
        """Empty a slot; emits DEVICE_DELETED {"device": ID, "path": ...}."""

    def add_fd(self, name: str, fd: int) -> None:
        """Keep ``fd`` (received by ``getfd``) under ``name``; the machine owns it after."""

    def balloon(self, value: int) -> None:
        """Set the balloon target (bytes); may raise VmmError when there is no balloon."""

    def query_balloon(self) -> Dict[str, Any]:
        """{"actual": bytes}; may raise VmmError when there is no balloon."""
