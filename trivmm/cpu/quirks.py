"""The registry of host-quirk hooks: which ``Quirk`` builds what, for one vCPU.

``vcpu_hooks`` is what the VM calls for each vCPU; the template's ``quirks`` choose the
parts. A template with none gets the base ``VcpuHooks``, which handles nothing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from trivmm.cpu.hooks import VcpuHooks
from trivmm.cpu.templates import CpuTemplate, Quirk
from trivmm.kvm.vcpu import Vcpu
from trivmm.memory import GuestMemory

if TYPE_CHECKING:
    from trivmm.cpu.fallback import EmulationFallback, SyscallCompleter

__all__ = ["QuirkHooks", "vcpu_hooks"]


class QuirkHooks(VcpuHooks):
    """The emulation fallback and SYSCALL completion of one vCPU, each present if asked for."""

    def __init__(self, fallback: EmulationFallback | None, syscalls: SyscallCompleter | None) -> None:
        self.fallback = fallback
        self.syscalls = syscalls
        self.wants_refresh = syscalls is not None

    @property
    def settled(self) -> bool:
        return self.syscalls is None or self.syscalls.armed_at is not None

    def refresh(self) -> None:
        if self.syscalls is not None:
            self.syscalls.refresh()

    def on_emulation_failure(self, run: Any) -> bool:
        if self.fallback is None:
            return False
        self.fallback.handle(run)
        return True

    def on_debug_exit(self, run: Any) -> bool:
        return self.syscalls is not None and self.syscalls.on_debug_exit(run)

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        if self.fallback is not None:
            out.update(self.fallback.handled)
            out.update(self.fallback.faults)
        if self.syscalls is not None:
            completer = self.syscalls
            out.update({"syscalls completed": completer.completed, "page faults passed": completer.passed_faults,
                        "syscalls refused": sum(completer.refused.values()),
                        "debug exceptions reflected": completer.reflected})  # fmt: skip
        return out


def vcpu_hooks(template: CpuTemplate, vcpu: Vcpu, memory: GuestMemory) -> VcpuHooks:
    """The hooks ``template`` asks for, built for ``vcpu``."""
    if not template.quirks:
        return VcpuHooks()
    # The fallback (decoder, page walker) is imported only for templates that use it.
    from trivmm.cpu.fallback import EmulationFallback, SyscallCompleter
    from trivmm.cpu.paging import GuestView

    view = GuestView(vcpu, memory)
    fallback = EmulationFallback(view) if Quirk.EMULATION_FALLBACK in template.quirks else None
    syscalls = SyscallCompleter(view) if Quirk.SYSCALL_COMPLETION in template.quirks else None
    return QuirkHooks(fallback, syscalls)
