"""The Python exit floor: ``python -m bench.pyfloor GUEST MARKS PER_MARK``.

The cheapest exit loop CPython can run: per exit, one KVM_RUN through cffi's
fixed-prototype ``ioctl`` (``trivmm.kvm._ffi.ioctl_fixed``, as trivmm's own loop calls it)
and one ``struct.unpack_from`` of the run page (the fields trivmm's loop unpacks to
dispatch a port access), with a check that the exit was port I/O; nothing else. The VM
around it is built as ``trivmm.VM`` builds one (``Kvm -> Vm -> Vcpu``, in-kernel irqchip
and PIT, the CPU template's CPUID, the guest placed by trivmm's loader, 128 MiB as the CLI's
default) but without devices, bus, threads or trio: what trivmm spends beyond this loop is
its own exit path.

The guest is bench/guests/exit_marks.S: MARKS batches of (PER_MARK - 1) ``out`` exits and
one serial-port exit, then a power-off write. Like trivmm, which writes the guest's serial
byte to stdout, this loop writes one byte to stdout per batch, so ``python -m bench`` times
both from outside in the same way. A KVM_RUN interrupted by a signal (the benchmark stops
and continues the process) is entered again.
"""

from __future__ import annotations

import errno
import os
import struct
import sys
from pathlib import Path

from trivmm.boot.layout import ram_ranges
from trivmm.boot.loader import load_kernel
from trivmm.config import parse_size
from trivmm.cpu.setup import configure_vcpu, set_entry_state, vcpu_cpuid
from trivmm.cpu.templates import get_template
from trivmm.devices.acpi_pm import ACPI_PM_PORT, PM1_CONTROL_OFFSET
from trivmm.kvm import ExitReason, Kvm
from trivmm.kvm._ffi import IOCTLS, ffi, ioctl_fixed
from trivmm.kvm.vcpu import Vcpu
from trivmm.memory import GuestMemory

KVM_RUN = IOCTLS["KVM_RUN"]
EXIT_IO = int(ExitReason.IO)
# struct kvm_run from offset 8: exit_reason, then the io exit's direction, size, port,
# count and data_offset -- what trivmm's loop unpacks per exit (trivmm/vcpu.py).
RUN_EXIT_IO = struct.Struct("<I20xBBHIQ")
MARK = b"."


def exit_loop(vcpu: Vcpu, exits: int) -> None:
    """Answer ``exits`` PIO exits with the next KVM_RUN and nothing else."""
    fd, page, ioctl, null, unpack = vcpu.fd, vcpu.run_page, ioctl_fixed, ffi.NULL, RUN_EXIT_IO.unpack_from
    for _ in range(exits):
        while ioctl(fd, KVM_RUN, null) < 0:
            if ffi.errno != errno.EINTR:
                raise OSError(ffi.errno, "KVM_RUN failed")
        if unpack(page, 8)[0] != EXIT_IO:
            raise RuntimeError(f"not a PIO exit: {vcpu.run.exit_reason}")


def run_guest(guest: Path, marks: int, per_mark: int) -> None:
    """Build the VM, run ``marks`` batches of ``per_mark`` exits (a byte on stdout after
    each), and check that the guest's next exit is its power-off write."""
    memory = GuestMemory.from_ranges(ram_ranges(parse_size("128M")))
    try:
        with Kvm() as kvm, kvm.create_vm() as vm:
            for slot, region in enumerate(memory):
                vm.set_user_memory_region(slot, region.guest_base, region.size, region.host_address)
            vm.setup_x86_platform()
            entry = load_kernel(memory, guest.read_bytes())
            with vm.create_vcpu(0) as vcpu:
                configure_vcpu(vcpu, vcpu_cpuid(kvm.supported_cpuid(), get_template("auto"), 0, 1))
                set_entry_state(vcpu, entry)
                for _ in range(marks):
                    exit_loop(vcpu, per_mark)
                    os.write(1, MARK)
                exit_loop(vcpu, 1)
                _, _, _, port, _, _ = RUN_EXIT_IO.unpack_from(vcpu.run_page, 8)
                if port != ACPI_PM_PORT + PM1_CONTROL_OFFSET:
                    raise SystemExit(f"pyfloor: expected the guest's power-off write, got port {port:#x}")
    finally:
        memory.close()

if __name__ == "__main__":
    run_guest(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))
