"""Every struct, field offset and ioctl number in trivmm.kvm._ffi against <linux/kvm.h>."""

from __future__ import annotations

import subprocess

import pytest

from trivmm.kvm._ffi import IOCTLS, STRUCTS, ffi
from trivmm.kvm.constants import Cap, ExitReason


def _fields(ctype: object, prefix: str = "") -> list[tuple[str, int]]:
    """(C member path, offset) of every named field, walking into anonymous members."""
    out = []
    for name, field in ctype.fields or []:  # type: ignore[attr-defined]
        path = f"{prefix}{name}"
        out.append((path, field.offset))
        inner = field.type
        if inner.kind == "struct" or inner.kind == "union":
            out.extend((p, field.offset + off) for p, off in _fields(inner, f"{path}."))
    return out


def _flatten_anonymous(path: str) -> str:
    # cffi names anonymous members '$1' etc.; C reaches their fields directly.
    return ".".join(part for part in path.split(".") if not part.startswith("$"))


@pytest.fixture(scope="module")
def c_layout(c_compiler: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, int]:
    """Sizes, offsets, ioctl numbers and constants as the C compiler sees them in <linux/kvm.h>."""
    lines = ['#include <stdio.h>', '#include <stddef.h>', '#include <linux/kvm.h>', 'int main(void) {']
    for struct in STRUCTS:
        ctype = ffi.typeof(f"struct {struct}")
        lines.append(f'printf("sizeof {struct} %zu\\n", sizeof(struct {struct}));')
        for path, _ in _fields(ctype):
            member = _flatten_anonymous(path)
            if member:
                lines.append(f'printf("offsetof {struct}.{member} %zu\\n", offsetof(struct {struct}, {member}));')
    for name in IOCTLS:
        lines.append(f'printf("ioctl {name} %lu\\n", (unsigned long){name});')
    for cap in Cap:
        lines.append(f'printf("cap {cap.name} %d\\n", KVM_CAP_{cap.name});')
    for reason in ExitReason:
        lines.append(f'printf("exit {reason.name} %d\\n", KVM_EXIT_{reason.name});')
    lines.append("return 0; }")
    tmp = tmp_path_factory.mktemp("abi")
    source = tmp / "abi.c"
    source.write_text("\n".join(lines))
    subprocess.run([c_compiler, "-o", str(tmp / "abi"), str(source)], check=True)
    output = subprocess.run([str(tmp / "abi")], check=True, capture_output=True, text=True).stdout
    return {" ".join(line.split()[:2]): int(line.split()[2]) for line in output.splitlines()}


@pytest.mark.parametrize("struct", STRUCTS)
def test_struct_layout_matches_header(c_layout: dict[str, int], struct: str) -> None:
    ctype = ffi.typeof(f"struct {struct}")
    assert ffi.sizeof(ctype) == c_layout[f"sizeof {struct}"]
    checked = 0
    for path, offset in _fields(ctype):
        member = _flatten_anonymous(path)
        if member:
            assert offset == c_layout[f"offsetof {struct}.{member}"], member
            checked += 1
    assert checked > 0


def test_ioctl_numbers_match_header(c_layout: dict[str, int]) -> None:
    for name, number in IOCTLS.items():
        assert number == c_layout[f"ioctl {name}"], name


def test_constants_match_header(c_layout: dict[str, int]) -> None:
    for cap in Cap:
        assert cap.value == c_layout[f"cap {cap.name}"], cap
    for reason in ExitReason:
        assert reason.value == c_layout[f"exit {reason.name}"], reason
