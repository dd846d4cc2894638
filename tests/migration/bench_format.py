"""Timing of the template format (not a test): ``python tests/migration/bench_format.py [DIR]``.

A 1 GiB anonymous guest with ~50 MiB touched (40 random 1 MiB blocks of random
data plus 2560 scattered pages, so nearly every 2 MiB chunk has data), written,
verified and read back.  ``--drop-caches`` (root) also times a verification with
a cold page cache.
"""

import argparse
import os
import random
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from stratovirt_py.memory import GuestMemory  # noqa: E402
from stratovirt_py.migration import memfile  # noqa: E402
from stratovirt_py.migration.format import read_template, verify_template, write_template  # noqa: E402

MiB = 1 << 20


def ms(t):
    return f"{t * 1000:8.1f} ms"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("dir", nargs="?", help="where to write (default: a temporary directory)")
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--drop-caches", action="store_true")
    args = ap.parse_args()
    base = args.dir or tempfile.mkdtemp(prefix="svpy-bench-", dir="/var/tmp")
    os.environ["XDG_CACHE_HOME"] = os.path.join(base, "cache")
    d = os.path.join(base, "tpl")
    size = args.size_mib * MiB

    mem = GuestMemory.anonymous(size)
    rnd = random.Random(1)
    for _ in range(40):
        mem.write(rnd.randrange(0, size // MiB) * MiB, rnd.randbytes(MiB))
    for _ in range(2560):
        mem.write(rnd.randrange(0, size // 4096) * 4096 + 100, b"touched!")
    sections = {"vcpus": (1, [{"regs": tuple(range(20)), "xsave": bytes(4096),
                               "msrs": [[i, i * 7] for i in range(60)],
                               "cpuid": [{"function": i, "index": 0, "eax": i, "ebx": 1,
                                          "ecx": 2, "edx": 3, "flags": 0} for i in range(80)]}
                              for _ in range(4)]),
                "config": (1, {"mem_size": size, "nr_cpus": 4, "devices": []})}

    print(f"guest {size // MiB} MiB, files in {base}")
    t = time.perf_counter()
    rep = write_template(d, {"kvm_api_version": 12}, sections, mem)
    print(f"write_template            {ms(time.perf_counter() - t)}  (memory scan+write "
          f"{ms(rep.memory_seconds).strip()}, {rep.data_bytes / MiB:.1f} MiB of nonzero pages)")
    st = os.stat(os.path.join(d, "memory"))
    print(f"memory file               {st.st_size // MiB} MiB, {st.st_blocks * 512 / MiB:.1f} MiB on disk;"
          f" state {rep.state_size} bytes")

    fd = os.open(os.path.join(base, "scratch"), os.O_RDWR | os.O_CREAT | os.O_TRUNC)
    for use in (True, False):
        os.ftruncate(fd, 0)
        t = time.perf_counter()
        memfile.write_memory(fd, mem, use_pagemap=use)
        print(f"write_memory pagemap={use!s:<5} {ms(time.perf_counter() - t)}  (again, same guest)")
    os.close(fd)
    os.unlink(os.path.join(base, "scratch"))

    t = time.perf_counter()
    r = verify_template(d)
    print(f"verify_template (warm pc) {ms(time.perf_counter() - t)}  ({r.bytes_read / MiB:.1f} MiB in {r.reads} reads)")
    if args.drop_caches:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        t = time.perf_counter()
        verify_template(d)
        print(f"verify_template (cold pc) {ms(time.perf_counter() - t)}")
    times = []
    for _ in range(20):
        t = time.perf_counter()
        tpl = read_template(d)
        times.append(time.perf_counter() - t)
        assert tpl.verified == "cache"
    times.sort()
    print(f"read_template warm cache  {ms(times[len(times) // 2])}  (median of 20; min {ms(times[0]).strip()})")
    t = time.perf_counter()
    m = GuestMemory.from_file(tpl.memory_path, tpl.mem_size, mapped=True)
    print(f"GuestMemory.from_file     {ms(time.perf_counter() - t)}  (mapped)")
    m.write(0x1000, b"restored VM ran")
    t = time.perf_counter()
    rep = write_template(os.path.join(base, "tpl2"), {"kvm_api_version": 12}, sections, m)
    print(f"write_template (restored) {ms(time.perf_counter() - t)}  (a guest restored with mapped=True, "
          f"memory {ms(rep.memory_seconds).strip()})")
    m.close()
    mem.close()
    if not args.dir:
        shutil.rmtree(base)


if __name__ == "__main__":
    main()
