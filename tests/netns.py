"""Two "hosts" for the migration tests: two network namespaces joined by a veth pair, and
``python -m trivmm`` started in one of them with its console in a file.

Needs root and iproute2 (``ip netns``); a missing prerequisite (tests/conftest.py) otherwise.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import attrs

from tests.conftest import prerequisite_missing

__all__ = ["ROOT", "ENV", "NamespacePair", "two_namespaces", "start_trivmm"]

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
_SERIAL = itertools.count()  # several pairs in one process get distinct names


@attrs.frozen
class NamespacePair:
    """Namespaces ``a`` and ``b``, each end of the veth pair's address in them."""

    a: str
    b: str
    address_a: str
    address_b: str


@contextlib.contextmanager
def two_namespaces(subnet: str = "10.213.7") -> Iterator[NamespacePair]:
    """Two network namespaces joined by a veth pair (SUBNET.1 in ``a``, SUBNET.2 in ``b``,
    /24, loopback up in both), deleted afterwards with the veth pair."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        prerequisite_missing("network namespaces", "needs root and iproute2 (ip netns) to make two of them")
    suffix = f"{os.getpid() % 100000}{next(_SERIAL) or ''}"
    a, b, veth_a, veth_b = f"trivmm-a{suffix}", f"trivmm-b{suffix}", f"tva{suffix}", f"tvb{suffix}"
    pair = NamespacePair(a, b, f"{subnet}.1", f"{subnet}.2")
    steps = [["ip", "netns", "add", a], ["ip", "netns", "add", b],
             ["ip", "link", "add", veth_a, "netns", a, "type", "veth", "peer", "name", veth_b, "netns", b],
             ["ip", "-n", a, "addr", "add", f"{pair.address_a}/24", "dev", veth_a],
             ["ip", "-n", b, "addr", "add", f"{pair.address_b}/24", "dev", veth_b],
             ["ip", "-n", a, "link", "set", veth_a, "up"], ["ip", "-n", b, "link", "set", veth_b, "up"],
             ["ip", "-n", a, "link", "set", "lo", "up"], ["ip", "-n", b, "link", "set", "lo", "up"]]  # fmt: skip
    try:
        for step in steps:
            done = subprocess.run(step, capture_output=True, text=True)
            if done.returncode:
                prerequisite_missing("network namespaces", f"cannot make two here: {' '.join(step)}: "
                                                           f"{done.stderr.strip()}")  # fmt: skip
        yield pair
    finally:
        for name in (a, b):  # the veth pair goes with them
            subprocess.run(["ip", "netns", "del", name], capture_output=True)


def start_trivmm(command: list[str], cwd: Path, name: str, netns: str | None = None,
                 stdin: int | IO[bytes] | None = subprocess.DEVNULL) -> subprocess.Popen[bytes]:  # fmt: skip
    """``python -m trivmm COMMAND`` in ``cwd`` (in network namespace ``netns``: ``ip netns
    exec`` execs it, so the process is trivmm's own), stdout and stderr in NAME.out/.err."""
    prefix = [] if netns is None else ["ip", "netns", "exec", netns]
    with open(cwd / f"{name}.out", "wb") as out, open(cwd / f"{name}.err", "wb") as err:
        return subprocess.Popen([*prefix, sys.executable, "-m", "trivmm", *command], stdin=stdin, stdout=out,
                                stderr=err, cwd=cwd, env=ENV)  # fmt: skip
