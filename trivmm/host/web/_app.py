"""The web console's Starlette app: pages, the JSON API and the websockets (the live VM
list, a VM's serial console, its VNC display), all behind ``AuthMiddleware``.

API (JSON; errors are ``{"error": sentence}`` with 400, 401, 403, 404, 409 or 413: a body
over 64 KiB, 4 KiB for the log-in form, is refused without being read further):
    GET    /api/session                 {"csrf": token} for the page's state-changing requests
    GET    /api/vms                     [summary, ...]
    POST   /api/vms                     {"name", "options" (run's options, shell-quoted), "autostart"}
    GET    /api/vms/NAME                summary
    DELETE /api/vms/NAME                undefine
    POST   /api/vms/NAME/ACTION         start, stop ({"force": bool}), reset, pause, resume
Websockets:
    /api/events                         {"type": "list", "vms": [...]}, then {"type": "event", ...}
    /api/vms/NAME/console               binary: the console's history then its output; input back
    /api/vms/NAME/display               binary both ways: the VM's VNC socket (as websockify)
A websocket that cannot be served is accepted and closed with 4000 + the HTTP status and a reason.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import shlex
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, quote

import anyio
import attrs
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from trivmm.errors import ConfigError
from trivmm.host.model import HostError, HostEvent, UnknownVm, VmStateConflict, VmSummary
from trivmm.host.verbs import relative_paths
from trivmm.host.web._auth import COOKIE, AuthMiddleware, LoginLimiter, Session, Sessions

if TYPE_CHECKING:
    from trivmm.host.manager import HostManager

__all__ = ["STATIC", "WebConsole", "summary_json"]

STATIC = Path(__file__).parent / "static"
MAX_BODY = 64 * 1024
MAX_LOGIN_BODY = 4096
MAX_PENDING_INPUT = 1 << 20  # bytes a websocket's client may send ahead of the guest or display
ACTIONS = ("start", "stop", "reset", "pause", "resume")
MEDIA_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
               ".mjs": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8",
               ".png": "image/png", ".svg": "image/svg+xml", ".txt": "text/plain; charset=utf-8"}  # fmt: skip


def summary_json(summary: VmSummary) -> dict[str, Any]:
    return {"name": summary.name, "state": summary.state.value, "vcpus": summary.vcpus, "memory": summary.memory,
            "display": list(summary.display) if summary.display else None, "autostart": summary.autostart,
            "last_exit": summary.last_exit}  # fmt: skip


def _error(exc: HostError) -> JSONResponse:
    status = 404 if isinstance(exc, UnknownVm) else 409 if isinstance(exc, VmStateConflict) else 400
    return JSONResponse({"error": str(exc)}, status_code=status)


def _bad_request(reason: str) -> JSONResponse:
    return JSONResponse({"error": reason}, status_code=400)


class _BodyTooLarge(ValueError):
    """A request body over its limit (413)."""


async def _limited_body(request: Request, limit: int) -> bytes:
    """The request's body, read no further than ``limit`` bytes: ``_BodyTooLarge`` beyond
    (a Content-Length over it is refused before anything is read), so no client, logged in
    or not, makes the service buffer more."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise _BodyTooLarge(f"the request body is over {limit} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise _BodyTooLarge(f"the request body is over {limit} bytes")
    return bytes(body)


def _too_large(exc: _BodyTooLarge) -> JSONResponse:
    return JSONResponse({"error": str(exc)}, status_code=413, headers={"connection": "close"})


async def _json_body(request: Request) -> dict[str, Any]:
    body = await _limited_body(request, MAX_BODY)
    if not body:
        return {}
    try:
        value = json.loads(body)
    except ValueError as exc:
        raise ValueError("the request body is not JSON") from exc
    if not isinstance(value, dict):
        raise ValueError("the request body is not a JSON object")
    return value


