"""``Vcpu``: one vCPU fd and its shared ``kvm_run`` page — registers, state, events.

KVM_RUN itself is issued by the run loop (``trivmm.vcpu``) through a fixed-prototype cffi
call on ``fd``; this class maps the page it reports exits in.
"""

from __future__ import annotations

import errno
import mmap
import struct
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from trivmm.kvm._ffi import ffi
from trivmm.kvm._ioctl import ULONG, FdObject, KvmError
from trivmm.kvm.constants import Cap
from trivmm.kvm.system import CpuidEntry

if TYPE_CHECKING:
    from trivmm.kvm.vm import Vm

__all__ = ["Vcpu", "Translation"]

# KVM_GET/SET_XSAVE use the standard (non-compacted) XSAVE layout.
_XSAVE_FSW, _XSAVE_MXCSR = 2, 24  # in the legacy (FXSAVE) region
_XSAVE_XSTATE_BV = 512  # the header's bitmap of components present
_XFEATURE_SSE = 1 << 1
_XSAVE_U16, _XSAVE_U32, _XSAVE_U64 = struct.Struct("<H"), struct.Struct("<I"), struct.Struct("<Q")
# struct kvm_cpuid2 (nent, padding) and its kvm_cpuid_entry2s (function, index, flags, eax,
# ebx, ecx, edx, padding[3]), packed as bytes KVM_SET_CPUID2 reads (and never writes).
_CPUID2_HEADER = struct.Struct("<II")
_CPUID_ENTRY2 = struct.Struct("<7I12x")
assert _CPUID_ENTRY2.size == ffi.sizeof("struct kvm_cpuid_entry2")
assert _CPUID2_HEADER.size == ffi.sizeof("struct kvm_cpuid2")
_PACKED_CPUID_LIMIT = 256
_packed_cpuid: dict[int, tuple[tuple[Any, ...], bytes]] = {}  # id(tuple) -> (the tuple, its bytes)


def _pack_cpuid(entries: Sequence[Any]) -> bytes:
    """``entries`` (``CpuidEntry``s) as a struct kvm_cpuid2. A tuple's bytes are kept by its
    identity (the cache holds the tuple, so the identity cannot be reused): the VM hands
    every vCPU with the same table the same tuple."""
    if isinstance(entries, tuple):
        hit = _packed_cpuid.get(id(entries))
        if hit is not None and hit[0] is entries:
            return hit[1]
    packed = _CPUID2_HEADER.pack(len(entries), 0) + b"".join(
        _CPUID_ENTRY2.pack(e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx) for e in entries)
    if isinstance(entries, tuple):
        if len(_packed_cpuid) >= _PACKED_CPUID_LIMIT:
            _packed_cpuid.clear()
        _packed_cpuid[id(entries)] = (entries, packed)
    return packed


class Translation:
    """KVM_TRANSLATE's answer for one guest-virtual address. On x86, ``writeable`` and
    ``usermode`` are constants, not the page's permissions (``trivmm.cpu.paging`` walks
    the tables where permissions matter)."""

    __slots__ = ("physical_address", "usermode", "valid", "writeable")

    def __init__(self, physical_address: int, valid: bool, writeable: bool, usermode: bool) -> None:
        self.physical_address = physical_address
        self.valid = valid
        self.writeable = writeable
        self.usermode = usermode


