"""``VmConfig``: everything that describes a VM before it exists, validated up front."""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

import attrs

from trivmm.errors import ConfigError

__all__ = ["VmConfig", "DiskConfig", "NetConfig", "parse_size", "DEFAULT_LINUX_CMDLINE", "MAX_VCPUS", "BOOT_PROTOCOLS",
           "TRANSPORTS", "VsockConfig"]  # fmt: skip

MAX_VCPUS = 64
DEFAULT_LINUX_CMDLINE = "console=ttyS0 reboot=k io_delay=none"
BOOT_PROTOCOLS = ("auto", "linux64", "pvh")
TRANSPORTS = ("pci", "mmio")
_SIZE = re.compile(r"^\s*(\d+)\s*([KMGT]?)(i?B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1 << 20, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str | int) -> int:
    """``"128M"``, ``"1G"``, ``"512"`` (MiB) or a byte count as int -> bytes."""
    if isinstance(text, int):
        return text
    m = _SIZE.match(text)
    if not m:
        raise ConfigError(f"bad size {text!r} (use e.g. 128M or 1G)")
    return int(m.group(1)) * _UNITS[m.group(2).upper()]


def _memory(value: int | str) -> int:
    size = parse_size(value)
    if size < 2 << 20 or size % 4096:
        raise ConfigError(f"memory must be a multiple of 4 KiB and at least 2 MiB, not {size} bytes")
    if size > 1 << 40:
        raise ConfigError("memory above 1 TiB is not supported")
    return size


def _vcpus(value: int) -> int:
    if not 1 <= value <= MAX_VCPUS:
        raise ConfigError(f"vcpus must be 1..{MAX_VCPUS}, not {value}")
    return value


def _cpu_template(value: str) -> str:
    from trivmm.cpu.templates import TEMPLATES

    if value != "auto" and value not in TEMPLATES:
        raise ConfigError(f"unknown CPU template {value!r} (auto, {', '.join(TEMPLATES)})")
    return value


def _boot_protocol(value: str) -> str:
    if value not in BOOT_PROTOCOLS:
        raise ConfigError(f"unknown boot protocol {value!r} ({', '.join(BOOT_PROTOCOLS)})")
    return value


def _transport(value: str) -> str:
    if value not in TRANSPORTS:
        raise ConfigError(f"unknown virtio transport {value!r} ({', '.join(TRANSPORTS)})")
    return value


def _path(value: str | Path | None) -> Path | None:
    return None if value is None else Path(value)


def _mac(instance: object, attribute: object, value: str | None) -> None:
    if value is not None:
        from trivmm.net import parse_mac

        parse_mac(value)  # ConfigError if it is not a unicast address


def _options(text: str, what: str, usage: str, allowed: tuple[str, ...]) -> dict[str, str]:
    """``key=value`` items of a comma-separated device option, each key at most once."""
    options: dict[str, str] = {}
    for item in filter(None, text.split(",")):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in allowed or key in options:
            raise ConfigError(f"bad {what} option {item!r} ({usage})")
        options[key] = value.strip()
    return options


@attrs.frozen
class NetConfig:
    """A virtio-net NIC whose wire is a host tap: ``tap`` names the tap to attach to (created
    if missing, which needs CAP_NET_ADMIN); None creates ``trivmm%d``. ``mac``: the guest's
    address, e.g. "52:54:00:12:34:56"; None: a random locally-administered one."""

    tap: str | None = None
    mac: str | None = attrs.field(default=None, validator=_mac)

    @classmethod
    def parse(cls, text: str) -> NetConfig:
        """``tap[=NAME][,mac=MAC]`` (the CLI's ``--net``)."""
        usage = "tap[=NAME][,mac=MAC]"
        kind, _, rest = text.partition(",")
        name, eq, tap = kind.partition("=")
        if name.strip() != "tap":
            raise ConfigError(f"bad --net {text!r}: only tap networking exists ({usage})")
        if eq and not tap.strip():
            raise ConfigError(f"bad --net {text!r}: an empty tap name")
        options = _options(rest, "--net", usage, ("mac",))
        return cls(tap=tap.strip() or None, mac=options.get("mac"))


_DISK_FORMATS = ("raw", "qcow2", "vmdk")
_ON_OFF = {"on": True, "off": False, "yes": True, "no": False, "true": True, "false": False}


def _disk_format(value: str | None) -> str | None:
    if value is not None and value not in _DISK_FORMATS:
        raise ConfigError(f"unknown disk format {value!r} ({', '.join(_DISK_FORMATS)})")
    return value


def _serial(value: str | None) -> None:
    if value is not None and (not value.isascii() or len(value) > 20):
        raise ConfigError(f"disk serial {value!r} is not ASCII of at most 20 bytes")


@attrs.frozen
class DiskConfig:
    """A virtio-blk disk: the image at ``path`` in ``format`` (None: probed from its first
    bytes; a probed raw image that looks like another format is refused), ``readonly``, and
    ``serial`` (what the guest reads as its ID, up to 20 ASCII bytes)."""

    path: Path = attrs.field(converter=Path)
    format: str | None = attrs.field(default=None, converter=_disk_format)
    readonly: bool = False
    serial: str | None = attrs.field(default=None, validator=lambda _, __, value: _serial(value))

    @classmethod
    def parse(cls, text: str) -> DiskConfig:
        """``PATH[,format=raw|qcow2|vmdk][,readonly=on][,serial=S]`` (the CLI's ``--disk``)."""
        usage = "PATH[,format=raw|qcow2|vmdk][,readonly=on|off][,serial=S]"
        path, _, rest = text.partition(",")
        if not path.strip():
            raise ConfigError(f"bad --disk {text!r}: no image path ({usage})")
        options = _options(rest, "--disk", usage, ("format", "readonly", "serial"))
        readonly = options.get("readonly", "off").lower()
        if readonly not in _ON_OFF:
            raise ConfigError(f"bad --disk readonly={options['readonly']!r} (on or off)")
        return cls(path.strip(), options.get("format"), _ON_OFF[readonly], options.get("serial"))


def _disks(value: Iterable[DiskConfig]) -> tuple[DiskConfig, ...]:
    disks = tuple(value)
    if not all(isinstance(disk, DiskConfig) for disk in disks):
        raise ConfigError("disks takes DiskConfig values")
    return disks


def _cid(instance: object, attribute: object, value: int) -> None:
    if not 3 <= value <= 0xFFFF_FFFE:
        raise ConfigError(f"a vsock guest CID must be 3 to 4294967294 (0-2 and 2**32-1 are reserved), not {value}")


@attrs.frozen
class VsockConfig:
    """A virtio-vsock device, with Firecracker's host side: ``cid`` is the guest's context
    id; trivmm listens on the unix socket ``uds`` (host processes connect there and write
    ``CONNECT <port>\\n``), and a guest connection to host port P goes to ``<uds>_P``."""

    cid: int = attrs.field(validator=_cid)
    uds: Path = attrs.field(converter=Path)

    @classmethod
    def parse(cls, text: str) -> VsockConfig:
        """``cid=N,uds=PATH`` (the CLI's ``--vsock``; PATH may not contain a comma)."""
        usage = "cid=N,uds=PATH"
        options = _options(text, "--vsock", usage, ("cid", "uds"))
        if set(options) != {"cid", "uds"} or not options["uds"]:
            raise ConfigError(f"bad --vsock {text!r}: give both cid and uds ({usage})")
        if not re.fullmatch(r"[0-9]{1,10}", options["cid"]):
            raise ConfigError(f"bad --vsock cid {options['cid']!r}: a decimal number")
        return cls(cid=int(options["cid"]), uds=Path(options["uds"]))


def _vsock(value: VsockConfig | None) -> VsockConfig | None:
    if value is not None and not isinstance(value, VsockConfig):
        raise ConfigError("vsock takes a VsockConfig")
    return value


def _display(value: str | tuple[int, int] | None) -> tuple[int, int] | None:
    from trivmm.devices.display import check_display, parse_display

    if value is None:
        return None
    try:
        if isinstance(value, str):
            return parse_display(value)
        size = tuple(value)
        if len(size) != 2 or not all(isinstance(side, int) for side in size):
            raise ValueError(f"display takes (width, height) or 'WIDTHxHEIGHT', not {value!r}")
        check_display((size[0], size[1]))
        return (size[0], size[1])
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def _display_protocol(instance: VmConfig, attribute: object, value: tuple[int, int] | None) -> None:
    if value is not None and instance.boot_protocol == "pvh":
        raise ConfigError("a display is announced to Linux in the 64-bit boot protocol's zero page "
                          "(screen_info); PVH has none: use boot protocol auto or linux64")  # fmt: skip


def _nets(value: Iterable[NetConfig]) -> tuple[NetConfig, ...]:
    nets = tuple(value)
    if not all(isinstance(net, NetConfig) for net in nets):
        raise ConfigError("net takes NetConfig values")
    return nets


@attrs.frozen
class VmConfig:
    """A VM's shape. ``kernel=None`` boots the built-in guest shipped with trivmm."""

    kernel: Path | None = attrs.field(default=None, converter=_path)
    initrd: Path | None = attrs.field(default=None, converter=_path)
    append: str = ""
    memory: int = attrs.field(default=128 << 20, converter=_memory)
    vcpus: int = attrs.field(default=1, converter=_vcpus)
    cpu_template: str = attrs.field(default="auto", converter=_cpu_template)
    boot_protocol: str = attrs.field(default="auto", converter=_boot_protocol)
    cmdline_base: str = DEFAULT_LINUX_CMDLINE
    # virtio devices, and the transport that carries them (PCI: what any guest finds with no
    # hints; MMIO: the microVM option, announced in the ACPI DSDT).
    transport: str = attrs.field(default="pci", converter=_transport)
    rng: bool = False
    disks: tuple[DiskConfig, ...] = attrs.field(default=(), converter=_disks)
    net: tuple[NetConfig, ...] = attrs.field(default=(), converter=_nets)
    vsock: VsockConfig | None = attrs.field(default=None, converter=_vsock)
    # A linear XRGB8888 framebuffer, (width, height) or "WIDTHxHEIGHT" (trivmm.devices.display);
    # under boot protocol "auto" it makes a Linux kernel boot by linux64, which can announce it.
    display: tuple[int, int] | None = attrs.field(default=None, converter=_display, validator=_display_protocol)

    def read_kernel(self) -> bytes:
        if self.kernel is None:
            from trivmm.guest.builtin import builtin_guest

            return builtin_guest()
        return _read_input(self.kernel, "kernel")

    def read_initrd(self) -> bytes | None:
        return None if self.initrd is None else _read_input(self.initrd, "initrd")


def _read_input(path: Path, what: str) -> bytes:
    try:
        data = path.read_bytes()
    except IsADirectoryError:
        raise ConfigError(f"{what} {path} is a directory") from None
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc.strerror}") from None
    if not data:
        raise ConfigError(f"{what} {path} is empty")
    return data
