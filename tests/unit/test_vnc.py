"""The VNC server without KVM: a display drawn from the host side (``Display.write``, which
records its pages as the dirty log would), a recording keyboard, and raw-socket RFB
clients -- polite ones (3.3, 3.7, 3.8; Raw, Zlib, ZRLE; pixel formats) and hostile ones
(bad versions, silence, unknown messages, oversized messages, floods, readers that never
read, too many clients). Each case runs under trio and asyncio."""

from __future__ import annotations

import os
import stat
import struct
import time
import tracemalloc
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import pytest

from tests.unit.rfb_client import RfbClient, connect_raw
from trivmm.devices.display import Display, Rect
from trivmm.errors import ConfigError
from trivmm.vnc import server as vnc_server
from trivmm.vnc.protocol import Encoding, PixelFormat
from trivmm.vnc.server import VncEndpoint, VncServer

pytestmark = pytest.mark.parametrize("backend", ["trio", "asyncio"])
WIDTH, HEIGHT = 96, 48


class Keyboard:
    """Records what the server feeds the PS/2 devices (I8042.key / .pointer)."""

    def __init__(self) -> None:
        self.keys: list[tuple[int, bool]] = []
        self.motion: list[tuple[int, int, int, int]] = []

    def key(self, code: int, down: bool) -> bool:
        self.keys.append((code, down))
        return True

    def pointer(self, dx: int, dy: int, buttons: int, wheel: int = 0) -> bool:
        self.motion.append((dx, dy, buttons, wheel))
        return True


def pattern(width: int = WIDTH, height: int = HEIGHT, salt: int = 0) -> bytes:
    """XRGB8888 pixels: blue = x, green = y, red = salt."""
    return b"".join(bytes([(x + salt) & 0xFF, y & 0xFF, salt & 0xFF, 0]) for y in range(height) for x in range(width))


def run_on(backend: str, fn: Callable[[], Awaitable[None]]) -> None:
    anyio.run(fn, backend=backend)


@asynccontextmanager
async def serving(tmp_path: Path, **options: object) -> AsyncIterator[tuple[VncServer, Display, Keyboard]]:
    display = Display(WIDTH, HEIGHT)
    display.write(0, pattern())
    keyboard = Keyboard()
    server = VncServer(display, keyboard, f"unix:{tmp_path / 'vnc.sock'}", **options)  # type: ignore[arg-type]
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(server.serve)
            yield server, display, keyboard
            tg.cancel_scope.cancel()
    finally:
        server.close()
        display.close()


def address(server: VncServer) -> str:
    assert server.endpoint.path is not None
    return server.endpoint.path


def assemble(rects: list[tuple[int, int, int, int, int, bytes]], width: int = WIDTH, height: int = HEIGHT,
             bpp: int = 4) -> bytes:  # fmt: skip
    """A screen of ``bpp``-byte pixels painted with ``rects``."""
    screen = bytearray(width * height * bpp)
    for x, y, w, h, _, pixels in rects:
        for row in range(h):
            at = ((y + row) * width + x) * bpp
            screen[at : at + w * bpp] = pixels[row * w * bpp : (row + 1) * w * bpp]
    return bytes(screen)


async def wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    with anyio.fail_after(timeout):
        while not predicate():
            await anyio.sleep(0.005)


