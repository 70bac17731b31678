"""``python -m trivmm``: run a VM, build test guests.

Exit status of ``run``: 0 when the guest powers off or resets, 1 when the VM fails, 2 for
bad input (a missing file, a kernel that is not one, a bad size), 3 when the guest kernel
panicked (it said so through the pvpanic device), 130 on Ctrl-C. Errors are one line on
stderr; ``--debug`` shows tracebacks.

The guest's console goes to stdout through the VM's bounded console buffer and a worker
thread: a stalled stdout never stops a vCPU; output it could not take is counted and
reported on stderr when the VM ends.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import select
import stat
import sys
import termios
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, NoReturn

import anyio
import anyio.abc
import anyio.lowlevel
import attrs

from trivmm._groups import first_error
from trivmm.errors import TrivmmError
from trivmm.eventfd import close_watched_fd

if TYPE_CHECKING:
    from trivmm.config import VmConfig
    from trivmm.migration.qmpclient import QmpClient
    from trivmm.qmp import QmpServer
    from trivmm.vm import VM, VmExit
    from trivmm.vnc import VncServer

__all__ = ["main", "add_run_options", "parse_run_args", "vm_config_from_args"]

EXIT_OK, EXIT_VM_FAILED, EXIT_BAD_INPUT, EXIT_GUEST_PANIC, EXIT_INTERRUPTED = 0, 1, 2, 3, 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m trivmm",
                                     description="trivmm: a KVM virtual machine monitor.")  # fmt: skip
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser(
        "run",
        help="boot a guest with its console on this terminal",
        description="Boot a guest. The guest's serial console is on stdout and stdin feeds its "
        "serial port. Without --kernel, a tiny built-in guest prints a greeting and powers off. "
        "Exit status: 0 when the guest powers off or resets, 1 when the VM fails, 2 for bad "
        "input, 3 when the guest kernel panicked, 130 on Ctrl-C.",
    )
    add_run_options(run)

    migrate = sub.add_parser(
        "migrate",
        help="move a running guest to another trivmm (hot or cold)",
        description="Migrate the guest of the trivmm whose control socket (run --api-sock) is SRC to "
        "the destination DST, a trivmm started with run --incoming DST (tcp:HOST:PORT or unix:PATH), or "
        "into a snapshot file (file:PATH). Hot (pre-copy) unless --cold. Exits 0 once the destination "
        "runs the guest (the source is then quit, unless --keep-source), 1 when the migration failed "
        "(the source runs on), 2 for bad input.",
    )
    migrate.add_argument("src", metavar="SRC", help="the source's control socket (run --api-sock PATH)")
    migrate.add_argument("dst", metavar="DST", help="where to: tcp:HOST:PORT, unix:PATH or file:PATH")
    migrate.add_argument("--cold", action="store_true",
                         help="pause the guest first and send everything once (file: is always cold)")
    migrate.add_argument("--downtime-ms", metavar="N", type=int,
                         help="the longest pause for the switch-over that pre-copy aims at (default 300)")
    migrate.add_argument("--max-bandwidth", metavar="RATE",
                         help="bytes per second the stream may use, e.g. 100M (default: no limit)")
    migrate.add_argument("--copy-storage", action="store_true",
                         help="copy the writable disks' contents too (the destination's own --disk images, "
                              "of the same size), as virsh migrate does with copy-storage-all")
    migrate.add_argument("--keep-source", action="store_true",
                         help="leave the source paused (postmigrate) instead of quitting it after a migration")

    snapshot = sub.add_parser(
        "snapshot",
        help="write a running guest's snapshot to a file",
        description="Write the complete state of the guest of the trivmm whose control socket (run "
        "--api-sock) is SRC to FILE (written atomically); a guest that was running runs on. Restore it "
        "with run --incoming file:FILE.",
    )
    snapshot.add_argument("src", metavar="SRC", help="the source's control socket (run --api-sock PATH)")
    snapshot.add_argument("file", metavar="FILE", help="the snapshot file to write")

    state_dir_help = ("the host service's state directory (default /var/lib/trivmm for root, else "
                      "$XDG_STATE_HOME/trivmm or ~/.local/state/trivmm)")  # fmt: skip
    serve = sub.add_parser(
        "serve",
        help="run the host service: every defined VM, a control socket and a web console",
        description="Run the host service (docs/host.md): the VMs defined with `vm define`, kept in SQLite "
        "under the state directory, each running in this process; `python -m trivmm vm ...` drives them "
        "through the control socket STATE_DIR/trivmm.sock (mode 0600). VMs recorded as running when the "
        "service last ended are reported stopped; autostart VMs are started. SIGTERM or Ctrl-C stops every "
        "VM and the service.",
    )
    serve.add_argument("--state-dir", metavar="DIR", help=state_dir_help)
    serve.add_argument("--listen", metavar="HOST:PORT|none", default="127.0.0.1:8006",
                       help="where the web console listens (none: no web console) (default 127.0.0.1:8006)")
    vm = sub.add_parser("vm", help="define, start, stop and attach to the host service's VMs",
                        description="The host service's VMs (like virsh): each ACTION asks the service "
                        "running on the state directory (python -m trivmm serve). Exit status: 0 done, 1 "
                        "failed (no service, a VM in the wrong state), 2 bad input (an unknown VM, bad run "
                        "options).")  # fmt: skip
    from trivmm.host.verbs import add_vm_verbs

    add_vm_verbs(vm, state_dir_help)

    guest = sub.add_parser("guest", help="build test guests from Debian packages")
    guest_sub = guest.add_subparsers(dest="guest_command", required=True, metavar="ACTION")
    build = guest_sub.add_parser("build", help="build the Debian-based test guests into a cache directory",
                                 description="Build (a) a small kernel from Debian's linux-source with "
                                 "trivmm's config fragment and (b) the stock Debian cloud kernel, each with "
                                 "a busybox-static initramfs. Needs root and apt.")  # fmt: skip
    build.add_argument("--dir", metavar="PATH",
                       help="cache directory (default $TRIVMM_GUEST_DIR or ~/.cache/trivmm/guests)")
    which = build.add_mutually_exclusive_group()
    which.add_argument("--small-only", action="store_true", help="only the small kernel")
    which.add_argument("--stock-only", action="store_true", help="only the stock cloud kernel")
    build.add_argument("--jobs", type=int, default=None, help="parallel make jobs (default: all cores)")
    guest_sub.add_parser("builtin", help="reassemble the built-in guest from its source (GNU as/ld)")
    return parser


def add_run_options(run: argparse.ArgumentParser) -> None:
    """``run``'s options (the VM's shape, devices, display, ...) on ``run``: shared by
    ``python -m trivmm run`` and the host service's VM definitions (``vm define``)."""
    from trivmm.config import DEFAULT_LINUX_CMDLINE, MAX_VCPUS
    from trivmm.cpu.templates import TEMPLATES

    run.add_argument("--kernel", metavar="PATH", help="bzImage or ELF vmlinux (default: the built-in guest)")
    run.add_argument("--initrd", metavar="PATH", help="initramfs image")
    run.add_argument("--append", metavar="STR", default="",
                     help=f"kernel command line, added after the defaults ({DEFAULT_LINUX_CMDLINE!r} "
                          "and the CPU template's)")  # fmt: skip
    run.add_argument("--memory", metavar="SIZE", default="128M", help="guest RAM, e.g. 256M or 1G (default 128M)")
    run.add_argument("--vcpus", metavar="N", type=int, default=1, help=f"number of vCPUs, 1..{MAX_VCPUS} (default 1)")
    run.add_argument("--cpu-template", metavar="NAME", default="auto",
                     choices=["auto", *TEMPLATES],
                     help="CPU model: auto (detect the host), " + ", ".join(
                         f"{t.name} ({t.description.split(':')[0]})" for t in TEMPLATES.values()))  # fmt: skip
    run.add_argument("--boot-protocol", metavar="NAME", default="auto", choices=["auto", "linux64", "pvh"],
                     help="how to enter the kernel: pvh (its PVH entry note; for a bzImage, trivmm unpacks "
                          "the payload to find it), linux64 (the 64-bit entry; a bzImage as it is, unpacked "
                          "in the guest by its own decompressor), or auto: PVH where the kernel has the note "
                          "(a bzImage's gzip, xz, LZ4 or zstd payload unpacked by trivmm), else linux64 "
                          "(default auto)")  # fmt: skip

    run.add_argument("--disk", metavar="PATH[,format=F][,readonly=on][,serial=S]", action="append", default=[],
                     help="a virtio-blk disk: a raw, qcow2 or vmdk (read-only) image, used as it is; the format "
                          "is probed when not given (a raw image that looks like another format is refused "
                          "unless format=raw) (repeatable: /dev/vda, /dev/vdb, ...)")  # fmt: skip
    run.add_argument("--rng", action="store_true", help="a virtio-rng device fed from the host's random source")
    run.add_argument("--net", metavar="tap[=NAME][,mac=MAC]", action="append", default=[],
                     help="a virtio-net NIC on a host tap: NAME is attached to (or created), none "
                          "creates trivmmN (needs CAP_NET_ADMIN); MAC default: random 02:xx:xx:xx:xx:xx "
                          "(repeatable)")  # fmt: skip
    run.add_argument("--vsock", metavar="cid=N,uds=PATH",
                     help="a virtio-vsock device for guest CID N: trivmm listens on the unix socket PATH "
                          "(a host process connects and writes 'CONNECT <port>\\n'); the guest's connections "
                          "to host port P go to PATH_P")  # fmt: skip
    run.add_argument("--transport", metavar="NAME", default="pci", choices=["pci", "mmio"],
                     help="how virtio devices are attached: pci (virtio-pci with MSI-X, found by any guest) "
                          "or mmio (virtio-mmio, announced in the ACPI DSDT) (default pci)")  # fmt: skip
    run.add_argument("--api-sock", metavar="PATH",
                     help="a QMP control socket (QEMU's machine protocol; unix socket, mode 0600) at PATH: "
                          "query-status, stop, cont, quit, ... (docs/qmp.md); a stale socket there is "
                          "replaced")  # fmt: skip
    # --- display (docs/display.md) ---
    run.add_argument("--display", metavar="WIDTHxHEIGHT",
                     help="a linear framebuffer (32 bpp, XRGB8888) announced to Linux as an EFI framebuffer "
                          "(efifb/simpledrm, fbcon); makes boot protocol auto enter Linux by linux64, and "
                          "adds console=tty0 (default: none)")  # fmt: skip
    run.add_argument("--vnc", metavar="unix:PATH|HOST:PORT",
                     help="a VNC (RFB 3.8) server for the display, no password: a unix socket (mode 0600) or "
                          "TCP on a loopback address (another address only with ,allow-remote=on); keys and "
                          "pointer go to the PS/2 keyboard and mouse (needs --display, or --incoming with a guest that "
                          "has a display)")  # fmt: skip
    run.add_argument("--incoming", metavar="URI",
                     help="receive the guest from a migration instead of booting one: tcp:HOST:PORT or "
                          "unix:PATH (listen there until a migration succeeds) or file:PATH (a snapshot); "
                          "the guest's shape comes from the stream, --disk/--net/--vsock replace its device "
                          "backends (docs/migration.md)")  # fmt: skip