class Vcpu(FdObject):
    """A vCPU fd. ``run`` is the cffi view of the mmapped ``struct kvm_run``;
    ``run_page`` the same bytes as a writable ``mmap`` for zero-copy PIO data."""

    __slots__ = ("index", "run", "run_page", "vm")

    def __init__(self, vm: Vm, index: int, fd: int) -> None:
        super().__init__(fd)
        self.vm = vm
        self.index = index
        self.run_page = mmap.mmap(fd, vm.kvm.vcpu_mmap_size, mmap.MAP_SHARED,
                                  mmap.PROT_READ | mmap.PROT_WRITE)  # fmt: skip
        self.run: Any = ffi.cast("struct kvm_run *", ffi.from_buffer(self.run_page))

    def close(self) -> None:
        if not self.closed:
            self.run = None
            try:
                self.run_page.close()
            except BufferError:  # a view is still alive somewhere; the fd close still frees it
                pass
        super().close()

    # --- registers ----------------------------------------------------------------------
    def _get(self, request: str, ctype: str) -> Any:
        value = ffi.new(ctype)
        self.ioctl(request, value)
        return value

    def get_regs(self) -> Any:
        return self._get("KVM_GET_REGS", "struct kvm_regs *")

    def set_regs(self, regs: Any) -> None:
        self.ioctl("KVM_SET_REGS", regs)

    def get_sregs(self) -> Any:
        return self._get("KVM_GET_SREGS", "struct kvm_sregs *")

    def set_sregs(self, sregs: Any) -> None:
        self.ioctl("KVM_SET_SREGS", sregs)

    def get_fpu(self) -> Any:
        return self._get("KVM_GET_FPU", "struct kvm_fpu *")

    def set_fpu(self, fpu: Any) -> None:
        self.ioctl("KVM_SET_FPU", fpu)

    def get_lapic(self) -> Any:
        return self._get("KVM_GET_LAPIC", "struct kvm_lapic_state *")

    def set_lapic(self, lapic: Any) -> None:
        self.ioctl("KVM_SET_LAPIC", lapic)

    def get_mp_state(self) -> int:
        return int(self._get("KVM_GET_MP_STATE", "struct kvm_mp_state *").mp_state)

    def set_mp_state(self, state: int) -> None:
        self.ioctl("KVM_SET_MP_STATE", ffi.new("struct kvm_mp_state *", {"mp_state": state}))

    def get_vcpu_events(self) -> Any:
        return self._get("KVM_GET_VCPU_EVENTS", "struct kvm_vcpu_events *")

    def set_vcpu_events(self, events: Any) -> None:
        self.ioctl("KVM_SET_VCPU_EVENTS", events)

    def get_debugregs(self) -> Any:
        return self._get("KVM_GET_DEBUGREGS", "struct kvm_debugregs *")

    def set_debugregs(self, debugregs: Any) -> None:
        self.ioctl("KVM_SET_DEBUGREGS", debugregs)

    # --- exceptions for the guest -------------------------------------------------------
    def inject_exception(self, vector: int, error_code: int | None = None) -> None:
        """Have the guest take exception ``vector`` at its current RIP when it next runs,
        delivered through its IDT as an injected event (KVM_SET_VCPU_EVENTS). Set CR2 first
        for a #PF (``set_cr2``) and DR6 for a #DB (``set_dr6``): an injected event carries
        no payload. Refused while the vCPU is already delivering an event."""
        events = self.get_vcpu_events()
        if events.exception.injected or events.exception.pending or events.interrupt.injected or events.nmi.injected:
            raise KvmError("KVM_SET_VCPU_EVENTS", errno.EBUSY, f"vCPU {self.index} is already delivering an event")
        events.exception.injected = 1
        events.exception.pending = 0
        events.exception.nr = vector
        events.exception.has_error_code = int(error_code is not None)
        events.exception.error_code = error_code or 0
        events.exception_has_payload = 0
        self.set_vcpu_events(events)

    def set_cr2(self, address: int) -> None:
        """CR2, the page-fault address register (KVM_SET_SREGS)."""
        sregs = self.get_sregs()
        sregs.cr2 = address
        self.set_sregs(sregs)

    def set_dr6(self, value: int) -> None:
        """The guest's DR6, the debug status register (KVM_SET_DEBUGREGS)."""
        debugregs = self.get_debugregs()
        debugregs.dr6 = value
        self.set_debugregs(debugregs)

    def get_xsave(self) -> Any:
        return self._get("KVM_GET_XSAVE", "struct kvm_xsave *")

    def set_xsave(self, xsave: Any) -> None:
        self.ioctl("KVM_SET_XSAVE", xsave)

    def get_fsw(self) -> int:
        """FSW, the x87 status word, from KVM_GET_XSAVE (where MXCSR is read from too)."""
        xsave = self.get_xsave()
        return int(_XSAVE_U16.unpack_from(ffi.buffer(xsave.region), _XSAVE_FSW)[0])

    def get_mxcsr(self) -> int:
        """MXCSR, the SSE control/status register, from KVM_GET_XSAVE. (KVM_GET_FPU's copy
        is not reliable: on the nested host it always reads 0.)"""
        xsave = self.get_xsave()
        return int(_XSAVE_U32.unpack_from(ffi.buffer(xsave.region), _XSAVE_MXCSR)[0])

    def set_mxcsr(self, value: int) -> None:
        """Set MXCSR through KVM_SET_XSAVE, marking the SSE component present in XSTATE_BV:
        without that bit the host restores the component's initial state and drops the
        value (measured on the nested host, where KVM_SET_FPU's MXCSR is lost that way)."""
        xsave = self.get_xsave()
        region = ffi.buffer(xsave.region)
        _XSAVE_U32.pack_into(region, _XSAVE_MXCSR, value)
        (features,) = _XSAVE_U64.unpack_from(region, _XSAVE_XSTATE_BV)
        _XSAVE_U64.pack_into(region, _XSAVE_XSTATE_BV, features | _XFEATURE_SSE)
        self.set_xsave(xsave)

    def get_xcrs(self) -> Any:
        return self._get("KVM_GET_XCRS", "struct kvm_xcrs *")

    def set_xcrs(self, xcrs: Any) -> None:
        self.ioctl("KVM_SET_XCRS", xcrs)

    # --- MSRs and CPUID -----------------------------------------------------------------
    def get_msrs(self, indices: list[int]) -> dict[int, int]:
        """Read the MSRs in ``indices``; those KVM does not know are left out."""
        msrs = ffi.new("struct kvm_msrs *", {"nmsrs": len(indices), "entries": len(indices)})
        for i, index in enumerate(indices):
            msrs.entries[i].index = index
        count = self.ioctl("KVM_GET_MSRS", msrs)
        return {msrs.entries[i].index: msrs.entries[i].data for i in range(count)}

    def set_msrs(self, values: dict[int, int]) -> None:
        items = sorted(values.items())
        msrs = ffi.new("struct kvm_msrs *", {"nmsrs": len(items), "entries": len(items)})
        for i, (index, data) in enumerate(items):
            msrs.entries[i].index = index
            msrs.entries[i].data = data
        count = self.ioctl("KVM_SET_MSRS", msrs)
        if count != len(items):
            raise KvmError("KVM_SET_MSRS", 22, f"MSR {items[count][0]:#x} was refused")

    def get_listed_msrs(self, indices: Sequence[int]) -> dict[int, int]:
        """Read the MSRs in ``indices``, leaving out those KVM_GET_MSRS refuses (a host may
        list MSRs in KVM_GET_MSR_INDEX_LIST that it then refuses): a refused one is dropped
        and the rest read again, so this costs one ioctl plus one per refusal."""
        pending = list(indices)
        values: dict[int, int] = {}
        while pending:
            msrs = ffi.new("struct kvm_msrs *", {"nmsrs": len(pending), "entries": len(pending)})
            for i, index in enumerate(pending):
                msrs.entries[i].index = index
            count = self.ioctl("KVM_GET_MSRS", msrs)
            values.update((msrs.entries[i].index, msrs.entries[i].data) for i in range(count))
            pending = pending[count + 1 :]  # entry ``count`` is the one KVM refused
        return values

    def set_cpuid(self, entries: Sequence[Any]) -> None:
        """KVM_SET_CPUID2 from ``CpuidEntry`` values."""
        self.ioctl("KVM_SET_CPUID2", ffi.from_buffer("struct kvm_cpuid2 *", _pack_cpuid(entries)))

    def get_cpuid(self) -> list[CpuidEntry]:
        """KVM_GET_CPUID2: the CPUID table this vCPU was given."""
        nent = 128
        while True:
            buf = ffi.new("struct kvm_cpuid2 *", {"nent": nent, "entries": nent})
            try:
                self.ioctl("KVM_GET_CPUID2", buf)
            except KvmError as exc:
                if exc.errno == errno.E2BIG and nent < 4096:
                    nent *= 2
                    continue
                raise
            return [CpuidEntry(e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx)
                    for e in buf.entries[0 : buf.nent]]  # fmt: skip

    # --- TSC frequency --------------------------------------------------------------------
    def get_tsc_khz(self) -> int:
        """KVM_GET_TSC_KHZ: the guest's TSC frequency (needs KVM_CAP_GET_TSC_KHZ)."""
        self.vm.kvm.require(Cap.GET_TSC_KHZ)
        return self.ioctl("KVM_GET_TSC_KHZ")

    def set_tsc_khz(self, khz: int) -> None:
        """KVM_SET_TSC_KHZ: scale the guest's TSC to ``khz`` (needs KVM_CAP_TSC_CONTROL)."""
        self.vm.kvm.require(Cap.TSC_CONTROL)
        self.ioctl("KVM_SET_TSC_KHZ", ULONG(khz))

    # --- debugging and address translation ---------------------------------------------
    def set_guest_debug(self, control: int, debugreg: list[int] | None = None) -> None:
        self.vm.kvm.require(Cap.SET_GUEST_DEBUG)
        dbg = ffi.new("struct kvm_guest_debug *", {"control": control})
        for i, value in enumerate(debugreg or ()):
            dbg.arch.debugreg[i] = value
        self.ioctl("KVM_SET_GUEST_DEBUG", dbg)

    def translate(self, linear_address: int) -> Translation:
        """KVM_TRANSLATE. On x86 KVM reports ``writeable`` and ``usermode`` as constants, not
        the page's permissions: code that must honour them walks the page tables itself
        (``trivmm.cpu.paging``)."""
        tr = ffi.new("struct kvm_translation *", {"linear_address": linear_address})
        self.ioctl("KVM_TRANSLATE", tr)
        return Translation(tr.physical_address, bool(tr.valid), bool(tr.writeable), bool(tr.usermode))
