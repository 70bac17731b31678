"""Build the Debian-based test guests into a cache directory.

``python -m trivmm guest build`` makes, from Debian 12 packages only:

* ``small/``: a small kernel built from Debian's ``linux-source-6.1`` with the config
  fragment beside this file (``small-kernel.config``): ``vmlinux`` and ``bzImage``;
* ``stock/``: the stock cloud kernel (``linux-image-cloud-amd64``): its ``bzImage``, the
  ``vmlinux`` unpacked from it, and its virtio modules;
* for each, an uncompressed busybox-static initramfs (``initramfs.cpio``) whose ``/init``
  (``init.sh`` here) prints ``TRIVMM-INIT-OK cpus=N`` and powers off.

The initramfs is left uncompressed on purpose: on a nested KVM that emulates guest kernel
code, gunzip inside the guest costs about a minute. Everything is keyed by the inputs'
digest, so a second run is a no-op.
"""

from __future__ import annotations

import hashlib
import lzma
import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from trivmm.boot.bzimage import extract_vmlinux
from trivmm.guest.cpio import CpioEntry, write_newc

__all__ = ["GuestBuildError", "build_guests", "default_cache_dir", "INIT_MARKER"]

INIT_MARKER = "TRIVMM-INIT-OK"

_HERE = Path(__file__).parent
_SMALL_CONFIG = _HERE / "small-kernel.config"
_INIT_SCRIPT = _HERE / "init.sh"
_VSOCK_HELPER = _HERE / "vsock_helper.c"  # the guest's end of the virtio-vsock tests, built static
_HELPER_BUILD_PACKAGES = ["gcc", "libc6-dev", "linux-libc-dev"]
_LINUX_SOURCE_PACKAGE = "linux-source-6.1"
_LINUX_SOURCE_TARBALL = Path("/usr/src/linux-source-6.1.tar.xz")
_KERNEL_BUILD_PACKAGES = ["flex", "bison", "bc", "libelf-dev", "libssl-dev", "make", "gcc", "lz4"]
_STOCK_META_PACKAGE = "linux-image-cloud-amd64"
_BUSYBOX = Path("/bin/busybox")
# The stock kernel's drivers for trivmm's devices, in load order (modinfo "depends").
_STOCK_MODULES = ["virtio_ring", "virtio", "virtio_pci_legacy_dev", "virtio_pci_modern_dev", "virtio_pci",
                  "virtio_mmio", "virtio_blk", "failover", "net_failover",
                  "virtio_net", "vsock", "vmw_vsock_virtio_transport_common",
                  "vmw_vsock_virtio_transport", "virtio_rng",
                  "pvpanic", "pvpanic_mmio"]  # pvpanic: a panic ends the VM (QEMU0001 in the DSDT)  # fmt: skip


class GuestBuildError(Exception):
    """A step of the guest build failed; the message says which and why."""


