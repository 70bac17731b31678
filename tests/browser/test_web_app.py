"""The web console's app without a browser or KVM (FakeManager): the token file, log-in,
sessions, what is refused without them (pages, API, websockets), cross-site requests, the
API's errors, the websockets' messages, and serve_web on hypercorn under trio and asyncio."""

from __future__ import annotations

import os
import socket
import stat
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import anyio
import httpx
import pytest
from starlette.websockets import WebSocketDisconnect

from tests.browser.fake_manager import FakeManager
from trivmm.host.model import HostError, VmState
from trivmm.host.web import serve_web
from trivmm.host.web._app import WebConsole
from trivmm.host.web._auth import COOKIE, load_or_create_token

with warnings.catch_warnings():  # Starlette >= 1.x would rather have httpx2 than httpx here; either works
    warnings.simplefilter("ignore", UserWarning)
    from starlette.testclient import TestClient

TOKEN = "t" * 43
ORIGIN = {"origin": "http://testserver"}


@pytest.fixture(params=["trio", "asyncio"])
def manager_and_client(request: pytest.FixtureRequest) -> Iterator[tuple[FakeManager, TestClient]]:
    manager = FakeManager()
    with TestClient(WebConsole(cast(Any, manager), TOKEN).app(), backend=request.param) as client:  # type: ignore[arg-type]
        yield manager, client


def log_in(client: TestClient) -> dict[str, str]:
    """Logs ``client`` in; the headers its state-changing requests need."""
    response = client.post("/login", data={"token": TOKEN, "next": "/vm/x"}, headers=ORIGIN, follow_redirects=False)
    assert response.status_code == 303 and response.headers["location"] == "/vm/x"
    cookie = response.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/" in cookie
    csrf = client.get("/api/session").json()["csrf"]
    return {**ORIGIN, "x-csrf-token": csrf}


def test_the_token_file_is_made_private_once_and_then_read(tmp_path: Path) -> None:
    token = load_or_create_token(tmp_path)
    path = tmp_path / "web-token"
    assert len(token) >= 40 and path.read_text() == token + "\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    path.chmod(0o644)
    assert load_or_create_token(tmp_path) == token
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    path.write_text("short\n")
    with pytest.raises(HostError, match="does not hold a token"):
        load_or_create_token(tmp_path)


def test_nothing_is_reachable_without_logging_in(manager_and_client: tuple[FakeManager, TestClient]) -> None:
    manager, client = manager_and_client
    page = client.get("/vm/a", follow_redirects=False)
    assert page.status_code == 303 and page.headers["location"] == "/login?next=/vm/a"
    for path in ("/api/vms", "/api/session", "/static/vendor/xterm/xterm.mjs", "/static/index.js"):
        response = client.get(path, follow_redirects=False)
        assert response.status_code in (303, 401), path
        assert b"xterm" not in response.content
    assert client.get("/api/vms").json() == {"error": "log in first"}
    assert client.post("/api/vms", json={"name": "a"}, headers=ORIGIN).status_code == 401
    for path in ("/api/events", "/api/vms/a/console", "/api/vms/a/display"):
        with pytest.raises(WebSocketDisconnect) as refused, client.websocket_connect(path, headers=ORIGIN):
            pass
        assert refused.value.code == 1008, path
    assert manager.vms == {}
    login = client.get("/login")
    assert login.status_code == 200 and b'name="token"' in login.content
    assert "frame-ancestors 'none'" in login.headers["content-security-policy"]


def test_a_wrong_token_fails_and_repeated_failures_are_limited(manager_and_client: tuple[FakeManager, TestClient]
                                                               ) -> None:  # fmt: skip
    _, client = manager_and_client
    failed = client.post("/login", data={"token": "wrong", "next": "/vm/a?x=1&y=2"}, headers=ORIGIN,
                         follow_redirects=False)  # fmt: skip
    assert failed.headers["location"] == "/login?failed=1&next=/vm/a%3Fx%3D1%26y%3D2"
    for _ in range(4):
        response = client.post("/login", data={"token": "wrong"}, headers=ORIGIN, follow_redirects=False)
        assert response.status_code == 303 and response.headers["location"].startswith("/login?failed=1")
        assert COOKIE not in response.headers.get("set-cookie", "")
    limited = client.post("/login", data={"token": TOKEN}, headers=ORIGIN, follow_redirects=False)
    assert limited.status_code == 429 and int(limited.headers["retry-after"]) > 0
    assert client.get("/api/vms").status_code == 401


