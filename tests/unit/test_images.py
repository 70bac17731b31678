"""Disk images (trivmm.images): raw, qcow2 and VMDK against Debian's qemu-img.

Images made by qemu-img read back exactly as ``qemu-img convert -O raw`` reads them; after
writes through trivmm, ``qemu-img check`` finds no errors and no leaks, and ``qemu-img
compare`` finds the image equal to a bytearray model. Hostile images fail with an
``ImageError`` and write nothing outside their own data clusters. The hypothesis test runs
30 examples (``TRIVMM_IMAGE_EXAMPLES=N`` runs N; 400 passed on 2026-11-27): each a fresh
qcow2 -- version, cluster size, refcount width, backing file, initial data or compressed
clusters, an internal snapshot, all drawn -- then up to 12 writes, reads, discards and
write-zeroes, a ``qemu-img check`` and a ``qemu-img compare``. The whole file runs in about
30 s on 2 cores.

qemu-img and qemu-io come from Debian's qemu-utils, installed by the ``qemu`` fixture
(root and apt); without them those tests skip, or fail in strict mode (tests/conftest.py).
"""

from __future__ import annotations

import os
import random
import shutil
import struct
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import prerequisite_missing
from tests.unit.images_helpers import (
    SECTOR,
    as_raw,
    assert_clean,
    assert_same,
    disk_content,
    header,
    l1_entry_offset,
    l2_entry_offset,
    patch,
    peek,
    qemu_img,
    qemu_io,
    stream_optimized_vmdk,
)
from trivmm.errors import ConfigError
from trivmm.images import DiskImage, ImageError, foreign_format, open_image, probe_format
from trivmm.images.qcow2 import OFFSET_MASK, OFLAG_COMPRESSED, OFLAG_COPIED, OFLAG_ZERO, Qcow2Image

KIB, MIB = 1 << 10, 1 << 20


@pytest.fixture(scope="session")
def qemu() -> None:
    """qemu-img and qemu-io (Debian's qemu-utils), installed if missing."""
    if shutil.which("qemu-img") is None or shutil.which("qemu-io") is None:
        from trivmm.guest.build import ensure_debian_packages

        try:
            ensure_debian_packages(["qemu-utils"])
        except Exception as exc:
            prerequisite_missing("qemu-img", f"cannot install Debian's qemu-utils: {exc}")
        if shutil.which("qemu-img") is None:
            prerequisite_missing("qemu-img", "Debian's qemu-utils is not installed (needs root and apt)")


def create(path: Path, size: int, *, compat: str = "1.1", cluster: int = 64 * KIB, refcount_bits: int = 16,
           backing: Path | None = None, backing_fmt: str = "raw", extra: str = "") -> Path:  # fmt: skip
    options = f"compat={compat},cluster_size={cluster},refcount_bits={refcount_bits}" + extra
    args: list[str | Path] = ["create", "-q", "-f", "qcow2", "-o", options]
    if backing is not None:
        args += ["-b", backing.name, "-F", backing_fmt]
    qemu_img(*args, path, str(size))
    return path


def convert(source: Path, target: Path, *, compat: str = "1.1", cluster: int = 64 * KIB,
            compress: bool = False) -> Path:  # fmt: skip
    qemu_img("convert", "-f", "raw", "-O", "qcow2", *(["-c"] if compress else []),
             "-o", f"compat={compat},cluster_size={cluster}", source, target)  # fmt: skip
    return target


def apply_writes(image: DiskImage, model: bytearray, rng: random.Random, count: int, *, max_length: int) -> None:
    """Random writes (and a few write-zeroes) to ``image`` and ``model`` alike."""
    for _ in range(count):
        offset = rng.randrange(image.size)
        n = min(rng.randrange(1, max_length), image.size - offset)
        if rng.random() < 0.2:
            image.write_zeroes(offset, n)
            model[offset : offset + n] = bytes(n)
        else:
            data = rng.randbytes(n)
            image.write(offset, data)
            model[offset : offset + n] = data


def check_reads(image: DiskImage, expected: bytes, rng: random.Random, count: int = 40) -> None:
    assert image.read(0, image.size) == expected
    for _ in range(count):
        offset = rng.randrange(image.size)
        n = rng.randrange(0, min(256 * KIB, image.size - offset) + 1)
        assert image.read(offset, n) == expected[offset : offset + n], (offset, n)


# --- probing ---------------------------------------------------------------------------------
def test_probe_recognises_qcow2_vmdk_and_raw() -> None:
    assert probe_format(b"QFI\xfb\x00\x00\x00\x03") == "qcow2"
    assert probe_format(b"KDMV\x01\x00\x00\x00") == "vmdk"
    assert probe_format(b"# Disk DescriptorFile\nversion=1\n") == "vmdk"
    assert probe_format(b"\xeb\x63\x90" + bytes(509)) == "raw"
    assert probe_format(b"") == "raw"


FOREIGN = {
    "QED": b"QED\x00" + bytes(60),
    "VDI": b"<<< Oracle VM VirtualBox Disk Image >>>\n".ljust(64, b"\0") + struct.pack("<I", 0xBEDA107F),
    "VHD": b"conectix" + bytes(56),
    "VHDX": b"vhdxfile" + bytes(56),
    "LUKS": b"LUKS\xba\xbe\x00\x02" + bytes(56),
}


@pytest.mark.parametrize("name", sorted(FOREIGN))
def test_probed_raw_that_looks_like_another_format_is_refused(tmp_path: Path, name: str) -> None:
    path = tmp_path / "disk.img"
    path.write_bytes(FOREIGN[name].ljust(64 * KIB, b"\0"))
    assert foreign_format(FOREIGN[name]) == name
    with pytest.raises(ImageError, match=rf"disk.img: looks like a {name} image.*format='raw'"):
        open_image(path)
    with open_image(path, format="raw") as image:  # said explicitly: its bytes are the disk
        assert image.read(0, 8) == FOREIGN[name][:8]


