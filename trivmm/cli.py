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
import select
import stat
import sys
import termios
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import anyio
import anyio.abc
import anyio.lowlevel

from trivmm.eventfd import close_watched_fd

if TYPE_CHECKING:
    from trivmm.vm import VM, VmExit

__all__ = ["main"]

EXIT_OK, EXIT_VM_FAILED, EXIT_BAD_INPUT, EXIT_GUEST_PANIC, EXIT_INTERRUPTED = 0, 1, 2, 3, 130


def _parser() -> argparse.ArgumentParser:
    from trivmm.config import DEFAULT_LINUX_CMDLINE, MAX_VCPUS
    from trivmm.cpu.templates import TEMPLATES

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


def _run(args: argparse.Namespace) -> int:
    from trivmm.config import DiskConfig, NetConfig, VmConfig, VsockConfig
    from trivmm.vcpu import StopReason
    from trivmm.vm import VM

    config = VmConfig(kernel=args.kernel, initrd=args.initrd, append=args.append, memory=args.memory,
                      vcpus=args.vcpus, cpu_template=args.cpu_template, boot_protocol=args.boot_protocol,
                      transport=args.transport, rng=args.rng,
                      net=tuple(NetConfig.parse(spec) for spec in args.net),
                      disks=tuple(DiskConfig.parse(spec) for spec in args.disk),
                      vsock=VsockConfig.parse(args.vsock) if args.vsock else None)  # fmt: skip
    async def main() -> int:
        stdin = _stdin_stream()
        try:
            with VM(config, console_output=_write_stdout, console_input=stdin) as vm:
                if args.api_sock is None:
                    result = await vm.run()
                else:
                    result = await _run_with_api_socket(vm, args.api_sock)
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
        try:
            async with anyio.create_task_group() as tg:
                await tg.start(server.serve)
                result = await vm.run()  # serve() then ends on its own, within FLUSH_TIMEOUT
        except BaseExceptionGroup as group:
            raise _one_error(group) from None
    return result


def _one_error(group: BaseExceptionGroup) -> BaseException:
    """The error that matters out of a task group's: Ctrl-C first, then any other than a
    cancellation."""
    leaves: list[BaseException] = []
    pending: list[BaseException] = [group]
    while pending:
        exc = pending.pop()
        if isinstance(exc, BaseExceptionGroup):
            pending.extend(exc.exceptions)
        else:
            leaves.append(exc)
    cancelled = anyio.get_cancelled_exc_class()
    for wanted in (KeyboardInterrupt, Exception, cancelled):
        for exc in leaves:
            if isinstance(exc, wanted):
                return exc
    return group


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


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from trivmm.errors import ConfigError, TrivmmError
    from trivmm.guest.build import GuestBuildError
    from trivmm.kvm import KvmError, KvmUnavailable

    try:
        return _run(args) if args.command == "run" else _guest(args)
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
        print(f"trivmm: VM failed: {exc}", file=sys.stderr)
        return EXIT_VM_FAILED
