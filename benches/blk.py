"""virtio-blk throughput: stratovirt-py beside QEMU -M microvm, same guest, same image.

    .venv/bin/python benches/blk.py [--reps 5] [--sizes 4K:8192,64K:2048,1M:512]
        [--random 4K:16384:32] [--image-mib 64] [--dir /var/tmp] [--qemu-cache writeback]
        [--json FILE]

The test guest's ``sv.blkbench=<read|write>,<bs>,<count>[,<depth>[,rand]]`` submits
``count`` requests of ``bs`` bytes, sequential from sector 0 (wrapping at the capacity)
or at random sector offsets (the same sequence for both VMMs), ``depth`` in flight (16 by
default; fewer when ``depth * bs`` passes the guest's 2 MiB buffer: 2 for 1 MiB; above 21
each request is one indirect descriptor), one data descriptor per request, and prints
``blkbench: <rw> <bs> <count> <cycles> <tsc_khz>``: guest TSC cycles from the first
submission to the last completion. MiB/s and requests/s are computed from that (the
guest's own clock, so VMM start-up is not included). ``--sizes`` are run read and write,
sequential; ``--random`` (BS:COUNT:DEPTH) read only. With ``STRATOVIRT_BEFORE=<exe>``
another build of ours runs as a third peer, interleaved with the other two.

Ours: ``-drive id=d0,file=IMG,direct=off -device virtio-blk-device,drive=d0,id=b0``
(buffered I/O through the host page cache). QEMU:
``-global virtio-mmio.force-legacy=false -drive id=d0,file=IMG,format=raw,if=none,
cache=writeback -device virtio-blk-device,drive=d0`` (also the host page cache; QEMU's
default aio=threads). The image is a file of random data on a real filesystem
(/var/tmp, ext4 here, not tmpfs), written once and then in the page cache: this measures
the VMMs' request path, not the disk.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common as C  # noqa: E402

RESULT = re.compile(rb"^blkbench: (read|write) (\d+) (\d+) (\d+) (\d+)$")


def parse_size(s: str) -> int:
    s = s.strip().upper()
    if s.endswith("M"):
        return int(s[:-1]) << 20
    return int(s[:-1]) * 1024 if s.endswith("K") else int(s)


def size_label(bs: int) -> str:
    if bs % (1 << 20) == 0:
        return f"{bs >> 20}M"
    return f"{bs // 1024}K" if bs % 1024 == 0 else str(bs)


def one_run(peer, qemu, kernel, img, rw, bs, count, tmp, i, qemu_cache, mem,
            depth=None, rand=False) -> dict:
    qmp = os.path.join(tmp, f"{peer}-{rw}-{bs}-{i}.qmp")
    extra = "" if depth is None else f",{depth}" + (",rand" if rand else "")
    append = f"sv.blkbench={rw},{bs},{count}{extra} sv.hb=0"
    if peer in ("ours", "before"):
        argv = C.stratovirt_argv(kernel, mem, append, qmp, [
            "-drive", f"id=d0,file={img},direct=off",
            "-device", "virtio-blk-device,drive=d0,id=b0"])
        if peer == "before":
            argv[0] = os.environ["STRATOVIRT_BEFORE"]
    else:
        argv = C.qemu_argv(qemu, kernel, mem, append, qmp, [
            "-global", "virtio-mmio.force-legacy=false",
            "-drive", f"id=d0,file={img},format=raw,if=none,cache={qemu_cache}",
            "-device", "virtio-blk-device,drive=d0"])
    vm = C.Vmm(peer, argv, qmp, env=None if peer == "qemu" else C.NO_POOL_ENV)
    try:
        _, line, idx = vm.wait_line(lambda l: l.startswith(b"blkbench: ") and (
            RESULT.match(l) or b"errors" not in l), 300)
        m = RESULT.match(line)
        if not m:
            raise RuntimeError(f"{peer}: {line.decode(errors='replace')}")
        errs = [l for _, l in vm.lines if l.startswith(b"blkbench: errors")]
        if errs:
            return {"error": errs[0].decode(errors="replace")}
        cycles, khz = int(m.group(4)), int(m.group(5))
        secs = cycles / (khz * 1000.0)
        return {"secs": secs, "mib_s": bs * count / secs / 2**20, "req_s": count / secs}
    finally:
        vm.kill()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--sizes", default="4K:8192,64K:2048,1M:512",
                    help="comma separated BS:COUNT pairs (BS a multiple of 512, K/M allowed)")
    ap.add_argument("--random", default="4K:16384:32",
                    help="random-read cases, comma separated BS:COUNT:DEPTH ('' for none)")
    ap.add_argument("--modes", default="read,write")
    ap.add_argument("--image-mib", type=int, default=64)
    ap.add_argument("--mem", type=int, default=128)
    ap.add_argument("--dir", default="/var/tmp", help="where the image lives (not tmpfs)")
    ap.add_argument("--qemu-cache", default="writeback")
    ap.add_argument("--retries", type=int, default=4,
                    help="re-runs of a run whose guest reports request errors (counted, shown)")
    ap.add_argument("--no-qemu", action="store_true")
    ap.add_argument("--json", help="write the results here")
    a = ap.parse_args(argv)
    cases = []          # (label, rw, bs, count, depth, rand)
    for rw in a.modes.split(","):
        for item in a.sizes.split(","):
            bs, count = item.split(":")
            bs = parse_size(bs)
            cases.append((f"{rw} {size_label(bs)} x{count}", rw, bs, int(count), None, False))
    for item in filter(None, a.random.split(",")):
        bs, count, depth = item.split(":")
        bs = parse_size(bs)
        cases.append((f"random read {size_label(bs)} x{count}, {depth} in flight", "read", bs,
                      int(count), int(depth), True))

    qemu = None if a.no_qemu else C.ensure_qemu()
    if not a.no_qemu and not qemu:
        return 2
    C.header("virtio-blk: requests from the test guest", qemu)
    kernel = C.guest_elf()
    tmp = C.bench_dir("svbench-blk-", a.dir)
    fs = os.popen(f"stat -f -c %T {tmp}").read().strip()
    print(f"image: {a.image_mib} MiB of random data in {tmp} ({fs})")
    img = os.path.join(tmp, "disk.img")
    C.random_file(img, a.image_mib << 20)
    with open(img, "rb") as f:        # into the page cache for both peers alike
        while f.read(8 << 20):
            pass
    # STRATOVIRT_BEFORE: another build of ours (an older commit) run as a third peer, so
    # that before/after ratios come from the same run.
    peers = ["ours"] + (["before"] if os.environ.get("STRATOVIRT_BEFORE") else []) + \
        (["qemu"] if qemu else [])
    samples = {}
    failures = []
    load = C.CpuLoad()
    try:
        for key, rw, bs, count, depth, rand in cases:
            samples[key] = {p: [] for p in peers}
            for i in range(a.reps):
                for p in peers:
                    for attempt in range(a.retries + 1):
                        r = one_run(p, qemu, kernel, img, rw, bs, count, tmp, i,
                                    a.qemu_cache, a.mem, depth, rand)
                        if "error" not in r:
                            break
                        failures.append(f"{p} {key}: {r['error']}")
                        print(f"  {p} {key}: guest reported `{r['error']}`: "
                              "run discarded" + (", retrying" if attempt < a.retries
                                                 else ""), flush=True)
                    else:
                        continue          # every attempt failed: no sample this rep
                    samples[key][p].append(r)
            print(f"{key}: " + ", ".join(
                f"{p} {C.median([s['mib_s'] for s in samples[key][p]]):.1f} MiB/s"
                for p in peers), flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    cpu = C.CpuLoad.stop(load)

    rows = []
    for key, s in samples.items():
        o_mb = C.median([x["mib_s"] for x in s["ours"]])
        o_rq = C.median([x["req_s"] for x in s["ours"]])
        q_mb = C.median([x["mib_s"] for x in s["qemu"]]) if qemu else None
        q_rq = C.median([x["req_s"] for x in s["qemu"]]) if qemu else None
        n_ok = len(s["ours"])
        row = [key + ("" if n_ok == a.reps else f" (ours: {n_ok} good runs)"),
               C.fmt(o_mb), C.fmt(o_rq, ".0f"), C.fmt(q_mb), C.fmt(q_rq, ".0f"),
               C.ratio(o_mb, q_mb)]
        if "before" in s:
            b_mb = C.median([x["mib_s"] for x in s["before"]])
            row += [C.fmt(b_mb), C.ratio(b_mb, q_mb)]
        rows.append(row)
    headers = [f"median of {a.reps}", "ours MiB/s", "ours req/s", "QEMU MiB/s",
               "QEMU req/s", "ours/QEMU"]
    if "before" in peers:
        headers += ["before MiB/s", "before/QEMU"]
    C.table(headers, rows)
    if failures:
        print(f"discarded runs (guest reported request errors): {len(failures)}")
        for f in failures:
            print(f"  {f}")
    print(f"CPU during the run: {cpu['busy_pct']}% busy over {cpu['ncpu']} CPUs, "
          f"loadavg before {cpu['loadavg_before'][0]:.2f} after {cpu['loadavg_after'][0]:.2f}")
    C.write_json(a.json, "blk", {"samples": samples, "image_mib": a.image_mib, "fs": fs,
                                 "qemu_cache": a.qemu_cache, "cpu": cpu,
                                 "discarded_runs": failures,
                                 "qemu": C.qemu_version(qemu) if qemu else None})
    return 0


if __name__ == "__main__":
    sys.exit(main())