@contextlib.contextmanager
def _guest_terminal(fd: int) -> Iterator[None]:
    """Non-canonical, no echo (the guest echoes); Ctrl-C still stops trivmm."""
    if not os.isatty(fd):
        yield
        return
    saved = termios.tcgetattr(fd)
    mode = termios.tcgetattr(fd)
    mode[3] &= ~(termios.ICANON | termios.ECHO)
    mode[6][termios.VMIN], mode[6][termios.VTIME] = 1, 0
    termios.tcsetattr(fd, termios.TCSANOW, mode)
    try:
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSANOW, saved)


def _write_stdout(data: bytes) -> None:
    """Write all of ``data`` to fd 1 (on the VM's console worker thread: blocking is fine).
    stdout may share its open file with stdin, which the input stream made non-blocking:
    then wait until it takes more rather than giving up."""
    view = memoryview(data)
    while view:
        try:
            written = os.write(1, view)
        except BlockingIOError:
            select.select([], [1], [])
            continue
        view = view[written:]


class _RunOptionsParser(argparse.ArgumentParser):
    """run's options alone; a bad one is a ``ConfigError`` with argparse's message."""

    def error(self, message: str) -> NoReturn:
        from trivmm.errors import ConfigError

        raise ConfigError(message)

    def exit(self, status: int = 0, message: str | None = None) -> NoReturn:
        from trivmm.errors import ConfigError

        raise ConfigError((message or "").strip() or "--help is not a VM option")


