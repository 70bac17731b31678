"""PIO and MMIO address spaces: overlap-checked ranges; devices see offsets."""

from trivmm.bus.address_space import MMIO_LIMIT, PIO_LIMIT, AddressSpace, BusDevice, BusError, BusRange

__all__ = ["AddressSpace", "BusDevice", "BusError", "BusRange", "PIO_LIMIT", "MMIO_LIMIT"]
