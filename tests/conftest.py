"""Shared fixtures and the rules for skipping: no /dev/kvm, no guest artifacts, no toolchain."""

from __future__ import annotations

import os
import shutil

import pytest


def kvm_unavailable_reason() -> str | None:
    if not os.path.exists("/dev/kvm"):
        return "/dev/kvm does not exist on this machine"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "/dev/kvm is not readable and writable by this user"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = kvm_unavailable_reason()
    for item in items:
        if reason and ("kvm" in item.keywords or "e2e" in item.keywords):
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="session")
def binutils() -> None:
    missing = [tool for tool in ("as", "ld") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"GNU binutils ({', '.join(missing)}) not installed: cannot assemble test guests")