def parse_run_args(argv: Sequence[str]) -> argparse.Namespace:
    """``argv`` (``python -m trivmm run``'s options) parsed as ``run`` does; a bad option is a
    ``ConfigError`` carrying argparse's message (``--help`` included: nothing is printed)."""
    parser = _RunOptionsParser(prog="python -m trivmm run", add_help=False)
    add_run_options(parser)
    return parser.parse_args(list(argv))


def vm_config_from_args(args: argparse.Namespace) -> VmConfig:
    """The ``VmConfig`` that ``run``'s parsed options describe (``ConfigError`` for bad ones,
    the option combinations included)."""
    from trivmm.config import DiskConfig, NetConfig, VmConfig, VsockConfig

    config = VmConfig(kernel=args.kernel, initrd=args.initrd, append=args.append, memory=args.memory,
                      vcpus=args.vcpus, cpu_template=args.cpu_template, boot_protocol=args.boot_protocol,
                      transport=args.transport, rng=args.rng,
                      net=tuple(NetConfig.parse(spec) for spec in args.net),
                      disks=tuple(DiskConfig.parse(spec) for spec in args.disk),
                      vsock=VsockConfig.parse(args.vsock) if args.vsock else None,
                      display=args.display)  # fmt: skip
    _check_display_options(args)
    if args.incoming is not None:
        _check_incoming_options(args)
    return config


