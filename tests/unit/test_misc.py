from __future__ import annotations

import stat
import subprocess
import sys

import pytest

from trivmm.config import VmConfig, parse_size
from trivmm.cpu.templates import LINUX_CLEARCPUID_MAX, TEMPLATES, CpuidBits, CpuTemplate, detect_host_template
from trivmm.errors import ConfigError
from trivmm.guest.cpio import CpioEntry, write_newc
from trivmm.kvm.system import CpuidEntry


def test_newc_archive_layout() -> None:
    archive = write_newc([CpioEntry.directory("bin"), CpioEntry.file("init", b"#!/bin/sh\n", 0o755),
                          CpioEntry.symlink("bin/sh", "busybox")])  # fmt: skip
    assert archive.startswith(b"070701") and len(archive) % 4 == 0
    assert b"TRAILER!!!\0" in archive and b"#!/bin/sh\n" in archive
    header = archive[:110]
    mode = int(header[14:22], 16)
    assert stat.S_ISDIR(mode)
    # name size field counts the NUL; file size of the directory is 0
    assert int(header[94:102], 16) == len(b"bin\0") and int(header[54:62], 16) == 0


def test_cpio_refuses_empty_names() -> None:
    with pytest.raises(ValueError):
        write_newc([CpioEntry.file("/", b"")])


def test_templates_clear_bits_and_fit_linux_limits() -> None:
    entries = [CpuidEntry(1, 0, 0, 0, 0, 0xFFFFFFFF, 0), CpuidEntry(0xD, 0, 0, 1, 1, 1, 1),
               CpuidEntry(0x40000001, 0, 0, 0xFFFFFFFF, 0, 0, 0)]  # fmt: skip
    nested = TEMPLATES["nested-pvm"].apply(entries)
    leaf1 = next(e for e in nested if e.function == 1)
    assert not leaf1.ecx & (1 << 13)  # CX16
    assert not leaf1.ecx & (1 << 26)  # XSAVE
    assert leaf1.ecx & 1  # SSE3 stays
    assert all(e.function != 0xD for e in nested)
    kvm_features = next(e for e in nested if e.function == 0x40000001)
    assert kvm_features.eax == (1 << 0) | (1 << 3) | (1 << 24)
    assert TEMPLATES["host"].apply(entries) == entries
    for template in TEMPLATES.values():
        for option in template.linux_cmdline:
            if option.startswith("clearcpuid="):
                assert len(option.split("=", 1)[1]) <= LINUX_CLEARCPUID_MAX


def test_template_subleaf_selection() -> None:
    t = CpuTemplate("t", "", clear=(CpuidBits(7, "ebx", 0xF, index=0),))
    out = t.apply([CpuidEntry(7, 0, 0, 0, 0xFF, 0, 0), CpuidEntry(7, 1, 0, 0, 0xFF, 0, 0)])
    assert [e.ebx for e in out] == [0xF0, 0xFF]


def test_host_detection(tmp_path) -> None:  # type: ignore[no-untyped-def]
    assert detect_host_template(tmp_path / "absent").name == "host"
    assert detect_host_template(tmp_path).name == "nested-pvm"


@pytest.mark.parametrize(("text", "value"), [("128M", 128 << 20), ("1G", 1 << 30), ("512", 512 << 20),
                                             ("64MiB", 64 << 20), ("4096K", 4 << 20)])  # fmt: skip
def test_parse_size(text: str, value: int) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize("kwargs", [{"memory": "1X"}, {"memory": "1M"}, {"memory": 4097 << 10},
                                    {"vcpus": 0}, {"vcpus": 1000}, {"boot_protocol": "bogus"},
                                    {"cpu_template": "no-such-cpu"}])  # fmt: skip
def test_bad_config_is_refused(kwargs: dict) -> None:  # type: ignore[type-arg]
    with pytest.raises(ConfigError):
        VmConfig(**kwargs)


def test_missing_and_empty_files_are_config_errors(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ConfigError, match="cannot read kernel"):
        VmConfig(kernel=tmp_path / "none").read_kernel()
    (tmp_path / "empty").write_bytes(b"")
    with pytest.raises(ConfigError, match="empty"):
        VmConfig(initrd=tmp_path / "empty").read_initrd()


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "trivmm", *args], capture_output=True, text=True, timeout=60)


def test_cli_help_lists_every_run_option() -> None:
    out = _cli("run", "--help").stdout
    for option in ("--kernel", "--initrd", "--append", "--memory", "--vcpus", "--cpu-template", "--boot-protocol"):
        assert option in out


