"""argv -> ``VmConfig``: the StratoVirt command line, option by option."""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs an import at run time
    from typing import Callable, Dict, Iterable, List, Optional

from . import __version__
from .config import (MAX_CPUS, ChardevConfig, DeviceConfig, DriveConfig, IncomingConfig,
                     NetdevConfig, ObjectConfig, SerialConfig, VmConfig, check_id, check_keys,
                     parse_bool, parse_int, parse_mem_size, parse_suboptions)
from .errors import ConfigError

USAGE = """\
Usage: stratovirt [OPTIONS]
  -machine [type=]microvm[,mem-share=on|off][,dump-guest-core=on|off]
  -m [size=]N[K|M|G]            guest memory (default 256 MiB)
  -smp [cpus=]N                  number of vCPUs (1..254)
  -kernel PATH  -initrd PATH  -append CMDLINE
  -drive id=ID,file=PATH[,readonly=on|off][,direct=on|off][,aio=..][,format=raw][,throttling.iops-total=N]
  -device virtio-blk-device,id=ID,drive=DRIVE[,serial=S][,iothread=T]
  -netdev tap,id=ID,ifname=NAME|fd=N  -device virtio-net-device,id=ID,netdev=NETDEV[,mac=MAC]
  -object rng-random,id=ID,filename=PATH  -device virtio-rng-device,id=ID,rng=ID
  -chardev socket|file|pty|stdio,id=ID[,path=P,server,nowait]
  -device virtio-serial-device,id=ID  -device virtconsole,id=ID,chardev=ID
  -serial stdio|pty|file,path=P|socket,path=P,server,nowait|chardev:ID
  -qmp unix:PATH,server,nowait | tcp:IP:PORT,server,nowait
  -incoming file:DIR[,mapped=on|off]   restore from a template
  -D [LOGFILE]  -name NAME  -uuid UUID  -daemonize  -pidfile PATH  -disable-seccomp  -S
  -h, -help  -version
"""

VERSION_TEXT = f"StratoVirt 2.4.0 (stratovirt-py {__version__})"

FLAGS = {"-S", "-daemonize", "-disable-seccomp", "-h", "-help", "-version", "-nodefaults"}
OPTIONAL_VALUE = {"-D"}

DEVICE_DRIVERS = {
    "virtio-blk-device": ("id", "drive", "serial", "iothread", "num-queues", "bootindex"),
    "virtio-net-device": ("id", "netdev", "mac", "iothread", "mq"),
    "virtio-rng-device": ("id", "rng", "max-bytes", "period"),
    "virtio-serial-device": ("id", "max_ports"),
    "virtconsole": ("id", "chardev", "nr"),
    "vhost-vsock-device": ("id", "guest-cid", "vhostfd"),
    "virtio-balloon-device": ("id", "deflate-on-oom", "free-page-reporting"),
    "vhost-user-fs-device": ("id", "chardev", "tag"),
}


