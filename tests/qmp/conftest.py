"""Fixtures for the QMP tests: a fake machine, a running server, a raw client."""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
import threading
from typing import Any, Dict, Iterator, List, Optional

import pytest

from stratovirt_py.errors import DeviceError, VmmError
from stratovirt_py.qmp import EventBus, QmpServer


class DeviceNotActiveError(VmmError):
    qmp_class = "DeviceNotActive"


class DeviceNotFoundError(VmmError):
    qmp_class = "DeviceNotFound"


class FakeMachine:
    """Behaves like the VM as the MachineControl contract describes it."""

    def __init__(self, events: EventBus) -> None:
        self.events = events
        self.run_state = "running"
        self.calls: List[tuple] = []
        self.fds: Dict[str, int] = {}
        self.blockdevs: Dict[str, dict] = {}
        self.netdevs: Dict[str, dict] = {}
        self.devices: Dict[str, dict] = {}
        self.migration = "none"
        self.quit_called = threading.Event()
        self.quit_hook: Optional[Any] = None
        self.explode: Optional[BaseException] = None   # raised by query_balloon

    def pause(self) -> None:
        self.calls.append(("pause",))
        if self.run_state != "paused":
            self.run_state = "paused"
            self.events.emit("STOP")

    def resume(self) -> None:
        self.calls.append(("resume",))
        self.run_state = "running"
        self.events.emit("RESUME")

    def quit(self) -> None:
        self.calls.append(("quit",))
        if self.quit_hook is not None:
            self.quit_hook()
        self.quit_called.set()
        self.events.emit("SHUTDOWN", {"guest": False, "reason": "host-qmp-quit"})

    def system_reset(self) -> None:
        self.calls.append(("system_reset",))
        self.events.emit("RESET", {"guest": False, "reason": "host-qmp-system-reset"})

    def system_powerdown(self) -> None:
        self.calls.append(("system_powerdown",))
        self.events.emit("POWERDOWN")

    def cpus(self) -> List[dict]:
        return [{"cpu-index": i, "thread-id": 1000 + i, "arch": "x86",
                 "props": {"socket-id": 0, "core-id": i, "thread-id": 0},
                 "current": i == 0, "halted": False,
                 "qom_path": f"/machine/unattached/device[{i}]"} for i in range(2)]

    def hotpluggable_cpus(self) -> List[dict]:
        return [{"type": "host-x86-cpu", "vcpus-count": 1,
                 "props": {"socket-id": 0, "core-id": i, "thread-id": 0},
                 "qom-path": f"/machine/unattached/device[{i}]"} for i in range(2)]

    def migrate(self, uri: str) -> None:
        self.calls.append(("migrate", uri))
        if not uri.startswith("file:"):
            raise VmmError(f"Invalid uri: {uri}")
        self.migration = "completed"

    def migrate_info(self) -> Dict[str, Any]:
        return {"status": self.migration}

    def migrate_cancel(self) -> None:
        self.calls.append(("migrate_cancel",))
        self.migration = "none"

    def blockdev_add(self, args: dict) -> None:
        self.calls.append(("blockdev_add", args))
        if args["node-name"] in self.blockdevs:
            raise DeviceError(f"Block device {args['node-name']} already exists")
        self.blockdevs[args["node-name"]] = args

    def netdev_add(self, args: dict) -> None:
        self.calls.append(("netdev_add", args))
        self.netdevs[args["id"]] = args

    def blockdev_del(self, node_name: str) -> None:
        self.calls.append(("blockdev_del", node_name))
        self.blockdevs.pop(node_name)

    def netdev_del(self, netdev_id: str) -> None:
        self.calls.append(("netdev_del", netdev_id))
        self.netdevs.pop(netdev_id)

    def device_add(self, args: dict) -> None:
        self.calls.append(("device_add", args))
        if args["driver"] == "virtio-blk-mmio" and args.get("drive") not in self.blockdevs:
            raise DeviceError(f"No drive {args.get('drive')} for device {args['id']}")
        self.devices[args["id"]] = args

    def device_del(self, dev_id: str) -> None:
        self.calls.append(("device_del", dev_id))
        if dev_id not in self.devices:
            raise DeviceNotFoundError(f"Device '{dev_id}' not found")
        del self.devices[dev_id]
        self.events.emit("DEVICE_DELETED", {"device": dev_id,
                                            "path": f"/machine/peripheral/{dev_id}"})

    def add_fd(self, name: str, fd: int) -> None:
        self.calls.append(("add_fd", name))
        old = self.fds.pop(name, None)
        if old is not None:
            os.close(old)
        self.fds[name] = fd

    def balloon(self, value: int) -> None:
        raise DeviceNotActiveError("No balloon device has been activated")

    def query_balloon(self) -> dict:
        if self.explode is not None:
            raise self.explode
        raise DeviceNotActiveError("No balloon device has been activated")

    def close_fds(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()


class RawClient:
    """A QMP client on a plain socket, reading CRLF-terminated lines."""

    def __init__(self, address: Any, family: int = socket.AF_UNIX, timeout: float = 5.0,
                 read_greeting: bool = True) -> None:
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(address)
        self.buf = b""
        self.events: List[dict] = []
        self.greeting_line = self.read_line() if read_greeting else b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read_line(self) -> bytes:
        while b"\r\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError(f"server closed; buffered {self.buf!r}")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line + b"\r\n"

    def read_msg(self) -> dict:
        return json.loads(self.read_line())

    def read_reply(self) -> dict:
        """The next non-event message; events on the way are kept in ``events``."""
        while True:
            msg = self.read_msg()
            if "event" in msg:
                self.events.append(msg)
            else:
                return msg

    def cmd(self, execute: str, arguments: Optional[dict] = None, **extra: Any) -> dict:
        msg: Dict[str, Any] = {"execute": execute}
        if arguments is not None:
            msg["arguments"] = arguments
        msg.update(extra)
        self.send(json.dumps(msg).encode() + b"\n")
        return self.read_reply()

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def sock_dir() -> Iterator[str]:
    # A short directory: AF_UNIX paths are limited to 107 bytes.
    path = tempfile.mkdtemp(prefix="qmp", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def bus() -> EventBus:
    return EventBus()


@pytest.fixture
def machine(bus: EventBus) -> Iterator[FakeMachine]:
    m = FakeMachine(bus)
    yield m
    m.close_fds()


@pytest.fixture
def qmp_path(sock_dir: str) -> str:
    return os.path.join(sock_dir, "qmp.sock")


@pytest.fixture
def server(machine: FakeMachine, bus: EventBus, qmp_path: str) -> Iterator[QmpServer]:
    srv = QmpServer(machine, bus, [f"unix:{qmp_path},server,nowait"])
    srv.start()
    yield srv
    srv.close()


@pytest.fixture
def client(server: QmpServer, qmp_path: str) -> Iterator[RawClient]:
    c = RawClient(qmp_path)
    yield c
    c.close()


@pytest.fixture
def connect(server: QmpServer, qmp_path: str) -> Iterator[Any]:
    """Factory for extra clients of ``server`` (closed at the end of the test)."""
    clients: List[RawClient] = []

    def _connect(address: Any = None, family: int = socket.AF_UNIX, **kw: Any) -> RawClient:
        c = RawClient(qmp_path if address is None else address, family, **kw)
        clients.append(c)
        return c

    yield _connect
    for c in clients:
        c.close()


def wait_until(predicate: Any, timeout: float = 5.0) -> bool:
    """Poll ``predicate`` until it is true or ``timeout`` passes."""
    import time
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.005)
    return bool(predicate())


@pytest.fixture
def wait() -> Any:
    return wait_until