def _safe_next(target: str | None) -> str:
    """A local path to go to after logging in ('/' unless ``target`` is one)."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    return target


@attrs.define(eq=False)
class WebConsole:
    """The app's state: the manager it drives, the login token and the session table."""

    manager: HostManager
    token: str
    sessions: Sessions = attrs.field(factory=Sessions)
    limiter: LoginLimiter = attrs.field(factory=LoginLimiter)

    def app(self) -> AuthMiddleware:
        routes = [
            Route("/", self._page("index.html")),
            Route("/vm/{name}", self._page("vm.html")),
            Route("/login", self._login_page, methods=["GET"]),
            Route("/login", self._login, methods=["POST"]),
            Route("/logout", self._logout, methods=["POST"]),
            Route("/static/{path:path}", self._static),
            Route("/api/session", self._session),
            Route("/api/vms", self._list, methods=["GET"]),
            Route("/api/vms", self._define, methods=["POST"]),
            Route("/api/vms/{name}", self._info, methods=["GET"]),
            Route("/api/vms/{name}", self._undefine, methods=["DELETE"]),
            Route("/api/vms/{name}/{action}", self._action, methods=["POST"]),
            WebSocketRoute("/api/events", self._events),
            WebSocketRoute("/api/vms/{name}/console", self._console),
            WebSocketRoute("/api/vms/{name}/display", self._display),
        ]
        return AuthMiddleware(Starlette(routes=routes), self.sessions)

    # --- pages -----------------------------------------------------------------------------
    @staticmethod
    def _page(name: str) -> Callable[[Request], Awaitable[Response]]:
        async def page(request: Request) -> Response:
            return FileResponse(STATIC / name, media_type=MEDIA_TYPES[".html"], headers={"cache-control": "no-store"})

        return page

    async def _static(self, request: Request) -> Response:
        relative = request.path_params["path"]
        path = (STATIC / relative).resolve()
        if not path.is_relative_to(STATIC.resolve()) or not path.is_file() or path.suffix not in MEDIA_TYPES:
            return Response("not found", status_code=404, media_type="text/plain")
        return FileResponse(path, media_type=MEDIA_TYPES[path.suffix])

    async def _login_page(self, request: Request) -> Response:
        if request.scope.get("trivmm.session") is not None:
            return RedirectResponse(_safe_next(request.query_params.get("next")), status_code=303)
        return FileResponse(STATIC / "login.html", media_type=MEDIA_TYPES[".html"],
                            headers={"cache-control": "no-store"})  # fmt: skip

    async def _login(self, request: Request) -> Response:
        client = request.client.host if request.client else "?"
        wait = self.limiter.retry_after(client)
        if wait > 0:
            return JSONResponse({"error": f"too many failed log-ins; try again in {wait:.0f} s"}, status_code=429,
                                headers={"retry-after": str(int(wait) + 1)})  # fmt: skip
        try:
            body = await _limited_body(request, MAX_LOGIN_BODY)
        except _BodyTooLarge as exc:
            return _too_large(exc)
        form = parse_qs(body.decode("latin-1"))
        token = (form.get("token") or [""])[0].strip()
        nxt = _safe_next(form.get("next", [""])[0])
        if not hmac.compare_digest(token.encode(), self.token.encode()):
            self.limiter.failed(client)
            return RedirectResponse("/login?failed=1&next=" + quote(nxt, safe="/"), status_code=303)
        session_id, _ = self.sessions.create()
        response = RedirectResponse(nxt, status_code=303)
        response.set_cookie(COOKIE, session_id, httponly=True, samesite="strict", path="/",
                            secure=request.url.scheme == "https")  # fmt: skip
        return response

    async def _logout(self, request: Request) -> Response:
        self.sessions.drop(request.cookies.get(COOKIE))
        response = JSONResponse({"ok": True})
        response.delete_cookie(COOKIE, path="/", httponly=True, samesite="strict")
        return response

    # --- API -------------------------------------------------------------------------------
    async def _session(self, request: Request) -> Response:
        session: Session = request.scope["trivmm.session"]
        return JSONResponse({"csrf": session.csrf}, headers={"cache-control": "no-store"})

    async def _list(self, request: Request) -> Response:
        return JSONResponse([summary_json(s) for s in self.manager.list()], headers={"cache-control": "no-store"})

    async def _info(self, request: Request) -> Response:
        try:
            return JSONResponse(summary_json(self.manager.info(request.path_params["name"])))
        except HostError as exc:
            return _error(exc)

    async def _define(self, request: Request) -> Response:
        try:
            body = await _json_body(request)
            name, options, autostart = body.get("name"), body.get("options", ""), body.get("autostart", False)
            if not isinstance(name, str) or not isinstance(options, str) or not isinstance(autostart, bool):
                raise ValueError('give "name" and "options" as strings and "autostart" as true or false')
            try:
                run_args = shlex.split(options)
            except ValueError as exc:
                raise ValueError(f"cannot split the options: {exc}") from exc
            try:
                relative = relative_paths(run_args)
            except ConfigError as exc:
                raise ValueError(str(exc)) from exc
            if relative:  # the service's directory is nobody's choice: say where
                raise ValueError(f"give absolute paths (the service has no current directory of yours): "
                                 f"{', '.join(relative)}")  # fmt: skip
        except _BodyTooLarge as exc:
            return _too_large(exc)
        except ValueError as exc:
            return _bad_request(str(exc))
        try:
            summary = await self.manager.define(name, run_args, autostart=autostart)
        except HostError as exc:
            return _error(exc)
        return JSONResponse(summary_json(summary), status_code=201)

    async def _undefine(self, request: Request) -> Response:
        try:
            await self.manager.undefine(request.path_params["name"])
        except HostError as exc:
            return _error(exc)
        return JSONResponse({"ok": True})

    async def _action(self, request: Request) -> Response:
        name, action = request.path_params["name"], request.path_params["action"]
        if action not in ACTIONS:
            return JSONResponse({"error": f"no action {action!r}; use one of {', '.join(ACTIONS)}"}, status_code=404)
        try:
            body = await _json_body(request)
            force = body.get("force", False)
            if not isinstance(force, bool):
                raise ValueError('"force" is true or false')
        except _BodyTooLarge as exc:
            return _too_large(exc)
        except ValueError as exc:
            return _bad_request(str(exc))
        manager = self.manager
        try:
            if action == "start":
                summary = await manager.start(name)
            elif action == "stop":
                summary = await manager.stop(name, force=force)
            elif action == "reset":
                summary = await manager.reset(name)
            elif action == "pause":
                summary = await manager.pause(name)
            else:
                summary = await manager.resume(name)
        except HostError as exc:
            return _error(exc)
        return JSONResponse(summary_json(summary))

    # --- websockets ------------------------------------------------------------------------
    async def _events(self, websocket: WebSocket) -> None:
        await websocket.accept()
        async with self.manager.subscribe() as events, _until_disconnect(websocket) as scope:
            with scope:
                await websocket.send_json({"type": "list", "vms": [summary_json(s) for s in self.manager.list()]})
                async for event in events:
                    await websocket.send_json(self._event_json(event))

    def _event_json(self, event: HostEvent) -> dict[str, Any]:
        message: dict[str, Any] = {"type": "event", "time": event.time, "vm": event.vm, "kind": event.kind,
                                   "state": event.state.value if event.state else None, "detail": event.detail,
                                   "summary": None}  # fmt: skip
        if event.vm is not None and event.kind != "undefined":
            with contextlib.suppress(UnknownVm):
                message["summary"] = summary_json(self.manager.info(event.vm))
        return message

    async def _console(self, websocket: WebSocket) -> None:
        async with contextlib.AsyncExitStack() as stack:
            try:
                attachment = await stack.enter_async_context(self.manager.console(websocket.path_params["name"]))
            except HostError as exc:
                await _close_with_error(websocket, exc)
                return
            await websocket.accept()
            await websocket.send_bytes(attachment.history)

            async def output() -> None:
                try:
                    while True:
                        await websocket.send_bytes(await attachment.receive())
                except (anyio.EndOfStream, anyio.ClosedResourceError):
                    await websocket.close(1000, "the VM stopped")

            async with _until_disconnect(websocket, on_data=attachment.send) as scope:
                with scope:
                    await output()

    async def _display(self, websocket: WebSocket) -> None:
        name = websocket.path_params["name"]
        try:
            path = self.manager.display_socket(name)
            if path is None:
                raise VmStateConflict(f"VM {name} has no display (it is not running, or runs without --display).")
        except HostError as exc:
            await _close_with_error(websocket, exc)
            return
        try:
            stream = await anyio.connect_unix(path)
        except OSError as exc:
            await _close_with_error(websocket, VmStateConflict(f"cannot reach VM {name}'s display: {exc.strerror}."))
            return
        async with stream:
            protocols = websocket.scope.get("subprotocols") or []
            await websocket.accept(subprotocol="binary" if "binary" in protocols else None)

            async def from_vnc() -> None:
                try:
                    while True:
                        await websocket.send_bytes(await stream.receive(65536))
                except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
                    await websocket.close(1000, "the display closed")

            async with _until_disconnect(websocket, on_data=stream.send) as scope:
                with scope:
                    await from_vnc()