def test_log_in_goes_only_to_a_local_page(manager_and_client: tuple[FakeManager, TestClient]) -> None:
    _, client = manager_and_client
    for target in ("//evil.example/x", "http://evil.example/", "/\\evil.example"):
        response = client.post("/login", data={"token": TOKEN, "next": target}, headers=ORIGIN, follow_redirects=False)
        assert response.status_code == 303 and response.headers["location"] == "/", target


def test_cross_site_and_csrf_less_requests_are_refused(manager_and_client: tuple[FakeManager, TestClient]) -> None:
    manager, client = manager_and_client
    cross = client.post("/login", data={"token": TOKEN}, headers={"origin": "http://evil.example"},
                        follow_redirects=False)  # fmt: skip
    assert cross.status_code == 403 and "cross-site" in cross.json()["error"]
    assert client.post("/login", data={"token": TOKEN}, follow_redirects=False).status_code == 403  # no Origin
    headers = log_in(client)
    body = {"name": "a", "options": "--kernel /k"}
    assert client.post("/api/vms", json=body, headers={"origin": "http://evil.example", "x-csrf-token":
                                                      headers["x-csrf-token"]}).status_code == 403  # fmt: skip
    assert client.post("/api/vms", json=body, headers=ORIGIN).status_code == 403  # no CSRF token
    assert client.post("/api/vms", json=body, headers={**ORIGIN, "x-csrf-token": "x" * 43}).status_code == 403
    assert manager.vms == {}
    with pytest.raises(WebSocketDisconnect) as refused, \
            client.websocket_connect("/api/events", headers={"origin": "http://evil.example"}):  # fmt: skip
        pass
    assert refused.value.code == 1008
    assert client.post("/api/vms", json=body, headers=headers).status_code == 201
    assert list(manager.vms) == ["a"]


def test_the_api_defines_starts_stops_and_deletes(manager_and_client: tuple[FakeManager, TestClient]) -> None:
    manager, client = manager_and_client
    headers = log_in(client)
    created = client.post("/api/vms", json={"name": "web1", "options": "--kernel '/a b/k' --display 640x480"},
                          headers=headers)  # fmt: skip
    assert created.status_code == 201, created.text
    assert created.json() == {"name": "web1", "state": "stopped", "vcpus": 1, "memory": 64 << 20,
                              "display": [640, 480], "autostart": False, "last_exit": None}  # fmt: skip
    assert client.post("/api/vms", json={"name": "web1", "options": ""}, headers=headers).status_code == 409
    bad = client.post("/api/vms", json={"name": "no/slash", "options": ""}, headers=headers)
    assert bad.status_code == 400 and "bad VM name" in bad.json()["error"]
    quoting = client.post("/api/vms", json={"name": "q", "options": "--kernel 'open"}, headers=headers)
    assert quoting.status_code == 400 and "cannot split" in quoting.json()["error"]
    relative = client.post("/api/vms", json={"name": "r", "options": "--kernel k --disk d.img,format=raw"},
                           headers=headers)  # fmt: skip
    assert relative.status_code == 400 and relative.json()["error"].endswith("directory of yours): k, d.img")
    unparsable = client.post("/api/vms", json={"name": "u", "options": "--vcpus many"}, headers=headers)
    assert unparsable.status_code == 400 and "--vcpus" in unparsable.json()["error"]
    assert client.post("/api/vms", content=b"[1]", headers=headers).status_code == 400
    assert client.post("/api/vms/web1/start", json={}, headers=headers).json()["state"] == "running"
    assert client.post("/api/vms/web1/start", json={}, headers=headers).status_code == 409
    assert client.delete("/api/vms/web1", headers=headers).status_code == 409
    assert client.post("/api/vms/web1/explode", json={}, headers=headers).status_code == 404
    assert client.post("/api/vms/web1/stop", json={"force": "yes"}, headers=headers).status_code == 400
    stopped = client.post("/api/vms/web1/stop", json={"force": True}, headers=headers).json()
    assert stopped["state"] == "stopped" and stopped["last_exit"] == "forced off"
    assert client.get("/api/vms/nope").status_code == 404
    assert client.delete("/api/vms/web1", headers=headers).json() == {"ok": True}
    assert client.get("/api/vms").json() == [] and manager.vms == {}
    assert client.post("/logout", headers=headers).status_code == 200
    assert client.get("/api/vms").status_code == 401


