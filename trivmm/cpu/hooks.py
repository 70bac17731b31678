"""Where a CPU template's host-quirk handling plugs into the generic run loop.

The run loop (``trivmm/vcpu.py``) knows only ``VcpuHooks``: one call for each exit a host
KVM may leave to the VMM because it could not finish the guest's work itself (an emulation
failure, a debug exit), and a refresh for hooks that follow guest state. A CPU template
names the quirks its host needs (``CpuTemplate.quirks``) and ``trivmm.cpu.quirks.vcpu_hooks``
builds them. This base class handles nothing, which is what the ``host`` template gets: on
stock KVM an emulation failure stops the VM with an ``UnhandledInstruction`` naming RIP and
the instruction's bytes.
"""

from __future__ import annotations

from typing import Any

from trivmm.kvm.constants import EMULATION_FLAG_INSTRUCTION_BYTES
from trivmm.kvm.vcpu import Vcpu
from trivmm.memory import GuestMemory, GuestMemoryError

__all__ = ["VcpuHooks", "UnhandledInstruction", "describe_instruction", "failed_instruction"]


class VcpuHooks:
    """One vCPU's host-quirk hooks; this base handles nothing and needs no refresh.

    Every method runs on the vCPU's thread, between two KVM_RUNs.
    """

    wants_refresh = False  # whether the VM should call ``refresh`` (through the loop) periodically

    @property
    def settled(self) -> bool:
        """False while ``refresh`` should also run at exits (the run loop rate-limits it)."""
        return True

    def refresh(self) -> None:
        """Look again at the guest state the hooks follow."""

    def on_emulation_failure(self, run: Any) -> bool:
        """Finish the instruction KVM could not emulate: True if done, False if not handled.
        May raise ``UnhandledInstruction`` to say why not."""
        return False

    def on_debug_exit(self, run: Any) -> bool:
        """Handle KVM_EXIT_DEBUG; False if these hooks did not ask for it."""
        return False

    def counts(self) -> dict[str, int]:
        """What the hooks did so far, by name (for tests and diagnostics)."""
        return {}


# Names for the bytes the nested host is known to choke on, for error messages.
_KNOWN_NAMES: dict[bytes, str] = {
    b"\xf0\x48\x0f\xc7": "lock cmpxchg16b",
    b"\x48\x0f\xc7": "cmpxchg16b",
    b"\x48\x0f\xae": "xsave/xrstor family",
    b"\x0f\xae": "ldmxcsr/stmxcsr/fxsave family (0f ae)",
    b"\xf3\x0f\xb8": "popcnt",
    b"\xf3\x48\x0f\xb8": "popcnt",
    b"\x0f\x01\xca": "clac",
    b"\x0f\x01\xcb": "stac",
    b"\x66\x0f\x6e": "movd (SSE2)",
    b"\x66\x44\x0f\x6e": "movd (SSE2)",
    b"\x66\x45\x0f\x6e": "movd (SSE2)",
    b"\x0f\x01\xd9": "vmmcall",
    b"\x0f\x01\xc1": "vmcall",
    b"\xcc": "int3",
    b"\xcf": "iret",
    b"\x48\xcf": "iretq",
    b"\x9b": "fwait",
}


def describe_instruction(code: bytes) -> str:
    """A name for ``code`` from the table of instructions hosts are known to refuse."""
    for prefix in sorted(_KNOWN_NAMES, key=len, reverse=True):
        if code.startswith(prefix):
            return _KNOWN_NAMES[prefix]
    return "unknown instruction"


class UnhandledInstruction(Exception):
    """The host could not run an instruction and neither could the VMM."""

    def __init__(self, vcpu: int, rip: int, code: bytes, why: str) -> None:
        super().__init__(
            f"host KVM could not emulate the instruction at RIP {rip:#x} "
            f"(bytes {code.hex(' ') or 'unavailable'}: {describe_instruction(code)}); {why}"
        )
        self.vcpu = vcpu
        self.rip = rip
        self.code = code


def failed_instruction(vcpu: Vcpu, memory: GuestMemory, run: Any) -> tuple[int, bytes]:
    """RIP and up to 15 bytes of the instruction an emulation failure stopped at: from the
    exit when it carries them, else fetched at CS:RIP as the vCPU would, as far as it can."""
    # Imported here: this runs only when a VM is about to stop, and a VM whose template has
    # no quirks (stock KVM) need not pay for the decoder and the page walker at start-up.
    from trivmm.cpu.decode import MAX_INSTRUCTION_LENGTH, CpuMode, cpu_mode
    from trivmm.cpu.paging import PAGE_SIZE, Access, AccessKind, GuestFault, GuestView, Paging

    rip = int(vcpu.get_regs().rip)
    failure = run.emulation_failure
    if failure.ndata >= 1 and failure.flags & EMULATION_FLAG_INSTRUCTION_BYTES and failure.insn_size:
        return rip, bytes(failure.insn_bytes[0 : min(failure.insn_size, MAX_INSTRUCTION_LENGTH)])
    sregs = vcpu.get_sregs()
    paging = Paging.of(sregs)
    address = rip if cpu_mode(sregs) is CpuMode.BITS64 else (sregs.cs.base + rip) & 0xFFFF_FFFF
    fetch = Access(AccessKind.FETCH, user=sregs.cs.selector & 3 == 3)
    view = GuestView(vcpu, memory)
    code = b""
    while len(code) < MAX_INSTRUCTION_LENGTH:
        chunk = min(MAX_INSTRUCTION_LENGTH - len(code), PAGE_SIZE - ((address + len(code)) & (PAGE_SIZE - 1)))
        try:
            code += view.read(address + len(code), chunk, fetch, paging, mark=False)
        except (GuestFault, GuestMemoryError):
            break
    return rip, code