def test_probed_raw_refuses_a_write_that_would_make_it_qcow2(tmp_path: Path) -> None:
    """CVE-2008-2004: a guest must not turn its raw disk into a qcow2 with a backing file."""
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(64 * KIB))
    with open_image(path) as image:
        assert image.format == "raw"
        with pytest.raises(ImageError, match=r"look like a qcow2 image"):
            image.write(0, b"QFI\xfb" + bytes(508))
        with pytest.raises(ImageError, match=r"look like a vmdk image"):
            image.write(0, b"# Disk DescriptorFile\n")
        with pytest.raises(ImageError, match=r"look like a QED image"):
            image.write(0, b"QED\x00")
        image.write(0, b"\xeb\x63\x90")  # a boot sector is fine
        image.write(4, b"QFI\xfb")  # so is the magic anywhere but where probing looks
        image.write(0, b"xy" * 8 * KIB)  # and a write that only starts in the first sector
    assert path.read_bytes()[:4] == b"xyxy"
    with open_image(path, format="raw") as image:
        image.write(0, b"QFI\xfb")
    assert path.read_bytes()[:4] == b"QFI\xfb"


def test_open_errors_are_config_errors_naming_the_file(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match=r"nowhere.img: cannot open"):
        open_image(tmp_path / "nowhere.img")
    (tmp_path / "x.img").write_bytes(bytes(512))
    with pytest.raises(ConfigError, match=r"x.img: unsupported image format 'qed'"):
        open_image(tmp_path / "x.img", format="qed")
    with pytest.raises(ImageError, match=r"x.img: not a qcow2 image"):
        open_image(tmp_path / "x.img", format="qcow2")
    with pytest.raises(ImageError, match=r"x.img: VMDK images are read-only"):
        open_image(tmp_path / "x.img", format="vmdk")
    with pytest.raises(ImageError, match=r"x.img: not a VMDK image"):
        open_image(tmp_path / "x.img", format="vmdk", readonly=True)