def test_static_files_are_served_with_module_types_and_no_escape(manager_and_client: tuple[FakeManager, TestClient]
                                                                 ) -> None:  # fmt: skip
    _, client = manager_and_client
    log_in(client)
    xterm = client.get("/static/vendor/xterm/xterm.mjs")
    assert xterm.status_code == 200 and xterm.headers["content-type"].startswith("text/javascript")
    assert client.get("/static/vendor/novnc/core/rfb.js").status_code == 200
    assert client.get("/static/vendor/novnc/LICENSE.txt").status_code == 200
    assert client.get("/static/../_app.py").status_code == 404
    assert client.get("/static/%2e%2e/_app.py").status_code == 404
    page = client.get("/")
    assert page.status_code == 200 and b'id="vms"' in page.content
    assert page.headers["x-frame-options"] == "DENY"


def test_the_event_and_console_websockets(manager_and_client: tuple[FakeManager, TestClient]) -> None:
    manager, client = manager_and_client
    headers = log_in(client)
    client.post("/api/vms", json={"name": "a", "options": ""}, headers=headers)
    with client.websocket_connect("/api/events", headers=ORIGIN) as events:
        first = events.receive_json()
        assert first["type"] == "list" and [vm["name"] for vm in first["vms"]] == ["a"]
        with client.websocket_connect("/api/vms/a/console", headers=ORIGIN) as console:
            assert console.receive() == {"type": "websocket.close", "code": 4409,
                                         "reason": "VM 'a' is stopped: start it to attach to its console"}  # fmt: skip
        client.post("/api/vms/a/start", json={}, headers=headers)
        event = events.receive_json()
        assert (event["vm"], event["kind"], event["state"], event["summary"]["state"]) == ("a", "state", "running",
                                                                                            "running")  # fmt: skip
        with client.websocket_connect("/api/vms/a/console", headers=ORIGIN) as console:
            assert console.receive_bytes() == b"hello from a\r\n"
            console.send_bytes(b"ls\r")
            assert console.receive_bytes() == b"echo:ls\r"
            console.send_text("é")
            assert console.receive_bytes() == "echo:é".encode()
            client.post("/api/vms/a/stop", json={}, headers=headers)
            assert console.receive() == {"type": "websocket.close", "code": 1000, "reason": "the VM stopped"}
        assert events.receive_json()["state"] == "stopped"
        client.delete("/api/vms/a", headers=headers)
        gone = events.receive_json()
        assert (gone["kind"], gone["summary"]) == ("undefined", None)
    assert manager.vms == {}


def test_a_client_gone_mid_console_leaves_the_service_serving(manager_and_client: tuple[FakeManager, TestClient]
                                                              ) -> None:  # fmt: skip
    manager, client = manager_and_client
    headers = log_in(client)
    client.post("/api/vms", json={"name": "a", "options": ""}, headers=headers)
    client.post("/api/vms/a/start", json={}, headers=headers)
    for _ in range(3):
        with client.websocket_connect("/api/vms/a/console", headers=ORIGIN) as console:
            assert console.receive_bytes() == b"hello from a\r\n"
            console.send_bytes(b"x")  # then gone, without reading the echo
    with client.websocket_connect("/api/events", headers=ORIGIN) as events:
        assert events.receive_json()["vms"][0]["state"] == "running"
    for _ in range(100):  # the handlers notice the disconnects on their own loop
        if not manager._consoles and not manager._subscribers:
            break
        time.sleep(0.01)
    assert manager._consoles == [] and manager._subscribers == []
    assert client.post("/api/vms/a/stop", json={}, headers=headers).json()["state"] == "stopped"