def _run(args: argparse.Namespace) -> int:
    from trivmm.vcpu import StopReason
    from trivmm.vm import VM

    config = vm_config_from_args(args)

    async def main() -> int:
        stdin = _stdin_stream()
        try:
            if args.incoming is not None:
                result = await _run_incoming(args, config, stdin)
            else:
                with VM(config, console_output=_write_stdout, console_input=stdin) as vm, _vnc_server(vm, args) as vnc:
                    if args.api_sock is None:
                        result = await _beside_vnc(vnc, vm.run)
                    else:
                        result = await _beside_vnc(vnc, lambda: _run_with_api_socket(vm, args.api_sock))
        finally:
            if stdin is not None:
                stdin.close()
        if result.console_dropped:
            print(f"trivmm: {result.console_dropped} bytes of console output were dropped "
                  "(stdout did not keep up)", file=sys.stderr)  # fmt: skip
        if result.reason is StopReason.PANIC:
            print("trivmm: the guest kernel panicked (its console output above says why)", file=sys.stderr)
            return EXIT_GUEST_PANIC
        return EXIT_OK

    with _guest_terminal(0):
        return anyio.run(main, backend="trio")


async def _run_with_api_socket(vm: VM, path: str) -> VmExit:
    """``vm.run()`` with a QMP server beside it (``--api-sock``): the socket is bound first
    (a bad path is bad input), and the server sends SHUTDOWN to its clients after the VM ends."""
    from trivmm.qmp import QmpServer

    with QmpServer(vm, path) as server:
        _serve_migration(vm, server)
        try:
            async with anyio.create_task_group() as tg:
                await tg.start(server.serve)
                result = await vm.run()  # serve() then ends on its own, within FLUSH_TIMEOUT
        except BaseExceptionGroup as group:
            raise first_error(group) from None
    return result


