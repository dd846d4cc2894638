"""virtio-blk: run every request a kick made available, merging neighbours into one syscall.

A driver that streams sequential I/O (the test guest's blkbench, Linux's block layer
with its queue plugged) makes many requests available per kick, and each of them in
Python costs more than the system call it issues.  So a batch is popped whole,
adjacent reads (or adjacent writes) that can go straight to guest memory become one
``preadv``/``pwritev`` over all their buffers, and every request still gets its own
status, in the order the driver made them available.  When the C fast path is built
(``blk_native.py``), the plain requests at the front of the ring go to it first, and
this module takes over at the first request it leaves.

What stays exactly as with one request at a time:
- a malformed chain (QueueError) still puts the device in NEEDS_RESET, after the
  requests popped before it have been executed and returned to the driver;
- requests run in ring order, so a read after a write to the same sectors sees it;
  flushes, GET_ID, discard and anything refused (out of range, read-only, misaligned,
  bounced through the host buffer) run on their own through ``Blk.handle_request``;
- a merged transfer that fails is retried request by request, so each request gets the
  status it would have had alone.
"""

from __future__ import annotations

from ...logs import get_logger
from .queue import DescriptorChain, QueueError

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs an import at run time
    from typing import List, Optional, Tuple
    from .blk import Blk
    from .queue import Queue

log = get_logger(__name__)

T_IN = 0                 # VIRTIO_BLK_T_IN / _OUT, as in blk.py
T_OUT = 1
SECTOR_SIZE = 512
HEADER_SIZE = 16
IOV_MAX = 1024


class _Transfer:
    """A read or write that can be done in place: its offset and guest-memory views."""

    __slots__ = ("chain", "write", "offset", "end", "views", "nbytes", "status_addr")

    def __init__(self, chain: DescriptorChain, write: bool, offset: int, views: list,
                 nbytes: int, status_addr: int):
        self.chain = chain
        self.write = write
        self.offset = offset
        self.end = offset + nbytes
        self.views = views
        self.nbytes = nbytes
        self.status_addr = status_addr


def run_batch(dev: "Blk", q: Queue) -> Tuple[int, Optional[QueueError]]:
    """Pop and complete every available request: (how many completed, the malformed
    chain's error that ended the batch, if any, for the caller to raise once it has
    signalled the completions)."""
    native = dev.native
    done = native.run(dev, q) if native is not None else 0
    items: List[object] = []           # _Transfer, or a chain for handle_request
    error: Optional[QueueError] = None
    try:
        for _ in range(q.pending()):
            chain = q.pop()
            items.append(_classify(dev, chain) or chain)
    except QueueError as e:
        error = e
    i, n = 0, len(items)
    while i < n:
        item = items[i]
        if not isinstance(item, _Transfer):
            try:
                used = dev.handle_request(item)
            except QueueError as e:
                for _ in range(n - i - 1):  # popped but never run: as if never popped
                    q.undo_pop()
                return done, e
            q.add_used(item.head, used)
            i += 1
            done += 1
            continue
        j = i + 1
        iovs = len(item.views)
        while j < n:
            nxt = items[j]
            if not isinstance(nxt, _Transfer) or nxt.write != item.write or \
                    nxt.offset != items[j - 1].end or iovs + len(nxt.views) > IOV_MAX:
                break
            iovs += len(nxt.views)
            j += 1
        _run_group(dev, q, items[i:j])
        done += j - i
        i = j
    return done, error


def _classify(dev: "Blk", chain: DescriptorChain) -> Optional[_Transfer]:
    """A _Transfer for a plain in-range read/write doable in place, else None."""
    readable, writable = chain.readable, chain.writable
    if not readable or readable[0][1] != HEADER_SIZE or not writable:
        return None                    # unusual layouts (and errors) take the general path
    mem = chain.mem
    rtype, _, sector = dev.header_struct.unpack_from(mem.view(readable[0][0], HEADER_SIZE))
    status_addr, status_len = writable[-1]
    status_addr += status_len - 1
    if rtype == T_IN:
        if status_len != 1:
            return None
        segments = writable[:-1]
        nbytes = chain.writable_len - 1
        write = False
    elif rtype == T_OUT:
        if dev.readonly or len(writable) != 1:
            return None
        segments = readable[1:]
        nbytes = chain.readable_len - HEADER_SIZE
        write = True
    else:
        return None
    if nbytes == 0 or nbytes % SECTOR_SIZE or sector * SECTOR_SIZE + nbytes > dev.capacity * SECTOR_SIZE:
        return None
    views = dev.direct_views(chain, segments)
    if views is None:
        return None
    return _Transfer(chain, write, sector * SECTOR_SIZE, views, nbytes, status_addr)


def _run_group(dev: "Blk", q: Queue, group: List[_Transfer]) -> None:
    first = group[0]
    results: List[Tuple[int, int]]
    try:
        views = first.views if len(group) == 1 else [v for t in group for v in t.views]
        if first.write:
            dev.pwritev_full(views, first.offset)
        else:
            dev.preadv_full(views, first.offset)
        results = [(0, 0 if t.write else t.nbytes) for t in group]
    except OSError as e:
        if len(group) == 1:
            _log_failure(dev, first, e)
            results = [(1, 0)]
        else:                           # alone, each request gets its own status
            results = [_run_alone(dev, t) for t in group]
    mem = first.chain.mem
    for t, (status, written) in zip(group, results):
        mem.view(t.status_addr, 1)[0] = status
        q.add_used(t.chain.head, written + 1)


def _run_alone(dev: "Blk", t: _Transfer) -> Tuple[int, int]:
    try:
        if t.write:
            dev.pwritev_full(t.views, t.offset)
            return 0, 0
        dev.preadv_full(t.views, t.offset)
        return 0, t.nbytes
    except OSError as e:
        _log_failure(dev, t, e)
        return 1, 0


def _log_failure(dev: "Blk", t: _Transfer, e: OSError) -> None:
    log.warning("%s: %s: request type %d at sector %d failed: %s", dev.id, dev.path,
                T_OUT if t.write else T_IN, t.offset // SECTOR_SIZE, e.strerror or e)
