"""Shared fixtures, and the one rule for a test whose prerequisite is missing.

A test states what it needs: the ``kvm`` and ``e2e`` markers (a usable /dev/kvm), the
``binutils`` fixture (GNU as, ld, nm, readelf), the ``c_compiler`` fixture (``cc`` that
finds <linux/kvm.h>), or a call to ``prerequisite_missing`` (the e2e tests' built guests).
When one is missing, strict mode -- ``CI=true``, or ``TRIVMM_STRICT_PREREQUISITES=1`` as
``scripts/test`` exports without ``--fast`` -- FAILS the test with the reason; otherwise the
test is skipped and the run's summary lists each missing prerequisite and what it skipped.
``TRIVMM_TEST_KVM_DEVICE`` points the kvm check at another path (tests/unit/test_prerequisites.py).
"""

from __future__ import annotations

import fcntl
import functools
import os
import shutil
import subprocess
from typing import NoReturn

import pytest

STRICT_VARIABLE = "TRIVMM_STRICT_PREREQUISITES"
KVM_DEVICE_VARIABLE = "TRIVMM_TEST_KVM_DEVICE"  # what the kvm check opens; /dev/kvm unless set
BINUTILS = ("as", "ld", "nm", "readelf")
KVM_API_VERSION = 12
_KVM_GET_API_VERSION = 0xAE00  # _IO(KVMIO, 0x00)
_TRUE_WORDS = ("1", "true", "yes")


def strict_reason() -> str | None:
    """Why a missing prerequisite fails rather than skips (the variable that says so), or None."""
    for variable in (STRICT_VARIABLE, "CI"):
        value = os.environ.get(variable, "")
        if value.lower() in _TRUE_WORDS:
            return f"{variable}={value}"
    return None


_MISSING = "missing_prerequisite"  # the attribute that marks a skip or failure as ours: (prerequisite, reason)


def prerequisite_missing(prerequisite: str, reason: str) -> NoReturn:
    """Skip the running test, or fail it in strict mode, because ``prerequisite`` is missing."""
    message = f"missing prerequisite {prerequisite}: {reason}"
    strict = strict_reason()
    outcome: BaseException  # pytest's outcomes are BaseExceptions
    if strict is None:
        outcome = pytest.skip.Exception(message)
    else:
        outcome = pytest.fail.Exception(f"{message} (a failure, not a skip, because {strict})", pytrace=False)
    setattr(outcome, _MISSING, (prerequisite, reason))
    raise outcome


# --- the checks: each returns what is wrong, or None ---------------------------------------
def kvm_problem(path: str) -> str | None:
    """Whether ``path`` is a KVM device this user can use: open read-write, API version 12."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        return f"cannot open {path} read-write: {exc.strerror}"
    try:
        version = fcntl.ioctl(fd, _KVM_GET_API_VERSION)
    except OSError as exc:
        return f"{path} is not a KVM device (KVM_GET_API_VERSION: {exc.strerror})"
    finally:
        os.close(fd)
    if version != KVM_API_VERSION:
        return f"{path} speaks KVM API {version}, not {KVM_API_VERSION}"
    return None


def binutils_problem() -> str | None:
    """Whether GNU binutils (to assemble the tiny guests) are on PATH."""
    missing = [tool for tool in BINUTILS if shutil.which(tool) is None]
    return f"GNU binutils not on PATH ({', '.join(missing)})" if missing else None


def c_compiler_problem() -> str | None:
    """Whether ``cc`` is on PATH and its preprocessor finds <linux/kvm.h>."""
    cc = shutil.which("cc")
    if cc is None:
        return "no C compiler (cc) on PATH"
    proc = subprocess.run([cc, "-E", "-x", "c", "-o", os.devnull, "-"], input=b"#include <linux/kvm.h>\n",
                          capture_output=True)  # fmt: skip
    if proc.returncode != 0:
        return "cc cannot find <linux/kvm.h> (Debian package linux-libc-dev)"
    return None


@functools.cache
def _problem(prerequisite: str) -> str | None:
    if prerequisite == "kvm":
        return kvm_problem(os.environ.get(KVM_DEVICE_VARIABLE, "/dev/kvm"))
    if prerequisite == "binutils":
        return binutils_problem()
    if prerequisite == "c-compiler":
        return c_compiler_problem()
    raise ValueError(f"unknown prerequisite {prerequisite!r}")


def require(prerequisite: str) -> None:
    """Skip or fail (strict mode) the running test unless ``prerequisite`` is usable:
    ``kvm``, ``binutils`` or ``c-compiler``. Each is checked once per session."""
    problem = _problem(prerequisite)
    if problem is not None:
        prerequisite_missing(prerequisite, problem)


# --- hooks and fixtures ----------------------------------------------------------------------
_OUTCOMES = pytest.StashKey[dict[tuple[str, str, str], set[str]]]()  # (outcome, prerequisite, reason) -> ids


def pytest_configure(config: pytest.Config) -> None:
    config.stash[_OUTCOMES] = {}


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    if "kvm" in item.keywords or "e2e" in item.keywords:
        require("kvm")


def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> None:
    if call.excinfo is None:
        return
    missing = getattr(call.excinfo.value, _MISSING, None)
    if missing is not None:
        outcome = "skipped" if call.excinfo.errisinstance(pytest.skip.Exception) else "failed"
        item.config.stash[_OUTCOMES].setdefault((outcome, *missing), set()).add(item.nodeid)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, exitstatus: int,
                            config: pytest.Config) -> None:  # fmt: skip
    outcomes = config.stash.get(_OUTCOMES, {})
    for outcome in ("skipped", "failed"):
        rows = sorted((key[1:], len(ids)) for key, ids in outcomes.items() if key[0] == outcome)
        if not rows:
            continue
        total = sum(count for _, count in rows)
        terminalreporter.write_sep("=", f"missing prerequisites: {total} tests {outcome}", yellow=True, bold=True)
        for (prerequisite, reason), count in rows:
            tests = "test" if count == 1 else "tests"
            terminalreporter.write_line(f"{prerequisite}: {count} {tests} {outcome}: {reason}")
        if outcome == "skipped":
            terminalreporter.write_line(f"(these fail instead under CI=true or {STRICT_VARIABLE}=1, "
                                        "as scripts/test without --fast sets)")  # fmt: skip


@pytest.fixture(scope="session")
def binutils() -> None:
    """GNU as, ld, nm and readelf, to assemble the tiny test guests."""
    require("binutils")


@pytest.fixture(scope="session")
def c_compiler() -> str:
    """The path of ``cc``, checked to find <linux/kvm.h>."""
    require("c-compiler")
    cc = shutil.which("cc")
    assert cc is not None
    return cc