# --- polite clients -------------------------------------------------------------------------------
def test_a_client_gets_the_screen_and_then_only_what_changed(backend: str, tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(tmp_path, name="test-vm") as (server, display, _):
            client = await RfbClient.connect(address(server))
            assert (client.width, client.height, client.name) == (WIDTH, HEIGHT, b"test-vm")
            assert client.format == PixelFormat()  # XRGB8888, little-endian
            await client.request(incremental=False)
            with anyio.fail_after(5):
                assert assemble(await client.read_update()) == pattern()
            # Incremental: nothing is sent until something changes; then just that.
            await client.request(incremental=True)
            with anyio.move_on_after(0.3) as idle:
                await client.read_update()
            assert idle.cancelled_caught
            display.write((10 * WIDTH + 20) * 4, b"\x11\x22\x33\x00" * 5)  # 5 pixels of row 10
            with anyio.fail_after(5):
                rects = await client.read_update()
            assert [r[:4] for r in rects] == [(20, 10, 5, 1)]
            assert rects[0][5] == b"\x11\x22\x33\x00" * 5
            await client.aclose()

    run_on(backend, main)


@pytest.mark.parametrize("version", [b"RFB 003.003\n", b"RFB 003.007\n", b"RFB 003.008\n", b"RFB 003.889\n"])
def test_protocol_versions_3_3_3_7_and_3_8(backend: str, tmp_path: Path, version: bytes) -> None:
    async def main() -> None:
        async with serving(tmp_path) as (server, _, _):
            client = await RfbClient.connect(address(server), version=version)
            await client.request()
            with anyio.fail_after(5):
                assert assemble(await client.read_update()) == pattern()
            await client.aclose()

    run_on(backend, main)


RGBX = PixelFormat(32, 24, False, True, 255, 255, 255, 0, 8, 16)  # noVNC's and vncdotool's
BIG_XRGB = PixelFormat(32, 24, True, True, 255, 255, 255, 16, 8, 0)
RGB565 = PixelFormat(16, 16, False, True, 31, 63, 31, 11, 5, 0)
BGR233 = PixelFormat(8, 8, False, True, 7, 7, 3, 0, 3, 6)


def expected_pixels(fmt: PixelFormat, native: bytes) -> bytes:
    out = bytearray()
    for at in range(0, len(native), 4):
        b, g, r = native[at], native[at + 1], native[at + 2]
        value = 0
        for level, top, shift in ((r, fmt.red_max, fmt.red_shift), (g, fmt.green_max, fmt.green_shift),
                                  (b, fmt.blue_max, fmt.blue_shift)):  # fmt: skip
            value |= (level * top + 127) // 255 << shift
        out += value.to_bytes(fmt.bytes_per_pixel, "big" if fmt.big_endian else "little")
    return bytes(out)


@pytest.mark.parametrize("fmt", [RGBX, BIG_XRGB, RGB565, BGR233], ids=["rgbx", "big-xrgb", "rgb565", "bgr233"])
def test_pixel_formats_are_converted(backend: str, tmp_path: Path, fmt: PixelFormat) -> None:
    async def main() -> None:
        async with serving(tmp_path) as (server, _, _):
            client = await RfbClient.connect(address(server))
            await client.set_pixel_format(fmt)
            await client.request()
            with anyio.fail_after(5):
                screen = assemble(await client.read_update(), bpp=fmt.bytes_per_pixel)
            assert screen == expected_pixels(fmt, pattern())
            await client.aclose()

    run_on(backend, main)


@pytest.mark.parametrize("encoding", [Encoding.ZLIB, Encoding.ZRLE])
@pytest.mark.parametrize("fmt", [PixelFormat(), RGBX, RGB565], ids=["xrgb", "rgbx", "rgb565"])
def test_zlib_and_zrle_carry_the_same_pixels(backend: str, tmp_path: Path, encoding: int, fmt: PixelFormat) -> None:
    async def main() -> None:
        async with serving(tmp_path) as (server, display, _):
            client = await RfbClient.connect(address(server))
            await client.set_pixel_format(fmt)
            await client.set_encodings([Encoding.DESKTOP_SIZE, encoding, Encoding.RAW])
            await client.request()
            with anyio.fail_after(5):
                rects = await client.read_update()
            assert {r[4] for r in rects} == {encoding}
            assert assemble(rects, bpp=fmt.bytes_per_pixel) == expected_pixels(fmt, pattern())
            # A second update on the same zlib stream (the client inflates with one z_stream).
            display.write(0, pattern(salt=7))
            await client.request(incremental=True)
            with anyio.fail_after(5):
                rects = await client.read_update()
            assert assemble(rects, bpp=fmt.bytes_per_pixel) == expected_pixels(fmt, pattern(salt=7))
            await client.aclose()

    run_on(backend, main)


def test_changes_outside_the_asked_region_wait_until_they_are_asked_for(backend: str, tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(tmp_path) as (server, display, _):
            client = await RfbClient.connect(address(server))
            await client.request()
            with anyio.fail_after(5):
                await client.read_update()
            await client.request(incremental=True, rect=(0, 0, 10, 10))  # the top-left corner only
            display.write((20 * WIDTH + 50) * 4, b"\x42" * 4)  # (50, 20): outside it
            cpu = time.process_time()
            with anyio.move_on_after(0.4) as idle:
                await client.read_update()
            assert idle.cancelled_caught  # nothing sent ...
            assert time.process_time() - cpu < 0.2  # ... and nothing spinning meanwhile
            await client.request(incremental=True)  # the whole screen: now it comes
            with anyio.fail_after(5):
                assert [r[:4] for r in await client.read_update()] == [(50, 20, 1, 1)]
            await client.aclose()

    run_on(backend, main)


def test_keys_and_the_pointer_reach_the_ps2_devices(backend: str, tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(tmp_path) as (server, _, keyboard):
            client = await RfbClient.connect(address(server))
            for keysym, down in ((0xFFE1, True), (ord("A"), True), (ord("A"), False), (0xFFE1, False),
                                 (0xFF52, True), (0xFF52, False), (0x12345678, True)):  # fmt: skip
                await client.key(keysym, down)
            await client.pointer(0, 10, 10)
            await client.pointer(1, 15, 7)  # left button, 5 right, 3 up
            await client.pointer(0x08, 15, 7)  # wheel up
            await wait_for(lambda: len(keyboard.keys) == 6 and len(keyboard.motion) == 3)
            assert keyboard.keys == [(0x2A, True), (0x1E, True), (0x1E, False), (0x2A, False),
                                     (0xE048, True), (0xE048, False)]  # fmt: skip
            assert keyboard.motion == [(0, 0, 0, 0), (5, -3, 1, 0), (0, 0, 0, -1)]
            # QEMU's extended key events: acknowledged with a pseudo-rectangle, then XT codes.
            await client.set_encodings([Encoding.RAW, Encoding.QEMU_EXTENDED_KEY_EVENT])
            with anyio.fail_after(5):
                rects = await client.read_update()
            assert [r[4] for r in rects] == [Encoding.QEMU_EXTENDED_KEY_EVENT]
            await client.send(struct.pack(">BBHII", 255, 0, 1, ord("q"), 0x10))  # Q, by its XT code
            await client.send(struct.pack(">BBHII", 255, 0, 0, 0xFF53, 0xCD))  # Right (0xE0 0x4D) released
            await wait_for(lambda: len(keyboard.keys) == 8)
            assert keyboard.keys[6:] == [(0x10, True), (0xE04D, False)]
            await client.aclose()

    run_on(backend, main)


def test_several_clients_each_get_every_change(backend: str, tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(tmp_path) as (server, display, _):
            clients = [await RfbClient.connect(address(server)) for _ in range(3)]
            for client in clients:
                await client.request()
                with anyio.fail_after(5):
                    await client.read_update()
                await client.request(incremental=True)
            display.write(4 * WIDTH * 4, b"\xff" * 8)  # row 4, pixels 0 and 1
            for client in clients:
                with anyio.fail_after(5):
                    assert [r[:4] for r in await client.read_update()] == [(0, 4, 2, 1)]
            assert server.clients == 3
            for client in clients:
                await client.aclose()
            await wait_for(lambda: server.clients == 0)

    run_on(backend, main)


def test_an_idle_screen_is_polled_only_while_a_client_waits_and_never_scanned(backend: str, tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(tmp_path, refresh_rate=100) as (server, display, _):
            display.refresh()  # the pattern written at start: scanned once
            polls, scans = display.polls, display.scans
            await anyio.sleep(0.2)
            assert display.polls == polls  # nobody connected: no polling at all
            client = await RfbClient.connect(address(server))
            await client.request()
            with anyio.fail_after(5):
                await client.read_update()
            polls = display.polls  # (a full update looks once, to be current)
            await anyio.sleep(0.2)
            assert display.polls == polls  # a client that asks for nothing costs no polls either
            await client.request(incremental=True)  # now it waits for a change: polled at the refresh rate
            await anyio.sleep(0.5)
            assert display.polls > polls + 10
            assert display.scans == scans  # ... but an unchanged screen is never read
            await client.aclose()

    run_on(backend, main)


# --- hostile clients --------------------------------------------------------------------------------
@pytest.mark.parametrize("greeting", [b"HTTP/1.1 GET\n", b"RFB 004.000\n", b"RFB 003.00x\n", b"\0" * 12])
def test_bad_version_lines_are_refused(backend: str, tmp_path: Path, greeting: bytes) -> None:
    async def main() -> None:
        async with serving(tmp_path) as (server, _, _):
            stream = await connect_raw(address(server))
            client = RfbClient(stream)
            assert await client.read(12) == b"RFB 003.008\n"
            await client.send(greeting)
            with anyio.fail_after(5):
                assert await client.closed()

    run_on(backend, main)


def test_a_silent_client_is_dropped_after_the_handshake_timeout(backend: str, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    monkeypatch.setattr(vnc_server, "HANDSHAKE_TIMEOUT", 0.3)

    async def main() -> None:
        async with serving(tmp_path) as (server, _, _):
            client = RfbClient(await connect_raw(address(server)))
            with anyio.fail_after(5):
                assert await client.closed()

    run_on(backend, main)


def test_security_type_other_than_none_is_refused_with_a_reason(backend: str, tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(tmp_path) as (server, _, _):
            client = RfbClient(await connect_raw(address(server)))
            await client.read(12)
            await client.send(b"RFB 003.008\n")
            assert await client.read(2) == b"\x01\x01"
            await client.send(b"\x02")  # VNC authentication: not offered
            result, length = struct.unpack(">II", await client.read(8))
            assert result == 1 and b"None" in await client.read(length)
            with anyio.fail_after(5):
                assert await client.closed()

    run_on(backend, main)


@pytest.mark.parametrize(("message", "why"), [
    (b"\x07", "unknown message type"),
    (struct.pack(">BxH", 2, 60000), "SetEncodings with 60000 encodings"),
    (struct.pack(">B3xI", 6, (16 << 20)), "ClientCutText of 16 MiB"),
    (b"\x00\x00\x00\x00" + PixelFormat(32, 24, False, False, 255, 255, 255, 16, 8, 0).pack(), "a colour map"),
    (b"\x00\x00\x00\x00" + PixelFormat(24, 24, False, True, 255, 255, 255, 16, 8, 0).pack(), "24 bits per pixel"),
    (b"\x00\x00\x00\x00" + PixelFormat(32, 24, False, True, 0, 255, 255, 16, 8, 0).pack(), "red max 0"),
    (struct.pack(">BB", 255, 1), "a QEMU audio message"),
])  # fmt: skip
def test_messages_that_cannot_be_served_close_the_connection(backend: str, tmp_path: Path, message: bytes,
                                                             why: str) -> None:  # fmt: skip
    async def main() -> None:
        async with serving(tmp_path) as (server, _, _):
            client = await RfbClient.connect(address(server))
            await client.send(message)
            with anyio.fail_after(5):
                assert await client.closed(), why
            # ... and the server serves the next client as before.
            other = await RfbClient.connect(address(server))
            await other.request()
            with anyio.fail_after(5):
                assert assemble(await other.read_update()) == pattern()
            await other.aclose()

    run_on(backend, main)


def test_cut_text_is_read_and_ignored(backend: str, tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(tmp_path) as (server, _, keyboard):
            client = await RfbClient.connect(address(server))
            text = b"x" * 300_000
            await client.send(struct.pack(">B3xI", 6, len(text)) + text)
            await client.key(ord("z"), True)
            await wait_for(lambda: keyboard.keys == [(0x2C, True)])
            await client.aclose()

    run_on(backend, main)


def test_too_many_clients_are_told_so(backend: str, tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(tmp_path, max_clients=2) as (server, _, _):
            kept = [await RfbClient.connect(address(server)) for _ in range(2)]
            refused = RfbClient(await connect_raw(address(server)))
            await refused.read(12)
            await refused.send(b"RFB 003.008\n")
            assert await refused.read(1) == b"\x00"  # no security types: a reason follows
            (length,) = struct.unpack(">I", await refused.read(4))
            assert b"too many VNC clients" in await refused.read(length)
            with anyio.fail_after(5):
                assert await refused.closed()
            for client in kept:
                await client.aclose()

    run_on(backend, main)


def test_a_flood_of_connections_is_closed_at_once(backend: str, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    monkeypatch.setattr(vnc_server, "MAX_HANDSHAKES", 2)

    async def main() -> None:
        async with serving(tmp_path, max_clients=1) as (server, _, _):
            silent = [RfbClient(await connect_raw(address(server))) for _ in range(3)]
            for client in silent:  # three in their handshake (one client's worth, plus two)
                assert await client.read(12) == b"RFB 003.008\n"
            extra = RfbClient(await connect_raw(address(server)))
            with anyio.fail_after(5), pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError)):
                await extra.stream.receive()  # no greeting: closed at once
            for client in silent:
                await client.aclose()

    run_on(backend, main)


def test_a_flood_of_input_is_bounded_and_slowed(backend: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(vnc_server, "MESSAGE_RATE", 1000)

    async def main() -> None:
        async with serving(tmp_path) as (server, _, keyboard):
            client = await RfbClient.connect(address(server))
            events = 1000
            flood = struct.pack(">BBxxI", 4, 1, ord("k")) * events
            started = anyio.current_time()
            await client.send(flood)
            await wait_for(lambda: len(keyboard.keys) == events, timeout=20)
            # 1000 a second, in windows of 0.1 s: a thousand take at least 0.9 s
            assert anyio.current_time() - started >= 0.85
            await client.aclose()

    run_on(backend, main)


def test_a_client_that_never_reads_costs_bounded_memory_and_stalls_nobody(backend: str, tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(tmp_path, refresh_rate=200) as (server, display, _):
            stalled = await RfbClient.connect(address(server))
            # Ask for full updates again and again, never reading one: at most one update is
            # built and in flight for it (the socket's buffers fill, its writer waits).
            request = struct.pack(">BBHHHH", 3, 0, 0, 0, WIDTH, HEIGHT)
            frames = [pattern(salt=1), pattern(salt=2)]
            tracemalloc.start()
            try:
                before = tracemalloc.get_traced_memory()[0]
                for round in range(100):
                    await stalled.send(request * 50)
                    display.write(0, frames[round % 2])
                    await anyio.sleep(0.005)
                grown = tracemalloc.get_traced_memory()[0] - before
            finally:
                tracemalloc.stop()
            frame = WIDTH * HEIGHT * 4
            assert grown < 32 * frame, grown  # not 5,000 frames: a few, whatever it asked
            other = await RfbClient.connect(address(server))  # others are served meanwhile
            await other.request()
            with anyio.fail_after(5):
                assert assemble(await other.read_update()) == frames[1]
            await other.aclose()
            await stalled.aclose()

    run_on(backend, main)


# --- sockets ------------------------------------------------------------------------------------------
def test_listening_addresses(backend: str, tmp_path: Path) -> None:
    display = Display(WIDTH, HEIGHT)
    try:
        for text in ("0.0.0.0:0", "[::]:0"):
            with pytest.raises(ConfigError, match="not a loopback address"):
                VncServer(display, None, text)
        with VncServer(display, None, "0.0.0.0:0", allow_remote=True) as server:
            assert server.endpoint.port > 0
        with VncServer(display, None, "0.0.0.0:0,allow-remote=on") as server:
            assert server.endpoint.allow_remote
        for bad in ("5900", "unix:", "localhost:http", "127.0.0.1:70000"):
            with pytest.raises(ConfigError):
                VncEndpoint.parse(bad)
        assert VncEndpoint.parse("[::1]:5901") == VncEndpoint(host="::1", port=5901)
        # A unix socket: mode 0600, a stale one replaced, a regular file refused, removed at the end.
        path = tmp_path / "v.sock"
        path.write_bytes(b"")
        with pytest.raises(ConfigError, match="not a socket"):
            VncServer(display, None, f"unix:{path}")
        path.unlink()

        async def main() -> None:
            stale = VncServer(display, None, f"unix:{path}")
            stale._sock.close()  # type: ignore[union-attr]  # what a crashed process leaves
            with VncServer(display, None, f"unix:{path}") as server:
                assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
                with pytest.raises(ConfigError, match="in use"):
                    VncServer(display, None, f"unix:{path}")
                async with anyio.create_task_group() as tg:
                    await tg.start(server.serve)
                    client = await RfbClient.connect(str(path))
                    await client.aclose()
                    tg.cancel_scope.cancel()
            assert not path.exists()

        run_on(backend, main)
    finally:
        display.close()


def test_tcp_on_loopback(backend: str) -> None:
    async def main() -> None:
        display = Display(WIDTH, HEIGHT)
        display.write(0, pattern())
        try:
            with VncServer(display, None, "127.0.0.1:0") as server:
                async with anyio.create_task_group() as tg:
                    await tg.start(server.serve)
                    client = await RfbClient.connect(("127.0.0.1", server.endpoint.port))
                    await client.request(rect=(8, 4, 16, 2))
                    with anyio.fail_after(5):
                        rects = await client.read_update()
                    assert [r[:4] for r in rects] == [(8, 4, 16, 2)]
                    assert rects[0][5] == display.read(Rect(8, 4, 16, 2))
                    await client.aclose()
                    tg.cancel_scope.cancel()
        finally:
            display.close()

    run_on(backend, main)
