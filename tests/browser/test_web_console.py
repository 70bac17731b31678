"""The web console in a real browser (Debian's chromium driven by Playwright) against the
real host service (``python -m trivmm serve`` in a subprocess), with tiny guests:

* nothing without logging in: the page sends the browser to the log-in form, the API says
  401, a websocket is refused; a cross-site request from another origin changes nothing,
  and one that carries the session cookie but another Origin (or no CSRF token) gets 403;
* log in with the token file; define VMs with the page's form; start one from the list and
  see its serial console in xterm.js; type into a guest that powers off on a newline;
  see a guest's framebuffer through noVNC (the guest's pattern, pixel for pixel), type a
  key it paints, stop the VMs;
* with 100 VMs defined the page lists them all, and how long it takes to show a start is
  measured and reported (the target is 200 ms; not asserted).

Screenshots go to the test's tmp dir (and to docs/images with TRIVMM_DOCS_SCREENSHOTS=1).
The Linux version (the small Debian-built guest, fbcon on its display) is marked e2e."""

from __future__ import annotations

import base64
import contextlib
import http.server
import json
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.browser.browser import (
    CANVAS,
    CHROMIUM_ARGS,
    XTERM_TEXT,
    Service,
    chromium_executable,
    save_screenshot,
    service_running,
)
from tests.conftest import prerequisite_missing, require
from tests.kvm.guests import assemble

pytestmark = [pytest.mark.kvm, pytest.mark.browser]
WIDTH, HEIGHT = 320, 200  # the display guest's screen
TIMEOUT_MS = 60_000


@contextlib.contextmanager
def other_origin() -> Iterator[str]:
    """The URL of an empty page served from another port of 127.0.0.1."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _EmptyPage)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


class _EmptyPage(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = b"<!doctype html><title>elsewhere</title>"
        self.send_response(200)
        self.send_header("content-type", "text/html")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    executable = chromium_executable()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    with service_running(tmp_path_factory.mktemp("state")) as running:
        yield running


@pytest.fixture(scope="module")
def guests(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny guests: one printing a counter on COM1 for ever, one powering off after a
    line typed into COM1, one drawing a pattern on a 320x200 screen (then idle for ever;
    a key paints a square, Escape powers off)."""
    require("binutils")
    out = tmp_path_factory.mktemp("guests")
    return {"counter": assemble("serial_counter", out), "echo": assemble("serial_echo", out),
            "display": assemble("display", out, symbols={"width": WIDTH, "height": HEIGHT, "busy": 0})}  # fmt: skip


def log_in(context: Any, service: Service, shots: Path | None = None) -> Any:
    """A page of ``context`` logged in through the log-in form."""
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(service.url)
    assert page.url.startswith(service.url + "login"), page.url
    if shots is not None:
        save_screenshot(page, shots, "web-login.png")
    page.fill("#token", service.token)
    page.click("button[type=submit]")
    page.wait_for_url(service.url)
    page.wait_for_selector("#connection:text('live')")
    return page


def row(page: Any, name: str, state: str | None = None) -> Any:
    selector = f'tr[data-name="{name}"]' + (f'[data-state="{state}"]' if state else "")
    return page.wait_for_selector(selector)


def define_in_page(page: Any, name: str, options: str) -> None:
    page.fill("#define input[name=name]", name)
    page.fill("#define input[name=options]", options)
    page.click("#define button[type=submit]")
    row(page, name, "stopped")


