"""A VNC (RFB 3.8) server for a VM's display and PS/2 input (docs/display.md)."""

from trivmm.vnc.protocol import NATIVE_FORMAT, PixelFormat
from trivmm.vnc.server import VncEndpoint, VncServer

__all__ = ["VncServer", "VncEndpoint", "PixelFormat", "NATIVE_FORMAT"]