def test_the_display_websocket_bridges_bytes_to_the_vnc_socket(tmp_path: Path) -> None:
    """Bytes both ways between the websocket and the VM's unix socket (a server that
    greets, then echoes upper-cased), with the 'binary' subprotocol noVNC asks for."""
    path = tmp_path / "vnc.sock"
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(path))
    listener.listen(1)
    manager = FakeManager(display_path=path)

    def serve_one() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.sendall(b"RFB 003.008\n")
            while data := conn.recv(100):
                conn.sendall(data.upper())

    import threading

    thread = threading.Thread(target=serve_one, daemon=True)
    thread.start()
    with TestClient(WebConsole(cast(Any, manager), TOKEN).app()) as client:
        headers = log_in(client)
        client.post("/api/vms", json={"name": "d", "options": "--display 640x480"}, headers=headers)
        with client.websocket_connect("/api/vms/d/display", headers=ORIGIN) as ws:
            assert ws.receive()["code"] == 4409  # not running: no display
        client.post("/api/vms/d/start", json={}, headers=headers)
        with client.websocket_connect("/api/vms/d/display", headers=ORIGIN, subprotocols=["binary"]) as ws:
            assert ws.accepted_subprotocol == "binary"
            assert ws.receive_bytes() == b"RFB 003.008\n"
            ws.send_bytes(b"abc")
            assert ws.receive_bytes() == b"ABC"
    thread.join(5)
    listener.close()
    assert not thread.is_alive()


@pytest.mark.parametrize("backend", ["trio", "asyncio"])
def test_serve_web_on_hypercorn(backend: str, tmp_path: Path) -> None:
    """serve_web on port 0 reports its port; the token file it made logs a client in."""
    manager = FakeManager()

    async def main() -> None:
        async with anyio.create_task_group() as group:
            port = await group.start(serve_web, cast(Any, manager), "127.0.0.1", 0, tmp_path)
            assert port > 0
            token = (tmp_path / "web-token").read_text().strip()
            base = f"http://127.0.0.1:{port}"
            async with httpx.AsyncClient(base_url=base) as client:
                assert (await client.get("/api/vms")).status_code == 401
                login = await client.post("/login", data={"token": token}, headers={"origin": base})
                assert login.status_code == 303, login.text
                assert (await client.get("/api/vms")).json() == []
                csrf = (await client.get("/api/session")).json()["csrf"]
                defined = await client.post("/api/vms", json={"name": "h", "options": ""},
                                            headers={"origin": base, "x-csrf-token": csrf})  # fmt: skip
                assert defined.status_code == 201
            group.cancel_scope.cancel()

    anyio.run(main, backend=backend)
    assert manager.info("h").state is VmState.STOPPED
    assert stat.S_IMODE(os.stat(tmp_path / "web-token").st_mode) == 0o600


@pytest.mark.parametrize(("path", "logged_in"), [("/login", False), ("/api/vms", True), ("/api/vms/a/start", True)])
def test_an_oversized_body_is_refused_without_being_read(path: str, logged_in: bool) -> None:
    """A client (logged in or not) streaming a huge body gets 413 after the first chunk past
    the limit; the service does not buffer the rest (it used to read all of it first)."""
    console = WebConsole(cast(Any, FakeManager()), TOKEN)
    app = console.app()
    headers = [(b"host", b"h"), (b"origin", b"http://h"), (b"content-type", b"application/json")]
    if logged_in:
        session_id, session = console.sessions.create()
        headers += [(b"cookie", f"{COOKIE}={session_id}".encode()), (b"x-csrf-token", session.csrf.encode())]
    pulled = 0
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        nonlocal pulled
        pulled += 1
        return {"type": "http.request", "body": b"x" * (1 << 20), "more_body": pulled < 100}

    async def send(message: Any) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": path, "raw_path": path.encode(), "query_string": b"",
             "headers": headers, "scheme": "http", "server": ("h", 80), "client": ("192.0.2.1", 5),
             "root_path": "", "http_version": "1.1", "asgi": {"version": "3.0"}}  # fmt: skip
    anyio.run(app, scope, receive, send)
    assert sent[0]["status"] == 413 and pulled == 1
    assert b"over" in sent[1]["body"]
    declared = [*headers, (b"content-length", str(1 << 30).encode())]
    pulled, sent = 0, []
    anyio.run(app, {**scope, "headers": declared}, receive, send)
    assert sent[0]["status"] == 413 and pulled == 0



