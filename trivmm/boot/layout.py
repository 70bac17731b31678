"""Where trivmm puts things in guest-physical memory (x86-64), Firecracker-like.

The MMIO gap (3 GiB .. 4 GiB) when the VM has PCI (``PciLayout``)::

    0xC000_0000 .. 0xE000_0000  PCI 32-bit MMIO window (512 MiB, BARs; naturally aligned
                                up to 512 MiB, so a 256 MiB BAR still fits twice)
    0xE000_0000 .. 0xE010_0000  PCI ECAM for bus 0 (1 MiB: 32 devices x 8 functions x 4 KiB),
                                in MCFG and reserved by a PNP0C02 device in the DSDT;
                                0xE010_0000 .. 0xF000_0000 kept free for more buses' ECAM
    0xF000_0000 .. 0xF400_0000  non-PCI platform MMIO devices (virtio-mmio slots from 0xF000_0000)
    0xF400_0000 .. 0xFC00_0000  the display's linear framebuffer (trivmm.devices.display), a
                                RAM-like KVM memory slot of its own, up to 128 MiB
    0xFC00_0000 .. 0xFEC0_0000  free
    0xFEC0_0000                 IOAPIC;  0xFEE0_0000 LAPIC;  0xFFFB_C000 KVM's TSS/identity map

ECAM at 0xE000_0000 (not QEMU q35's 0xB000_0000, which sits below q35's variable RAM
ceiling of 2.75 GiB; our RAM stops at 3 GiB): the base many Intel chipsets' PCIEXBAR uses,
256 MiB-aligned so that a future 256-bus ECAM fits at the same base, and leaving the 32-bit
window below it one contiguous, naturally aligned 512 MiB block. The 64-bit window starts at
the first 1 GiB boundary above the end of RAM (4 GiB when RAM fits below the gap), so it
never meets RAM and needs only a guest physical-address width of 37 bits for small VMs.
PCI I/O BARs come from 0x1000..0xFFFF, above every legacy port trivmm models.
"""

from __future__ import annotations

import attrs

__all__ = ["GDT", "IDT", "PVH_START_INFO", "PVH_MEMMAP", "PVH_MODLIST", "ZERO_PAGE",
           "BOOT_STACK", "PML4", "PDPT", "PD", "PD_PAGES", "CMDLINE", "CMDLINE_MAX", "EBDA_START",
           "BIOS_START", "ACPI_START", "HIMEM_START", "MMIO_GAP_START", "MMIO_GAP_END",
           "IOAPIC_ADDRESS", "LAPIC_ADDRESS", "MIN_MEMORY", "ram_ranges",
           "VIRTIO_MMIO_BASE", "VIRTIO_MMIO_SLOT", "VIRTIO_MMIO_GSIS",
           "PCI_ECAM_BASE", "PCI_MMIO32_BASE", "PCI_MMIO32_SIZE", "PCI_IO_BASE", "PCI_IO_SIZE",
           "PCI_MMIO64_SIZE", "PCI_MMIO64_ALIGN", "PCI_INTX_GSIS", "PciLayout", "pci_layout",
           "FRAMEBUFFER_BASE", "FRAMEBUFFER_LIMIT"]  # fmt: skip

GDT = 0x500
IDT = 0x520
PVH_START_INFO = 0x6000
PVH_MODLIST = 0x6040  # one 32-byte module entry (the initrd)
PVH_MEMMAP = 0x6080  # up to 32 24-byte entries, below ZERO_PAGE
ZERO_PAGE = 0x7000
BOOT_STACK = 0x8FF0
PML4 = 0x9000
PDPT = 0xA000
PD = 0xB000  # four page directories: identity-map the first 4 GiB with 2 MiB pages
PD_PAGES = 4
CMDLINE = 0x20000
CMDLINE_MAX = 0x10000
EBDA_START = 0x9FC00  # MP table (the kernel scans 639K..640K)
BIOS_START = 0xA0000
ACPI_START = 0xE0000  # RSDP, then the other ACPI tables, up to 1 MiB
HIMEM_START = 0x100000
MMIO_GAP_START = 0xC000_0000  # 3 GiB .. 4 GiB: device MMIO, IOAPIC, LAPIC
MMIO_GAP_END = 1 << 32
IOAPIC_ADDRESS = 0xFEC0_0000
LAPIC_ADDRESS = 0xFEE0_0000
MIN_MEMORY = 2 << 20
PCI_MMIO32_BASE = 0xC000_0000
PCI_MMIO32_SIZE = 0x2000_0000  # up to the ECAM
PCI_ECAM_BASE = 0xE000_0000
PCI_IO_BASE = 0x1000
PCI_IO_SIZE = 0x1_0000 - PCI_IO_BASE
PCI_MMIO64_SIZE = 64 << 30
PCI_MMIO64_ALIGN = 1 << 30
PCI_INTX_GSIS = (16, 17, 18, 19)  # IOAPIC pins KVM routes only to the IOAPIC (no PIC, no ISA device)