def default_cache_dir() -> Path:
    env = os.environ.get("TRIVMM_GUEST_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "trivmm" / "guests"


def _log(message: str) -> None:
    print(f"[guest build] {message}", file=sys.stderr, flush=True)


def _run(argv: list[str], **kwargs: object) -> None:
    try:
        subprocess.run(argv, check=True, **kwargs)  # type: ignore[call-overload]
    except FileNotFoundError as exc:
        raise GuestBuildError(f"{argv[0]}: not found") from exc
    except subprocess.CalledProcessError as exc:
        raise GuestBuildError(f"{' '.join(argv[:3])} ... failed with status {exc.returncode}") from exc


def _missing_packages(names: list[str]) -> list[str]:
    missing = []
    for name in names:
        probe = subprocess.run(["dpkg-query", "-W", "-f=${Status}", name],
                               capture_output=True, text=True)  # fmt: skip
        if "install ok installed" not in probe.stdout:
            missing.append(name)
    return missing


def ensure_debian_packages(names: list[str]) -> None:
    """Install the Debian packages in ``names`` that are missing (needs root and apt)."""
    missing = _missing_packages(names)
    if not missing:
        return
    _log(f"installing Debian packages: {' '.join(missing)}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    argv = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing]
    if subprocess.run(argv, env=env).returncode != 0:
        _run(["apt-get", "update", "-q"], env=env)
        _run(argv, env=env)


def _digest(*parts: bytes) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(hashlib.sha256(part).digest())
    return h.hexdigest()[:16]


def _vsock_helper(cache: Path) -> bytes:
    """``vsock_helper`` (``vsock_helper.c`` beside this file) compiled static, cached by the
    digest of its source."""
    source = _VSOCK_HELPER.read_bytes()
    out = cache / "helpers" / f"vsock_helper-{_digest(source)}"
    if not out.exists():
        ensure_debian_packages(_HELPER_BUILD_PACKAGES)
        out.parent.mkdir(parents=True, exist_ok=True)
        partial = out.with_name(out.name + ".partial")
        _log("compiling vsock_helper")
        _run(["gcc", "-static", "-Os", "-s", "-o", str(partial), str(_VSOCK_HELPER)])
        partial.replace(out)
    return out.read_bytes()


def _initramfs(init_script: bytes, modules: Sequence[tuple[str, bytes]] = (),
               programs: Sequence[tuple[str, bytes]] = ()) -> bytes:  # fmt: skip
    """An uncompressed newc initramfs: busybox, /init, device nodes and kernel modules.

    Only /bin/sh links to busybox; /init calls every applet as `busybox <applet>`, and
    installs the links only when asked for an interactive shell. Measured on the nested
    host: 270 applet links cost ~13 s to unpack (each is kernel work at emulated CPL0)."""
    entries = [CpioEntry.directory(d) for d in ("bin", "sbin", "dev", "proc", "sys", "tmp",
                                                "lib", "lib/modules", "usr", "usr/bin", "usr/sbin")]  # fmt: skip
    entries += [
        CpioEntry.char_device("dev/console", 5, 1),
        CpioEntry.char_device("dev/null", 1, 3, 0o666),
        CpioEntry.file("bin/busybox", _BUSYBOX.read_bytes(), 0o755),
        CpioEntry.symlink("bin/sh", "busybox"),
        CpioEntry.file("init", init_script, 0o755),
    ]
    entries += [CpioEntry.file(f"lib/modules/{i:02d}-{name}.ko", data)
                for i, (name, data) in enumerate(modules)]  # fmt: skip
    entries += [CpioEntry.file(f"bin/{name}", data, 0o755) for name, data in programs]
    return write_newc(entries)


def build_small(cache: Path, jobs: int) -> Path:
    """Build the small kernel from Debian's linux-source; return its directory."""
    ensure_debian_packages([_LINUX_SOURCE_PACKAGE, "busybox-static", "xz-utils",
                            *_KERNEL_BUILD_PACKAGES])  # fmt: skip
    fragment = _SMALL_CONFIG.read_bytes()
    tarball_id = str(_LINUX_SOURCE_TARBALL.stat().st_size).encode()
    key = _digest(fragment, tarball_id)
    out = cache / "small"
    stamp = out / "kernel.key"
    if stamp.exists() and stamp.read_text() == key and (out / "vmlinux").exists():
        _log(f"small kernel up to date in {out}")
    else:
        src = cache / "src" / "linux-source-6.1"
        if not (src / "Makefile").exists():
            _log(f"unpacking {_LINUX_SOURCE_TARBALL} (about a minute)")
            (cache / "src").mkdir(parents=True, exist_ok=True)
            _run(["tar", "-xf", str(_LINUX_SOURCE_TARBALL), "-C", str(cache / "src")])
        _log(f"configuring and building the small kernel with -j{jobs} (several minutes)")
        (src / "trivmm.config").write_bytes(fragment)
        quiet = {"stdout": subprocess.DEVNULL}
        _run(["make", "-C", str(src), "tinyconfig"], **quiet)
        _run([str(src / "scripts/kconfig/merge_config.sh"), "-m", "-O", str(src),
              str(src / ".config"), str(src / "trivmm.config")], cwd=src, **quiet)  # fmt: skip
        _run(["make", "-C", str(src), "olddefconfig"], **quiet)
        _run(["make", "-C", str(src), f"-j{jobs}", "bzImage"], **quiet)
        out.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src / "vmlinux", out / "vmlinux")
        shutil.copyfile(src / "arch/x86/boot/bzImage", out / "bzImage")
        shutil.copyfile(src / ".config", out / "config")
        shutil.copyfile(src / "System.map", out / "System.map")
        stamp.write_text(key)
    programs = [("vsock_helper", _vsock_helper(cache))]
    (out / "initramfs.cpio").write_bytes(_initramfs(_INIT_SCRIPT.read_bytes(), programs=programs))
    return out


def _decompress_module(path: Path) -> bytes:
    data = path.read_bytes()
    return lzma.decompress(data) if path.suffix == ".xz" else data


def build_stock(cache: Path) -> Path:
    """Fetch and unpack Debian's stock cloud kernel; return its directory."""
    ensure_debian_packages(["busybox-static", *_HELPER_BUILD_PACKAGES])  # the payload is unpacked in process
    out = cache / "stock"
    work = cache / "stock-deb"
    depends = subprocess.run(["apt-cache", "depends", _STOCK_META_PACKAGE],
                             capture_output=True, text=True).stdout  # fmt: skip
    images = [line.split(":", 1)[1].strip() for line in depends.splitlines()
              if line.strip().startswith("Depends:") and "linux-image-" in line]  # fmt: skip
    if not images:
        raise GuestBuildError(f"apt-cache knows no image behind {_STOCK_META_PACKAGE} (run apt-get update)")
    package = images[0]
    stamp = out / "package"
    wanted = ",".join(_STOCK_MODULES)
    if not (out / "vmlinux").exists() or not stamp.exists() or stamp.read_text() != f"{package} {wanted}":
        _log(f"downloading {package}")
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        _run(["apt-get", "download", "-q", package], cwd=work)
        deb = next(work.glob("*.deb"))
        _run(["dpkg-deb", "-x", str(deb), str(work / "root")])
        out.mkdir(parents=True, exist_ok=True)
        vmlinuz = next((work / "root/boot").glob("vmlinuz-*"))
        shutil.copyfile(vmlinuz, out / "bzImage")
        (out / "vmlinux").write_bytes(extract_vmlinux(vmlinuz.read_bytes()))
        # (Debian's System.map here is a placeholder pointing at the -dbg package.)
        shutil.copyfile(next((work / "root/boot").glob("config-*")), out / "config")
        moddir = out / "modules"
        moddir.mkdir(exist_ok=True)
        for ko in (work / "root/lib/modules").rglob("*.ko*"):
            stem = ko.name.split(".ko")[0].replace("-", "_")
            if stem in _STOCK_MODULES:
                (moddir / f"{stem}.ko").write_bytes(_decompress_module(ko))
        stamp.write_text(f"{package} {wanted}")
        shutil.rmtree(work, ignore_errors=True)
    modules = [(name, (out / "modules" / f"{name}.ko").read_bytes())
               for name in _STOCK_MODULES if (out / "modules" / f"{name}.ko").exists()]  # fmt: skip
    programs = [("vsock_helper", _vsock_helper(cache))]
    (out / "initramfs.cpio").write_bytes(_initramfs(_INIT_SCRIPT.read_bytes(), modules, programs))
    return out


def build_guests(cache: Path | None = None, *, small: bool = True, stock: bool = True,
                 jobs: int | None = None) -> dict[str, Path]:  # fmt: skip
    """Build the requested guests; return {"small": dir, "stock": dir}."""
    cache = cache or default_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    jobs = jobs or os.cpu_count() or 1
    built: dict[str, Path] = {}
    if small:
        built["small"] = build_small(cache, jobs)
    if stock:
        built["stock"] = build_stock(cache)
    return built
