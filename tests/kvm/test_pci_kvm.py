"""KVM's GSI routing as the PCI platform uses it: a table with MSI routes keeps the legacy
PIC and IOAPIC routes working, an MSI-X vector raised through its irqfd reaches the LAPIC,
and KVM_SET_GSI_ROUTING really replaces the whole table (why ``GsiRouter`` re-emits KVM's
defaults every time)."""

from __future__ import annotations

import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.kvm.guests import GUESTS
from trivmm import VM, StopReason, VmConfig
from trivmm.boot.layout import pci_layout
from trivmm.devices.pci import MSIX_ENABLE, BarKind, GsiRouter, MsixCapability, PciFunction, PciRoot, default_routes
from trivmm.kvm import KvmError
from trivmm.kvm._ffi import ffi
from trivmm.kvm.vm import IRQCHIP_IOAPIC, IRQCHIP_PIC_MASTER, IRQCHIP_PIC_SLAVE, IrqchipRoute, MsiRoute, Vm

pytestmark = pytest.mark.kvm

_APIC_SPIV = 0xF0
_APIC_IRR = 0x200
_SPIV_ENABLE = 0x100
MSI_ADDRESS = 0xFEE0_0000  # fixed delivery, physical destination: APIC ID 0 (vCPU 0)


@pytest.fixture
def vm() -> Iterator[VM]:
    with VM(VmConfig(memory="16M")) as machine:
        yield machine


def _kvm(vm: VM) -> Vm:
    assert vm.vm is not None
    return vm.vm


def _pic_irr(kvm: Vm, chip: int) -> int:
    return int(kvm.get_irqchip(chip).chip.pic.irr)


def _ioapic_irr(kvm: Vm) -> int:
    return int(kvm.get_irqchip(IRQCHIP_IOAPIC).chip.ioapic.irr)


