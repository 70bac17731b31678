"""``python -m trivmm vm ...``: the host service's verbs, a client of its control socket."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import select
import socket
import sys
import termios
import tty
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from trivmm.host.control import _HEADER, MAX_REQUEST, MAX_RESPONSE, SOCKET_NAME, encode_frame
from trivmm.host.model import HostError

__all__ = ["ControlClient", "ServiceUnavailable", "RemoteError", "run_verb", "add_vm_verbs", "canonical_run_args",
           "relative_paths",
           "ESCAPE", "EXIT_OK", "EXIT_FAILED", "EXIT_BAD_INPUT"]  # fmt: skip

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2
ESCAPE = 0x1D  # Ctrl-]: detach from a console, as virsh console does
_BAD_INPUT_KINDS = ("unknown-vm", "invalid", "protocol")


class ServiceUnavailable(HostError):
    """No service listens on the control socket."""


class RemoteError(HostError):
    """The service refused or failed a request; ``kind`` says how (docs/host.md)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind

    @property
    def exit_status(self) -> int:
        return EXIT_BAD_INPUT if self.kind in _BAD_INPUT_KINDS else EXIT_FAILED


class ControlClient:
    """A connection to the service whose control socket is ``STATE_DIR/trivmm.sock``."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / SOCKET_NAME
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            self.sock.connect(str(self.path))
        except (FileNotFoundError, ConnectionRefusedError, NotADirectoryError):
            self.sock.close()
            hint = "" if state_dir == _default_state_dir() else f" --state-dir {state_dir}"
            raise ServiceUnavailable(f"no trivmm service at {self.path}: start it with "
                                     f"`python -m trivmm serve{hint}`") from None
        except OSError as exc:
            self.sock.close()
            raise ServiceUnavailable(f"cannot reach the trivmm service at {self.path}: {exc.strerror}") from None

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _receive_exactly(self, size: int) -> bytes:
        data = bytearray()
        while len(data) < size:
            chunk = self.sock.recv(size - len(data))
            if not chunk:
                raise HostError("the trivmm service closed the connection")
            data += chunk
        return bytes(data)

    def request(self, op: str, **arguments: Any) -> Any:
        """Send one request; its result, or ``RemoteError``."""
        frame = encode_frame({"op": op, **arguments})
        if len(frame) - _HEADER.size > MAX_REQUEST:
            raise RemoteError("invalid", f"the request is larger than {MAX_REQUEST} bytes")
        self.sock.sendall(frame)
        (size,) = _HEADER.unpack(self._receive_exactly(_HEADER.size))
        if size > MAX_RESPONSE:
            raise HostError(f"the trivmm service sent a response of {size} bytes (at most {MAX_RESPONSE})")
        answer = json.loads(self._receive_exactly(size))
        if not isinstance(answer, dict):
            raise HostError("the trivmm service sent a malformed response")
        if not answer.get("ok"):
            raise RemoteError(str(answer.get("kind", "failure")), str(answer.get("error", "the request failed")))
        return answer.get("result")


def _default_state_dir() -> Path:
    from trivmm.host.manager import default_state_dir

    return default_state_dir()


# --- run options, made independent of the caller's directory ------------------------------------
def relative_paths(run_args: Sequence[str]) -> list[str]:
    """The host paths in ``run_args`` (--kernel, --initrd, --disk, the vsock uds) that are
    not absolute (run's parser's ``ConfigError`` for bad options): a definition made where
    there is no caller's directory (the web console) must not have any."""
    from trivmm.cli import parse_run_args

    args = parse_run_args(run_args)
    paths = [args.kernel, args.initrd, *(spec.partition(",")[0] for spec in args.disk)]
    if args.vsock:
        paths += [field[4:] for field in args.vsock.split(",") if field.startswith("uds=")]
    return [path for path in paths if path and not os.path.isabs(path)]


