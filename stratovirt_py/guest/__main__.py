"""``python -m stratovirt_py.guest --path [--format elf|bzimage]``: build the test
guest if needed and print the image's path."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from stratovirt_py.guest.build import GuestBuildError, build_guest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stratovirt_py.guest", description=__doc__)
    parser.add_argument("--path", action="store_true", help="print the path of the built image")
    parser.add_argument("--format", choices=("elf", "bzimage"), default="elf")
    parser.add_argument("--cache-dir", type=Path, default=None, help="cache root directory")
    args = parser.parse_args(argv)
    try:
        path = build_guest(args.format, args.cache_dir)
    except GuestBuildError as err:
        print(f"stratovirt-guest: {err}", file=sys.stderr)
        return 1
    if args.path:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