class _FdReceiveStream(anyio.abc.ByteReceiveStream):
    """stdin as a byte stream. A pipe or terminal is waited on through the event loop's
    epoll; a regular file (which epoll cannot watch, and which is always "ready") is read
    on a worker thread."""

    def __init__(self, fd: int, *, pollable: bool) -> None:
        self._fd = fd
        self._pollable = pollable
        # O_NONBLOCK is a property of the open file, which this dup shares with the
        # terminal or pipe the shell gave us: put it back in close().
        self._was_blocking = os.get_blocking(fd)
        if pollable:
            os.set_blocking(fd, False)

    def close(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            if self._pollable:
                os.set_blocking(fd, self._was_blocking)
            close_watched_fd(fd)

    async def receive(self, max_bytes: int = 4096) -> bytes:
        if not self._pollable:
            data = await anyio.to_thread.run_sync(os.read, self._fd, max_bytes)
        else:
            while True:
                try:
                    data = os.read(self._fd, max_bytes)
                    break
                except BlockingIOError:
                    await anyio.wait_readable(self._fd)
        if not data:
            raise anyio.EndOfStream
        return data

    async def aclose(self) -> None:
        self.close()
        await anyio.lowlevel.checkpoint()


def _stdin_stream() -> _FdReceiveStream | None:
    """stdin as a stream for the guest's serial port, or None if it is closed."""
    if sys.stdin is None:  # fd 0 was closed at start-up; it may since hold another file
        return None
    try:
        mode = os.fstat(0).st_mode
    except OSError:
        return None
    return _FdReceiveStream(os.dup(0), pollable=not stat.S_ISREG(mode))


def _guest(args: argparse.Namespace) -> int:
    from pathlib import Path

    if args.guest_command == "builtin":
        from trivmm.guest.builtin import assemble_builtin_guest

        target = Path(__file__).parent / "guest" / "builtin" / "hello.elf"
        assemble_builtin_guest(target)
        print(f"wrote {target}")
        return EXIT_OK
    from trivmm.guest.build import build_guests

    built = build_guests(Path(args.dir) if args.dir else None, small=not args.stock_only,
                         stock=not args.small_only, jobs=args.jobs)  # fmt: skip
    for name, path in built.items():
        print(f"{name}: {path}")
    return EXIT_OK


# --- display: run --display, --vnc (docs/display.md) ------------------------------------------
def _check_display_options(args: argparse.Namespace) -> None:
    from trivmm.errors import ConfigError

    if args.incoming is not None:  # the display, if any, comes with the guest
        if args.display is not None:
            raise ConfigError("--display: with --incoming the display comes from the migration stream")
        if args.vnc is not None:
            from trivmm.vnc import VncEndpoint

            VncEndpoint.parse(args.vnc)  # bad syntax is bad input before anything is received
    elif args.vnc is not None and args.display is None:
        raise ConfigError("--vnc needs a display: add --display WIDTHxHEIGHT")


@contextlib.contextmanager
def _vnc_server(vm: VM, args: argparse.Namespace) -> Iterator[VncServer | None]:
    """The VNC server of ``--vnc`` for ``vm``'s display, bound now (a bad address is bad input)."""
    if args.vnc is None or vm.display is None:
        yield None
        return
    from trivmm.vnc import VncServer

    with VncServer(vm.display, vm.i8042, args.vnc) as server:
        print(f"trivmm: VNC server on {server.endpoint}", file=sys.stderr, flush=True)
        yield server


async def _beside_vnc(server: VncServer | None, run: Callable[[], Awaitable[VmExit]]) -> VmExit:
    """``run()`` (the VM) with the VNC server serving beside it until it ends."""
    if server is None:
        return await run()
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(server.serve)
            result = await run()
            tg.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        raise first_error(group) from None
    return result


# --- migration: run --incoming, migrate, snapshot (docs/migration.md) ---------------------------
_SHAPE_OPTIONS = ("kernel", "initrd", "append", "memory", "vcpus", "cpu_template", "boot_protocol", "transport", "rng")
_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?B)?(/s)?\s*$", re.IGNORECASE)
_POLL_INTERVAL = 0.1