def test_cli_bad_input_is_one_line_and_status_2(tmp_path) -> None:  # type: ignore[no-untyped-def]
    not_a_kernel = tmp_path / "notes.txt"
    not_a_kernel.write_text("hello\n" * 200)
    cases = [(["--kernel", str(not_a_kernel)], "not a bzImage or an ELF vmlinux"),
             (["--kernel", str(tmp_path / "absent")], "cannot read kernel"),
             (["--memory", "12Q"], "bad size"),
             (["--vcpus", "0"], "vcpus must be")]  # fmt: skip
    for args, reason in cases:
        result = _cli("run", *args)
        assert result.returncode == 2, result
        assert result.stderr.startswith("trivmm: ") and result.stderr.count("\n") == 1
        assert reason in result.stderr
        assert "Traceback" not in result.stderr



@pytest.mark.kvm
def test_cli_bad_devices_name_their_file_and_exit_2(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Every input error names its file: a disk that is missing, corrupt, or a raw image that
    looks like another format; and bad device options are one line too."""
    corrupt = tmp_path / "corrupt.qcow2"
    corrupt.write_bytes(b"QFI\xfb" + bytes(60))  # a qcow2 magic with nonsense behind it
    disguised = tmp_path / "disguised.img"
    disguised.write_bytes(b"conectix" + bytes(1 << 16))  # a VHD footer's cookie at the start
    cases = [(["--disk", str(tmp_path / "absent.img")], str(tmp_path / "absent.img")),
             (["--disk", str(corrupt)], str(corrupt)),
             (["--disk", str(disguised)], str(disguised)),
             (["--disk", f"{disguised},format=qcow3"], "unknown disk format 'qcow3'"),
             (["--disk", f"{disguised},colour=blue"], "bad --disk option 'colour=blue'"),
             (["--net", "vde=switch"], "only tap networking exists")]  # fmt: skip
    for args, reason in cases:
        result = _cli("run", "--memory", "16M", *args)
        assert result.returncode == 2, result
        assert result.stderr.startswith("trivmm: ") and result.stderr.count("\n") == 1, result.stderr
        assert reason in result.stderr, result.stderr


def test_disk_and_net_options_parse() -> None:
    from trivmm import DiskConfig, NetConfig

    disk = DiskConfig.parse("/images/a.qcow2,format=qcow2,readonly=on,serial=disk-1")
    assert disk == DiskConfig("/images/a.qcow2", "qcow2", True, "disk-1")
    assert DiskConfig.parse("b.img") == DiskConfig("b.img")
    assert NetConfig.parse("tap=tap7,mac=52:54:00:12:34:56") == NetConfig("tap7", "52:54:00:12:34:56")
    assert NetConfig.parse("tap") == NetConfig()
    for bad in ("", ",format=raw", "x,readonly=maybe", "x,serial=a,serial=b"):
        with pytest.raises(ConfigError):
            DiskConfig.parse(bad)
    for bad in ("tap=", "tap,mac=01:00:00:00:00:00", "tap,mtu=9000"):
        with pytest.raises(ConfigError):
            NetConfig.parse(bad)


@pytest.mark.kvm
def test_a_missing_capability_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    from trivmm.kvm import Cap, Kvm, MissingCapability

    with Kvm() as kvm:
        monkeypatch.setattr(Kvm, "check_extension", lambda self, cap: 0 if cap is Cap.IRQFD else 1)
        with pytest.raises(MissingCapability, match="KVM_CAP_IRQFD"):
            kvm.require(Cap.USER_MEMORY, Cap.IRQFD)


def test_kvm_unavailable_is_a_clear_error(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from trivmm.kvm import Kvm, KvmUnavailable

    with pytest.raises(KvmUnavailable, match="no-such-kvm"):
        Kvm(str(tmp_path / "no-such-kvm"))


def test_shipped_builtin_guest_is_built_from_its_source(binutils: None) -> None:
    from trivmm.guest.builtin import assemble_builtin_guest, builtin_guest

    assert assemble_builtin_guest() == builtin_guest(), "run `python -m trivmm guest builtin` and commit hello.elf"


def test_generated_cffi_module_is_current() -> None:
    """The pre-parsed module describes exactly what _cdef.py declares (layouts and calls),
    whichever cffi version generated it."""
    import cffi

    from trivmm.kvm._cdef import CDEF
    from trivmm.kvm._ffi import STRUCTS, ffi

    fresh = cffi.FFI()
    fresh.cdef(CDEF)
    hint = "run `python -m trivmm.kvm._build_ffi` and commit _kvm_cffi.py"
    for struct in STRUCTS:
        ours, theirs = ffi.typeof(f"struct {struct}"), fresh.typeof(f"struct {struct}")
        assert ffi.sizeof(ours) == fresh.sizeof(theirs), (struct, hint)
        def layout(ctype: object) -> list[tuple[str, int]]:  # anonymous members: cffi names them $N
            return [(n if not n.startswith("$") else "$", f.offset) for n, f in ctype.fields]  # type: ignore[attr-defined]

        assert layout(ours) == layout(theirs), (struct, hint)
    assert set(dir(ffi.dlopen(None))) >= {"ioctl", "eventfd"}
