"""virtio devices over virtio-mmio (version 2).

    queue.py    split virtqueue, device side, strictly validated (QueueError on bad input)
    device.py   constants and the VirtioDevice base every device derives from
    mmio.py     MmioTransport: the bus device for one 0x200-byte slot; EventFdIrq, CountingIrq
    blk.py      Blk(path, readonly, direct, serial, iops_total, aio)
    rng.py      Rng(path, max_bytes, period_ms)
    console.py  Console(backend)  (virtio-serial-device + one virtconsole port)

Wiring one device into a machine (vm = the KVM layer, io = the IoThread):

    dev = Blk("/img", serial="s1", id="virtio-blk0")
    irq_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC); vm.register_irqfd(irq_fd, gsi)
    t = MmioTransport(dev, mem, EventFdIrq(irq_fd), iothread=io)
    mmio_bus.insert(t, base, MMIO_SLOT_SIZE)
    for offset, datamatch, fd in t.ioeventfds():   # 4-byte write of datamatch to base+offset
        vm.register_ioeventfd(base + offset, fd, datamatch=datamatch, length=4)

Snapshot: ``t.drain()`` (after pausing vCPUs), then ``t.save()`` / ``dev.save()``; ``t.resume()``
if the VM goes on.  Restore: ``t.restore(ts)``, ``dev.restore(ds)``, then, with guest memory
in place, ``t.resume_after_restore()``.  Shutdown: ``t.close()`` (closes eventfds and the
device's backend).
"""