def ram_ranges(memory_size: int) -> list[tuple[int, int]]:
    """Guest RAM as (base, size): below the MMIO gap, then from 4 GiB on."""
    if memory_size < MIN_MEMORY:
        raise ValueError(f"guest memory must be at least {MIN_MEMORY >> 20} MiB")
    low = min(memory_size, MMIO_GAP_START)
    ranges = [(0, low)]
    if memory_size > low:
        ranges.append((MMIO_GAP_END, memory_size - low))
    return ranges


@attrs.frozen
class PciLayout:
    """Where the PCI host bridge decodes: one segment, buses ``0..ecam_buses-1`` (ECAM at
    ``ecam_base``, 1 MiB per bus), and the windows the VMM hands BARs out of (and the DSDT's
    ``\\_SB.PCI0._CRS`` announces). ``intx_gsis``: the IOAPIC GSIs INTA..INTD are swizzled
    onto. Hashable: the ACPI tables built for a layout are cached per process."""

    mmio64_base: int
    mmio64_size: int = PCI_MMIO64_SIZE
    ecam_base: int = PCI_ECAM_BASE
    ecam_buses: int = 1
    io_base: int = PCI_IO_BASE
    io_size: int = PCI_IO_SIZE
    mmio32_base: int = PCI_MMIO32_BASE
    mmio32_size: int = PCI_MMIO32_SIZE
    intx_gsis: tuple[int, ...] = PCI_INTX_GSIS

    @property
    def ecam_size(self) -> int:
        return self.ecam_buses << 20

    def intx_gsi(self, slot: int, pin: int) -> int:
        """The GSI of ``pin`` (1 = INTA .. 4 = INTD) of the device in ``slot``: the usual
        swizzle, so that INTA of neighbouring slots lands on different lines."""
        if not 1 <= pin <= 4:
            raise ValueError(f"interrupt pin must be 1..4 (INTA..INTD), not {pin}")
        return self.intx_gsis[(slot + pin - 1) % len(self.intx_gsis)]


def pci_layout(memory_size: int) -> PciLayout:
    """The PCI layout for a VM of ``memory_size`` bytes of RAM: everything fixed but the
    64-bit window, which starts at the first ``PCI_MMIO64_ALIGN`` boundary above RAM."""
    ram_end = max(base + size for base, size in ram_ranges(memory_size))
    start = max(ram_end, MMIO_GAP_END)
    start = (start + PCI_MMIO64_ALIGN - 1) // PCI_MMIO64_ALIGN * PCI_MMIO64_ALIGN
    return PciLayout(mmio64_base=start)


# virtio-mmio transports: one 4 KiB slot each from VIRTIO_MMIO_BASE (in the MMIO gap's part
# left to non-PCI devices), each with its own edge-triggered GSI: IOAPIC pins no other
# device uses (PCI INTx takes 16..19), then free ISA lines.
VIRTIO_MMIO_BASE = 0xF000_0000
VIRTIO_MMIO_SLOT = 0x1000
VIRTIO_MMIO_GSIS = (20, 21, 22, 23, 5, 6, 7, 10, 11)

# The display's framebuffer (trivmm.devices.display): outside PCI's windows (so no BAR the
# guest assigns can land on it) and below the IOAPIC, as a GOP framebuffer an EFI loader
# announces; Linux learns of it from screen_info only.
FRAMEBUFFER_BASE = 0xF400_0000
FRAMEBUFFER_LIMIT = 0xFC00_0000
