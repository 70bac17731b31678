"""A command really run in Linux through the asyncio example service: the small test kernel and
its initramfs, whose /init runs ``trivmm.cmd=`` (trivmm/guest/init.sh). One boot: minutes on a
nested host (see tests/e2e/test_linux_boot.py)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.conftest import prerequisite_missing
from tests.e2e.test_linux_boot import SMALL_BOOT_TIMEOUT, _guest
from tests.examples.service import Service

pytestmark = pytest.mark.e2e


def test_a_command_runs_in_linux_through_the_asyncio_service(tmp_path: Path) -> None:
    small = _guest("small")
    initramfs = small / "initramfs.cpio"
    if b"trivmm.cmd=" not in initramfs.read_bytes():
        prerequisite_missing("guests", f"{initramfs} predates trivmm.cmd= in trivmm/guest/init.sh: "
                                       "run `python -m trivmm guest build --small-only`")  # fmt: skip
    service = Service("asyncio", tmp_path, "--kernel", str(small / "vmlinux"), "--initrd", str(initramfs),
                      "--timeout", str(SMALL_BOOT_TIMEOUT))  # fmt: skip
    try:
        started = time.monotonic()
        response = service.run({"command": "uname -s; echo $((6*7))"}, timeout=SMALL_BOOT_TIMEOUT + 60)
        elapsed = time.monotonic() - started
        assert response.status_code == 200, (response.text[-3000:], service.log[-3000:])
        body = response.json()
        assert body["rc"] == 0, body
        assert body["exit"] in ("poweroff", "reset"), body
        lines = body["output"].splitlines()
        assert "Linux" in lines and "42" in lines, body
        assert service.stop() == 0
        print(f"`uname -s; echo $((6*7))` in Linux through the service: {body!r}, {elapsed:.1f} s")
    finally:
        service.kill()