def test_nothing_without_logging_in_and_no_cross_site_requests(browser: Any, service: Service) -> None:
    context = browser.new_context()
    try:
        page = context.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        page.goto(service.url + "vm/x")
        assert page.url == service.url + "login?next=/vm/x"
        assert page.request.get(service.url + "api/vms").status == 401
        assert page.request.get(service.url + "static/vendor/xterm/xterm.mjs", max_redirects=0).status == 303
        opened = page.evaluate("""(url) => new Promise((resolve) => {
            const ws = new WebSocket(url);
            ws.onopen = () => resolve("open");
            ws.onclose = (close) => resolve("closed " + close.code);
        })""", service.url.replace("http", "ws") + "api/events")  # fmt: skip
        assert opened == "closed 1006"  # the handshake refused (HTTP 403)
        # a wrong token: back to the form, which says so
        page.fill("#token", "not-the-token")
        page.click("button[type=submit]")
        page.wait_for_selector("#failed:visible")

        # another origin on the same host (another port: the same site, so the browser sends
        # the session cookie along): its POST reaches the service, which refuses it
        logged_in = log_in(context, service)
        with other_origin() as elsewhere:
            cross = context.new_page()
            cross.goto(elsewhere)
            sent = cross.evaluate("""(url) => fetch(url, {method: "POST", mode: "no-cors", credentials: "include",
                                          headers: {"Content-Type": "text/plain"}, body: '{"name": "evil"}'})
                                     .then(() => "sent", (error) => "failed: " + error)""",
                                  service.url + "api/vms")  # fmt: skip
        assert sent == "sent"  # an opaque response: the browser sent it
        names = [vm["name"] for vm in logged_in.request.get(service.url + "api/vms").json()]
        assert "evil" not in names

        # the session cookie, but another Origin, or no CSRF token: refused
        cookie = next(c for c in context.cookies() if c["name"] == "trivmm_session")
        assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
        import httpx

        with httpx.Client(base_url=service.url, cookies={cookie["name"]: cookie["value"]}) as client:
            csrf = client.get("/api/session").json()["csrf"]
            body = {"name": "evil", "options": ""}
            evil = client.post("/api/vms", json=body, headers={"origin": "http://evil.example", "x-csrf-token": csrf})
            assert evil.status_code == 403
            assert client.post("/api/vms", json=body, headers={"origin": service.origin}).status_code == 403
            assert "evil" not in [vm["name"] for vm in client.get("/api/vms").json()]
    finally:
        context.close()


def test_log_in_define_start_see_the_console_and_the_screen_and_stop(
        browser: Any, service: Service, guests: dict[str, Path], tmp_path: Path) -> None:  # fmt: skip
    context = browser.new_context(viewport={"width": 1200, "height": 900})
    try:
        page = log_in(context, service, tmp_path)
        define_in_page(page, "counter", f"--kernel {guests['counter']} --memory 16M")
        define_in_page(page, "echo", f"--kernel {guests['echo']} --memory 16M")
        define_in_page(page, "screen", f"--kernel {guests['display']} --memory 16M --display {WIDTH}x{HEIGHT}")
        page.click('tr[data-name="counter"] button[data-action=start]')
        row(page, "counter", "running")
        save_screenshot(page, tmp_path, "web-list.png")

        # the serial console: the counter's lines in xterm.js
        page.click('tr[data-name="counter"] a')
        page.wait_for_url(service.url + "vm/counter")
        page.wait_for_function(f"() => /0000000[2-9a-f]/.test(({XTERM_TEXT})())")
        text = page.evaluate(XTERM_TEXT)
        lines = [int(line, 16) for line in re.findall(r"^[0-9a-f]{8}$", text, re.MULTILINE)]
        assert len(lines) >= 2 and lines == list(range(lines[0], lines[0] + len(lines))), text[-500:]
        save_screenshot(page, tmp_path, "web-console.png", full_page=True)
        page.click(".actions button[data-action=stop]")
        page.wait_for_selector("#state.stopped")
        page.wait_for_function(f"() => ({XTERM_TEXT})().includes('[the VM stopped]')")

        # keystrokes: the echo guest powers off after a newline typed into its serial port
        page.goto(service.url + "vm/echo")
        page.click(".actions button[data-action=start]")
        page.wait_for_selector("#state.running")
        page.wait_for_function("() => window.trivmm.console && window.trivmm.console.readyState === 1")
        page.click("#terminal")
        page.keyboard.type("hi")
        page.keyboard.press("Control+J")  # xterm.js sends Ctrl-J as "\n"
        page.wait_for_selector("#state.stopped")
        assert "powered off" in page.inner_text("#state")

        # the display: the guest's pattern through noVNC, pixel for pixel; a key it paints
        page.goto(service.url + "vm/screen")
        page.click(".actions button[data-action=start]")
        page.wait_for_selector("#display-status:text('connected')")
        points = [[0, 0], [100, 50], [WIDTH - 1, HEIGHT - 1]]
        page.wait_for_function(f"() => {{ const c = ({CANVAS})([[100, 50]]); return c && c.pixels[0][2] === 0x80; }}")
        canvas = page.evaluate(CANVAS, points)
        assert (canvas["width"], canvas["height"]) == (WIDTH, HEIGHT)
        assert canvas["pixels"] == [[x & 0xFF, y & 0xFF, 0x80] for x, y in points]
        save_screenshot(page, tmp_path, "web-display.png", full_page=True)
        page.click("#screen canvas")
        page.keyboard.press("a")  # the guest paints a 16x16 square in the scancode's grey
        grey = "p[0] === p[1] && p[1] === p[2] && p[0] > 0"
        page.wait_for_function(f"() => {{ const p = ({CANVAS})([[5, 5]]).pixels[0]; return {grey}; }}")
        page.click(".actions button[data-action=force-stop]")
        page.wait_for_selector("#state.stopped")
        assert "forced off" in page.inner_text("#state")

        # back in the list: every VM stopped, and delete one
        page.goto(service.url)
        for name in ("counter", "echo", "screen"):
            row(page, name, "stopped")
        page.once("dialog", lambda dialog: dialog.accept())
        page.click('tr[data-name="echo"] button[data-action=delete]')
        page.wait_for_selector('tr[data-name="echo"]', state="detached")
    finally:
        context.close()