def _serve_migration(vm: VM, server: QmpServer) -> None:
    """The VM's migration engine behind the QMP server's migration commands, its events
    sent to the server's clients, running as a service of the VM."""
    migration = vm.migration
    migration.emit = server.emit_event
    server.migration = migration
    vm.add_service(migration.serve)


def _check_incoming_options(args: argparse.Namespace) -> None:
    """With --incoming the guest's shape comes from the stream: options that set it are refused."""
    from trivmm.errors import ConfigError

    defaults = _parser().parse_args(["run"])
    given = [name for name in _SHAPE_OPTIONS if getattr(args, name) != getattr(defaults, name)]
    if given:
        options = ", ".join("--" + name.replace("_", "-") for name in given)
        raise ConfigError(f"{options}: with --incoming the guest's shape comes from the migration stream")


async def _run_incoming(args: argparse.Namespace, config: VmConfig, stdin: _FdReceiveStream | None) -> VmExit:
    """``run --incoming URI``: wait for the guest (a tcp: or unix: listener takes one
    migration after another until one succeeds; file: restores a snapshot), then run it."""
    from trivmm.errors import ConfigError, MigrationError
    from trivmm.kvm import KvmError
    from trivmm.migration import listen, parse_uri, restore_vm

    try:
        target = parse_uri(args.incoming)
    except MigrationError as exc:
        raise ConfigError(str(exc)) from None

    def adapt(saved: VmConfig) -> VmConfig:  # the destination's own device backends, where given
        changes: dict[str, Any] = {}
        if config.disks:
            changes["disks"] = config.disks
        if config.net:
            changes["net"] = config.net
        if config.vsock is not None:
            changes["vsock"] = config.vsock
        return attrs.evolve(saved, **changes)

    async def receive() -> VM:
        if target.scheme == "file":
            return await restore_vm(target.path, console_output=_write_stdout, console_input=stdin, adapt=adapt)
        async with listen(str(target)) as listener:
            print(f"trivmm: waiting for a migration on {listener.uri}", file=sys.stderr, flush=True)
            while True:
                try:
                    return await listener.accept(console_output=_write_stdout, console_input=stdin, adapt=adapt)
                except (MigrationError, ConfigError, KvmError) as exc:
                    print(f"trivmm: an incoming migration failed: {exc}; waiting for another", file=sys.stderr,
                          flush=True)  # fmt: skip

    def arrived(vm: VM) -> None:
        if args.vnc is not None and vm.display is None:
            raise ConfigError("--vnc: the guest that came has no display")
        if vm.start_paused:
            print("trivmm: the guest is here, paused as its source was (QMP cont resumes it)", file=sys.stderr,
                  flush=True)  # fmt: skip
        else:
            print("trivmm: the guest runs here", file=sys.stderr, flush=True)

    if args.api_sock is None:
        with await receive() as vm, _vnc_server(vm, args) as vnc:
            arrived(vm)
            return await _beside_vnc(vnc, vm.run)
    from trivmm.qmp import QmpServer

    with QmpServer(None, args.api_sock, migration=_Incoming()) as server:
        try:
            async with anyio.create_task_group() as tg:
                await tg.start(server.serve)  # query-status: "inmigrate" meanwhile
                with await receive() as vm, _vnc_server(vm, args) as vnc:
                    server.attach(vm)
                    _serve_migration(vm, server)
                    arrived(vm)
                    result = await _beside_vnc(vnc, vm.run)
        except BaseExceptionGroup as group:
            raise first_error(group) from None
    return result


class _Incoming:
    """The QMP server's migration control while the destination waits for its guest."""

    def run_state(self) -> str:
        return "inmigrate"

    async def migrate(self, uri: str, arguments: Mapping[str, Any]) -> None:
        raise TrivmmError("this VM is still being received (inmigrate)")

    async def migrate_cancel(self) -> None:
        pass

    async def query_migrate(self) -> Mapping[str, Any]:
        return {}

    async def set_parameters(self, parameters: Mapping[str, Any]) -> None:
        raise TrivmmError("this VM is still being received (inmigrate)")


