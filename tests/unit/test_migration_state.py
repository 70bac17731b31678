"""State sections without KVM: the payload codecs, each platform device's save/restore
through the registry's JSON encoding, the PCI root's configuration space, the vCPU
section and the host-quirk layer's state. Untrusted payloads give ``MigrationError`` (or
the device's ``ValueError``), never another exception."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.unit.fake_cpu import FakeVcpu, PageTables
from trivmm.boot.layout import pci_layout
from trivmm.bus import MMIO_LIMIT, PIO_LIMIT, AddressSpace
from trivmm.cpu.fallback import EmulationFallback, SyscallCompleter
from trivmm.cpu.paging import GuestView
from trivmm.cpu.quirks import QuirkHooks
from trivmm.devices.acpi_pm import AcpiPm, AcpiPmState
from trivmm.devices.i8042 import I8042, I8042State, KeyboardState, MouseState
from trivmm.devices.pci import PciFunction, PciRoot
from trivmm.devices.pci.root import PciRootState
from trivmm.devices.pvpanic import PvPanic, PvPanicState
from trivmm.devices.rtc import CmosRtc, RtcState
from trivmm.devices.serial import Serial, SerialState
from trivmm.errors import MigrationError
from trivmm.kvm._ffi import ffi
from trivmm.kvm.constants import GuestDebug
from trivmm.kvm.system import CpuidEntry
from trivmm.memory import GuestMemory
from trivmm.migration.codec import Size, decode_state, encode_state, pack_fields, unpack_fields
from trivmm.migration.devices import AttrsState
from trivmm.migration.state import VcpuState, apply_quirks, capture_quirks, decode_vcpu, encode_vcpu

# --- codecs ---------------------------------------------------------------------------------------


@given(st.dictionaries(st.from_regex(r"[a-z]{1,12}", fullmatch=True), st.binary(max_size=64), max_size=6))
def test_fields_round_trip(fields: dict[str, bytes]) -> None:
    sizes = {name: Size(0, 64) for name in fields}
    assert unpack_fields(pack_fields(fields), "test", sizes) == fields


@given(st.binary(max_size=200))
def test_fields_from_garbage_are_refused_cleanly(payload: bytes) -> None:
    try:
        fields = unpack_fields(payload, "test", {"a": Size(0, 8), "bb": Size.exact(4)}, optional=frozenset({"a"}))
    except MigrationError:
        return
    assert len(fields["bb"]) == 4 and len(fields.get("a", b"")) <= 8


def test_field_errors_name_the_problem() -> None:
    sizes = {"a": Size.exact(2), "b": Size(0, 8, 4)}
    with pytest.raises(MigrationError, match="missing field"):
        unpack_fields(pack_fields({"a": b"xx"}), "s", sizes)
    with pytest.raises(MigrationError, match="unknown field 'c'"):
        unpack_fields(pack_fields({"a": b"xx", "b": b"", "c": b""}), "s", sizes)
    with pytest.raises(MigrationError, match="'b' is 3 bytes"):
        unpack_fields(pack_fields({"a": b"xx", "b": b"123"}), "s", sizes)
    with pytest.raises(MigrationError, match="appears twice"):
        unpack_fields(pack_fields({"a": b"xx"}) + pack_fields({"a": b"yy"}), "s", sizes)


@attrs.frozen
class Inner:
    data: bytes
    flag: bool


@attrs.frozen
class Outer:
    number: int
    name: str
    maybe: int | None
    items: tuple[int, ...]
    pair: tuple[int, int]
    counts: dict[str, int]
    inner: Inner | None


outers = st.builds(Outer, st.integers(-(1 << 70), 1 << 70), st.text(max_size=8), st.none() | st.integers(),
                   st.lists(st.integers(), max_size=4).map(tuple), st.tuples(st.integers(), st.integers()),
                   st.dictionaries(st.text(max_size=4), st.integers(), max_size=3),
                   st.none() | st.builds(Inner, st.binary(max_size=16), st.booleans()))  # fmt: skip


@given(outers)
def test_state_json_round_trip(value: Outer) -> None:
    assert decode_state(Outer, encode_state(value), "outer") == value


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=6) | st.floats(allow_nan=False),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=20,
)


@given(json_values, outers)
@settings(max_examples=200)
def test_state_json_from_hostile_input_is_refused_cleanly(value: Any, outer: Outer) -> None:
    document = json.loads(encode_state(outer))
    for data in (json.dumps(value).encode(), json.dumps({**document, "number": value}).encode(),
                 json.dumps({**document, "inner": value}).encode(), b"\xff{", b"[" * 10000):  # fmt: skip
        try:
            decoded = decode_state(Outer, data, "outer")
        except MigrationError:
            continue
        assert isinstance(decoded, Outer) and isinstance(decoded.number, int)


def test_state_json_errors_name_the_field() -> None:
    document = json.loads(encode_state(Outer(1, "x", None, (), (1, 2), {}, Inner(b"ab", True))))
    with pytest.raises(MigrationError, match=r"outer: Outer.number: True is not an integer"):
        decode_state(Outer, json.dumps({**document, "number": True}).encode(), "outer")
    with pytest.raises(MigrationError, match=r"unknown fields \['extra'\]"):
        decode_state(Outer, json.dumps({**document, "extra": 1}).encode(), "outer")
    with pytest.raises(MigrationError, match="not valid JSON"):
        decode_state(Outer, b"{", "outer")


def test_a_field_added_later_with_a_default_may_be_absent_a_required_one_may_not() -> None:
    from trivmm.migration.snapshot import SavedConfig

    older = {"kernel": None, "initrd": None, "append": "", "memory": 1 << 24, "vcpus": 1, "cpu_template": "host",
             "boot_protocol": "auto", "cmdline_base": "", "transport": "pci", "rng": False, "disks": [], "net": [],
             "vsock": None, "memory_slots": [[0, 1 << 24]], "sections": ["vcpu/0"]}  # before "display" existed
    assert decode_state(SavedConfig, json.dumps(older).encode(), "config").display is None
    with pytest.raises(MigrationError, match=r"missing fields \['vcpus'\]"):
        decode_state(SavedConfig, json.dumps({k: v for k, v in older.items() if k != "vcpus"}).encode(), "config")


# --- platform devices -------------------------------------------------------------------------------


def through_the_stream(device: Any, state_type: type, fresh: Any) -> Any:
    """Save ``device`` as the registry does, restore into ``fresh``; return ``fresh``."""
    data = AttrsState(device, state_type, "test").save_state()
    AttrsState(fresh, state_type, "test").restore_state(data)
    assert fresh.save() == device.save()
    return fresh


def pio(device: Any, offset: int, value: int | None = None, size: int = 1) -> int:
    data = memoryview(bytearray(size))
    if value is None:
        device.read(offset, data)
        return int.from_bytes(data, "little")
    data[:] = value.to_bytes(size, "little")
    device.write(offset, data)
    return 0


accesses = st.lists(st.tuples(st.integers(0, 7), st.none() | st.integers(0, 255)), max_size=40)


@given(accesses, st.binary(max_size=80))
def test_serial_state_survives_the_stream_and_behaves_the_same(ops: list[tuple[int, int | None]], typed: bytes) -> None:
    out: list[bytes] = []
    levels: list[bool] = []
    uart = Serial(out.append, levels.append)
    uart.enqueue_input(typed)
    for offset, value in ops:
        pio(uart, offset, value)
    restored_levels: list[bool] = []
    restored = through_the_stream(uart, SerialState, Serial(out.append, restored_levels.append))
    assert restored_levels[-1:] == [True] if levels[-1:] == [True] else restored_levels == []
    for offset in (5, 0, 2, 5, 0, 6, 1, 3, 4, 7):  # the same reads give the same answers
        assert pio(restored, offset) == pio(uart, offset)


@given(accesses)
def test_i8042_state_survives_the_stream(ops: list[tuple[int, int | None]]) -> None:
    levels: list[bool] = []
    kbd = I8042(lambda: None, levels.append)
    for offset, value in ops:
        pio(kbd, 4 if offset & 1 else 0, value)
    restored_levels: list[bool] = []
    restored = through_the_stream(kbd, I8042State, I8042(lambda: None, restored_levels.append))
    assert (restored_levels or [False])[-1] == (levels or [False])[-1]
    for offset in (4, 0, 4, 0, 0, 4):
        assert pio(restored, offset) == pio(kbd, offset)


@given(st.lists(st.tuples(st.integers(0, 127), st.integers(0, 255)), max_size=30), st.integers(0, 127))
def test_rtc_state_survives_the_stream(writes: list[tuple[int, int]], index: int) -> None:
    rtc = CmosRtc(clock=lambda: 1_700_000_000.0)
    for at, value in writes:
        pio(rtc, 0, at)
        pio(rtc, 1, value)
    pio(rtc, 0, index)
    restored = through_the_stream(rtc, RtcState, CmosRtc(clock=lambda: 1_700_000_000.0))
    assert pio(restored, 1) == pio(rtc, 1)


def test_acpi_pm_and_pvpanic_states_survive_the_stream() -> None:
    pm = AcpiPm(lambda: None, lambda: None)
    pio(pm, 2, 0x0120, size=2)
    restored = through_the_stream(pm, AcpiPmState, AcpiPm(lambda: None, lambda: None))
    assert pio(restored, 2, size=2) == 0x0120 and pio(restored, 4, size=2) & 1  # SCI_EN
    panic = PvPanic(lambda: None)
    pio(panic, 0, 2)
    assert through_the_stream(panic, PvPanicState, PvPanic(lambda: None)).crash_loaded == 1


# The i8042's keyboard and mouse, as saved by a fresh model (the fields the documents below leave alone).
_PS2 = {"aux_output": {"$b": ""}, "aux_line": False, "keyboard": json.loads(encode_state(KeyboardState())),
        "mouse": json.loads(encode_state(MouseState()))}


@pytest.mark.parametrize(("device", "state_type", "document", "message"), [
    (lambda: Serial(lambda b: None, lambda level: None), SerialState,
     {"ier": 0, "lcr": 3, "mcr": 8, "scr": 0, "fcr": 0, "dll": 12, "dlm": 0, "thre_pending": False,
      "rx": {"$b": "00" * 65}}, "more than 64"),
    (lambda: I8042(lambda: None, lambda level: None), I8042State,
     {"ctr": 0, "status": 0, "output": {"$b": "00" * 17}, "pending_command": 0, "line": False, **_PS2},
     "more than 16"),
    (lambda: I8042(lambda: None, lambda level: None), I8042State,
     {"ctr": 0, "status": 0, "output": {"$b": ""}, "pending_command": 0xAA, "line": False, **_PS2},
     "takes no data"),
    (lambda: I8042(lambda: None, lambda level: None), I8042State,
     {"ctr": 0, "status": 0, "output": {"$b": ""}, "pending_command": 0, "line": False,
      **{**_PS2, "keyboard": {**_PS2["keyboard"], "scancode_set": 3}}}, "keyboard state"),
    (lambda: CmosRtc(), RtcState, {"index": 0, "cmos": {"$b": "00"}}, "1 bytes"),
    (lambda: AcpiPm(lambda: None, lambda: None), AcpiPmState, {"registers": {"$b": "00"}}, "not 8"),
    (lambda: PvPanic(lambda: None), PvPanicState, {"crash_loaded": -1}, "negative"),
])  # fmt: skip
def test_device_states_that_cannot_be_theirs_are_refused(device: Any, state_type: type, document: dict[str, Any],
                                                         message: str) -> None:  # fmt: skip
    target = device()
    before = target.save()
    with pytest.raises(ValueError, match=message):
        AttrsState(target, state_type, "test").restore_state(json.dumps(document).encode())
    assert target.save() == before  # nothing changed


def make_root(functions: int = 1) -> PciRoot:
    root = PciRoot(AddressSpace("pio", PIO_LIMIT), AddressSpace("mmio", MMIO_LIMIT), pci_layout(128 << 20),
                   lambda gsi, level: None)  # fmt: skip
    for _ in range(functions):
        root.add(PciFunction(0x1AF4, 0x1005, 0xFF0000))
    return root


def test_the_pci_roots_configuration_survives_the_stream() -> None:
    root = make_root()
    root.config_write(0, 1, 0, 0x0D, 1, 0x40)  # latency timer of slot 1
    root.config_write(0, 1, 0, 0x04, 2, 0x0)  # decoding off
    root.config_io.address = 0x8000_0804
    restored = through_the_stream(root, PciRootState, make_root())
    assert restored.config_read(0, 1, 0, 0x0D, 1) == 0x40
    assert restored.config_read(0, 1, 0, 0x04, 2) == 0 and restored.config_io.address == 0x8000_0804


def test_a_pci_state_of_another_bus_is_refused() -> None:
    state = make_root(2).save()
    target = make_root(1)
    with pytest.raises(ValueError, match="slots"):
        target.restore(state)
    config = bytearray(make_root().save().slots[1].config)
    config[0] ^= 0xFF  # vendor ID: read-only
    with pytest.raises(ValueError, match="read-only"):
        target.restore(PciRootState(0, (target.save().slots[0], attrs.evolve(state.slots[1], config=bytes(config)))))


# --- vCPU sections -------------------------------------------------------------------------------


def _sized(ctype: str, seed: int) -> bytes:
    return bytes((seed + i) & 0xFF for i in range(ffi.sizeof(ctype)))


vcpu_states = st.builds(
    lambda seed, msrs, cpuid, mp, khz: VcpuState(
        regs=_sized("struct kvm_regs", seed), sregs=_sized("struct kvm_sregs", seed + 1),
        fpu=_sized("struct kvm_fpu", seed + 2), xsave=_sized("struct kvm_xsave", seed + 3),
        xcrs=_sized("struct kvm_xcrs", seed + 4), lapic=_sized("struct kvm_lapic_state", seed + 5),
        events=_sized("struct kvm_vcpu_events", seed + 6), debugregs=_sized("struct kvm_debugregs", seed + 7),
        mp_state=mp, tsc_khz=khz, msrs=tuple(sorted(msrs.items())), cpuid=tuple(cpuid)),
    st.integers(0, 255), st.dictionaries(st.integers(0, 0xFFFF_FFFF), st.integers(0, (1 << 64) - 1), max_size=8),
    st.lists(st.builds(CpuidEntry, *[st.integers(0, 0xFFFF_FFFF)] * 7), max_size=4), st.integers(0, 8),
    st.integers(0, 0xFFFF_FFFF),
)  # fmt: skip


@given(vcpu_states)
@settings(max_examples=30)
def test_vcpu_sections_round_trip(state: VcpuState) -> None:
    assert decode_vcpu(encode_vcpu(state), "vcpu/0") == state
    regs = state.struct("regs")
    assert bytes(ffi.buffer(regs)) == state.regs


@given(vcpu_states, st.integers(0, 10_000), st.integers(1, 255))
@settings(max_examples=100)
def test_damaged_vcpu_sections_are_refused_cleanly(state: VcpuState, position: int, mask: int) -> None:
    payload = bytearray(encode_vcpu(state))
    for damaged in (bytes(payload[: position % len(payload)]), _flipped(payload, position, mask)):
        try:
            decode_vcpu(damaged, "vcpu/0")
        except MigrationError:
            pass


def _flipped(data: bytearray, position: int, mask: int) -> bytes:
    out = bytearray(data)
    out[position % len(out)] ^= mask
    return bytes(out)


# --- the host-quirk layer -------------------------------------------------------------------------


@pytest.fixture
def memory() -> Iterator[GuestMemory]:
    mem = GuestMemory.from_ranges([(0, 8 << 20)])
    yield mem
    mem.close()


def quirk_hooks(memory: GuestMemory) -> tuple[QuirkHooks, FakeVcpu]:
    vcpu = FakeVcpu(memory, PageTables(memory))
    view = GuestView(vcpu, memory)  # type: ignore[arg-type]
    return QuirkHooks(EmulationFallback(view), SyscallCompleter(view)), vcpu


@pytest.mark.parametrize(("armed_at", "stepping", "debug"), [
    (None, False, []),
    (0x15_0000, False, [(GuestDebug.ENABLE | GuestDebug.USE_HW_BP, [0x15_0000, 0, 0, 0, 0, 0, 0, 0x401])]),
    (0x15_0000, True, [(GuestDebug.ENABLE | GuestDebug.SINGLESTEP, None)]),
])  # fmt: skip
def test_quirk_state_rearms_guest_debugging(memory: GuestMemory, armed_at: int | None, stepping: bool,
                                            debug: list[Any]) -> None:  # fmt: skip
    source, _ = quirk_hooks(memory)
    assert source.syscalls is not None and source.fallback is not None
    source.syscalls.armed_at, source.syscalls.stepping, source.syscalls.completed = armed_at, stepping, 12
    source.syscalls.refused["a reason"] = 3
    source.fallback.handled["fwait"] = 5
    payload = capture_quirks(source)
    assert payload is not None
    target, vcpu = quirk_hooks(memory)
    apply_quirks(target, payload, "quirks/0")
    assert vcpu.debug == debug
    assert target.syscalls is not None and target.syscalls.save() == source.syscalls.save()
    assert target.fallback is not None and target.fallback.handled == {"fwait": 5}


def test_quirk_state_that_cannot_be_theirs_is_refused(memory: GuestMemory) -> None:
    source, _ = quirk_hooks(memory)
    assert source.syscalls is not None
    source.syscalls.stepping = True  # stepping with nothing armed
    payload = capture_quirks(source)
    assert payload is not None
    target, vcpu = quirk_hooks(memory)
    with pytest.raises(MigrationError, match="never armed"):
        apply_quirks(target, payload, "quirks/0")
    with pytest.raises(MigrationError, match="not this CPU template's"):
        apply_quirks(QuirkHooks(None, target.syscalls), payload, "quirks/0")
    assert vcpu.debug == []
