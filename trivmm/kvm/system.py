"""``Kvm``: the system file descriptor (``/dev/kvm``), root of the fd hierarchy."""

from __future__ import annotations

import errno
import os
import stat
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

import attrs

from trivmm.kvm._ffi import ffi
from trivmm.kvm._ioctl import ULONG, FdObject, KvmError, KvmUnavailable, MissingCapability
from trivmm.kvm.constants import Cap

if TYPE_CHECKING:
    from trivmm.kvm.vm import Vm

__all__ = ["Kvm", "CpuidEntry", "DEFAULT_DEVICE"]

DEFAULT_DEVICE = "/dev/kvm"
_API_VERSION = 12
# What the host's KVM answers on its system fd -- its API version, capabilities, vCPU
# mmap size, supported CPUID -- is fixed by the loaded module and the CPU: it is asked
# once per process and device (its device number), not once per VM. Values are immutable
# (ints, tuples of frozen CpuidEntry).
_host_answers: dict[tuple[int, object], object] = {}
_verified_devices: set[int] = set()  # devices that answered KVM_GET_API_VERSION with 12
_shared: dict[str, Kvm] = {}  # Kvm.shared(): one system fd per device path per process
_shared_lock = threading.Lock()
T = TypeVar("T")


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

    __slots__ = ("_device", "path")

    def __init__(self, path: str = DEFAULT_DEVICE) -> None:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise KvmUnavailable("open", exc.errno or errno.ENODEV, path) from None
        super().__init__(fd)
        self.path = path
        try:
            st = os.fstat(fd)
        except OSError as exc:  # pragma: no cover - fstat of an fd just opened
            self.close()
            raise KvmUnavailable("fstat", exc.errno or errno.EBADF, path) from None
        # The device number keys what this process learns about the host's KVM; anything
        # that is not a character device is asked every time.
        self._device: int | None = st.st_rdev if stat.S_ISCHR(st.st_mode) else None
        if self._device is None or self._device not in _verified_devices:
            version = self.ioctl("KVM_GET_API_VERSION")
            if version != _API_VERSION:
                self.close()
                raise KvmUnavailable("KVM_GET_API_VERSION", errno.EPROTO,
                                     f"{path} speaks API {version}, trivmm needs {_API_VERSION}")  # fmt: skip
            if self._device is not None:
                _verified_devices.add(self._device)

    @classmethod
    def shared(cls, path: str = DEFAULT_DEVICE) -> Kvm:
        """The process's system fd for ``path``, opened on first use and kept: every VM
        is created from it (one fd, one open per process rather than per VM). Whoever
        gets it must not close it."""
        with _shared_lock:
            kvm = _shared.get(path)
            if kvm is None or kvm.closed:
                kvm = _shared[path] = cls(path)
            return kvm

    def _host_answer(self, what: object, ask: Callable[[], T]) -> T:
        """``ask()``, or what it answered before for this device in this process."""
        if self._device is None:
            return ask()
        key = (self._device, what)
        try:
            return _host_answers[key]  # type: ignore[return-value]
        except KeyError:
            answer = _host_answers[key] = ask()
            return answer

    def check_extension(self, cap: Cap) -> int:
        return self._host_answer(cap, lambda: self.ioctl("KVM_CHECK_EXTENSION", ULONG(int(cap))))

    def require(self, *caps: Cap) -> None:
        """Raise ``MissingCapability`` naming the first of ``caps`` the host lacks."""
        for cap in caps:
            if self.check_extension(cap) <= 0:
                raise MissingCapability(cap)

    @property
    def vcpu_mmap_size(self) -> int:
        return self._host_answer("vcpu-mmap-size", lambda: self.ioctl("KVM_GET_VCPU_MMAP_SIZE"))

    @property
    def max_vcpus(self) -> int:
        return self.check_extension(Cap.MAX_VCPUS) or self.check_extension(Cap.NR_VCPUS) or 4

    def supported_cpuid(self) -> tuple[CpuidEntry, ...]:
        """KVM_GET_SUPPORTED_CPUID: what this host's KVM can present to a guest (asked once
        per process: the same tuple for every VM)."""
        return self._host_answer("supported-cpuid", lambda: tuple(self._cpuid("KVM_GET_SUPPORTED_CPUID")))

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
