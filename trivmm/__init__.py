"""trivmm: a virtual machine monitor for Linux KVM, for async Python under trio or asyncio.

    import anyio, trivmm

    async def main():
        async with trivmm.open_vm(trivmm.VmConfig(kernel="vmlinux", initrd="initrd.cpio")) as vm:
            async for chunk in vm.console:      # the guest's serial output
                print(chunk.decode(errors="replace"), end="")
            print(await vm.wait())

    anyio.run(main)                             # or trio.run(main), or asyncio.run(main())

The public API is re-exported here; submodules are implementation. Errors: everything
trivmm raises on purpose is a ``TrivmmError`` -- ``ConfigError`` (bad input, including
``KernelImageError``), ``VmError`` (the VM failed; ``VcpuError`` names the vCPU) and
``KvmError`` (the host's KVM refused, an ``OSError`` with its errno; ``KvmUnavailable``
when /dev/kvm cannot be used) and ``MigrationError`` (a snapshot that cannot be written,
read or applied).
"""

from trivmm._threads import ensure_kick_handler as install_signal_handler
from trivmm.boot.bzimage import KernelImageError
from trivmm.config import DiskConfig, NetConfig, VmConfig, VsockConfig, parse_size
from trivmm.console import ConsoleStream
from trivmm.errors import ConfigError, MigrationError, TrivmmError, VcpuError, VmError
from trivmm.kvm import KvmError, KvmUnavailable
from trivmm.vcpu import StopReason
from trivmm.vm import VM, VmExit, open_vm

__all__ = ["VM", "open_vm", "VmConfig", "DiskConfig", "NetConfig", "VmExit", "StopReason", "ConsoleStream",
           "TrivmmError", "ConfigError", "VmError", "VcpuError", "KernelImageError", "KvmError", "KvmUnavailable",
           "parse_size", "install_signal_handler", "VsockConfig", "MigrationError"]  # fmt: skip