def canonical_run_args(run_args: Sequence[str], cwd: str | None = None) -> list[str]:
    """``run_args`` parsed by run's parser (``ConfigError`` with its message) and written
    back in full option names, with the paths in them (--kernel, --initrd, --disk, the vsock
    uds) made absolute against ``cwd``: the service does not run in the caller's directory."""
    from trivmm.cli import add_run_options, parse_run_args

    cwd = os.getcwd() if cwd is None else cwd
    args = parse_run_args(run_args)

    def absolute(path: str) -> str:
        return path if not path or os.path.isabs(path) else os.path.normpath(os.path.join(cwd, path))

    def first_field_absolute(spec: str) -> str:
        head, sep, rest = spec.partition(",")
        return absolute(head) + sep + rest

    def uds_absolute(spec: str) -> str:
        fields = spec.split(",")
        return ",".join("uds=" + absolute(f[4:]) if f.startswith("uds=") else f for f in fields)

    if args.kernel:
        args.kernel = absolute(args.kernel)
    if args.initrd:
        args.initrd = absolute(args.initrd)
    args.disk = [first_field_absolute(spec) for spec in args.disk]
    if args.vsock:
        args.vsock = uds_absolute(args.vsock)
    parser = argparse.ArgumentParser(add_help=False)
    add_run_options(parser)
    argv: list[str] = []
    for action in parser._actions:
        value = getattr(args, action.dest)
        option = action.option_strings[0]
        if isinstance(action, argparse._StoreTrueAction):
            if value:
                argv.append(option)
        elif isinstance(action, argparse._AppendAction):
            for item in value:
                argv += [option, str(item)]
        elif value is not None and value != action.default:
            argv += [option, str(value)]
    return argv


