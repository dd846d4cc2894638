"""Cold boot: stratovirt-py beside QEMU -M microvm booting the same test-guest ELF.

    .venv/bin/python benches/boot.py [--reps 10] [--mem 128] [--json FILE]

For each repetition (ours and QEMU interleaved) the time from just before the process
is spawned to: the first byte on the serial console, the banner line
``SVGUEST v1 booted`` and the line ``heartbeat 1`` (guest command line ``sv.hb=10``:
the first heartbeat comes 10 ms after the guest starts its heartbeat loop).
Note that our VMM appends its six ``virtio_mmio.device=`` slots to the kernel command line
(as StratoVirt does), so our guest prints a ~270 bytes longer ``cmdline:`` line: one
OUT exit per byte. A second boot per repetition with ``--pad`` extra command-line bytes
measures that per-byte (per-exit) cost from the arrival times of the banner and the
``hb-addr:`` line within one run.
QEMU boots the ELF through its PVH note, ours through the 64-bit Linux entry.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common as C  # noqa: E402


def one_boot(peer: str, qemu: str, kernel: str, mem: int, tmp: str, i: int,
             pad: int = 0) -> dict:
    qmp = os.path.join(tmp, f"{peer}-{i}-{pad}.qmp")
    append = "sv.hb=10" + (" sv.pad=" + "x" * pad if pad else "")
    if peer == "ours":
        argv = C.stratovirt_argv(kernel, mem, append, qmp)
    else:
        argv = C.qemu_argv(qemu, kernel, mem, append, qmp)
    vm = C.Vmm(peer, argv, qmp, env=C.NO_POOL_ENV if peer != "qemu" else None)
    try:
        first = vm.wait_first_byte(60)
        banner, _, _ = vm.wait_line(lambda l: l == C.BANNER, 60)
        hb, n = vm.wait_heartbeat(60)
        assert n == 1, f"{peer}: first heartbeat is {n}"
        out = {"first_byte": first, "banner": banner, "heartbeat1": hb}
        if pad:
            # serial cost per byte: one OUT exit per byte (PROTOCOL.md); the `cmdline:`
            # and `hb-addr:` lines arrive between the banner and the `hb-addr:` line's end
            t_hb, line, idx = vm.wait_line(lambda l: l.startswith(b"hb-addr:"), 10)
            nbytes = sum(len(l) + 1 for _, l in vm.lines[1:idx + 1])
            out["us_per_byte"] = (t_hb - banner) * 1000.0 / nbytes
        return out
    finally:
        vm.kill()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--mem", type=int, default=128, help="guest memory, MiB")
    ap.add_argument("--pad", type=int, default=3000,
                    help="extra command-line bytes for the serial per-byte cost runs (0: skip)")
    ap.add_argument("--no-qemu", action="store_true")
    ap.add_argument("--json", help="write the results here")
    a = ap.parse_args(argv)

    qemu = None if a.no_qemu else C.ensure_qemu()
    if not a.no_qemu and not qemu:
        return 2
    C.header("boot: process start -> serial milestones", qemu)
    kernel = C.guest_elf()
    tmp = C.bench_dir("svbench-boot-")
    peers = ["ours"] + (["qemu"] if qemu else [])
    samples = {p: {"first_byte": [], "banner": [], "heartbeat1": []} for p in peers}
    load = C.CpuLoad()
    try:
        for i in range(a.reps):
            for p in peers:
                r = one_boot(p, qemu, kernel, a.mem, tmp, i)
                for k, v in r.items():
                    samples[p][k].append(v)
                if a.pad:
                    r = one_boot(p, qemu, kernel, a.mem, tmp, i, a.pad)
                    samples[p].setdefault("us_per_byte", []).append(r["us_per_byte"])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    cpu = C.CpuLoad.stop(load)

    labels = [("first_byte", "spawn -> first serial byte (ms)"),
              ("banner", "spawn -> `SVGUEST v1 booted` (ms)"),
              ("heartbeat1", "spawn -> `heartbeat 1`, sv.hb=10 (ms)")]
    rows = []
    for key, label in labels:
        ours = C.median(samples["ours"][key])
        q = C.median(samples["qemu"][key]) if qemu else None
        rows.append([label, C.fmt(ours), C.fmt(q), C.ratio(ours, q)])
    if a.pad:
        ours = C.median(samples["ours"]["us_per_byte"])
        q = C.median(samples["qemu"]["us_per_byte"]) if qemu else None
        rows.append([f"serial output, µs per byte (1 OUT exit each; {a.pad}-byte cmdline)",
                     C.fmt(ours), C.fmt(q), C.ratio(ours, q)])
    C.table(["median of %d, %d MiB guest" % (a.reps, a.mem), "stratovirt-py", "QEMU",
             "ours/QEMU"], rows)
    for p in peers:
        qs = C.quantiles(samples[p]["heartbeat1"])
        print(f"{p:5s} heartbeat 1: min {qs['min']:.1f} p25 {qs['p25']:.1f} "
              f"median {qs['median']:.1f} p75 {qs['p75']:.1f} max {qs['max']:.1f} ms")
    print(f"CPU during the run: {cpu['busy_pct']}% busy over {cpu['ncpu']} CPUs, "
          f"loadavg before {cpu['loadavg_before'][0]:.2f} after {cpu['loadavg_after'][0]:.2f}")
    C.write_json(a.json, "boot", {"mem_mib": a.mem, "reps": a.reps, "samples_ms": samples,
                                  "cpu": cpu, "qemu": C.qemu_version(qemu) if qemu else None})
    return 0


if __name__ == "__main__":
    sys.exit(main())
