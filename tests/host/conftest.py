"""Fixtures of the host-service tests: a short state directory, the tiny guests."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture
def state_dir() -> Iterator[Path]:
    """A fresh state directory with a short path (unix socket paths are at most 107 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="trivmm-host-", dir="/tmp"))
    try:
        yield path / "state"
    finally:
        shutil.rmtree(path, ignore_errors=True)
