"""The host service's web console: log-in with the token in STATE_DIR/web-token, the VM
list (live), define/start/stop/reset/delete, each VM's serial console (xterm.js) and display
(noVNC), served by hypercorn on trio or asyncio. See docs/getting-started.md."""

from trivmm.host.web._server import serve_web

__all__ = ["serve_web"]
