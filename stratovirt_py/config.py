"""The VM configuration, parsed from StratoVirt's command-line syntax.

Options are single-dash with comma-separated ``key=value`` sub-options; the first
sub-option may be a bare value (``-device virtio-blk-device,id=x``,
``-machine microvm``).  ``,,`` stands for a literal comma, as in QEMU.
Everything here raises ``ConfigError`` with a message naming the option.
"""

from __future__ import annotations

from .record import asdict, field, record

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs an import at run time
    from typing import Dict, List, Optional, Tuple

from .errors import ConfigError

MiB = 1 << 20
GiB = 1 << 30
MIN_MEM = 128 * MiB
MAX_MEM = 512 * GiB
DEFAULT_MEM = 256 * MiB
MAX_CPUS = 254


def split_suboptions(value: str) -> List[str]:
    parts, cur, i = [], [], 0
    while i < len(value):
        c = value[i]
        if c == "," and value[i + 1:i + 2] == ",":
            cur.append(",")
            i += 2
            continue
        if c == ",":
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(c)
        i += 1
    parts.append("".join(cur))
    return parts


def parse_suboptions(option: str, value: str, positional: Optional[str] = None) -> Dict[str, str]:
    """``a,b=1,c=2`` -> ``{positional: "a", "b": "1", "c": "2"}``."""
    result: Dict[str, str] = {}
    for i, part in enumerate(split_suboptions(value)):
        if not part:
            continue
        if "=" in part:
            key, val = part.split("=", 1)
        elif i == 0 and positional:
            key, val = positional, part
        else:
            key, val = part, "on"
        if key in result:
            raise ConfigError(f"{option}: '{key}' is given twice")
        result[key] = val
    return result


def parse_bool(option: str, key: str, value: str) -> bool:
    v = value.lower()
    if v in ("on", "true", "yes", "1"):
        return True
    if v in ("off", "false", "no", "0"):
        return False
    raise ConfigError(f"{option}: invalid value '{value}' for '{key}' (expected on or off)")


def parse_int(option: str, key: str, value: str, lo: int = 0, hi: int = 2 ** 63) -> int:
    # int() also takes other scripts' digits, '_' separators and spaces: a command line
    # the VMM accepts but StratoVirt (and a template's restore) would read differently.
    try:
        if not value.isascii() or "_" in value or value != value.strip():
            raise ValueError(value)
        n = int(value, 0)
    except ValueError:
        raise ConfigError(f"{option}: invalid number '{value}' for '{key}'") from None
    if not lo <= n <= hi:
        raise ConfigError(f"{option}: '{key}' must be between {lo} and {hi}, got {n}")
    return n


_UNITS = {"": MiB, "K": 1 << 10, "M": MiB, "G": GiB, "T": 1 << 40}


def parse_mem_size(value: str) -> int:
    """``N``, ``N[KMGT]``, ``N[KMGT]B`` or ``N[KMGT]iB`` (any case); a bare number is MiB."""
    text = value.strip().upper()
    for suffix in ("IB", "B"):
        if text.endswith(suffix):
            text = text[:-len(suffix)]
            break
    unit = text[-1:] if text[-1:] in "KMGT" else ""
    digits = text[:len(text) - len(unit)]
    if not digits or not (digits.isascii() and digits.isdigit()):
        raise ConfigError(f"-m: invalid memory size '{value}' (examples: 256, 512M, 2G)")
    size = int(digits) * _UNITS[unit]
    if not MIN_MEM <= size <= MAX_MEM:
        raise ConfigError(f"-m: memory size {value} is out of range (128 MiB .. 512 GiB)")
    if size % 4096:
        raise ConfigError(f"-m: memory size {value} is not a multiple of 4 KiB")
    return size


MAX_ID_LEN = 255


def check_id(option: str, value: str) -> str:
    """An id a command line can carry: a template records ids and its restore must be
    able to name them again, so QMP may not create one that ``-device id=`` cannot."""
    if not value:
        raise ConfigError(f"{option}: the id is empty")
    if len(value) > MAX_ID_LEN or not value.isprintable():
        raise ConfigError(f"{option}: invalid id {value[:40]!r} (printable characters, "
                          f"at most {MAX_ID_LEN})")
    return value


def check_keys(option: str, opts: Dict[str, str], allowed: Tuple[str, ...]) -> None:
    for key in opts:
        if key not in allowed:
            raise ConfigError(f"{option}: unknown parameter '{key}'")


@record
class DriveConfig:
    id: str
    file: str
    readonly: bool = False
    direct: bool = True
    aio: Optional[str] = None
    format: str = "raw"
    iops_total: Optional[int] = None


@record
class DeviceConfig:
    driver: str
    id: str
    props: Dict[str, str] = field(default_factory=dict)
    slot: Optional[int] = None      # virtio-mmio slot, once placed


@record
class NetdevConfig:
    id: str
    kind: str = "tap"
    ifname: Optional[str] = None
    fds: List[int] = field(default_factory=list)
    vhost: bool = False
    vhostfds: List[int] = field(default_factory=list)
    queues: int = 1


@record
class ObjectConfig:
    kind: str
    id: str
    props: Dict[str, str] = field(default_factory=dict)


@record
class ChardevConfig:
    id: str
    backend: str
    path: Optional[str] = None
    server: bool = False
    nowait: bool = False


@record
class SerialConfig:
    kind: str = "none"          # stdio | pty | file | socket | chardev | none
    path: Optional[str] = None
    chardev: Optional[str] = None


@record
class IncomingConfig:
    kind: str                   # file | unix | tcp
    path: str
    mapped: bool = True


@record
class VmConfig:
    machine_type: str = "microvm"
    mem_share: bool = False
    dump_guest_core: bool = True
    mem_size: int = DEFAULT_MEM
    nr_cpus: int = 1
    kernel: Optional[str] = None
    initrd: Optional[str] = None
    append: List[str] = field(default_factory=list)
    drives: Dict[str, DriveConfig] = field(default_factory=dict)
    devices: List[DeviceConfig] = field(default_factory=list)
    netdevs: Dict[str, NetdevConfig] = field(default_factory=dict)
    objects: Dict[str, ObjectConfig] = field(default_factory=dict)
    chardevs: Dict[str, ChardevConfig] = field(default_factory=dict)
    iothreads: List[str] = field(default_factory=list)
    serial: SerialConfig = field(default_factory=SerialConfig)
    qmp: List[str] = field(default_factory=list)
    incoming: Optional[IncomingConfig] = None
    name: Optional[str] = None
    uuid: Optional[str] = None
    log_file: Optional[str] = None
    log_enabled: bool = False
    daemonize: bool = False
    pidfile: Optional[str] = None
    disable_seccomp: bool = False
    start_paused: bool = False

    @property
    def cmdline(self) -> str:
        return " ".join(a for a in self.append if a)

    def to_dict(self) -> dict:
        return asdict(self)