async def _close_with_error(websocket: WebSocket, exc: HostError) -> None:
    status = 404 if isinstance(exc, UnknownVm) else 409 if isinstance(exc, VmStateConflict) else 400
    await websocket.accept()
    await websocket.close(4000 + status, str(exc)[:120])


@contextlib.asynccontextmanager
async def _until_disconnect(websocket: WebSocket, on_data: Callable[[bytes], Awaitable[None]] | None = None
                            ) -> AsyncIterator[anyio.CancelScope]:  # fmt: skip
    """A cancel scope for the caller's work, cancelled when the client goes away; meanwhile
    the client's messages go to ``on_data`` (bytes; text as UTF-8), or are dropped.

    The client's messages are read on their own task and handed to ``on_data`` by another,
    so a disconnect is seen even while ``on_data`` waits (a guest that does not drain its
    serial port, a VNC server that does not read); at most ``MAX_PENDING_INPUT`` bytes wait
    for it, beyond which the connection is closed (1008)."""
    scope = anyio.CancelScope()
    pending = bytearray()
    wake = anyio.Event()

    async def reader() -> None:
        nonlocal wake
        try:
            while True:
                message = await websocket.receive()
                if message["type"] == "websocket.disconnect":
                    break
                data = message.get("bytes")
                if data is None and message.get("text") is not None:
                    data = message["text"].encode()
                if not data or on_data is None:
                    continue
                pending.extend(data)
                wake.set()
                if len(pending) > MAX_PENDING_INPUT:
                    with contextlib.suppress(Exception):
                        await websocket.close(1008, "input is not being read (over 1 MiB waits)")
                    break
        except (WebSocketDisconnect, anyio.BrokenResourceError, anyio.ClosedResourceError, RuntimeError):
            pass
        finally:
            scope.cancel()

    async def writer() -> None:
        nonlocal wake
        assert on_data is not None
        try:
            while True:
                await wake.wait()
                wake = anyio.Event()
                while pending:
                    data = bytes(pending)
                    pending.clear()
                    await on_data(data)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, anyio.EndOfStream, OSError):
            scope.cancel()  # the VM stopped, or its display closed

    async with anyio.create_task_group() as group:
        group.start_soon(reader)
        if on_data is not None:
            group.start_soon(writer)
        try:
            yield scope
        finally:
            group.cancel_scope.cancel()
