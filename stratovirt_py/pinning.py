"""Where the threads that share guest memory with the guest run, on kvm_pvm hosts.

On hosts whose /dev/kvm is kvm_pvm (software virtualization), a vCPU thread polling
guest memory was seen to miss writes made by the I/O thread while the two ran on
different CPUs (virtio used-ring entries and status bytes read stale: the
test_blk_many_requests_all_complete regression test fails in most runs).  Measured:
vCPU thread and I/O thread on the same CPU pass every time, on different CPUs fail
every time, wherever the main and QMP threads run.  So on kvm_pvm the data plane
(vCPU threads and the I/O thread) shares one CPU and the rest of the VMM floats.

Not an ordering problem on our side: the device writes the status byte, then the used
element, then the used index, and x86 keeps one thread's stores in that order.  Measured
with `tools/pvm-stale-read` (2026-12-06, 2-CPU AMD host): the polling guest read a stale
status (and its ring then fell out of step) in 11 of 70 runs; with one exit to the VMM
between reading the used index and reading the status (the test guest's `sv.pollexit`),
in 0 of 86.  Kicking the vCPU out of KVM_RUN from the host after every completion did not
help (5 of 16).  What fits: the kvm_pvm emulator, which runs guest CPL0 code in batches,
serves a guest page the guest itself wrote earlier in the batch (here: the status it set
to 0xff when it queued the request) from a view that writes from another CPU do not
reach until the batch ends.  A guest that leaves the batch between queueing and reading
(an interrupt-driven Linux guest does, through its interrupt handler's exits) may not be
affected; only the polling test guest was tried.

The CPU is handed out round-robin through a counter shared by the VMs of this host,
so clones started together spread over the CPUs instead of piling onto one.
STRATOVIRT_PVM_PIN=off turns this off; hardware KVM needs none of it.
"""

from __future__ import annotations

import os

from .logs import get_logger

log = get_logger(__name__)

# One byte appended per VM started by this user: the offset after our append is a
# number no other VM got, without a lock anyone could hold.
COUNTER = "/dev/shm/stratovirt-cpu-rr-{uid}"
COUNTER_LIMIT = 1 << 20

# The CPU the data-plane threads run on, or None: they run anywhere.
data_plane_cpu = None


def _next_index() -> int:
    """A number that goes up by one for every VM this user starts (the pid when unavailable)."""
    try:
        fd = os.open(COUNTER.format(uid=os.getuid()),
                     os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    except OSError:
        return os.getpid()
    try:
        os.write(fd, b".")
        n = os.lseek(fd, 0, os.SEEK_CUR)
        if n >= COUNTER_LIMIT:
            os.ftruncate(fd, 0)
        return n
    except OSError:
        return os.getpid()
    finally:
        os.close(fd)


def choose() -> None:
    """Decide the data plane's CPU for this VM (main thread, before any thread starts)."""
    global data_plane_cpu
    if os.environ.get("STRATOVIRT_PVM_PIN", "on") == "off" or not os.path.exists("/sys/module/kvm_pvm"):
        return
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except OSError:
        return
    data_plane_cpu = cpus[_next_index() % len(cpus)]
    log.info("kvm_pvm host: vCPU and I/O threads run on CPU %d", data_plane_cpu)


def pin_this_thread() -> None:
    """Called first thing by a vCPU or I/O thread."""
    if data_plane_cpu is None:
        return
    try:
        os.sched_setaffinity(0, {data_plane_cpu})
    except OSError as e:
        log.warning("kvm_pvm host: cannot pin a data-plane thread to CPU %d: %s", data_plane_cpu, e)
