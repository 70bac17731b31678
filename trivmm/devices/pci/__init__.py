"""PCI: the host bridge and bus 0 (``root``), endpoint functions with BARs and capabilities
(``function``), MSI-X (``msix``), and the GSI routing and INTx lines behind them (``irq``).
The ACPI side (MCFG, ``\\_SB.PCI0`` with ``_CRS`` and ``_PRT``) is in ``trivmm.boot.acpi``;
the address map in ``trivmm.boot.layout`` (``PciLayout``)."""

from trivmm.devices.pci.function import (
    CAP_ID_VENDOR,
    COMMAND_INTX_DISABLE,
    COMMAND_IO,
    COMMAND_MASTER,
    COMMAND_MEMORY,
    CONFIG_SIZE,
    EXTENDED_CONFIG_SIZE,
    Bar,
    BarKind,
    PciError,
    PciFunction,
)
from trivmm.devices.pci.irq import (
    FIRST_MSI_GSI,
    GsiExhausted,
    GsiRouter,
    IntxLines,
    MsiRouter,
    RoutingBackend,
    default_routes,
)
from trivmm.devices.pci.msix import MSIX_CAP_ID, MSIX_ENABLE, MSIX_FUNCTION_MASK, MsixCapability
from trivmm.devices.pci.root import (
    CONFIG_ADDRESS_PORT,
    HOST_BRIDGE_DEVICE,
    HOST_BRIDGE_VENDOR,
    HostBridge,
    PciConfigIo,
    PciEcam,
    PciRoot,
    PciRootState,
    PciSlotState,
)

__all__ = [
    "PciRoot", "PciRootState", "PciSlotState", "PciFunction", "HostBridge", "PciConfigIo", "PciEcam", "Bar",
    "BarKind", "PciError",
    "MsixCapability", "GsiRouter", "MsiRouter", "RoutingBackend", "IntxLines", "GsiExhausted",
    "default_routes", "FIRST_MSI_GSI", "CONFIG_ADDRESS_PORT", "HOST_BRIDGE_VENDOR", "HOST_BRIDGE_DEVICE",
    "CONFIG_SIZE", "EXTENDED_CONFIG_SIZE", "CAP_ID_VENDOR", "MSIX_CAP_ID", "MSIX_ENABLE", "MSIX_FUNCTION_MASK",
    "COMMAND_IO", "COMMAND_MEMORY", "COMMAND_MASTER", "COMMAND_INTX_DISABLE",
]  # fmt: skip
