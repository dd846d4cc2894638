"""One thread per vCPU: the KVM_RUN loop and the pause/park handshake.

Pausing must be exact: ``VcpuGroup.pause()`` returns only when every vCPU thread
sits outside KVM_RUN with any half-done port/MMIO exit completed (a KVM_RUN with
``immediate_exit`` set finishes it), so that registers and memory read afterwards
are a consistent snapshot.  Threads are kicked out of KVM_RUN with a real-time
signal whose handler does nothing.
"""

from __future__ import annotations

# _signal, not signal: the wrapper imports enum, milliseconds before the vCPU may run
import _signal as signal
import threading

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs an import at run time
    from typing import Callable, List

from . import pinning
from .logs import get_logger
from .devices.bus import Bus
from .kvm import KvmError, Vcpu
from .kvm.ioctls import ffi, lib

log = get_logger(__name__)

KICK_SIGNAL = signal.SIGRTMIN


def install_kick_handler() -> None:
    """Must run on the main thread before vCPU threads start."""
    signal.signal(KICK_SIGNAL, lambda signum, frame: None)


class VcpuGroup:
    def __init__(self, vcpus: List[Vcpu], pio: Bus, mmio: Bus,
                 on_exit: Callable[[str, int, str], None]):
        """``on_exit(reason, exit_code, message)`` is called once a vCPU ends the VM."""
        self.vcpus = vcpus
        self.pio = pio
        self.mmio = mmio
        self._on_exit = on_exit
        self._cond = threading.Condition()
        self._want_pause = True      # threads start parked; resume() lets them run
        self._stopping = False
        self._parked = 0
        self.threads: List[threading.Thread] = []
        self.thread_ids: List[int] = [0] * len(vcpus)

    def start(self) -> None:
        for v in self.vcpus:
            t = threading.Thread(target=self._thread_main, args=(v,), name=f"vcpu{v.index}",
                                 daemon=True)
            self.threads.append(t)
            t.start()
        with self._cond:
            self._cond.wait_for(lambda: self._parked == len(self.vcpus))

    # -- control (any thread) --------------------------------------------------------
    def pause(self) -> None:
        with self._cond:
            if self._want_pause:
                self._cond.wait_for(lambda: self._parked == len(self.vcpus) or self._stopping)
                return
            self._want_pause = True
        self._kick_all()
        with self._cond:
            self._cond.wait_for(lambda: self._parked == len(self.vcpus) or self._stopping)

    def resume(self) -> None:
        with self._cond:
            self._want_pause = False
            self._cond.notify_all()
            # Wait (without the GIL) until they have left the park: otherwise the
            # caller keeps the GIL and a vCPU waits out the 5 ms switch interval.
            self._cond.wait_for(lambda: self._parked == 0 or self._stopping, timeout=1.0)

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._kick_all()

    @property
    def paused(self) -> bool:
        return self._want_pause

    def _kick_all(self) -> None:
        for v, t in zip(self.vcpus, self.threads):
            v.set_immediate_exit(True)
            if t.ident is not None and t.is_alive():
                try:
                    signal.pthread_kill(t.ident, KICK_SIGNAL)
                except (ProcessLookupError, OSError):
                    pass

    # -- the vCPU thread -----------------------------------------------------------
    def _park(self, vcpu: Vcpu) -> bool:
        """Complete any pending exit, then wait while paused. False when stopping."""
        vcpu.set_immediate_exit(True)
        try:
            vcpu.run_once()
        except KvmError as e:
            log.debug("vcpu%d: completing exit before pause: %s", vcpu.index, e)
        vcpu.set_immediate_exit(False)
        with self._cond:
            self._parked += 1
            self._cond.notify_all()
            while self._want_pause and not self._stopping:
                self._cond.wait()
            self._parked -= 1
            self._cond.notify_all()
            return not self._stopping

    def _thread_main(self, vcpu: Vcpu) -> None:
        pinning.pin_this_thread()
        self.thread_ids[vcpu.index] = threading.get_native_id()
        try:
            self._loop(vcpu)
        except KvmError as e:
            self._on_exit("error", 1, f"vCPU {vcpu.index}: {e}")
        except Exception as e:  # a bug must end the VM with a message, not hang it
            log.exception("vcpu%d crashed", vcpu.index)
            self._on_exit("error", 1, f"vCPU {vcpu.index} failed: {e}")

    def _loop(self, vcpu: Vcpu) -> None:
        run = vcpu.run
        io = vcpu.exit_io
        mmio = vcpu.exit_mmio
        buf = vcpu.run_buf
        pio_bus, mmio_bus = self.pio, self.mmio
        EXIT_IO, EXIT_MMIO = lib.KVM_EXIT_IO, lib.KVM_EXIT_MMIO
        IO_OUT = lib.KVM_EXIT_IO_OUT
        while True:
            if self._want_pause or self._stopping:
                if not self._park(vcpu):
                    return
                continue
            if vcpu.run_once():
                continue        # EINTR/EAGAIN: a kick; the flags above say why
            reason = run.exit_reason
            if reason == EXIT_IO:
                port, size, count, off = io.port, io.size, io.count, io.data_offset
                if io.direction == IO_OUT:
                    for k in range(count):
                        start = off + k * size
                        pio_bus.write(port, bytes(buf[start:start + size]))
                else:
                    for k in range(count):
                        start = off + k * size
                        buf[start:start + size] = pio_bus.read(port, size)[:size]
            elif reason == EXIT_MMIO:
                addr, length = mmio.phys_addr, mmio.len
                if mmio.is_write:
                    mmio_bus.write(addr, bytes(ffi.buffer(mmio.data, length)))
                else:
                    data = mmio_bus.read(addr, length)[:length]
                    ffi.memmove(mmio.data, data, len(data))
            elif not self._handle_rare_exit(vcpu, reason):
                return

    def _handle_rare_exit(self, vcpu: Vcpu, reason: int) -> bool:
        if reason == lib.KVM_EXIT_SHUTDOWN:
            self._on_exit("guest-reset", 0, f"vCPU {vcpu.index}: triple fault, resetting the guest")
            return False
        if reason == lib.KVM_EXIT_SYSTEM_EVENT:
            kind = vcpu.exit_system_event.type
            if kind == lib.KVM_SYSTEM_EVENT_RESET:
                self._on_exit("guest-reset", 0, "guest requested a reset")
            elif kind == lib.KVM_SYSTEM_EVENT_SHUTDOWN:
                self._on_exit("guest-shutdown", 0, "guest powered off")
            else:
                self._on_exit("guest-panic", 1, f"guest system event {kind}")
            return False
        if reason == lib.KVM_EXIT_HLT:
            self._on_exit("guest-shutdown", 0, "guest halted")
            return False
        if reason == lib.KVM_EXIT_INTERNAL_ERROR:
            info = vcpu.exit_internal
            sub = info.suberror
            what = {1: "emulation failure", 2: "simultaneous exceptions",
                    3: "delivery event failure"}.get(sub, f"suberror {sub}")
            data = " ".join(f"{info.data[i]:#x}" for i in range(min(info.ndata, 16)))
            try:
                rip = f" at rip {vcpu.get('regs').rip:#x}"
            except KvmError:
                rip = ""
            self._on_exit("error", 1, f"vCPU {vcpu.index}: KVM internal error ({what}){rip}"
                          + (f", data {data}" if data else ""))
            return False
        if reason == lib.KVM_EXIT_FAIL_ENTRY:
            code = vcpu.exit_fail_entry.hardware_entry_failure_reason
            self._on_exit("error", 1, f"vCPU {vcpu.index}: KVM entry failed (reason {code:#x})")
            return False
        if reason in (lib.KVM_EXIT_INTR, lib.KVM_EXIT_IRQ_WINDOW_OPEN):
            return True
        self._on_exit("error", 1, f"vCPU {vcpu.index}: unexpected KVM exit {reason}")
        return False
