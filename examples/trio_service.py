"""The VM service (vm_service.py) on trio: served by hypercorn's trio worker.

    python3 examples/trio_service.py --port 8000
    curl -s localhost:8000/run -d '{"command": "uname -a"}'

The same Starlette app as asyncio_service.py: Starlette and trivmm are written on anyio,
so the app, its VMs and their consoles run on trio here (``GET /healthz`` says
``"async_library": "trio"``). On SIGINT or SIGTERM hypercorn stops taking requests, gives
those in flight ``--shutdown-grace`` seconds, then cancels them (their VMs are stopped and
torn down), and the process exits 0.
"""

from __future__ import annotations

import logging
import signal
import socket
import sys
from collections.abc import Sequence

import hypercorn.config
import hypercorn.trio
import trio
from starlette.applications import Starlette
from vm_service import Settings, prepare


async def _signalled() -> None:
    """Returns on SIGINT or SIGTERM: hypercorn's cue for a graceful shutdown."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            logging.getLogger("trivmm-service").info("%s: shutting down", signal.Signals(signum).name)
            return


async def serve(app: Starlette, settings: Settings, sock: socket.socket) -> None:
    config = hypercorn.config.Config()
    config.bind = [f"fd://{sock.detach()}"]  # hypercorn owns the listening socket from here
    config.graceful_timeout = settings.shutdown_grace
    config.accesslog = logging.getLogger("hypercorn.access")  # to the log the service set up (stderr)
    config.errorlog = logging.getLogger("hypercorn.error")
    await hypercorn.trio.serve(app, config, shutdown_trigger=_signalled)  # type: ignore[arg-type]


def main(argv: Sequence[str] | None = None) -> int:
    settings, app, sock = prepare(argv, "trio")
    trio.run(serve, app, settings, sock)
    return 0


if __name__ == "__main__":
    sys.exit(main())
