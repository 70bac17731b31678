"""The ACPI power button on a running VM: ``VM.powerdown()`` and QMP's ``system_powerdown``
press it; a tiny guest that enabled PWRBTN_EN sees PWRBTN_STS, clears it and powers off, as
an ACPI guest does (guests/power_button.S). A VM that has ended has no button to press."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest

from tests.kvm.guests import assemble
from tests.kvm.test_qmp import BACKENDS, serve_beside
from tests.kvm.test_tiny_guests import Log
from tests.unit.test_qmp_protocol import RawClient
from trivmm import VM, StopReason, VmConfig, VmError

pytestmark = [pytest.mark.kvm, pytest.mark.usefixtures("binutils")]
READY, PRESSED_STATUS, CLEARED_STATUS = 1, 0x0100, 0  # what the guest logs (SCI_EN is in PM1 control)


@contextlib.asynccontextmanager
async def _vm_with_log(elf: Path, log: Log) -> AsyncIterator[VM]:
    """A running VM of ``elf`` whose log port was there before its first instruction."""
    with VM(VmConfig(kernel=elf, memory="16M")) as vm:
        vm.pio.insert(0x510, 4, log)
        async with anyio.create_task_group() as tg:
            await tg.start(vm.run)
            try:
                yield vm
            finally:
                await vm.stop()  # a no-op once the guest has powered off


async def _until_ready(log: Log, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while READY not in log.values:
        assert time.monotonic() < deadline, "the guest never enabled its power button"
        await anyio.sleep(0.01)


@BACKENDS
def test_vm_powerdown_presses_the_button_the_guest_waits_for(backend: str, tmp_path: Path) -> None:
    elf = assemble("power_button", tmp_path)

    async def main() -> None:
        with anyio.fail_after(60):
            log = Log()
            async with _vm_with_log(elf, log) as vm:
                await _until_ready(log)
                await anyio.sleep(0.05)
                assert log.values == [READY], "the guest went on before the button was pressed"
                vm.powerdown()
                result = await vm.wait()
                with pytest.raises(VmError, match="already stopped"):
                    vm.powerdown()
        assert result.reason is StopReason.POWER_OFF
        assert log.values == [READY, PRESSED_STATUS, CLEARED_STATUS]

    anyio.run(main, backend=backend)


def test_qmp_system_powerdown_sends_powerdown_then_the_guests_shutdown(tmp_path: Path) -> None:
    elf = assemble("power_button", tmp_path)
    path = tmp_path / "qmp.sock"

    async def main() -> None:
        with anyio.fail_after(60):
            log = Log()
            async with _vm_with_log(elf, log) as vm:

                async def press() -> None:
                    client = await RawClient.connect(path)
                    await _until_ready(log)
                    assert await client.execute("system_powerdown", id=7) == {"return": {}, "id": 7}
                    assert (await client.event("POWERDOWN"))["event"] == "POWERDOWN"
                    shutdown = await client.event("SHUTDOWN")
                    assert shutdown["data"] == {"guest": True, "reason": "guest-shutdown"}
                    assert await client.closed()

                await serve_beside(vm, path, press)
                assert (await vm.wait()).reason is StopReason.POWER_OFF
        assert log.values == [READY, PRESSED_STATUS, CLEARED_STATUS]

    anyio.run(main)
