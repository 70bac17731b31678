"""How long the VMM takes to unpack a bzImage's payload (``trivmm.boot.bzimage.extract_vmlinux``).

    python -m bench.unpack

For the small Debian-built kernel (and the stock cloud kernel where one is cached): the
payload's compression, its compressed and unpacked sizes, and the median of 5 unpacks.
This is what a bzImage entered by PVH costs the VMM in place of the guest's own
decompressor (which runs at emulated CPL0 on a nested host: minutes there).
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

from trivmm.boot.bzimage import SetupHeader, extract_vmlinux, payload_compression
from trivmm.guest.build import default_cache_dir

ROUNDS = 5


def _kernels() -> list[tuple[str, Path]]:
    cache = default_cache_dir()
    return [(name, cache / name / "bzImage") for name in ("small", "stock") if (cache / name / "bzImage").exists()]


def bench_unpack() -> None:
    """Print, per cached bzImage: compression, compressed -> unpacked size, unpack time (ms)."""
    kernels = _kernels()
    if not kernels:
        print(f"unpack: no bzImage under {default_cache_dir()} (python -m trivmm guest build)")
        return
    for name, path in kernels:
        image = path.read_bytes()
        header = SetupHeader.parse(image)
        times = []
        size = 0
        for _ in range(ROUNDS):
            start = time.perf_counter()
            size = len(extract_vmlinux(image))
            times.append(time.perf_counter() - start)
        print(f"unpack {name}: {payload_compression(image)}, {header.payload_length / 2**20:.2f} MiB -> "
              f"{size / 2**20:.2f} MiB in {statistics.median(times) * 1e3:.1f} ms "
              f"(median of {ROUNDS}; {min(times) * 1e3:.1f}-{max(times) * 1e3:.1f})")  # fmt: skip


if __name__ == "__main__":
    bench_unpack()