def _parse_rate(text: str) -> int:
    """``100M``, ``1.5G``, ``500K`` (bytes per second, powers of 1024; ``/s`` may follow), or
    a plain number of bytes per second."""
    from trivmm.errors import ConfigError

    m = _RATE.match(text)
    if not m:
        raise ConfigError(f"bad rate {text!r} (use e.g. 100M for 100 MiB/s)")
    scale = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}[m.group(2).upper()]
    return int(float(m.group(1)) * scale)


async def _wait_for_migration(client: QmpClient, what: str) -> dict[str, Any]:
    """Poll query-migrate until the migration has ended; a progress bar on a terminal."""
    from tqdm import tqdm

    layout = "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}, {rate_fmt}] {postfix}"
    bar = tqdm(desc=what, file=sys.stderr, unit="B", unit_scale=True, unit_divisor=1024, disable=None,
               bar_format=layout)  # fmt: skip
    try:
        while True:
            info = await client.execute("query-migrate")
            status = info.get("status", "none") if isinstance(info, dict) else "none"
            ram = info.get("ram", {}) if isinstance(info, dict) else {}
            if ram:
                sent, remaining = ram.get("transferred", 0), ram.get("remaining", 0)
                bar.total = max(sent + remaining, 1)
                bar.n = sent
                dirty = ram.get("dirty-pages-rate", 0) * ram.get("page-size", 4096)
                postfix = f"{status}, round {ram.get('dirty-sync-count', 0)}, dirty {dirty / (1 << 20):.1f} MiB/s"
                if "expected-downtime" in info:
                    postfix += f", downtime ~{info['expected-downtime']} ms"
                if info.get("cpu-throttle-percentage"):
                    postfix += f", throttle {info['cpu-throttle-percentage']} %"
                bar.set_postfix_str(postfix, refresh=False)
                bar.refresh()
            if status in ("completed", "failed", "cancelled"):
                return info if isinstance(info, dict) else {}
            await anyio.sleep(_POLL_INTERVAL)
    finally:
        bar.close()


async def _migration_command(src: str, body: Callable[[QmpClient], Awaitable[int]]) -> int:
    from trivmm.migration.qmpclient import QmpClient

    client = await QmpClient.connect(src)
    try:
        return await body(client)
    finally:
        await client.aclose()


def _migrate(args: argparse.Namespace) -> int:
    """``migrate SRC DST``: drive the source's QMP socket (migrate, then query-migrate)."""
    from trivmm.errors import ConfigError, MigrationError
    from trivmm.migration import parse_uri

    try:
        dst = parse_uri(args.dst).absolute()  # the source resolves paths from its own directory
    except MigrationError as exc:
        raise ConfigError(str(exc)) from None
    if args.copy_storage and dst.scheme == "file":
        raise ConfigError("--copy-storage needs a destination (tcp: or unix:), not a file")
    if args.downtime_ms is not None and args.downtime_ms < 0:
        raise ConfigError("--downtime-ms must be 0 or more")
    bandwidth = None if args.max_bandwidth is None else _parse_rate(args.max_bandwidth)

    async def body(client: QmpClient) -> int:
        status = (await client.execute("query-status"))["status"]
        if status not in ("running", "paused", "postmigrate"):
            raise TrivmmError(f"the source VM cannot be migrated in state '{status}'")
        parameters: dict[str, Any] = {}
        if args.downtime_ms is not None:
            parameters["downtime-limit"] = args.downtime_ms
        if bandwidth is not None:
            parameters["max-bandwidth"] = bandwidth
        if parameters:
            await client.execute("migrate-set-parameters", parameters)
        stopped = args.cold and status == "running"  # QMP's cold migration: stop, then migrate
        try:
            if stopped:
                await client.execute("stop")
            await client.execute("migrate", {"uri": str(dst), **({"copy-storage": True} if args.copy_storage else {})})
            info = await _wait_for_migration(client, f"migrating to {dst}")
        except BaseException:
            with anyio.CancelScope(shield=True), anyio.move_on_after(10):
                await client.execute("migrate_cancel")
                if stopped:
                    await client.execute("cont")
            raise
        if info.get("status") != "completed":
            if stopped:
                await client.execute("cont")
            raise TrivmmError(f"migration to {dst} failed: {info.get('error-desc', info.get('status'))}")
        ram = info.get("ram", {})
        print(f"trivmm: migrated to {dst}: {ram.get('transferred', 0) / (1 << 20):.1f} MiB in "
              f"{info.get('total-time', 0)} ms, {ram.get('dirty-sync-count', 0)} round(s), downtime "
              f"{info.get('downtime', 0)} ms", file=sys.stderr)  # fmt: skip
        if not args.keep_source:
            await client.execute("quit")
        return EXIT_OK

    return anyio.run(_migration_command, args.src, body, backend="trio")


