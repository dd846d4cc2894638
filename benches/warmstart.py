"""Every warm-start figure of the warm-start issue in one run, beside QEMU.

Cold boot (``boot.py``), then snapshot time, restore as its own process and through
``stratovirt-pool``, and fan-out of N restores started at once (``snapshot.py``), each
printing its tables with ratios ours/QEMU taken in the same run.

    .venv/bin/python benches/warmstart.py [--sizes 256,1024,4096] [--fanout 16,50] [--reps 7]
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import boot  # noqa: E402
import snapshot  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="256,1024,4096")
    ap.add_argument("--fanout", default="16,50")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--json", help="prefix of the JSON results (PREFIX-boot.json, PREFIX-snapshot.json)")
    a = ap.parse_args(argv)
    extra = (lambda name: ["--json", f"{a.json}-{name}.json"]) if a.json else (lambda name: [])
    rc = boot.main(["--reps", str(a.reps), "--mem", "256", *extra("boot")])
    if rc:
        return rc
    return snapshot.main(["--sizes", a.sizes, "--states", "idle", "--reps", str(a.reps),
                          "--snap-reps", str(a.reps), "--parts", "snapshot,restore,fanout",
                          "--fanout", a.fanout, "--clone-mem", "256", "--pool",
                          *extra("snapshot")])


if __name__ == "__main__":
    sys.exit(main())