def _console_typed_then_gone(port: int, cookie: str) -> None:
    """A raw websocket client (wsproto, as hypercorn uses): attaches to VM a's console,
    types, closes and goes."""
    import wsproto
    import wsproto.events

    origin = f"http://127.0.0.1:{port}"
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        ws = wsproto.WSConnection(wsproto.ConnectionType.CLIENT)
        request = wsproto.events.Request(host=f"127.0.0.1:{port}", target="/api/vms/a/console",
                                         extra_headers=[(b"origin", origin.encode()), (b"cookie", cookie.encode())])
        sock.sendall(ws.send(request))
        ws.receive_data(sock.recv(65536))
        assert any(isinstance(event, wsproto.events.AcceptConnection) for event in ws.events())
        sock.sendall(ws.send(wsproto.events.BytesMessage(data=b"typed ahead of the guest")))
        sock.sendall(ws.send(wsproto.events.CloseConnection(code=1000)))
        time.sleep(0.1)


@pytest.mark.parametrize("backend", ["trio", "asyncio"])
def test_a_console_client_gone_while_the_guest_reads_no_input_is_let_go(
        backend: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """Typing into a guest that never drains its serial port used to hold the websocket's
    reader in ``send``, and hypercorn drops what is sent to a closed websocket silently, so
    a client that left was never noticed: its console stayed attached (a task and a buffer
    per such client) until the VM stopped."""
    from tests.browser.fake_manager import FakeConsole

    async def never_drained(self: FakeConsole, data: bytes) -> None:
        await anyio.sleep_forever()

    monkeypatch.setattr(FakeConsole, "send", never_drained)
    manager = FakeManager()

    async def main() -> None:
        async with anyio.create_task_group() as group:
            port = await group.start(serve_web, cast(Any, manager), "127.0.0.1", 0, tmp_path)
            base = f"http://127.0.0.1:{port}"
            async with httpx.AsyncClient(base_url=base) as client:
                await client.post("/login", data={"token": (tmp_path / "web-token").read_text().strip()},
                                  headers={"origin": base})  # fmt: skip
                headers = {"origin": base, "x-csrf-token": (await client.get("/api/session")).json()["csrf"]}
                await client.post("/api/vms", json={"name": "a", "options": ""}, headers=headers)
                await client.post("/api/vms/a/start", json={}, headers=headers)
                cookie = f"{COOKIE}={client.cookies[COOKIE]}"
            for _ in range(3):
                await anyio.to_thread.run_sync(_console_typed_then_gone, port, cookie)
            with anyio.move_on_after(5):
                while manager._consoles:
                    await anyio.sleep(0.02)
            assert manager._consoles == []
            group.cancel_scope.cancel()

    anyio.run(main, backend=backend)


def test_input_a_guest_does_not_read_is_bounded(manager_and_client: tuple[FakeManager, TestClient],
                                                monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """Over MAX_PENDING_INPUT bytes typed ahead of a guest that does not read them close the
    console (1008) rather than pile up in the service."""
    from tests.browser.fake_manager import FakeConsole
    from trivmm.host.web._app import MAX_PENDING_INPUT

    async def never_drained(self: FakeConsole, data: bytes) -> None:
        await anyio.sleep_forever()

    monkeypatch.setattr(FakeConsole, "send", never_drained)
    manager, client = manager_and_client
    headers = log_in(client)
    client.post("/api/vms", json={"name": "a", "options": ""}, headers=headers)
    client.post("/api/vms/a/start", json={}, headers=headers)
    with client.websocket_connect("/api/vms/a/console", headers=ORIGIN) as console:
        assert console.receive_bytes() == b"hello from a\r\n"
        for _ in range(4):  # one in the guest's hands, then more than the limit waiting
            console.send_bytes(b"k" * (MAX_PENDING_INPUT // 2))
        closed = console.receive()
        assert closed["type"] == "websocket.close" and closed["code"] == 1008, closed
    for _ in range(200):
        if not manager._consoles:
            break
        time.sleep(0.01)
    assert manager._consoles == []
