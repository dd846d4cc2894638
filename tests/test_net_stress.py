"""virtio-net, 100k frames each way: none lost, none reordered.

Host -> guest is paced by the guest's acknowledgements (``sv.netbench=rx``): the host
keeps at most a window of frames beyond the last acknowledged count, fewer than the tap
queues, so any frame missing is one the VMM lost, not one the tap dropped for want of
room.  Guest -> host (``sv.netbench=tx``) is read by a thread into a large socket buffer.
"""

import socket
import threading

import pytest

from nettools import in_netns
from test_net import (ETH_BENCH, GUEST_MAC, HOST_MAC, PACKET_OUTGOING, NetVm, mac_bytes,
                      netns, quit_vm, vm_args)  # noqa: F401 (netns: a fixture)

pytestmark = pytest.mark.kvm

FRAMES = 100_000
ETH_ACK = 0x88B7
WINDOW = 256
SO_RCVBUFFORCE = 33       # <asm-generic/socket.h>; the socket module does not name it


def packet_socket(ns, ifname, etype, rcvbuf=4 << 20):
    def make():
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(etype))
        s.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, rcvbuf)
        s.bind((ifname, etype))
        return s
    return in_netns(ns, make)


def guest_frames(sock, timeout):
    """Frames the guest sent (our own injections are skipped), until ``timeout`` idle."""
    sock.settimeout(timeout)
    while True:
        try:
            data, addr = sock.recvfrom(2048)
        except socket.timeout:
            return
        if addr[2] != PACKET_OUTGOING:
            yield data


def test_100k_frames_host_to_guest_in_order(kvm, netns, guest_elf, tmp_path):  # noqa: F811
    tx = packet_socket(netns, "svtap0", ETH_BENCH)
    acks = packet_socket(netns, "svtap0", ETH_ACK)
    args = vm_args(guest_elf, "ifname=svtap0")
    args[args.index("-append") + 1] = f"sv.netbench=rx,{FRAMES} sv.hb=0"
    head = mac_bytes(GUEST_MAC) + HOST_MAC + ETH_BENCH.to_bytes(2, "big")
    try:
        with NetVm(args, tmp_path, ns=netns) as vm:
            acked = -1
            frames = guest_frames(acks, 20)
            while acked < 0:                          # the guest's "ready": count 0
                acked = int.from_bytes(next(frames)[14:18], "big")
            sent = 0
            while acked < FRAMES:
                while sent < FRAMES and sent - acked < WINDOW:
                    tx.send(head + sent.to_bytes(4, "big") + bytes(42))
                    sent += 1
                acked = max(acked, int.from_bytes(next(frames)[14:18], "big"))
            m = vm.wait_for(rf"^netbench: rx {FRAMES} (\d+) \d+ \d+$", timeout=60)
            assert m.group(1) == "0", "frames out of order or missing"
            quit_vm(vm)
            assert vm.stderr == "", vm.stderr
    finally:
        tx.close()
        acks.close()


def test_100k_frames_guest_to_host_in_order(kvm, netns, guest_elf, tmp_path):  # noqa: F811
    rx = packet_socket(netns, "svtap0", ETH_BENCH, rcvbuf=64 << 20)
    args = vm_args(guest_elf, "ifname=svtap0")
    args[args.index("-append") + 1] = f"sv.netbench=tx,{FRAMES},60 sv.hb=0"
    seqs = []

    def read():
        for f in guest_frames(rx, 10):
            seqs.append(int.from_bytes(f[14:18], "big"))
            if len(seqs) == FRAMES:
                return
    reader = threading.Thread(target=read)
    reader.start()
    try:
        with NetVm(args, tmp_path, ns=netns) as vm:
            vm.wait_for(rf"^netbench: tx {FRAMES} 60 \d+ \d+$", timeout=120)
            reader.join(30)
            assert "netbench: errors" not in vm.output
            quit_vm(vm)
    finally:
        reader.join(30)
        rx.close()
    assert len(seqs) == FRAMES and seqs == list(range(FRAMES)), \
        f"{len(seqs)} frames, first out of order at {next((i for i, s in enumerate(seqs) if s != i), None)}"
