"""The VM service (vm_service.py) on asyncio: served by uvicorn.

    python3 examples/asyncio_service.py --port 8000
    curl -s localhost:8000/run -d '{"command": "uname -a"}'

On SIGINT or SIGTERM uvicorn stops taking requests, gives those in flight
``--shutdown-grace`` seconds, then cancels them (their VMs are stopped and torn down), and
the process exits 0.
"""

from __future__ import annotations

import math
import signal
import sys
from collections.abc import Sequence

import uvicorn
from vm_service import prepare


def main(argv: Sequence[str] | None = None) -> int:
    settings, app, sock = prepare(argv, "asyncio")
    config = uvicorn.Config(app, loop="asyncio", lifespan="on", log_level="info",
                            timeout_graceful_shutdown=math.ceil(settings.shutdown_grace))  # fmt: skip
    server = uvicorn.Server(config)
    # uvicorn takes SIGINT and SIGTERM for its graceful shutdown, then raises the signal again
    # for the handler it found: this one lets the process end with 0 rather than die of it.
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda signum, frame: None)
    server.run(sockets=[sock])
    return 0 if server.started else 1


if __name__ == "__main__":
    sys.exit(main())