def _lapic_irr(vm: VM, vector: int) -> bool:
    regs = ffi.buffer(vm.vcpus[0].get_lapic().regs)
    (word,) = struct.unpack_from("<I", regs, _APIC_IRR + 0x10 * (vector // 32))
    return bool(word >> (vector % 32) & 1)


def _enable_lapic(vm: VM) -> None:
    vcpu = vm.vcpus[0]
    lapic = vcpu.get_lapic()
    regs = ffi.buffer(lapic.regs)
    (spiv,) = struct.unpack_from("<I", regs, _APIC_SPIV)
    struct.pack_into("<I", regs, _APIC_SPIV, spiv | _SPIV_ENABLE | 0xFF)
    vcpu.set_lapic(lapic)


def test_legacy_lines_still_work_with_msi_routes_installed(vm: VM) -> None:
    kvm = _kvm(vm)
    router = GsiRouter(kvm)
    gsis = [router.allocate() for _ in range(3)]
    router.set_msi_routes({gsi: (MSI_ADDRESS, 0x40 + i) for i, gsi in enumerate(gsis)})
    assert router.pushes == 1 and len(router.table()) == len(default_routes()) + 3
    # ISA IRQ 5 (PIC master), IRQ 10 (PIC slave pin 2) and IOAPIC-only GSI 17
    assert not _pic_irr(kvm, IRQCHIP_PIC_MASTER) & (1 << 5)
    kvm.irq_line(5, True)
    assert _pic_irr(kvm, IRQCHIP_PIC_MASTER) & (1 << 5)
    assert _ioapic_irr(kvm) & (1 << 5)
    kvm.irq_line(10, True)
    assert _pic_irr(kvm, IRQCHIP_PIC_SLAVE) & (1 << 2)
    kvm.irq_line(17, True)
    assert _ioapic_irr(kvm) & (1 << 17)
    kvm.irq_line(17, False)
    assert not _ioapic_irr(kvm) & (1 << 17)
    kvm.irq_line(5, False)
    kvm.irq_line(10, False)


def test_an_msix_vector_reaches_the_lapic_through_its_irqfd(vm: VM) -> None:
    kvm = _kvm(vm)
    _enable_lapic(vm)
    router = GsiRouter(kvm)
    msix = MsixCapability(2, router, table_bar=0, table_offset=0, pba_bar=0, pba_offset=0x800)
    try:
        vector = 0x45
        msix.table_write(16, memoryview(struct.pack("<QII", MSI_ADDRESS, vector, 1)))  # entry 1, masked
        msix.control_written(MSIX_ENABLE)
        assert msix.notify(1) and msix.pending(1)
        assert not _lapic_irr(vm, vector)  # masked: nothing reached the guest
        msix.table_write(16 + 12, memoryview(struct.pack("<I", 0)))  # unmask: route, then fire the pending bit
        assert router.msi_route(msix.gsi(1)) == (MSI_ADDRESS, vector) and not msix.pending(1)
        deadline = time.monotonic() + 5
        while not _lapic_irr(vm, vector):  # MSI irqfds inject at once; a nested host may defer
            assert time.monotonic() < deadline, "the MSI never reached the LAPIC"
            time.sleep(0.001)
        # the legacy routes are intact alongside
        kvm.irq_line(4, True)
        assert _pic_irr(kvm, IRQCHIP_PIC_MASTER) & (1 << 4)
        kvm.irq_line(4, False)
    finally:
        msix.close()
    assert router.table() == default_routes()


def test_set_gsi_routing_replaces_the_whole_table(vm: VM) -> None:
    kvm = _kvm(vm)
    kvm.set_gsi_routing([MsiRoute(24, MSI_ADDRESS, 0x40)])  # no defaults: GSI 5 goes nowhere
    kvm.irq_line(5, True)
    assert not _pic_irr(kvm, IRQCHIP_PIC_MASTER) & (1 << 5)
    kvm.irq_line(5, False)
    kvm.set_gsi_routing(default_routes())
    kvm.irq_line(5, True)
    assert _pic_irr(kvm, IRQCHIP_PIC_MASTER) & (1 << 5)
    kvm.irq_line(5, False)


def test_kvm_refuses_a_bad_route(vm: VM) -> None:
    kvm = _kvm(vm)
    with pytest.raises(KvmError, match="KVM_SET_GSI_ROUTING"):
        kvm.set_gsi_routing([*default_routes(), IrqchipRoute(30, IRQCHIP_PIC_MASTER, 8)])  # the PIC has 8 pins
    kvm.irq_line(3, True)  # the table before the refusal is still in force
    assert _pic_irr(kvm, IRQCHIP_PIC_MASTER) & (1 << 3)
    kvm.irq_line(3, False)


# A tiny guest (32-bit, paging off, entered by PVH) that finds the PCI platform the way a
# kernel does -- configuration mechanism #1, then ECAM -- uses a BAR, moves it, and turns
# decoding off. Each result goes to the log port.
_PCI_GUEST = r"""
        .include "common.inc"
        .code32
        .text
        .globl _start
_start:
        mov     $0xcf8, %dx
        mov     $0x80000000, %eax       /* bus 0, device 0, register 0 */
        out     %eax, %dx
        mov     $0xcfc, %dx
        in      %dx, %eax
        LOG     %eax                    /* the host bridge's vendor and device */
        mov     $0xcf8, %dx
        mov     $0x80000800, %eax       /* device 1 */
        out     %eax, %dx
        mov     $0xcfe, %dx
        xor     %eax, %eax
        in      %dx, %ax                /* a word at 0xcfe: the device ID */
        LOG     %eax
        mov     0xe0008000, %eax        /* ECAM: device 1's vendor and device */
        LOG     %eax
        mov     0xe0008014, %ebx        /* BAR1 */
        and     $0xfffffff0, %ebx
        LOG     %ebx
        movl    $0x12345678, 4(%ebx)
        mov     8(%ebx), %eax
        LOG     %eax
        movl    $0xc0100000, 0xe0008014 /* the guest moves BAR1 */
        movl    $0xabcdef01, 0xc0100004
        mov     0xc0100008, %eax
        LOG     %eax
        mov     8(%ebx), %eax           /* the old address: nobody there */
        LOG     %eax
        movw    $0, 0xe0008004          /* command register: decoding off */
        mov     0xc0100008, %eax
        LOG     %eax
        LOG     $0x600d
        POWER_OFF_NOW
        PVH_NOTE _start
"""


class _Log:
    def __init__(self) -> None:
        self.values: list[int] = []

    def read(self, offset: int, data: memoryview) -> None:
        data[:] = bytes(len(data))

    def write(self, offset: int, data: memoryview) -> None:
        self.values.append(int.from_bytes(data, "little"))


class _Window:
    def __init__(self) -> None:
        self.writes: list[tuple[int, int]] = []

    def read(self, offset: int, data: memoryview) -> None:
        data[:] = (0x600DF00D if offset == 8 else 0).to_bytes(len(data), "little")

    def write(self, offset: int, data: memoryview) -> None:
        self.writes.append((offset, int.from_bytes(data, "little")))


class _Device(PciFunction):
    def __init__(self) -> None:
        super().__init__(0x1AF4, 0x1041, 0xFF0000)
        self.window = _Window()
        self.add_bar(1, 0x1000, BarKind.MEM32, self.window)
        self.moves: list[tuple[int, int | None, int | None]] = []

    def bar_moved(self, index: int, old: int | None, new: int | None) -> None:
        self.moves.append((index, old, new))


def _assemble(source: str, out_dir: Path) -> Path:
    (out_dir / "pci.S").write_text(source)
    subprocess.run(["as", "--64", "-I", str(GUESTS), "-o", str(out_dir / "pci.o"), str(out_dir / "pci.S")], check=True)
    subprocess.run(["ld", "-m", "elf_x86_64", "-T", str(GUESTS / "guest.ld"), "-n", "--build-id=none",
                    "--no-warn-rwx-segments", "-o", str(out_dir / "pci.elf"), str(out_dir / "pci.o")],
                   check=True)  # fmt: skip
    return out_dir / "pci.elf"


@pytest.mark.usefixtures("binutils")
async def test_a_guest_finds_uses_and_moves_a_bar(tmp_path: Path) -> None:
    with VM(VmConfig(kernel=_assemble(_PCI_GUEST, tmp_path), memory="16M")) as vm:
        log = _Log()
        vm.pio.insert(0x510, 4, log)
        root = PciRoot(vm.pio, vm.mmio, pci_layout(vm.config.memory), vm._irq_line)
        device = _Device()
        assert root.add(device) == 1
        result = await vm.run()
        root.close()
    assert result.reason is StopReason.POWER_OFF
    assert log.values == [0x0D57_8086, 0x1041, 0x1041_1AF4, 0xC000_0000, 0x600D_F00D, 0x600D_F00D,
                          0xFFFF_FFFF, 0xFFFF_FFFF, 0x600D]  # fmt: skip
    assert device.window.writes == [(4, 0x1234_5678), (4, 0xABCD_EF01)]
    assert device.moves == [(1, None, 0xC000_0000), (1, 0xC000_0000, 0xC010_0000), (1, 0xC010_0000, None)]