def test_a_hundred_vms_are_listed_and_a_start_shows_quickly(browser: Any, service: Service, guests: dict[str, Path],
                                                            tmp_path: Path) -> None:  # fmt: skip
    """Reports the time from a click on Start to the row showing the VM starting and then
    running (the issue's target: 200 ms), with 100 VMs in the list."""
    names = [f"many-{i:03}" for i in range(100)]
    with service.client() as client:
        for name in names:
            response = client.post("/api/vms", json={"name": name, "options": f"--kernel {guests['counter']} "
                                                                               "--memory 16M"})  # fmt: skip
            assert response.status_code == 201, response.text
    context = browser.new_context(viewport={"width": 1200, "height": 900})
    try:
        page = log_in(context, service)
        page.wait_for_function("() => document.querySelectorAll('tr[data-name^=\"many-\"]').length === 100")
        listed = page.eval_on_selector_all("tr[data-name^='many-']", "rows => rows.map(r => r.dataset.name)")
        assert listed == names
        timing = page.evaluate("""(name) => new Promise((resolve) => {
            const row = document.querySelector(`tr[data-name="${name}"]`);
            const started = performance.now();
            let reacted = null;
            new MutationObserver((changes, observer) => {
                if (reacted === null && row.dataset.state !== "stopped") reacted = performance.now() - started;
                if (row.dataset.state === "running") {
                    observer.disconnect();
                    resolve({reacted, running: performance.now() - started});
                }
            }).observe(row, {attributes: true});
            row.querySelector("button[data-action=start]").click();
        })""", "many-050")  # fmt: skip
        report = {"vms_listed": len(listed), "start_shown_ms": round(timing["reacted"], 1),
                  "running_shown_ms": round(timing["running"], 1)}  # fmt: skip
        (tmp_path / "web-100-vms.json").write_text(json.dumps(report))
        print(f"\nweb console with 100 VMs: {report}")
        assert timing["running"] >= timing["reacted"] > 0
        with service.client() as client:
            assert client.post("/api/vms/many-050/stop", json={"force": True}).json()["state"] == "stopped"
    finally:
        context.close()


# the keys for the characters that need Shift on a US keyboard (Playwright's keyboard.type
# sends "$" as Digit4 without Shift, and noVNC passes on the key, not the character)
_SHIFTED = {"$": "Digit4", "(": "Digit9", ")": "Digit0", "*": "Digit8", ">": "Period", "_": "Minus"}
_KEYS = {" ": "Space", "-": "Minus", "/": "Slash", ".": "Period", "\n": "Enter"}


def type_keys(page: Any, text: str) -> None:
    """``text`` typed key by key as on a US keyboard, a few keys at a time (the guest reads
    each scancode at an interrupt, its kernel code emulated on the nested host)."""
    for index, char in enumerate(text):
        if char in _SHIFTED:
            key = f"Shift+{_SHIFTED[char]}"
        elif char.isupper():
            key = f"Shift+Key{char}"
        else:
            key = _KEYS.get(char, char)
        page.keyboard.press(key, delay=30)
        if index % 8 == 7:
            time.sleep(0.5)


