"""``Kvm``: the system file descriptor (``/dev/kvm``), root of the fd hierarchy."""

from __future__ import annotations

import errno
import os
from typing import TYPE_CHECKING

import attrs

from trivmm.kvm._ffi import ffi
from trivmm.kvm._ioctl import ULONG, FdObject, KvmError, KvmUnavailable, MissingCapability
from trivmm.kvm.constants import Cap

if TYPE_CHECKING:
    from trivmm.kvm.vm import Vm

__all__ = ["Kvm", "CpuidEntry", "DEFAULT_DEVICE"]

DEFAULT_DEVICE = "/dev/kvm"
_API_VERSION = 12


@attrs.frozen
class CpuidEntry:
    """One CPUID leaf (``function``) and sub-leaf (``index``) with its four registers."""

    function: int
    index: int
    flags: int
    eax: int
    ebx: int
    ecx: int
    edx: int


class Kvm(FdObject):
    """The host's KVM: capabilities, supported CPUID and MSRs, and VM creation."""

    __slots__ = ("path",)

    def __init__(self, path: str = DEFAULT_DEVICE) -> None:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise KvmUnavailable("open", exc.errno or errno.ENODEV, path) from None
        super().__init__(fd)
        self.path = path
        version = self.ioctl("KVM_GET_API_VERSION")
        if version != _API_VERSION:
            self.close()
            raise KvmUnavailable("KVM_GET_API_VERSION", errno.EPROTO,
                                 f"{path} speaks API {version}, trivmm needs {_API_VERSION}")  # fmt: skip

    def check_extension(self, cap: Cap) -> int:
        return self.ioctl("KVM_CHECK_EXTENSION", ULONG(int(cap)))

    def require(self, *caps: Cap) -> None:
        """Raise ``MissingCapability`` naming the first of ``caps`` the host lacks."""
        for cap in caps:
            if self.check_extension(cap) <= 0:
                raise MissingCapability(cap)

    @property
    def vcpu_mmap_size(self) -> int:
        return self.ioctl("KVM_GET_VCPU_MMAP_SIZE")

    @property
    def max_vcpus(self) -> int:
        return self.check_extension(Cap.MAX_VCPUS) or self.check_extension(Cap.NR_VCPUS) or 4

    def supported_cpuid(self) -> list[CpuidEntry]:
        """KVM_GET_SUPPORTED_CPUID: what this host's KVM can present to a guest."""
        return self._cpuid("KVM_GET_SUPPORTED_CPUID")

    def _cpuid(self, request: str) -> list[CpuidEntry]:
        nent = 128
        while True:
            buf = ffi.new("struct kvm_cpuid2 *", {"nent": nent, "entries": nent})
            try:
                self.ioctl(request, buf)
            except KvmError as exc:
                if exc.errno == errno.E2BIG and nent < 4096:
                    nent *= 2
                    continue
                raise
            return [CpuidEntry(e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx)
                    for e in buf.entries[0:buf.nent]]  # fmt: skip

    def msr_index_list(self) -> list[int]:
        """KVM_GET_MSR_INDEX_LIST: the MSRs a VMM saves and restores for a vCPU."""
        nmsrs = 256
        while True:
            buf = ffi.new("struct kvm_msr_list *", {"nmsrs": nmsrs, "indices": nmsrs})
            try:
                self.ioctl("KVM_GET_MSR_INDEX_LIST", buf)
            except KvmError as exc:
                if exc.errno == errno.E2BIG and nmsrs < 8192:
                    nmsrs = max(buf.nmsrs, nmsrs * 2)
                    continue
                raise
            return list(buf.indices[0:buf.nmsrs])

    def create_vm(self) -> Vm:
        from trivmm.kvm.vm import Vm

        self.require(Cap.USER_MEMORY, Cap.IRQCHIP, Cap.IMMEDIATE_EXIT)
        return Vm(self, self.ioctl("KVM_CREATE_VM", ULONG(0)))