# --- raw ---------------------------------------------------------------------------------------
def test_raw_reads_writes_discards_and_zeroes(tmp_path: Path) -> None:
    rng = random.Random(1)
    model = bytearray(rng.randbytes(1 * MIB))
    path = tmp_path / "disk.raw"
    path.write_bytes(model)
    with open_image(path, format="raw") as image:
        assert (image.size, image.readonly, image.format) == (1 * MIB, False, "raw")
        check_reads(image, bytes(model), rng)
        image.write(5000, b"hello")
        model[5000:5005] = b"hello"
        image.discard(64 * KIB, 128 * KIB)  # a punched hole reads as zeros
        model[64 * KIB : 192 * KIB] = bytes(128 * KIB)
        image.write_zeroes(300_001, 70_000)
        model[300_001:370_001] = bytes(70_000)
        image.write_zeroes(500 * KIB, 8 * KIB, unmap=True)
        model[500 * KIB : 508 * KIB] = bytes(8 * KIB)
        image.write(image.size - 3, bytearray(b"end"))
        model[-3:] = b"end"
        image.flush()
        assert image.read(0, image.size) == model
    assert path.read_bytes() == model


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_scatter_reads_into_buffers(qemu: None, tmp_path: Path, fmt: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """``read_into`` fills many buffers from one offset (a raw image: preadv, straight into
    them), with short reads continued; past the disk is refused and nothing is filled."""
    rng = random.Random(2)
    model = rng.randbytes(1 * MIB)
    path = tmp_path / "disk.raw"
    path.write_bytes(model)
    if fmt == "qcow2":
        qcow2 = tmp_path / "disk.qcow2"
        qemu_img("convert", "-f", "raw", "-O", "qcow2", path, qcow2)
        path = qcow2
    with open_image(path, format=fmt) as image:
        for _ in range(20):
            sizes = [rng.randrange(1, 9000) for _ in range(rng.randrange(1, 12))]
            offset = rng.randrange(0, image.size - sum(sizes))
            buffers = [memoryview(bytearray(size)) for size in sizes]
            image.read_into(offset, buffers)
            assert b"".join(bytes(b) for b in buffers) == model[offset : offset + sum(sizes)]
        guard = memoryview(bytearray(b"\xee" * 512))
        with pytest.raises(ImageError, match="outside the disk"):
            image.read_into(image.size - 256, [guard])
        assert bytes(guard) == b"\xee" * 512
        if fmt == "raw":  # preadv returning less than asked (a signal): the rest is read too
            real = os.preadv
            monkeypatch.setattr(os, "preadv", lambda fd, bufs, at: real(fd, [bufs[0][:100]], at))
            buffers = [memoryview(bytearray(300)), memoryview(bytearray(50))]
            image.read_into(1000, buffers)
            assert bytes(buffers[0]) + bytes(buffers[1]) == model[1000:1350]


@pytest.mark.parametrize(("request_", "offset", "length"), [
    (request_, offset, length)
    for request_ in ("read", "write", "discard", "write_zeroes")
    for offset, length in ((1 * MIB - 511, 512), (1 * MIB, 1), (-1, 1), (0, -1))
    if length >= 0 or request_ != "write"  # a write's length is its data's
])  # fmt: skip
def test_requests_outside_the_disk_are_refused(tmp_path: Path, request_: str, offset: int, length: int) -> None:
    path = tmp_path / "disk.raw"
    path.write_bytes(bytes(1 * MIB))
    with open_image(path, format="raw") as image:
        call = getattr(image, request_)
        with pytest.raises(ImageError, match=r"disk.raw: request for .* outside the disk \(1048576 bytes\)"):
            call(offset, bytes(max(length, 0))) if request_ == "write" else call(offset, length)
    assert path.read_bytes() == bytes(1 * MIB)


def test_read_only_and_closed_images_refuse_writes(tmp_path: Path) -> None:
    path = tmp_path / "disk.raw"
    path.write_bytes(bytes(64 * KIB))
    image = open_image(path, readonly=True)
    assert image.readonly
    for name, args in (("write", (0, b"x")), ("discard", (0, 512)), ("write_zeroes", (0, 512))):
        with pytest.raises(ImageError, match=r"disk.raw: .* refused: the image is open read-only"):
            getattr(image, name)(*args)
    image.flush()  # nothing to flush, not an error
    image.close()
    image.close()
    with pytest.raises(ImageError, match=r"disk.raw: image is closed"):
        image.read(0, 1)


# --- qcow2: reading what qemu-img wrote --------------------------------------------------------
@pytest.mark.parametrize("compat", ["0.10", "1.1"])
@pytest.mark.parametrize("cluster", [512, 64 * KIB, 2 * MIB])
def test_qcow2_reads_what_qemu_img_wrote(qemu: None, tmp_path: Path, compat: str, cluster: int) -> None:
    rng = random.Random(cluster)
    source = tmp_path / "source.raw"
    source.write_bytes(disk_content(rng, 5 * MIB + 3 * SECTOR))
    path = convert(source, tmp_path / "disk.qcow2", compat=compat, cluster=cluster)
    if compat == "1.1":  # zero clusters: plain, and over a preallocated host cluster
        qemu_io(path, f"write -z {cluster} {min(4 * cluster, 2 * MIB)}", "write -P 0x3c 0 64k", "write -z 3M 512k")
    expected = as_raw(path)
    with open_image(path, readonly=True) as image:
        assert isinstance(image, Qcow2Image)
        assert (image.size, image.header.version) == (len(expected), 3 if compat == "1.1" else 2)
        assert image.discard_granularity == cluster
        check_reads(image, expected, rng)
        with pytest.raises(ImageError, match=r"disk.qcow2: write refused: the image is open read-only"):
            image.write(0, b"x")


@pytest.mark.parametrize("cluster", [512, 64 * KIB, 2 * MIB])
def test_qcow2_compressed_clusters_read_and_copy_on_write(qemu: None, tmp_path: Path, cluster: int) -> None:
    rng = random.Random(7)
    source = tmp_path / "source.raw"
    source.write_bytes(disk_content(rng, 6 * MIB))
    path = convert(source, tmp_path / "disk.qcow2", cluster=cluster, compress=True)
    assert "compressed" in qemu_img("check", path).stdout
    expected = as_raw(path)
    assert expected == source.read_bytes()
    with open_image(path, readonly=True) as image:
        check_reads(image, expected, rng)
    model = bytearray(expected)
    with open_image(path) as image:
        apply_writes(image, model, rng, 30, max_length=3 * cluster)
        image.discard(cluster, 2 * cluster)
        model[cluster : 3 * cluster] = bytes(2 * cluster)
        assert image.read(0, image.size) == model
    assert_clean(path)
    assert_same(path, model)


def test_qcow2_preallocated_zero_clusters_are_freed_when_rewritten(qemu: None, tmp_path: Path) -> None:
    path = create(tmp_path / "disk.qcow2", 4 * MIB, extra=",preallocation=metadata")
    qemu_io(path, "write -P 7 0 4M", "write -z 64k 1M")  # zero flag over allocated clusters
    l2 = peek(path, l2_entry_offset(path, 64 * KIB), ">Q")
    assert l2 & OFLAG_ZERO and l2 & OFFSET_MASK
    model = bytearray(as_raw(path))
    with open_image(path) as image:
        assert image.read(64 * KIB, 1 * MIB) == bytes(1 * MIB)
        image.write(100 * KIB, b"x" * 100)
        model[100 * KIB : 100 * KIB + 100] = b"x" * 100
        image.write_zeroes(2 * MIB, 1 * MIB)
        model[2 * MIB : 3 * MIB] = bytes(1 * MIB)
    assert_clean(path)
    assert_same(path, model)


# --- qcow2: writing ----------------------------------------------------------------------------
@pytest.mark.parametrize("compat", ["0.10", "1.1"])
@pytest.mark.parametrize("cluster", [512, 4 * KIB, 64 * KIB, 2 * MIB])
def test_qcow2_writes_pass_qemu_img_check(qemu: None, tmp_path: Path, compat: str, cluster: int) -> None:
    rng = random.Random(cluster + len(compat))
    source = tmp_path / "source.raw"
    source.write_bytes(disk_content(rng, 6 * MIB))
    path = convert(source, tmp_path / "disk.qcow2", compat=compat, cluster=cluster)
    model = bytearray(source.read_bytes())
    with open_image(path) as image:
        apply_writes(image, model, rng, 40, max_length=300 * KIB)
        for _ in range(6):
            offset = rng.randrange(image.size)
            n = min(rng.randrange(1, 1 * MIB), image.size - offset)
            image.discard(offset, n)  # whole clusters: unallocated, read as zeros
            first, stop = -(-offset // cluster) * cluster, (offset + n) // cluster * cluster
            model[first:stop] = bytes(max(0, stop - first))
        image.flush()
        check_reads(image, bytes(model), rng, count=10)
    assert_clean(path)
    assert_same(path, model)
    with open_image(path) as image:  # and again, after reopening
        apply_writes(image, model, rng, 10, max_length=100 * KIB)
    assert_clean(path)
    assert_same(path, model)


@pytest.mark.parametrize(("cluster", "refcount_bits", "written"), [(512, 64, 4 * MIB), (512, 16, 10 * MIB),
                                                                   (1 * KIB, 64, 20 * MIB)])  # fmt: skip
def test_qcow2_refcount_table_grows(qemu: None, tmp_path: Path, cluster: int, refcount_bits: int,
                                    written: int) -> None:  # fmt: skip
    """Enough new clusters to need new refcount blocks and a larger refcount table."""
    path = create(tmp_path / "disk.qcow2", written, cluster=cluster, refcount_bits=refcount_bits)
    before = header(path)
    rng = random.Random(3)
    model = bytearray(written)
    with open_image(path) as image:
        for offset in range(0, written, 256 * KIB):
            data = rng.randbytes(256 * KIB)
            image.write(offset, data)
            model[offset : offset + len(data)] = data
    after = header(path)
    assert after.reftable_clusters > before.reftable_clusters
    assert after.reftable_offset != before.reftable_offset
    assert_clean(path)
    assert_same(path, model)


@pytest.mark.parametrize("refcount_bits", [1, 2, 4, 8, 32, 64])
def test_qcow2_every_refcount_width(qemu: None, tmp_path: Path, refcount_bits: int) -> None:
    path = create(tmp_path / "disk.qcow2", 3 * MIB, cluster=4 * KIB, refcount_bits=refcount_bits)
    rng = random.Random(refcount_bits)
    model = bytearray(3 * MIB)
    with open_image(path) as image:
        apply_writes(image, model, rng, 30, max_length=200 * KIB)
        image.discard(0, 1 * MIB)
        model[: 1 * MIB] = bytes(1 * MIB)
        apply_writes(image, model, rng, 10, max_length=200 * KIB)  # reuses the freed clusters
    assert_clean(path)
    assert_same(path, model)


@pytest.mark.parametrize("compat", ["0.10", "1.1"])
@pytest.mark.parametrize("backing_fmt", ["raw", "qcow2"])
def test_qcow2_backing_file_read_and_copy_on_write(qemu: None, tmp_path: Path, compat: str,
                                                   backing_fmt: str) -> None:  # fmt: skip
    rng = random.Random(11)
    cluster = 4 * KIB
    base_raw = tmp_path / "base.raw"
    base_raw.write_bytes(disk_content(rng, 3 * MIB))
    base = base_raw if backing_fmt == "raw" else convert(base_raw, tmp_path / "base.qcow2", cluster=16 * KIB)
    overlay = create(tmp_path / "overlay.qcow2", 4 * MIB, compat=compat, cluster=cluster, backing=base,
                     backing_fmt=backing_fmt)  # fmt: skip  # larger than its backing file
    qemu_io(overlay, "write -P 0x11 8k 20k", "write -P 0x22 1M 64k")
    expected = as_raw(overlay)
    with open_image(overlay, readonly=True) as image:
        assert image.backing is not None and image.backing.format == backing_fmt
        check_reads(image, expected, rng)
    base_before = base.read_bytes()
    model = bytearray(expected)
    with open_image(overlay) as image:
        for offset, n in ((100, 10), (5 * cluster - 7, 20), (2 * MIB + 1, 3 * cluster), (3 * MIB - 5, 100)):
            data = rng.randbytes(n)  # partial clusters: the rest comes from the backing file
            image.write(offset, data)
            model[offset : offset + n] = data
        image.write_zeroes(200 * KIB, 64 * KIB)  # v3: zero clusters; v2: zeros written
        model[200 * KIB : 264 * KIB] = bytes(64 * KIB)
        image.write_zeroes(40 * KIB + 100, 10)
        model[40 * KIB + 100 : 40 * KIB + 110] = bytes(10)
        image.discard(500 * KIB, 64 * KIB)  # v3: zero clusters; v2: shows the backing file again
        model[500 * KIB : 564 * KIB] = bytes(64 * KIB) if compat == "1.1" else base_raw.read_bytes()[
            500 * KIB : 564 * KIB]  # fmt: skip
        image.discard(1 * MIB, 64 * KIB)
        model[1 * MIB : 1 * MIB + 64 * KIB] = (bytes(64 * KIB) if compat == "1.1"
                                                else base_raw.read_bytes()[1 * MIB : 1 * MIB + 64 * KIB])  # fmt: skip
        assert image.read(0, image.size) == model
    assert base.read_bytes() == base_before  # opened read-only, never written
    assert_clean(overlay)
    assert_same(overlay, model)


def test_qcow2_internal_snapshot_survives_writes(qemu: None, tmp_path: Path) -> None:
    """Clusters shared with a snapshot (refcount 2) are copied, never written in place."""
    rng = random.Random(13)
    source = tmp_path / "source.raw"
    source.write_bytes(disk_content(rng, 4 * MIB))
    path = convert(source, tmp_path / "disk.qcow2", cluster=4 * KIB)
    qemu_img("snapshot", "-c", "before", path)
    original = source.read_bytes()
    model = bytearray(original)
    with open_image(path) as image:
        apply_writes(image, model, rng, 40, max_length=100 * KIB)
        image.discard(1 * MIB, 512 * KIB)
        model[1 * MIB : 1 * MIB + 512 * KIB] = bytes(512 * KIB)
    assert_clean(path)
    assert_same(path, model)
    qemu_img("snapshot", "-a", "before", path)
    assert_clean(path)
    assert as_raw(path) == original


def test_qcow2_concurrent_requests_from_threads(qemu: None, tmp_path: Path) -> None:
    path = create(tmp_path / "disk.qcow2", 8 * MIB, cluster=4 * KIB)
    model = bytearray(8 * MIB)
    errors: list[BaseException] = []
    with open_image(path) as image:

        def worker(index: int) -> None:
            rng = random.Random(index)
            base = index * 2 * MIB
            try:
                for _ in range(60):
                    offset = base + rng.randrange(2 * MIB - 64 * KIB)
                    data = rng.randbytes(rng.randrange(1, 64 * KIB))
                    image.write(offset, data)
                    model[offset : offset + len(data)] = data
                    assert image.read(offset, len(data)) == data
            except BaseException as exc:  # reported below
                errors.append(exc)

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors
    assert_clean(path)
    assert_same(path, model)


def test_a_read_is_one_pread_per_contiguous_run(qemu: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What the benchmark's 64 KiB sequential and 4 KiB random reads cost in system calls."""
    source = tmp_path / "source.raw"
    source.write_bytes(random.Random(5).randbytes(4 * MIB))
    path = convert(source, tmp_path / "disk.qcow2", cluster=4 * KIB)
    calls: list[int] = []
    real_pread = os.pread

    def counting_pread(fd: int, n: int, offset: int) -> bytes:
        calls.append(n)
        return real_pread(fd, n, offset)

    for image in (open_image(source, format="raw", readonly=True), open_image(path, readonly=True)):
        with image:
            image.read(0, image.size)  # L2 tables are read once, then cached
            monkeypatch.setattr(os, "pread", counting_pread)
            for offset in (0, 64 * KIB, 3 * MIB + 4 * KIB):
                calls.clear()
                assert image.read(offset, 64 * KIB) == source.read_bytes()[offset : offset + 64 * KIB]
                assert calls == [64 * KIB]
                calls.clear()
                image.read(offset + 8 * KIB, 4 * KIB)
                assert calls == [4 * KIB]
            monkeypatch.undo()


# --- qcow2: the model-based test ---------------------------------------------------------------
_OP = st.sampled_from(["write", "write", "read", "discard", "zero"])
_OPS = st.lists(st.tuples(_OP, st.floats(0, 1), st.integers(1, 96 * KIB)), max_size=12)


@settings(max_examples=int(os.environ.get("TRIVMM_IMAGE_EXAMPLES", "30")), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])  # fmt: skip
@given(compat=st.sampled_from(["0.10", "1.1"]), cluster=st.sampled_from([512, 4 * KIB, 64 * KIB]),
       refcount_bits=st.sampled_from([1, 16, 64]), with_backing=st.booleans(),
       start=st.sampled_from(["empty", "data", "compressed"]), snapshot=st.booleans(), ops=_OPS,
       seed=st.integers(0, 1000))  # fmt: skip
def test_qcow2_random_requests_match_a_model(qemu: None, compat: str, cluster: int, refcount_bits: int,
                                             with_backing: bool, start: str, snapshot: bool,
                                             ops: list[tuple[str, float, int]], seed: int) -> None:  # fmt: skip
    """An image made by qemu-img -- empty, with data, or compressed; over a backing file or
    not; with an internal snapshot sharing its clusters or not -- then random requests."""
    rng = random.Random(seed)
    refcount_bits = refcount_bits if compat == "1.1" else 16  # version 2: 16 bits only
    size = 512 * KIB + 3 * SECTOR
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "disk.qcow2"
        backing = None
        base = bytes(size)
        if with_backing:
            backing = Path(tmp) / "base.raw"
            base = disk_content(rng, size - 64 * KIB) + bytes(64 * KIB)
            backing.write_bytes(base[: size - 64 * KIB])  # shorter than the overlay
        if start == "compressed" and backing is None:
            source = Path(tmp) / "source.raw"
            source.write_bytes(disk_content(rng, size))
            qemu_img("convert", "-f", "raw", "-O", "qcow2", "-c", "-o",
                     f"compat={compat},cluster_size={cluster},refcount_bits={refcount_bits}", source, path)  # fmt: skip
        else:
            create(path, size, compat=compat, cluster=cluster, refcount_bits=refcount_bits, backing=backing)
            if start != "empty":
                qemu_io(path, f"write -P 0x{rng.randrange(1, 256):x} {rng.randrange(size // 2)} 100k",
                        f"write -P 0x{rng.randrange(1, 256):x} {rng.randrange(size // 2)} 3k")  # fmt: skip
        if snapshot and refcount_bits > 1:
            qemu_img("snapshot", "-c", "s", path)
        model = bytearray(as_raw(path))
        with open_image(path) as image:
            for op, where, length in ops:
                offset = int(where * (size - 1))
                n = min(length, size - offset)
                if op == "write":
                    data = rng.randbytes(n)
                    image.write(offset, data)
                    model[offset : offset + n] = data
                elif op == "read":
                    assert image.read(offset, n) == model[offset : offset + n]
                elif op == "zero":
                    image.write_zeroes(offset, n)
                    model[offset : offset + n] = bytes(n)
                else:  # discard: whole clusters (the disk's last, short one included)
                    image.discard(offset, n)
                    first = -(-offset // cluster) * cluster
                    stop = size if offset + n == size else (offset + n) // cluster * cluster
                    if stop > first:
                        shows_backing = with_backing and compat == "0.10"
                        model[first:stop] = base[first:stop] if shows_backing else bytes(stop - first)
            assert image.read(0, size) == model
        assert_clean(path)
        assert_same(path, bytes(model))


# --- qcow2: refused features and hostile images ------------------------------------------------
@pytest.fixture
def small(qemu: None, tmp_path: Path) -> Path:
    """A 4 MiB v3 qcow2, 4 KiB clusters (2 MiB per L2 table), data in its first 64 KiB and at 3 MiB."""
    path = create(tmp_path / "small.qcow2", 4 * MIB, cluster=4 * KIB)
    qemu_io(path, "write -P 0x5a 0 64k", "write -P 0xa5 3M 4k")
    return path


def expect_open_error(path: Path, pattern: str, *, readonly: bool = False) -> None:
    with pytest.raises(ImageError, match=rf"{path.name}: .*{pattern}"):
        open_image(path, readonly=readonly).close()


@pytest.mark.parametrize(("options", "pattern"), [
    (",compression_type=zstd", "unsupported compression type zstd"),
    (",extended_l2=on", "unsupported feature: extended L2"),
    (",data_file={tmp}/disk.data", "unsupported feature: external data file"),
])  # fmt: skip
def test_qcow2_unsupported_features_refused(qemu: None, tmp_path: Path, options: str, pattern: str) -> None:
    path = create(tmp_path / "disk.qcow2", 1 * MIB, extra=options.format(tmp=tmp_path))
    expect_open_error(path, pattern, readonly=True)


@pytest.mark.parametrize(("offset", "fmt", "value", "pattern"), [
    (4, ">I", 1, "qcow version 1 images are unsupported"),
    (4, ">I", 4, "unsupported qcow2 version 4"),
    (20, ">I", 8, "cluster_bits 8 out of range"),
    (20, ">I", 22, "cluster_bits 22 out of range"),
    (32, ">I", 1, r"unsupported feature: encryption \(method 1\)"),
    (72, ">Q", 1 << 12, "unsupported incompatible features 0x1000"),
    (96, ">I", 7, "refcount_order 7 out of range"),
    (100, ">I", 96, "header_length 96 out of range"),
    (24, ">Q", 1 << 62, "virtual size .* too large"),
    (24, ">Q", 1 << 40, r"L1 table of \d+ entries too small for the virtual size"),
    (36, ">I", (32 << 20) // 8 + 1, "L1 table of .* entries is larger than 32 MiB"),
    (40, ">Q", 1 << 40, r"L1 table at 0x10000000000 .* lies past the end of the file"),
    (40, ">Q", 4096 + 8, "L1 table offset 0x1008 is not a cluster boundary"),
    (48, ">Q", 1 << 40, "refcount table at 0x10000000000 .* lies past the end"),
    (56, ">I", 0, "no refcount table"),
    (56, ">I", 1 << 20, "refcount table of 1048576 clusters is larger than 8 MiB"),
    (60, ">I", 1 << 20, "1048576 snapshots"),
])  # fmt: skip
def test_qcow2_hostile_header_fields(small: Path, offset: int, fmt: str, value: int, pattern: str) -> None:
    patch(small, offset, fmt, value)
    expect_open_error(small, pattern, readonly=True)


def test_qcow2_hostile_backing_file_names(small: Path) -> None:
    patch(small, 8, ">QI", 200, 2000)
    expect_open_error(small, r"backing file name too long \(2000 bytes")
    patch(small, 8, ">QI", 4000, 200)
    expect_open_error(small, "backing file name outside the header cluster")
    name = b'json:{"file.filename": "/etc/passwd"}'
    with small.open("r+b") as f:
        f.seek(2048)
        f.write(name)
    patch(small, 8, ">QI", 2048, len(name))
    expect_open_error(small, "unsupported backing file 'json:")


def test_qcow2_backing_chain_loops_and_depth(qemu: None, tmp_path: Path) -> None:
    a = create(tmp_path / "a.qcow2", 1 * MIB)
    b = create(tmp_path / "b.qcow2", 1 * MIB, backing=a, backing_fmt="qcow2")
    qemu_img("rebase", "-u", "-b", "b.qcow2", "-F", "qcow2", a)
    expect_open_error(b, "backing file loop", readonly=True)
    qemu_img("rebase", "-u", "-b", "b.qcow2", "-F", "qcow2", b)
    expect_open_error(b, "backing file loop", readonly=True)
    chain = [create(tmp_path / "c0.qcow2", 1 * MIB)]
    for i in range(1, 18):
        chain.append(create(tmp_path / f"c{i}.qcow2", 1 * MIB, backing=chain[-1], backing_fmt="qcow2"))
    with open_image(chain[16], readonly=True) as image:  # 16 backing files below it
        assert image.read(0, 4) == bytes(4)
    with pytest.raises(ImageError, match=r"c0.qcow2: backing chain deeper than 16 files"):
        open_image(chain[17], readonly=True)
    c = tmp_path / "c.qcow2"
    qemu_img("create", "-q", "-u", "-f", "qcow2", "-b", "missing.raw", "-F", "raw", c, "1M")
    with pytest.raises(ImageError, match=r"missing.raw: cannot open"):
        open_image(c, readonly=True)


def test_qcow2_backing_file_is_probed_with_the_same_rules(qemu: None, tmp_path: Path) -> None:
    base = tmp_path / "base.img"
    base.write_bytes(FOREIGN["QED"].ljust(1 * MIB, b"\0"))
    overlay = create(tmp_path / "overlay.qcow2", 1 * MIB, backing=base, backing_fmt="raw")
    with open_image(overlay, readonly=True) as image:  # the header says raw: its bytes
        assert image.read(0, 4) == b"QED\x00"
    with overlay.open("r+b") as f:  # no backing format extension: the backing file is probed
        head = f.read(4096)
        f.seek(head.index(struct.pack(">I", 0xE2792ACA)))
        f.write(struct.pack(">I", 0x12345678))  # an extension nobody knows
    with pytest.raises(ImageError, match=r"base.img: looks like a QED image"):
        open_image(overlay, readonly=True)


@pytest.mark.parametrize("bit", [0, 1])
def test_qcow2_dirty_or_corrupt_images_open_read_only_only(small: Path, bit: int) -> None:
    patch(small, 72, ">Q", 1 << bit)
    expect_open_error(small, "dirty" if bit == 0 else "flagged corrupt")
    with open_image(small, readonly=True) as image:
        assert image.read(0, 4) == b"\x5a" * 4


def test_qcow2_images_with_persistent_bitmaps_open_read_only_only(small: Path) -> None:
    qemu_img("bitmap", "--add", small, "b0")
    expect_open_error(small, "persistent dirty bitmaps")
    with open_image(small, readonly=True) as image:
        assert image.read(0, 4) == b"\x5a" * 4
    assert_clean(small)


def test_qcow2_hostile_l1_entries_fail_at_request_time(small: Path) -> None:
    entry = l1_entry_offset(small, 0)
    good = peek(small, entry, ">Q")
    for value, pattern in ((good + 512, "L2 table offset 0x[0-9a-f]+ is not cluster-aligned"),
                           ((1 << 40) | OFLAG_COPIED, "L2 table at 0x10000000000 lies past the end")):  # fmt: skip
        patch(small, entry, ">Q", value)
        with open_image(small, readonly=True) as image:
            with pytest.raises(ImageError, match=pattern):
                image.read(0, 512)
            assert image.read(3 * MIB, 4) == b"\xa5" * 4  # another L2 table: fine
        expect_open_error(small, pattern)  # a read-write open checks every L2 table first


@pytest.mark.parametrize(("value", "pattern"), [
    ((1 << 40) | OFLAG_COPIED, "data cluster at 0x10000000000 lies past the end of the file"),
    (0x10200 | OFLAG_COPIED, "data cluster offset 0x10200 is not cluster-aligned"),
    (OFLAG_COMPRESSED | (1 << 40), "compressed cluster at 0x10000000000 lies past the end"),
])  # fmt: skip
def test_qcow2_hostile_l2_entries_fail_at_request_time(small: Path, value: int, pattern: str) -> None:
    patch(small, l2_entry_offset(small, 8 * KIB), ">Q", value)
    with open_image(small) as image:
        with pytest.raises(ImageError, match=pattern):
            image.read(8 * KIB, 4 * KIB)
        assert image.read(0, 8 * KIB) == b"\x5a" * 8 * KIB
        with pytest.raises(ImageError, match=pattern):
            image.write(8 * KIB + 100, b"data")


def test_qcow2_corrupt_compressed_data_is_an_error(qemu: None, tmp_path: Path) -> None:
    source = tmp_path / "source.raw"
    source.write_bytes(bytes([7]) * 256 * KIB)
    path = convert(source, tmp_path / "disk.qcow2", cluster=64 * KIB, compress=True)
    entry = peek(path, l2_entry_offset(path, 0), ">Q")
    assert entry & OFLAG_COMPRESSED
    host = entry & ((1 << 62 - 8) - 1)
    patch(path, host, ">Q", 0xFFFF_FFFF_FFFF_FFFF)
    with open_image(path, readonly=True) as image:
        with pytest.raises(ImageError, match=r"compressed cluster at 0x[0-9a-f]+ is corrupt"):
            image.read(0, 512)


def test_qcow2_zero_flag_in_a_version_2_image_is_an_error(qemu: None, tmp_path: Path) -> None:
    path = create(tmp_path / "disk.qcow2", 1 * MIB, compat="0.10", cluster=4 * KIB)
    qemu_io(path, "write -P 1 0 4k")
    patch(path, l2_entry_offset(path, 0), ">Q", OFLAG_ZERO)
    with open_image(path, readonly=True) as image, pytest.raises(ImageError, match=r"zero-cluster flag in a version 2"):
        image.read(0, 512)


@pytest.mark.parametrize(("target", "flags"), [
    (target, flags)
    for target in ("header", "L1 table", "refcount table", "refcount block", "L2 table")
    for flags in (OFLAG_COPIED, 0, OFLAG_COMPRESSED)
    if target != "header" or flags == OFLAG_COMPRESSED  # a standard entry with host offset 0 is unallocated
])  # fmt: skip
def test_qcow2_write_through_an_l2_entry_at_metadata_is_refused(small: Path, target: str, flags: int) -> None:
    """Whatever an L2 entry says -- in place (COPIED), copy-on-write, compressed -- a write
    never lands in, nor drops a reference to, a metadata cluster."""
    h = header(small)
    host = {"header": 0, "L1 table": h.l1_offset, "refcount table": h.reftable_offset,
            "refcount block": peek(small, h.reftable_offset, ">Q"),
            "L2 table": peek(small, l1_entry_offset(small, 0), ">Q") & OFFSET_MASK}[target]  # fmt: skip
    patch(small, l2_entry_offset(small, 8 * KIB), ">Q", host | flags)
    before = small.read_bytes()
    with open_image(small) as image:
        if flags != OFLAG_COMPRESSED:
            assert len(image.read(8 * KIB, 4 * KIB)) == 4 * KIB  # reading its own file is harmless
        with pytest.raises(ImageError, match=f"points at the {target} .* write refused"):
            image.write(8 * KIB, b"\xff" * 4 * KIB)
        with pytest.raises(ImageError, match=r"writes refused after an earlier failure"):
            image.write(0, b"x")
        assert image.read(0, 4) == b"\x5a" * 4
    assert small.read_bytes() == before


def test_qcow2_overlapping_metadata_refuses_a_read_write_open(small: Path) -> None:
    h = header(small)
    patch(small, l1_entry_offset(small, 0), ">Q", h.reftable_offset | OFLAG_COPIED)
    expect_open_error(small, "the L2 table at 0x[0-9a-f]+ overlaps the refcount table")
    with open_image(small, readonly=True) as image:  # reading garbage from its own file is harmless
        image.read(0, 4 * KIB)


def test_qcow2_refcount_table_entries_are_checked(small: Path) -> None:
    h = header(small)
    patch(small, h.reftable_offset, ">Q", 1 << 40)
    expect_open_error(small, "refcount block at 0x10000000000 lies past the end")
    patch(small, h.reftable_offset, ">Q", 4096 + 512)
    expect_open_error(small, "refcount block offset 0x1200 is not cluster-aligned")
    with open_image(small, readonly=True) as image:  # reads need no refcounts
        assert image.read(0, 4) == b"\x5a" * 4


def test_qcow2_data_cluster_with_refcount_zero_is_not_written(small: Path) -> None:
    host = peek(small, l2_entry_offset(small, 0), ">Q") & OFFSET_MASK
    h = header(small)
    block = peek(small, h.reftable_offset, ">Q")
    patch(small, block + 2 * (host >> h.cluster_bits), ">H", 0)
    with open_image(small) as image, pytest.raises(ImageError, match=r"has refcount 0"):
        image.write(0, b"x")


def test_qcow2_snapshot_table_is_checked(small: Path) -> None:
    qemu_img("snapshot", "-c", "s", small)
    h = header(small)
    patch(small, h.snapshots_offset, ">QI", 1 << 40, 1)
    expect_open_error(small, "snapshot 0 L1 table at 0x10000000000")
    patch(small, 64, ">Q", 1 << 40)
    expect_open_error(small, "snapshot table at 0x10000000000", readonly=True)


# --- VMDK --------------------------------------------------------------------------------------
SUBFORMATS = ["monolithicSparse", "streamOptimized", "monolithicFlat", "twoGbMaxExtentSparse", "twoGbMaxExtentFlat"]


@pytest.fixture(scope="module")
def vmdk_source() -> bytes:
    return disk_content(random.Random(21), 3 * MIB + 5 * SECTOR)


@pytest.mark.parametrize("subformat", SUBFORMATS)
def test_vmdk_reads_what_qemu_img_wrote(qemu: None, tmp_path: Path, vmdk_source: bytes, subformat: str) -> None:
    source = tmp_path / "source.raw"
    source.write_bytes(vmdk_source)
    path = tmp_path / "disk.vmdk"
    qemu_img("convert", "-f", "raw", "-O", "vmdk", "-o", f"subformat={subformat}", source, path)
    expected = as_raw(path)
    assert expected[: len(vmdk_source)] == vmdk_source
    with open_image(path, readonly=True) as image:
        assert image.format == "vmdk" and image.readonly
        check_reads(image, expected, random.Random(1))
    expect_open_error(path, "VMDK images are read-only in trivmm")


def test_vmdk_stream_optimized_with_the_directory_in_the_footer(qemu: None, tmp_path: Path,
                                                                 vmdk_source: bytes) -> None:  # fmt: skip
    path = tmp_path / "stream.vmdk"
    path.write_bytes(stream_optimized_vmdk(vmdk_source, path.name))
    assert as_raw(path) == vmdk_source  # qemu-img agrees with the writer
    with open_image(path, readonly=True) as image:
        check_reads(image, vmdk_source, random.Random(2))


@pytest.fixture
def sparse_vmdk(qemu: None, tmp_path: Path) -> Iterator[Path]:
    source = tmp_path / "source.raw"
    source.write_bytes(bytes([9]) * 1 * MIB)
    path = tmp_path / "disk.vmdk"
    qemu_img("convert", "-f", "raw", "-O", "vmdk", "-o", "subformat=monolithicSparse", source, path)
    yield path


def _gd_offset(path: Path) -> int:
    return peek(path, 56, "<Q") * SECTOR


@pytest.mark.parametrize(("offset", "fmt", "value", "pattern"), [
    (4, "<I", 4, "unsupported VMDK sparse extent version 4"),
    (20, "<Q", 0, "grain size of 0 sectors out of range"),
    (20, "<Q", 8192, "grain size of 8192 sectors out of range"),
    (44, "<I", 0, "0 entries per grain table out of range"),
    (44, "<I", 4096, "4096 entries per grain table out of range"),
    (56, "<Q", 1 << 30, "grain directory at sector 1073741824 lies outside the file"),
    (12, "<Q", 1 << 60, "capacity of .* sectors too large"),
    (73, "<4s", b"\n \n\n", "newline check fails"),
    (77, "<H", 2, "unsupported compression algorithm 2"),
])  # fmt: skip
def test_vmdk_hostile_headers(sparse_vmdk: Path, offset: int, fmt: str, value: int | bytes, pattern: str) -> None:
    patch(sparse_vmdk, offset, fmt, value)
    expect_open_error(sparse_vmdk, pattern, readonly=True)


def test_vmdk_hostile_tables_fail_at_request_time(sparse_vmdk: Path) -> None:
    gd = _gd_offset(sparse_vmdk)
    gt = peek(sparse_vmdk, gd, "<I") * SECTOR
    patch(sparse_vmdk, gt + 4, "<I", 1 << 28)  # grain 1 far past the end
    with open_image(sparse_vmdk, readonly=True) as image:
        assert image.read(0, 64 * KIB) == bytes([9]) * 64 * KIB
        with pytest.raises(ImageError, match=r"grain at sector 268435456 lies past the end"):
            image.read(64 * KIB, 512)
    patch(sparse_vmdk, gd, "<I", 1 << 28)  # grain table 0 far past the end
    with open_image(sparse_vmdk, readonly=True) as image:
        with pytest.raises(ImageError, match=r"grain table at sector 268435456 lies past the end"):
            image.read(0, 512)


def test_vmdk_hostile_compressed_grains(qemu: None, tmp_path: Path) -> None:
    data = bytes([3]) * 256 * KIB
    path = tmp_path / "stream.vmdk"
    path.write_bytes(stream_optimized_vmdk(data, path.name))
    first_grain = 2 * SECTOR  # header and descriptor before it
    patch(path, first_grain + 8, "<I", 1 << 30)
    with open_image(path, readonly=True) as image, pytest.raises(ImageError, match=r"bad size 1073741824"):
        image.read(0, 512)
    patch(path, first_grain + 8, "<I", 100)
    patch(path, first_grain + 12, "<Q", 0xFFFF_FFFF_FFFF_FFFF)
    with open_image(path, readonly=True) as image, pytest.raises(ImageError, match=r"is corrupt"):
        image.read(0, 512)
    path.write_bytes(path.read_bytes()[:-SECTOR])  # no end-of-stream marker: no footer found
    expect_open_error(path, "no valid footer", readonly=True)


@pytest.mark.parametrize(("extent", "pattern"), [
    ('RW 2048 FLAT "/etc/passwd" 0', "extent file '/etc/passwd' lies outside the descriptor's directory"),
    ('RW 2048 FLAT "../x-flat.vmdk" 0', "extent file '../x-flat.vmdk' lies outside"),
    ('RW 2048 VMFS "x-flat.vmdk"', "unsupported extent type RW VMFS"),
    ('RW 4096 FLAT "x-flat.vmdk" 0', r"flat extent needs 2097152 bytes, the file has 1048576"),
    ('RW 2048 FLAT "missing.vmdk" 0', "missing.vmdk: cannot open"),
])  # fmt: skip
def test_vmdk_hostile_descriptors(tmp_path: Path, extent: str, pattern: str) -> None:
    (tmp_path / "x-flat.vmdk").write_bytes(bytes(1 * MIB))
    path = tmp_path / "x.vmdk"
    path.write_text(f'# Disk DescriptorFile\nversion=1\nparentCID=ffffffff\ncreateType="monolithicFlat"\n{extent}\n')
    with pytest.raises(ImageError, match=pattern):
        open_image(path, readonly=True)


def test_vmdk_descriptor_with_zero_and_flat_extents(tmp_path: Path) -> None:
    (tmp_path / "a-flat.vmdk").write_bytes(bytes(512) + b"A" * 1024)
    (tmp_path / "b-flat.vmdk").write_bytes(b"B" * 512)
    path = tmp_path / "x.vmdk"
    path.write_text('# Disk DescriptorFile\nversion=1\nCID=1\nparentCID=ffffffff\ncreateType="custom"\n'
                    'RW 2 FLAT "a-flat.vmdk" 1\nRW 3 ZERO\nRDONLY 1 FLAT "b-flat.vmdk" 0\n')  # fmt: skip
    with open_image(path, readonly=True) as image:
        assert image.size == 6 * SECTOR
        assert image.read(0, image.size) == b"A" * 1024 + bytes(1536) + b"B" * 512
        assert image.read(1000, 100) == b"A" * 24 + bytes(76)


def test_vmdk_delta_disks_and_extents_of_split_disks_are_refused(qemu: None, tmp_path: Path) -> None:
    path = tmp_path / "d.vmdk"
    path.write_text('# Disk DescriptorFile\nversion=1\nparentCID=1234abcd\ncreateType="monolithicFlat"\n'
                    'parentFileNameHint="base.vmdk"\nRW 1 ZERO\n')  # fmt: skip
    expect_open_error(path, "with a parent", readonly=True)
    source = tmp_path / "source.raw"
    source.write_bytes(bytes(1 * MIB))
    # A sparse extent whose embedded descriptor says it is one extent of a split disk
    descriptor = b'# Disk DescriptorFile\nparentCID=ffffffff\ncreateType="twoGbMaxExtentSparse"\n'
    other = tmp_path / "o.vmdk"
    qemu_img("convert", "-f", "raw", "-O", "vmdk", "-o", "subformat=monolithicSparse", source, other)
    desc_at = peek(other, 28, "<Q") * SECTOR
    with other.open("r+b") as f:
        f.seek(desc_at)
        f.write(descriptor.ljust(SECTOR, b"\0"))
    expect_open_error(other, "a sparse extent of a twoGbMaxExtentSparse disk", readonly=True)


def test_vmdk_size_limits(tmp_path: Path) -> None:
    path = tmp_path / "x.vmdk"
    path.write_bytes(b"# Disk DescriptorFile\n" + b"#" * (2 * MIB))
    expect_open_error(path, "descriptor file of .* bytes is too large", readonly=True)
    path.write_text("# Disk DescriptorFile\n" + "RW 1 ZERO\n" * 1025)
    expect_open_error(path, "1025 extents", readonly=True)
    path.write_text("# Disk DescriptorFile\nversion=1\n")
    expect_open_error(path, "descriptor names no extents", readonly=True)


def test_no_file_descriptor_leaks_on_failed_opens(qemu: None, tmp_path: Path) -> None:
    before = len(os.listdir("/proc/self/fd"))
    bad = tmp_path / "bad.qcow2"
    create(bad, 1 * MIB)
    patch(bad, 96, ">I", 7)
    for _ in range(5):
        with pytest.raises(ImageError):
            open_image(bad)
        with pytest.raises(ImageError):
            open_image(bad, format="vmdk", readonly=True)
    assert len(os.listdir("/proc/self/fd")) == before