class Parser:
    def __init__(self) -> None:
        self.cfg = VmConfig()
        self.show: Optional[str] = None
        self._handlers: Dict[str, Callable[[str], None]] = {
            "-machine": self._machine, "-m": self._mem, "-smp": self._smp,
            "-kernel": self._kernel, "-initrd": self._initrd, "-append": self._append,
            "-drive": self._drive, "-device": self._device, "-netdev": self._netdev,
            "-object": self._object, "-chardev": self._chardev, "-serial": self._serial,
            "-qmp": self._qmp, "-incoming": self._incoming, "-name": self._name,
            "-uuid": self._uuid, "-pidfile": self._pidfile, "-D": self._log,
            "-iothread": self._iothread,
        }

    def parse(self, argv: List[str]) -> VmConfig:
        i = 0
        while i < len(argv):
            arg = argv[i]
            opt = "-" + arg.lstrip("-") if arg.startswith("--") else arg
            i += 1
            if opt in FLAGS:
                self._flag(opt)
                continue
            if opt in OPTIONAL_VALUE:
                value = None
                if i < len(argv) and not argv[i].startswith("-"):
                    value = argv[i]
                    i += 1
                self._handlers[opt](value)
                continue
            handler = self._handlers.get(opt)
            if handler is None:
                if not arg.startswith("-"):
                    raise ConfigError(f"unexpected argument '{arg}' (options start with '-')")
                raise ConfigError(f"unknown option '{arg}' (see 'stratovirt -help')")
            if i >= len(argv):
                raise ConfigError(f"option '{arg}' needs a value")
            handler(argv[i])
            i += 1
        if self.show is None:
            self._validate()
        return self.cfg

    # -- flags -------------------------------------------------------------------------
    def _flag(self, opt: str) -> None:
        if opt in ("-h", "-help"):
            self.show = "help"
        elif opt == "-version":
            self.show = "version"
        elif opt == "-S":
            self.cfg.start_paused = True
        elif opt == "-daemonize":
            self.cfg.daemonize = True
        elif opt == "-disable-seccomp":
            self.cfg.disable_seccomp = True

    # -- machine ---------------------------------------------------------------------
    def _machine(self, value: str) -> None:
        o = parse_suboptions("-machine", value, "type")
        check_keys("-machine", o, ("type", "mem-share", "dump-guest-core", "accel", "usb"))
        mtype = o.get("type", "microvm")
        if mtype != "microvm":
            raise ConfigError(f"-machine: machine type '{mtype}' is not supported (only microvm)")
        if o.get("accel", "kvm") != "kvm":
            raise ConfigError(f"-machine: accelerator '{o['accel']}' is not supported (only kvm)")
        self.cfg.mem_share = parse_bool("-machine", "mem-share", o.get("mem-share", "off"))
        self.cfg.dump_guest_core = parse_bool("-machine", "dump-guest-core", o.get("dump-guest-core", "on"))

    def _mem(self, value: str) -> None:
        o = parse_suboptions("-m", value, "size")
        check_keys("-m", o, ("size",))
        self.cfg.mem_size = parse_mem_size(o.get("size", ""))

    def _smp(self, value: str) -> None:
        o = parse_suboptions("-smp", value, "cpus")
        check_keys("-smp", o, ("cpus", "maxcpus", "sockets", "dies", "clusters", "cores", "threads"))
        n = parse_int("-smp", "cpus", o.get("cpus", "1"), 1, MAX_CPUS)
        maxcpus = parse_int("-smp", "maxcpus", o.get("maxcpus", str(n)), 1, MAX_CPUS)
        if maxcpus < n:
            raise ConfigError(f"-smp: maxcpus ({maxcpus}) must not be less than cpus ({n})")
        for key in ("sockets", "dies", "clusters", "cores", "threads"):
            if key in o:
                parse_int("-smp", key, o[key], 1, MAX_CPUS)
        self.cfg.nr_cpus = n

    def _kernel(self, value: str) -> None:
        self.cfg.kernel = value

    def _initrd(self, value: str) -> None:
        self.cfg.initrd = self._path("-initrd", value)

    def _append(self, value: str) -> None:
        self.cfg.append.append(value)

    # -- storage and devices -----------------------------------------------------------
    def _drive(self, value: str) -> None:
        o = parse_suboptions("-drive", value)
        check_keys("-drive", o, ("id", "file", "readonly", "direct", "aio", "format", "if",
                                 "throttling.iops-total", "media", "discard", "detect-zeroes"))
        if "id" not in o:
            raise ConfigError("'id' is missing for 'blk' device.")
        if "file" not in o:
            raise ConfigError(f"-drive: 'file' is missing for drive '{o['id']}'")
        check_id("-drive", o["id"])
        if o["id"] in self.cfg.drives:
            raise ConfigError(f"-drive: drive id '{o['id']}' is used twice")
        fmt = o.get("format", "raw")
        if fmt != "raw":
            raise ConfigError(f"-drive: format '{fmt}' is not supported (only raw)")
        aio = o.get("aio")
        if aio not in (None, "native", "io_uring", "off", "threads"):
            raise ConfigError(f"-drive: invalid aio '{aio}' (native, io_uring or off)")
        iops = o.get("throttling.iops-total")
        self.cfg.drives[o["id"]] = DriveConfig(
            id=o["id"], file=o["file"],
            readonly=parse_bool("-drive", "readonly", o.get("readonly", "off")),
            direct=parse_bool("-drive", "direct", o.get("direct", "on")),
            aio=aio, format=fmt,
            iops_total=parse_int("-drive", "throttling.iops-total", iops, 1) if iops else None)

    def _device(self, value: str) -> None:
        o = parse_suboptions("-device", value, "driver")
        driver = o.pop("driver", None)
        if not driver:
            raise ConfigError("-device: the device type is missing")
        if driver not in DEVICE_DRIVERS:
            raise ConfigError(f"-device: unsupported device type '{driver}'")
        for key in ("bus", "addr", "multifunction"):
            if key in o:
                raise ConfigError(f"-device {driver}: '{key}' is not supported on the microvm machine")
        check_keys(f"-device {driver}", o, DEVICE_DRIVERS[driver])
        dev_id = o.pop("id", None)
        if not dev_id:
            raise ConfigError(f"'id' is missing for '{driver}' device.")
        check_id(f"-device {driver}", dev_id)
        if any(d.id == dev_id for d in self.cfg.devices):
            raise ConfigError(f"-device: device id '{dev_id}' is used twice")
        self.cfg.devices.append(DeviceConfig(driver=driver, id=dev_id, props=o))

    def _netdev(self, value: str) -> None:
        o = parse_suboptions("-netdev", value, "type")
        check_keys("-netdev", o, ("type", "id", "ifname", "fd", "fds", "vhost", "vhostfd",
                                  "vhostfds", "queues", "script", "downscript"))
        kind = o.get("type")
        if kind != "tap":
            raise ConfigError(f"-netdev: type '{kind}' is not supported (only tap)")
        if "id" not in o:
            raise ConfigError("'id' is missing for 'netdev' device.")
        fds = [parse_int("-netdev", "fd", f, 0, 65535)
               for f in (o.get("fds") or o.get("fd") or "").split(":") if f]
        vfds = [parse_int("-netdev", "vhostfd", f, 0, 65535)
                for f in (o.get("vhostfds") or o.get("vhostfd") or "").split(":") if f]
        if not fds and "ifname" not in o:
            raise ConfigError(f"-netdev {o['id']}: give 'ifname' or 'fd'")
        self._unique("-netdev", o["id"], self.cfg.netdevs)
        self.cfg.netdevs[o["id"]] = NetdevConfig(
            id=o["id"], ifname=o.get("ifname"), fds=fds,
            vhost=parse_bool("-netdev", "vhost", o.get("vhost", "off")), vhostfds=vfds,
            queues=parse_int("-netdev", "queues", o.get("queues", "1"), 1, 16))

    def _object(self, value: str) -> None:
        o = parse_suboptions("-object", value, "kind")
        kind = o.pop("kind", "")
        if kind not in ("rng-random", "iothread", "memory-backend-ram", "memory-backend-file"):
            raise ConfigError(f"-object: unsupported object type '{kind}'")
        if "id" not in o:
            raise ConfigError(f"'id' is missing for '{kind}' object.")
        obj_id = o.pop("id")
        self._unique("-object", obj_id, self.cfg.objects)
        self.cfg.objects[obj_id] = ObjectConfig(kind=kind, id=obj_id, props=o)

    def _chardev(self, value: str) -> None:
        o = parse_suboptions("-chardev", value, "backend")
        check_keys("-chardev", o, ("backend", "id", "path", "server", "nowait", "wait", "mux"))
        backend = o.get("backend")
        if backend not in ("socket", "file", "pty", "stdio"):
            raise ConfigError(f"-chardev: unsupported backend '{backend}'")
        if "id" not in o:
            raise ConfigError("'id' is missing for 'chardev' device.")
        if backend in ("socket", "file") and "path" not in o:
            raise ConfigError(f"-chardev {o['id']}: 'path' is missing")
        self._unique("-chardev", o["id"], self.cfg.chardevs)
        self.cfg.chardevs[o["id"]] = ChardevConfig(
            id=o["id"], backend=backend, path=o.get("path"),
            server="server" in o, nowait="nowait" in o)

    def _serial(self, value: str) -> None:
        if value.startswith("chardev:"):
            self.cfg.serial = SerialConfig("chardev", chardev=value.split(":", 1)[1])
            return
        o = parse_suboptions("-serial", value, "kind")
        kind = o.get("kind")
        if kind in ("stdio", "pty", "none"):
            check_keys("-serial", o, ("kind",))
            self.cfg.serial = SerialConfig(kind)
        elif kind in ("file", "socket"):
            check_keys("-serial", o, ("kind", "path", "server", "nowait"))
            if "path" not in o:
                raise ConfigError(f"-serial {kind}: 'path' is missing")
            self.cfg.serial = SerialConfig(kind, path=o["path"])
        else:
            raise ConfigError(f"-serial: unsupported backend '{kind}' "
                              "(stdio, pty, file,path=P, socket,path=P,server,nowait)")

    def _qmp(self, value: str) -> None:
        from .qmp.address import parse_qmp_address
        parse_qmp_address(value)    # refuse a bad address before anything starts
        self.cfg.qmp.append(value)

    def _incoming(self, value: str) -> None:
        kind, _, rest = value.partition(":")
        if kind not in ("file", "unix", "tcp") or not rest:
            raise ConfigError("Invalid incoming uri.")
        parts = rest.split(",")
        mapped = True
        for extra in parts[1:]:
            key, _, val = extra.partition("=")
            if key != "mapped":
                raise ConfigError(f"-incoming: unknown parameter '{key}'")
            mapped = parse_bool("-incoming", "mapped", val)
        self.cfg.incoming = IncomingConfig(kind=kind, path=parts[0], mapped=mapped)

    def _name(self, value: str) -> None:
        self.cfg.name = value

    def _uuid(self, value: str) -> None:
        self.cfg.uuid = value

    def _pidfile(self, value: str) -> None:
        self.cfg.pidfile = self._path("-pidfile", value)

    def _log(self, value: Optional[str]) -> None:
        self.cfg.log_enabled = True
        self.cfg.log_file = value

    def _iothread(self, value: str) -> None:
        o = parse_suboptions("-iothread", value)
        if "id" not in o:
            raise ConfigError("'id' is missing for 'iothread'.")
        self._unique("-iothread", o["id"], self.cfg.iothreads)
        self.cfg.iothreads.append(o["id"])

    # -- shared checks ---------------------------------------------------------------------
    @staticmethod
    def _unique(option: str, item_id: str, table: Iterable[str]) -> None:
        # A second definition would silently replace the first one.
        check_id(option, item_id)
        if item_id in table:
            raise ConfigError(f"{option}: id '{item_id}' is used twice")

    @staticmethod
    def _path(option: str, value: str) -> str:
        # An empty path reads as "not given" everywhere later: refuse it here.
        if not value:
            raise ConfigError(f"{option}: the path is empty")
        return value

    # -- whole-config checks ---------------------------------------------------------------
    def _validate(self) -> None:
        cfg = self.cfg
        if not cfg.kernel:
            raise ConfigError("kernel file is required for microvm machine type, which is not provided")
        if not cfg.qmp:
            raise ConfigError("a QMP socket is required: add -qmp unix:PATH,server,nowait")
        if cfg.daemonize and cfg.serial.kind == "stdio":
            raise ConfigError("-serial stdio cannot be used with -daemonize")
        if cfg.incoming and cfg.incoming.kind != "file":
            raise ConfigError("live migration over unix/tcp is not supported; use -incoming file:DIR")
        refs = {"drive": cfg.drives, "netdev": cfg.netdevs, "rng": cfg.objects,
                "chardev": cfg.chardevs}
        has_serial_bus = any(d.driver == "virtio-serial-device" for d in cfg.devices)
        for dev in cfg.devices:
            for key, table in refs.items():
                if key in dev.props and dev.props[key] not in table:
                    raise ConfigError(f"-device {dev.driver},id={dev.id}: {key} '{dev.props[key]}' "
                                      f"is not defined (add -{'object' if key == 'rng' else key} "
                                      f"with id={dev.props[key]})")
            needed = {"virtio-blk-device": "drive", "virtio-net-device": "netdev",
                      "virtio-rng-device": "rng", "virtconsole": "chardev"}.get(dev.driver)
            if needed and needed not in dev.props:
                raise ConfigError(f"-device {dev.driver},id={dev.id}: '{needed}' is missing")
            if dev.driver == "virtconsole" and not has_serial_bus:
                raise ConfigError(f"-device virtconsole,id={dev.id} needs a virtio-serial-device")
        if cfg.serial.kind == "chardev" and cfg.serial.chardev not in cfg.chardevs:
            raise ConfigError(f"-serial: chardev '{cfg.serial.chardev}' is not defined")


def parse_args(argv: List[str]) -> "tuple[VmConfig, Optional[str]]":
    p = Parser()
    cfg = p.parse(argv)
    return cfg, p.show
