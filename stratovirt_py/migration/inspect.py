"""``stratovirt-snapshot``: look at and check snapshot templates.

    stratovirt-snapshot info DIR      header, sections, memory usage, VM configuration
    stratovirt-snapshot verify DIR    check everything (reads all memory data); prints OK

``verify`` exits 0 and prints ``OK`` when the template is intact and restorable
on this host (``--no-host-check`` leaves out the architecture and CPU vendor
checks); otherwise it prints ``stratovirt-snapshot: <reason>`` on stderr and exits 1.
``info`` reads only the state (plus the memory file's size) and does not check
the memory data.  No command prints a traceback.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, List, Optional

from ..errors import VmmError
from .format import Template, read_template, verify_template

PROG = "stratovirt-snapshot"


def _size(n: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            return f"{n / (1 << shift):.1f} {unit}"
    return f"{n} B"


def _approx_len(data: Any) -> str:
    if isinstance(data, (list, tuple, dict)):
        return f"{len(data)} items"
    return type(data).__name__


def _config_summary(config: Any) -> List[str]:
    if not isinstance(config, dict):
        return [f"  (not a dict: {type(config).__name__})"]
    lines = []
    for key in ("mem_size", "nr_cpus"):
        if key in config:
            value = config[key]
            shown = f"{value} ({_size(value)})" if key == "mem_size" and isinstance(value, int) else value
            lines.append(f"  {key}: {shown}")
    devices = config.get("devices")
    if isinstance(devices, list):
        lines.append(f"  devices: {len(devices)}")
        for dev in devices:
            if isinstance(dev, dict):
                parts = []
                for k in ("type", "driver", "id", "addr", "bus", "mac", "serial", "file", "path"):
                    if k in dev and dev[k] is not None and not isinstance(dev[k], (dict, list, bytes)):
                        parts.append(f"{k}={dev[k]}")
                lines.append("    - " + (" ".join(parts) if parts else f"{len(dev)} keys"))
            else:
                lines.append(f"    - {dev!r}"[:120])
    others = [k for k in config if k not in ("mem_size", "nr_cpus", "devices")]
    for k in others:
        v = config[k]
        if v is None or isinstance(v, (bool, int, float, str)):
            lines.append(f"  {k}: {v}"[:160])
        else:
            lines.append(f"  {k}: ({_approx_len(v)})")
    return lines


def _info(t: Template, out) -> None:
    h = t.header
    w = out.write
    w(f"template:       {t.dir}\n")
    w(f"template id:    {t.template_id}\n")
    w(f"created:        {h.get('created', '?')} by {h.get('vmm', '?')} {h.get('vmm_version', '?')}\n")
    w(f"architecture:   {h.get('arch')}\n")
    w(f"cpu vendor:     {h.get('cpu_vendor')}\n")
    w(f"kvm api:        {h.get('kvm_api_version')}\n")
    for k, v in sorted((h.get("extra") or {}).items()):
        w(f"{k + ':':<16}{v}\n")
    w(f"state:          {t.state_path} ({t.state_size} bytes)\n")
    mem = h.get("memory", {})
    nchunks = len(t.memory_table) // 8
    w(f"memory:         {t.memory_path}\n")
    w(f"  size:         {t.mem_size} ({_size(t.mem_size)})\n")
    w(f"  on disk:      {t.memory_allocated} ({_size(t.memory_allocated)}, "
      f"{100.0 * t.memory_allocated / t.mem_size:.1f}%)\n")
    w(f"  data:         {mem.get('data_bytes', '?')} bytes in nonzero pages\n")
    w(f"  chunks:       {nchunks} x {_size(mem.get('chunk_size', 0))}, "
      f"{t.zero_chunks()} all zero\n")
    for gpa, size, off in t.regions:
        w(f"  region:       gpa {gpa:#x} size {size:#x} at file offset {off:#x}\n")
    w(f"sections:       {len(t.sections)}\n")
    entries = {e.get("name"): e for e in h.get("sections", []) if isinstance(e, dict)}
    for name, (version, _data) in t.sections.items():
        size = entries.get(name, {}).get("length", 0)
        w(f"  {name:<20} version {version:<4} {size:>10} bytes\n")
    if "config" in t.sections:
        w("config:\n")
        for line in _config_summary(t.sections["config"][1]):
            w(line + "\n")


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description="Inspect and check stratovirt-py snapshot templates.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p_info = sub.add_parser("info", help="show a template's header, sections and memory usage")
    p_info.add_argument("dir", metavar="DIR")
    p_verify = sub.add_parser("verify", help="check a template completely (reads all memory data)")
    p_verify.add_argument("dir", metavar="DIR")
    p_verify.add_argument("--no-host-check", action="store_true",
                          help="do not require this host's architecture and CPU vendor")
    p_verify.add_argument("-v", "--verbose", action="store_true", help="print what was checked")
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_usage(sys.stderr)
        sys.stderr.write(f"{PROG}: error: a command is required (info, verify)\n")
        return 2
    try:
        if args.command == "info":
            t = read_template(args.dir, verify=False, check_host=False)
            _info(t, sys.stdout)
        else:
            r = verify_template(args.dir, check_host=not args.no_host_check)
            # What a restore checks in the sections too: OK only for what it would accept.
            from .snapshot import check_sections
            check_sections(read_template(args.dir, verify=False, check_host=False))
            print("OK")
            if args.verbose:
                print(f"{r.dir}: template {r.template_id}, {_size(r.mem_size)} of memory, "
                      f"{r.data_chunks} data chunks, {_size(r.bytes_read)} read in {r.reads} reads, "
                      f"{r.seconds * 1000:.1f} ms")
        sys.stdout.flush()
    except VmmError as e:
        sys.stderr.write(f"{PROG}: {e}\n")
        return 1
    except KeyboardInterrupt:
        sys.stderr.write(f"{PROG}: interrupted\n")
        return 130
    except BrokenPipeError:
        return 1
    except Exception as e:  # never a traceback for the user
        sys.stderr.write(f"{PROG}: unexpected error: {type(e).__name__}: {e}\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