CANVAS_PNG = "() => document.querySelector('#screen canvas').toDataURL('image/png')"


@pytest.mark.e2e
def test_the_small_linux_guest_console_and_fbcon_in_the_browser(browser: Any, tmp_path: Path) -> None:
    """The small Debian-built guest with an 800x600 display: /init's marker on the serial
    console in xterm.js; fbcon's text on the screen through noVNC (read by tesseract);
    a command typed into noVNC runs in the shell on tty1 and writes to the serial port."""
    from tests.e2e.test_display_linux import (
        FBCON_OPTIONS,
        SCREEN_MARKER,
        SCREEN_SCRIPT,
        _tesseract,
        best_line_match,
        ocr,
    )
    from tests.e2e.test_linux_boot import SMALL_BOOT_TIMEOUT, _guest

    small = _guest("small")
    config = (small / "config").read_text() if (small / "config").exists() else ""
    missing = [option for option in FBCON_OPTIONS if option not in config.splitlines()]
    if missing:
        prerequisite_missing("guests", f"the small guest lacks {', '.join(missing)}: run `python -m trivmm guest "
                                       "build --small-only`")  # fmt: skip
    tesseract = _tesseract()
    command = base64.urlsafe_b64encode(SCREEN_SCRIPT.encode()).decode().rstrip("=")
    options = (f"--kernel {small / 'vmlinux'} --initrd {small / 'initramfs.cpio'} --display 800x600 "
               f"--append 'quiet trivmm.cmd={command} trivmm.vtshell'")  # fmt: skip
    with service_running(tmp_path / "state") as service:
        context = browser.new_context(viewport={"width": 1200, "height": 1100})
        try:
            page = log_in(context, service)
            define_in_page(page, "debian", options)
            page.goto(service.url + "vm/debian")
            started = time.monotonic()
            page.click(".actions button[data-action=start]")
            page.wait_for_selector("#state.running")
            page.wait_for_function(f"() => ({XTERM_TEXT})().includes('TRIVMM-VTSHELL-READY')",
                                   timeout=SMALL_BOOT_TIMEOUT * 1000)  # fmt: skip
            print(f"\nboot to the VT shell seen in xterm.js: {time.monotonic() - started:.1f} s")
            assert "TRIVMM-CMD-END rc=0" in page.evaluate(XTERM_TEXT)
            page.wait_for_selector("#display-status:text('connected')")
            screen = tmp_path / "linux-screen.png"
            deadline = time.monotonic() + 120
            while True:  # fbcon draws at emulated CPL0: the marker may take a while
                canvas = page.evaluate(CANVAS, [])
                screen.write_bytes(base64.b64decode(page.evaluate(CANVAS_PNG).split(",", 1)[1]))
                text = ocr(tesseract, screen)
                if SCREEN_MARKER in text.upper() or time.monotonic() > deadline:
                    break
                time.sleep(2)
            assert (canvas["width"], canvas["height"]) == (800, 600)
            assert canvas["lit"] > 500, "a blank screen"
            save_screenshot(page, tmp_path, "web-linux.png", full_page=True)
            # OCR of fbcon's 8x16 glyphs is near exact: a letter misread (V as U) passes, a screen without the line not
            score, line = best_line_match(text, SCREEN_MARKER)
            assert SCREEN_MARKER in text.upper() or score >= 0.85, f"OCR read {text!r} (best: {line!r}, {score:.2f})"
            # typed into noVNC: the shell on tty1 runs it and writes to the serial port
            page.click("#screen canvas")
            try:
                type_keys(page, "echo web-typed-$((6*7)) >/dev/ttyS0\n")
                page.wait_for_function(f"() => ({XTERM_TEXT})().includes('web-typed-42')", timeout=300_000)
                time.sleep(2)
            finally:
                save_screenshot(page, tmp_path, "web-linux.png", full_page=True)
            page.click(".actions button[data-action=force-stop]")
            page.wait_for_selector("#state.stopped")
        finally:
            context.close()
