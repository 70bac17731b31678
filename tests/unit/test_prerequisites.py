"""The rule in tests/conftest.py: a missing prerequisite skips (and is listed), or fails in strict mode."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import attrs
import pytest

from tests.conftest import STRICT_VARIABLE, kvm_problem, strict_reason

REPO = Path(__file__).resolve().parents[2]

NEEDY_TESTS = """
import pytest

from tests.e2e.test_linux_boot import _guest
from tests.kvm.guests import assemble


@pytest.mark.kvm
def test_needs_kvm():
    pass


def test_needs_binutils(binutils):
    pass


def test_assembles_a_guest(tmp_path):
    assemble("exits", tmp_path)


def test_needs_a_c_compiler(c_compiler):
    pass


def test_needs_the_small_guest():
    _guest("small")


def test_needs_nothing():
    pass
"""


@attrs.frozen
class NeedyRun:
    """The output of one run of NEEDY_TESTS and its outcome counts ("passed", "skipped", ...)."""

    output: str
    counts: dict[str, int]


@pytest.fixture(scope="module")
def needy_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, NeedyRun]:
    """NEEDY_TESTS run in a fresh pytest, fast tier and strict mode side by side, with every
    prerequisite missing: /dev/null stands in for /dev/kvm (it opens read-write but is no KVM
    device), PATH holds no tools, and the guest cache is empty."""
    directory = tmp_path_factory.mktemp("needy")
    (directory / "test_needy.py").write_text(NEEDY_TESTS)
    (directory / "empty").mkdir()
    env = {name: value for name, value in os.environ.items() if name not in ("CI", STRICT_VARIABLE)}
    env.update(PYTHONPATH=str(REPO), PATH=str(directory / "empty"), PYTEST_DISABLE_PLUGIN_AUTOLOAD="1",
               TRIVMM_TEST_KVM_DEVICE="/dev/null", TRIVMM_GUEST_DIR=str(directory / "empty"))  # fmt: skip
    command = [sys.executable, "-m", "pytest", "-p", "tests.conftest", "-p", "no:cacheprovider", "-q", "-ra",
               "-W", "ignore::pytest.PytestUnknownMarkWarning", "test_needy.py"]  # fmt: skip
    runs = {
        tier: subprocess.Popen(
            command, cwd=directory, env={**env, **extra}, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        for tier, extra in (("fast", {}), ("strict", {STRICT_VARIABLE: "1"}))
    }
    results = {}
    for tier, process in runs.items():
        output, _ = process.communicate(timeout=60)
        counts = {word: int(n) for n, word in re.findall(r"(\d+) (passed|skipped|failed|errors?)\b", output)}
        assert process.returncode == (1 if counts.get("failed") or counts.get("errors") else 0), output
        results[tier] = NeedyRun(output, counts)
    return results


def test_the_fast_tier_skips_and_lists_each_missing_prerequisite(needy_runs: dict[str, NeedyRun]) -> None:
    output, counts = needy_runs["fast"].output, needy_runs["fast"].counts
    assert counts == {"passed": 1, "skipped": 5}, output
    summary = output[output.index("missing prerequisites: 5 tests skipped") :]
    assert "kvm: 1 test skipped: /dev/null is not a KVM device" in summary
    assert "binutils: 2 tests skipped: GNU binutils not on PATH (as, ld, nm, readelf)" in summary
    assert "c-compiler: 1 test skipped: no C compiler (cc) on PATH" in summary
    assert "guests: 1 test skipped: small guest not built" in summary
    assert f"{STRICT_VARIABLE}=1" in summary


def test_strict_mode_fails_each_test_with_its_reason(needy_runs: dict[str, NeedyRun]) -> None:
    output, counts = needy_runs["strict"].output, needy_runs["strict"].counts
    assert counts == {"passed": 1, "failed": 2, "errors": 3}, output
    assert output.count(f"a failure, not a skip, because {STRICT_VARIABLE}=1") >= 5
    summary = output[output.index("missing prerequisites: 5 tests failed") :]
    for line in ("kvm: 1 test failed: /dev/null is not a KVM device", "binutils: 2 tests failed",
                 "c-compiler: 1 test failed", "guests: 1 test failed: small guest not built"):  # fmt: skip
        assert line in summary


@pytest.mark.parametrize(("environment", "expected"), [
    ({}, None),
    ({"CI": "true"}, "CI=true"),
    ({"CI": "1"}, "CI=1"),
    ({"CI": "false"}, None),
    ({STRICT_VARIABLE: "1"}, f"{STRICT_VARIABLE}=1"),
    ({STRICT_VARIABLE: "0"}, None),
])  # fmt: skip
def test_strict_mode_is_ci_or_the_variable(monkeypatch: pytest.MonkeyPatch, environment: dict[str, str],
                                           expected: str | None) -> None:  # fmt: skip
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.delenv(STRICT_VARIABLE, raising=False)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    assert strict_reason() == expected


def test_kvm_must_open_and_answer_the_api_version(tmp_path: Path) -> None:
    assert "cannot open" in (kvm_problem(str(tmp_path / "kvm")) or "")
    assert "not a KVM device" in (kvm_problem("/dev/null") or "")  # exists, opens read-write: not enough


@pytest.mark.parametrize(("arguments", "strict"), [((), "1"), (("--fast",), "")])
def test_scripts_test_is_strict_without_fast(tmp_path: Path, arguments: tuple[str, ...], strict: str) -> None:
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    record = tmp_path / "calls"
    (fake_bin / "python3").write_text(f'#!/bin/sh\necho "${{{STRICT_VARIABLE}:-}} $*" >> {record}\n')
    (fake_bin / "python3").chmod(0o755)
    env = {name: value for name, value in os.environ.items() if name not in ("CI", STRICT_VARIABLE)}
    env["PATH"] = f"{fake_bin}:{env.get('PATH', '')}"
    subprocess.run(["bash", str(REPO / "scripts" / "test"), *arguments], env=env, check=True,
                   capture_output=True, timeout=30)  # fmt: skip
    pytest_call = record.read_text().splitlines()[-1]
    assert pytest_call.startswith(f"{strict} -m pytest"), pytest_call