# --- the verbs ---------------------------------------------------------------------------------
def add_vm_verbs(vm: argparse.ArgumentParser, state_dir_help: str) -> None:
    """``vm``'s actions on its parser (each takes --state-dir)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--state-dir", metavar="DIR", help=state_dir_help)
    actions = vm.add_subparsers(dest="vm_command", required=True, metavar="ACTION")

    define = actions.add_parser("define", parents=[common], help="define a VM from run's options",
                                description="Define VM NAME from `python -m trivmm run`'s options, written after "
                                "the name (a `--` before them is allowed), e.g. `vm define web --kernel bzImage "
                                "--memory 512M --display 1024x768`. Relative paths are made absolute. --incoming, "
                                "--vnc and --api-sock are not for service VMs (a display gets a VNC socket of "
                                "its own). --autostart: the service starts the VM whenever it starts.")  # fmt: skip
    define.add_argument("--autostart", action="store_true", help="start the VM whenever the service starts")
    define.add_argument("name", metavar="NAME")
    define.add_argument("run_args", nargs=argparse.REMAINDER, metavar="RUN_OPTIONS",
                        help="python -m trivmm run's options")
    actions.add_parser("list", parents=[common], help="list the VMs and their states (like virsh list --all)")
    for verb, text in (("info", "show a VM's definition and state"), ("start", "boot a VM"),
                       ("reset", "stop a VM and boot it again (a cold reset)"),
                       ("pause", "pause a VM's vCPUs"), ("resume", "let a paused VM run on"),
                       ("undefine", "forget a stopped VM (its console log goes too)")):  # fmt: skip
        actions.add_parser(verb, parents=[common], help=text).add_argument("name", metavar="NAME")
    stop = actions.add_parser("stop", parents=[common], help="stop a VM (its ACPI power button, then by force)",
                              description="Stop a VM: press its ACPI power button and wait up to --timeout "
                              "seconds for the guest to power off, then stop it where it is. --force stops it "
                              "where it is at once (cutting a snapshot or migration under way short).")  # fmt: skip
    stop.add_argument("--force", action="store_true", help="stop at once, as pulling the plug")
    stop.add_argument("--timeout", metavar="SECONDS", type=float, default=30.0,
                      help="how long the guest gets to power off after its power button (default 30)")
    stop.add_argument("name", metavar="NAME")
    console = actions.add_parser("console", parents=[common], help="attach to a running VM's serial console",
                                 description="Attach this terminal to the VM's serial console (raw mode on a "
                                 "terminal; stdin may be a pipe). Ctrl-] (byte 0x1d) detaches; the console ends "
                                 "when the VM stops.")  # fmt: skip
    console.add_argument("name", metavar="NAME")
    snapshot = actions.add_parser("snapshot", parents=[common], help="write a running VM's snapshot to a file",
                                  description="Write the running VM's complete state to FILE; it runs on. "
                                  "`python -m trivmm run --incoming file:FILE` restores it.")  # fmt: skip
    snapshot.add_argument("name", metavar="NAME")
    snapshot.add_argument("file", metavar="FILE")
    migrate = actions.add_parser("migrate", parents=[common], help="move a running VM to another trivmm",
                                 description="Migrate the running VM to DEST_URI, where `python -m trivmm run "
                                 "--incoming DEST_URI` waits (tcp:HOST:PORT or unix:PATH; file:PATH writes a "
                                 "snapshot); once the destination runs it, the VM is stopped here.")  # fmt: skip
    migrate.add_argument("name", metavar="NAME")
    migrate.add_argument("uri", metavar="DEST_URI")
    events = actions.add_parser("events", parents=[common], help="show the newest recorded events")
    events.add_argument("name", metavar="NAME", nargs="?")
    events.add_argument("--limit", type=int, default=20, help="how many (default 20)")


def _state_dir(args: argparse.Namespace) -> Path:
    return Path(args.state_dir).absolute() if args.state_dir else _default_state_dir()


def _size(memory: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if memory >= scale and memory % scale == 0:
            return f"{memory // scale} {unit}"
    return f"{memory} B"


def _table(rows: list[dict[str, Any]]) -> str:
    header = ("Name", "State", "vCPUs", "Memory", "Display", "Autostart", "Last exit")
    lines = [header] + [(r["name"], r["state"], str(r["vcpus"]), _size(r["memory"]),
                         "x".join(map(str, r["display"])) if r["display"] else "-",
                         "yes" if r["autostart"] else "no", r["last_exit"] or "-") for r in rows]  # fmt: skip
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = [" " + "   ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip() for line in lines]
    text.insert(1, "-" * (sum(widths) + 3 * (len(widths) - 1) + 2))
    return "\n".join(text)


def run_verb(args: argparse.Namespace) -> int:
    """Run ``vm ACTION``; errors are one line on stderr and the exit status (docs/host.md)."""
    from trivmm.errors import ConfigError

    state_dir = _state_dir(args)
    verb = args.vm_command
    try:
        if verb == "define":
            run_args = list(args.run_args)
            if run_args[:1] == ["--"]:
                run_args = run_args[1:]
            run_args, autostart, state_dir = _define_options(run_args, args.autostart, state_dir)
            try:
                run_args = canonical_run_args(run_args)
            except ConfigError as exc:
                raise RemoteError("invalid", f"bad run options: {exc}") from None
        with ControlClient(state_dir) as client:
            if verb == "console":
                return _console(client, args.name)
            if verb == "define":
                client.request("define", name=args.name, run_args=run_args, autostart=autostart)
                print(f"VM {args.name} defined")
            elif verb == "list":
                print(_table(client.request("list")))
            elif verb == "info":
                _print_info(client.request("info", name=args.name))
            elif verb == "undefine":
                client.request("undefine", name=args.name)
                print(f"VM {args.name} undefined")
            elif verb == "stop":
                info = client.request("stop", name=args.name, force=args.force, timeout=args.timeout)
                print(f"VM {args.name} stopped ({info['last_exit']})")
            elif verb == "snapshot":
                client.request("snapshot", name=args.name, path=os.path.abspath(args.file))
                print(f"VM {args.name}: snapshot written to {args.file}")
            elif verb == "migrate":
                client.request("migrate", name=args.name, uri=args.uri)
                print(f"VM {args.name} migrated to {args.uri}")
            elif verb == "events":
                for event in client.request("events", name=args.name, limit=args.limit):
                    _print_event(event)
            else:
                state = client.request(verb, name=args.name)["state"]
                print(f"VM {args.name} {_DONE.get(verb, verb)} ({state})")
    except RemoteError as exc:
        print(f"trivmm: {exc}", file=sys.stderr)
        return exc.exit_status
    except HostError as exc:
        print(f"trivmm: {exc}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def _define_options(run_args: list[str], autostart: bool, state_dir: Path) -> tuple[list[str], bool, Path]:
    """define's own options (--autostart, --state-dir) where they came after NAME, among run's."""
    rest: list[str] = []
    words = iter(run_args)
    for word in words:
        if word in ("-h", "--help"):
            raise RemoteError("invalid", "after NAME, `vm define` takes run's options: `python -m trivmm run --help` "
                                         "lists them, `python -m trivmm vm define --help` define's own")
        if word == "--autostart":
            autostart = True
        elif word == "--state-dir":
            value = next(words, None)
            if value is None:
                raise RemoteError("invalid", "--state-dir needs a directory")
            state_dir = Path(value).absolute()
        elif word.startswith("--state-dir="):
            state_dir = Path(word.partition("=")[2]).absolute()
        else:
            rest.append(word)
    return rest, autostart, state_dir


_DONE = {"start": "started", "reset": "reset", "pause": "paused", "resume": "resumed"}


def _print_info(info: dict[str, Any]) -> None:
    rows = [("Name", info["name"]), ("State", info["state"]), ("vCPUs", str(info["vcpus"])),
            ("Memory", _size(info["memory"])),
            ("Display", "x".join(map(str, info["display"])) if info["display"] else "none"),
            ("Autostart", "yes" if info["autostart"] else "no"), ("Last exit", info["last_exit"] or "-"),
            ("Run options", " ".join(info["run_args"]) or "(none: the built-in guest)"),
            ("Console log", info["console_log"]), ("VNC socket", info["display_socket"] or "-")]  # fmt: skip
    for key, value in rows:
        print(f"{key + ':':<13}{value}")


def _print_event(event: dict[str, Any]) -> None:
    import time

    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(event["time"]))
    what = event["kind"] + (f" {event['state']}" if event["state"] else "")
    print(f"{when}  {event['vm'] or '-':<16} {what:<16} {event['detail']}")


@contextlib.contextmanager
def _raw_terminal(fd: int) -> Iterator[None]:
    """A raw terminal (Ctrl-C and friends go to the guest), restored on the way out."""
    if not os.isatty(fd):
        yield
        return
    saved = termios.tcgetattr(fd)
    tty.setraw(fd, termios.TCSANOW)
    try:
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view) :]
        except BlockingIOError:
            select.select([], [fd], [])


def _console(client: ControlClient, name: str, stdin: int = 0, stdout: int = 1) -> int:
    """Attach: raw bytes both ways until the VM stops, Ctrl-] or (stdin at its end) the VM stops."""
    client.request("console", name=name)
    print(f"Connected to VM {name} (escape character is ^])", file=sys.stderr, flush=True)
    sock = client.sock
    reading_stdin = True
    with _raw_terminal(stdin):
        while True:
            watched: list[int] = [sock.fileno(), stdin] if reading_stdin else [sock.fileno()]
            readable, _, _ = select.select(watched, [], [])
            if sock.fileno() in readable:
                data = sock.recv(65536)
                if not data:
                    print(f"\r\nVM {name} stopped", file=sys.stderr, flush=True)
                    return EXIT_OK
                _write_all(stdout, data)
            if reading_stdin and stdin in readable:
                typed = os.read(stdin, 4096)
                if not typed:
                    reading_stdin = False  # a pipe at its end: go on showing output
                    continue
                before, escape, _ = typed.partition(bytes([ESCAPE]))
                if before:
                    sock.sendall(before)
                if escape:
                    print(f"\r\nDetached from VM {name}", file=sys.stderr, flush=True)
                    return EXIT_OK
