"""The no-exit paths between a guest and a device backend, under trio and asyncio: a guest's
writes to an ioeventfd'd port reach a backend task awaiting its ``EventFd`` through the loop's
epoll without exiting to the VMM, and a backend's signal on an irqfd raises the interrupt in
KVM's in-kernel irqchip without a VMM ioctl."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest

from tests.kvm.guests import assemble
from trivmm import VM, StopReason, VmConfig
from trivmm.eventfd import EventFd

pytestmark = [pytest.mark.kvm, pytest.mark.usefixtures("binutils"),
              pytest.mark.parametrize("backend", ["trio", "asyncio"])]  # fmt: skip
NOTIFY_PORT = 0x12  # the exits guest writes `out %al, $0x12` `count` times
PIC_MASTER = 0


def test_guest_notifications_reach_a_backend_task_without_exits(backend: str, tmp_path: Path) -> None:
    writes = 2000
    elf = assemble("exits", tmp_path, symbols={"count": writes})

    async def main() -> None:
        notified = 0
        wakeups = 0
        with EventFd() as notify, VM(VmConfig(kernel=elf, memory="16M")) as vm:
            assert vm.vm is not None
            vm.vm.ioeventfd(notify.fd, NOTIFY_PORT, 1, pio=True)

            async def backend_task() -> None:
                nonlocal notified, wakeups
                while True:
                    notified += await notify.wait()
                    wakeups += 1

            vm.add_service(backend_task)
            with anyio.fail_after(60):
                result = await vm.run()
            notified += notify.take()  # the last writes, signalled as the guest powered off
        assert result.reason is StopReason.POWER_OFF
        assert notified == writes
        assert 1 <= wakeups <= writes
        assert result.exits < 20  # the power-off write, not one exit per notification

    anyio.run(main, backend=backend)


def test_a_backend_raises_an_interrupt_through_an_irqfd(backend: str) -> None:
    gsi = 5  # a PIC input no device of ours uses

    async def main() -> None:
        with EventFd() as interrupt, VM(VmConfig(memory="16M")) as vm:
            kvm_vm = vm.vm
            assert kvm_vm is not None
            kvm_vm.irqfd(interrupt.fd, gsi)
            assert not kvm_vm.get_irqchip(PIC_MASTER).chip.pic.irr & (1 << gsi)
            interrupt.signal()
            with anyio.fail_after(5):
                while not kvm_vm.get_irqchip(PIC_MASTER).chip.pic.irr & (1 << gsi):
                    await anyio.sleep(0.001)  # irqfd injection runs in a kernel work item
            kvm_vm.irqfd(interrupt.fd, gsi, deassign=True)

    anyio.run(main, backend=backend)


def test_closing_an_eventfd_wakes_its_waiter(backend: str) -> None:
    async def main() -> None:
        fd = EventFd()
        with anyio.fail_after(5):
            async with anyio.create_task_group() as tg:

                async def waiter() -> None:
                    with pytest.raises(anyio.ClosedResourceError):
                        await fd.wait()

                tg.start_soon(waiter)
                await anyio.sleep(0.01)
                fd.close()
        assert fd.closed

    anyio.run(main, backend=backend)
