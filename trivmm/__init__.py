"""trivmm: a virtual machine monitor for Linux KVM, on trio.

    import trio, trivmm

    async def main():
        with trivmm.VM(trivmm.VmConfig(kernel="vmlinux", initrd="initrd.cpio", vcpus=2),
                       console_output=print_bytes) as vm:
            print(await vm.run())

The public API is re-exported here; submodules are implementation.
"""

from trivmm._threads import ensure_kick_handler as install_signal_handler
from trivmm.boot.bzimage import KernelImageError
from trivmm.config import VmConfig, parse_size
from trivmm.errors import ConfigError, TrivmmError, VcpuError, VmError
from trivmm.vcpu import StopReason
from trivmm.vm import VM, VmExit

__all__ = ["VM", "VmConfig", "VmExit", "StopReason", "TrivmmError", "ConfigError", "VmError",
           "VcpuError", "KernelImageError", "parse_size", "install_signal_handler"]  # fmt: skip