def _snapshot(args: argparse.Namespace) -> int:
    """``snapshot SRC FILE``: migrate to file:FILE through the source's QMP socket, then
    let a guest that was running run on."""
    target = f"file:{os.path.abspath(args.file)}"

    async def body(client: QmpClient) -> int:
        status = (await client.execute("query-status"))["status"]
        if status not in ("running", "paused", "postmigrate"):
            raise TrivmmError(f"the source VM cannot be snapshotted in state '{status}'")
        await client.execute("migrate", {"uri": target})
        info = await _wait_for_migration(client, f"writing {args.file}")
        if info.get("status") != "completed":
            raise TrivmmError(f"the snapshot failed: {info.get('error-desc', info.get('status'))}")
        if status == "running":
            await client.execute("cont")
        ram = info.get("ram", {})
        print(f"trivmm: wrote {args.file} ({ram.get('transferred', 0)} bytes; the guest was paused "
              f"{info.get('downtime', 0)} ms)", file=sys.stderr)  # fmt: skip
        return EXIT_OK

    return anyio.run(_migration_command, args.src, body, backend="trio")


# --- the host service: serve, vm (docs/host.md) ----------------------------------------------------
def _serve(args: argparse.Namespace) -> int:
    """``serve``: the host service until SIGTERM or Ctrl-C (which stop its VMs first)."""
    import signal
    from pathlib import Path

    from trivmm.host.manager import default_state_dir
    from trivmm.host.service import parse_listen, serve

    listen = parse_listen(args.listen)
    state_dir = Path(args.state_dir) if args.state_dir else default_state_dir()

    async def main() -> int:
        try:
            async with anyio.create_task_group() as tg:
                with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                    await tg.start(serve, state_dir, listen)
                    async for signum in signals:
                        print(f"trivmm: {signal.Signals(signum).name}: stopping the VMs and the service",
                              file=sys.stderr, flush=True)  # fmt: skip
                        break
                    tg.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            raise first_error(group) from None
        return EXIT_OK

    return anyio.run(main, backend="trio")


def _vm(args: argparse.Namespace) -> int:
    from trivmm.host.verbs import run_verb

    return run_verb(args)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from trivmm.errors import ConfigError, TrivmmError
    from trivmm.guest.build import GuestBuildError
    from trivmm.kvm import KvmError, KvmUnavailable

    try:
        commands = {"run": _run, "guest": _guest, "migrate": _migrate, "snapshot": _snapshot, "serve": _serve,
                    "vm": _vm}
        return commands[args.command](args)
    except KeyboardInterrupt:
        print("trivmm: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (ConfigError, KvmUnavailable, GuestBuildError) as exc:
        if args.debug:
            raise
        print(f"trivmm: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except (TrivmmError, KvmError) as exc:
        if args.debug:
            raise
        what = "VM failed: " if args.command == "run" else ""  # migrate, snapshot: the reason says it
        print(f"trivmm: {what}{exc}", file=sys.stderr)
        return EXIT_VM_FAILED
