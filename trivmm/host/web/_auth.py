"""The web console's log-in: the token file, server-side sessions, CSRF and Origin checks,
and the ASGI middleware that lets nothing but the log-in page through without a session.

* The token is ``secrets.token_urlsafe(32)`` in ``STATE_DIR/web-token`` (mode 0600), made
  at the first start; whoever can read that file may log in.
* A session is a random cookie (HttpOnly, SameSite=Strict) whose SHA-256 keys a server-side
  table (so a lookup's timing says nothing about valid ids); each has its own CSRF token.
* A state-changing request (anything but GET/HEAD) needs an Origin equal to its own
  ``http://Host`` and, once logged in, the session's CSRF token in ``X-CSRF-Token``; a
  websocket needs the same Origin and the session. Tokens are compared in constant time.
* Failed log-ins are limited per client address: ``FAILURES_ALLOWED`` per ``FAILURE_WINDOW``.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import stat
import time
from collections import OrderedDict, deque
from http.cookies import SimpleCookie
from pathlib import Path
from urllib.parse import quote

import attrs
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from trivmm.host.model import HostError

__all__ = ["TOKEN_FILE", "COOKIE", "CSRF_HEADER", "Session", "Sessions", "LoginLimiter", "AuthMiddleware",
           "load_or_create_token", "same_origin"]  # fmt: skip

TOKEN_FILE = "web-token"
COOKIE = "trivmm_session"
CSRF_HEADER = "x-csrf-token"
SESSION_IDLE_LIMIT = 12 * 3600.0  # seconds without a request before a session is forgotten
MAX_SESSIONS = 256  # the oldest is dropped beyond this
FAILURES_ALLOWED = 5
FAILURE_WINDOW = 60.0
PUBLIC_PATHS = frozenset({"/login", "/static/style.css", "/static/login.js"})
SAFE_METHODS = frozenset({"GET", "HEAD"})


def load_or_create_token(state_dir: Path) -> str:
    """The log-in token in ``state_dir/web-token``, made (mode 0600) when the file is absent.
    A file others may read is made private again; an empty or unreadable one is a HostError."""
    path = state_dir / TOKEN_FILE
    token = secrets.token_urlsafe(32)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        pass
    except OSError as exc:
        raise HostError(f"cannot create the web console's token file {path}: {exc.strerror}.") from exc
    else:
        with os.fdopen(fd, "w") as file:
            file.write(token + "\n")
        return token
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        with os.fdopen(fd) as file:
            if stat.S_IMODE(os.fstat(file.fileno()).st_mode) & 0o077:
                os.fchmod(file.fileno(), 0o600)
            text = file.read(4096).strip()
    except OSError as exc:
        raise HostError(f"cannot read the web console's token file {path}: {exc.strerror}.") from exc
    if len(text) < 16 or any(ch.isspace() for ch in text):
        raise HostError(f"the web console's token file {path} does not hold a token (16 or more characters on one "
                        "line); remove it and a new one is made at the next start.")  # fmt: skip
    return text


def _digest(value: str) -> bytes:
    return hashlib.sha256(value.encode()).digest()


@attrs.define(eq=False)
class Session:
    """One logged-in browser: its CSRF token and when it was last seen."""

    csrf: str
    last_seen: float


@attrs.define(eq=False)
class Sessions:
    """The server-side session table, keyed by the SHA-256 of the cookie's value."""

    idle_limit: float = SESSION_IDLE_LIMIT
    limit: int = MAX_SESSIONS
    _table: OrderedDict[bytes, Session] = attrs.field(factory=OrderedDict, init=False)

    def create(self) -> tuple[str, Session]:
        """A new session: (the cookie value, the session)."""
        session_id = secrets.token_urlsafe(32)
        session = Session(csrf=secrets.token_urlsafe(32), last_seen=time.monotonic())
        self._table[_digest(session_id)] = session
        while len(self._table) > self.limit:
            self._table.popitem(last=False)
        return session_id, session

    def get(self, session_id: str | None) -> Session | None:
        """The live session the cookie value names, or None; touching it keeps it alive."""
        if not session_id:
            return None
        key = _digest(session_id)
        session = self._table.get(key)
        now = time.monotonic()
        if session is None:
            return None
        if now - session.last_seen > self.idle_limit:
            del self._table[key]
            return None
        session.last_seen = now
        self._table.move_to_end(key)
        return session

    def drop(self, session_id: str | None) -> None:
        if session_id:
            self._table.pop(_digest(session_id), None)


@attrs.define(eq=False)
class LoginLimiter:
    """Failed log-ins per client address: more than ``allowed`` in ``window`` seconds blocks
    that address until the oldest failure ages out."""

    allowed: int = FAILURES_ALLOWED
    window: float = FAILURE_WINDOW
    _failures: dict[str, deque[float]] = attrs.field(factory=dict, init=False)

    def retry_after(self, client: str) -> float:
        """Seconds before ``client`` may try again (0: now)."""
        failures = self._failures.get(client)
        if failures is None:
            return 0.0
        now = time.monotonic()
        while failures and now - failures[0] > self.window:
            failures.popleft()
        if not failures:
            del self._failures[client]
            return 0.0
        return failures[0] + self.window - now if len(failures) >= self.allowed else 0.0

    def failed(self, client: str) -> None:
        if len(self._failures) > 4096:  # many addresses: forget them all rather than grow
            self._failures.clear()
        self._failures.setdefault(client, deque(maxlen=self.allowed)).append(time.monotonic())


def header(scope: Scope, name: bytes) -> str | None:
    """The first value of header ``name`` (lower case) in ``scope``, decoded as Latin-1."""
    for key, value in scope.get("headers", ()):
        if key == name:
            return bytes(value).decode("latin-1")
    return None


def cookie_session_id(scope: Scope) -> str | None:
    raw = header(scope, b"cookie")
    if not raw:
        return None
    cookies: SimpleCookie = SimpleCookie()
    try:
        cookies.load(raw)
    except Exception:  # a malformed Cookie header: as if there were none
        return None
    morsel = cookies.get(COOKIE)
    return morsel.value if morsel is not None else None


def same_origin(scope: Scope) -> bool:
    """Whether the request's Origin is its own scheme and Host (a browser always sends Origin
    on cross-site and state-changing requests and on websockets; a missing one is refused)."""
    origin, host = header(scope, b"origin"), header(scope, b"host")
    if not origin or not host:
        return False
    scheme = "https" if scope.get("scheme") in ("https", "wss") else "http"
    return hmac.compare_digest(origin.encode(), f"{scheme}://{host}".encode())


def csrf_ok(scope: Scope, session: Session) -> bool:
    token = header(scope, CSRF_HEADER.encode())
    return token is not None and hmac.compare_digest(token.encode(), session.csrf.encode())


async def _respond(send: Send, status: int, body: bytes, content_type: bytes,
                   extra: list[tuple[bytes, bytes]] | None = None) -> None:  # fmt: skip
    headers = [(b"content-type", content_type), (b"content-length", str(len(body)).encode()),
               (b"cache-control", b"no-store"), *(extra or [])]  # fmt: skip
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _refuse_http(scope: Scope, send: Send, status: int, reason: str) -> None:
    path: str = scope.get("path", "/")
    if status == 401 and scope.get("method") in SAFE_METHODS and not path.startswith("/api/"):
        location = "/login?next=" + quote(path, safe="/")
        await _respond(send, 303, b"", b"text/plain", [(b"location", location.encode())])
        return
    await _respond(send, status, json.dumps({"error": reason}).encode(), b"application/json")


@attrs.define(eq=False)
class AuthMiddleware:
    """ASGI middleware: the session check in front of everything but ``PUBLIC_PATHS``, the
    Origin check on every state-changing request and websocket, and the CSRF check on those
    that come with a session. The session reaches the app as ``scope["trivmm.session"]``."""

    app: ASGIApp
    sessions: Sessions

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self.app(scope, receive, send)
            return
        session = self.sessions.get(cookie_session_id(scope))
        send = _with_security_headers(send) if scope["type"] == "http" else send
        scope["trivmm.session"] = session
        if scope["type"] == "websocket":
            if session is None or not same_origin(scope):
                await receive()  # websocket.connect
                await send({"type": "websocket.close", "code": 1008, "reason": ""})  # before accept: HTTP 403
                return
            await self.app(scope, receive, send)
            return
        path, method = scope.get("path", "/"), scope.get("method", "GET")
        if method not in SAFE_METHODS and not same_origin(scope):
            await _refuse_http(scope, send, 403, "cross-site request refused (Origin does not match Host)")
            return
        if path in PUBLIC_PATHS:
            await self.app(scope, receive, send)
            return
        if session is None:
            await _refuse_http(scope, send, 401, "log in first")
            return
        if method not in SAFE_METHODS and not csrf_ok(scope, session):
            await _refuse_http(scope, send, 403, "missing or wrong CSRF token")
            return
        await self.app(scope, receive, send)


def _with_security_headers(send: Send) -> Send:
    async def wrapped(message: Message) -> None:
        if message["type"] == "http.response.start":
            names = {bytes(key).lower() for key, _ in message.get("headers", ())}
            extra = [(key, value) for key, value in SECURITY_HEADERS if key not in names]
            message = {**message, "headers": [*message.get("headers", ()), *extra]}
        await send(message)

    return wrapped


# 'self' covers same-origin ws: in CSP3 (Chromium, Firefox); xterm.js sets inline styles
CONTENT_SECURITY_POLICY = (b"default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
                           b"img-src 'self' data: blob:; connect-src 'self'; frame-ancestors 'none'; "
                           b"base-uri 'none'; form-action 'self'")  # fmt: skip
SECURITY_HEADERS: list[tuple[bytes, bytes]] = [
    (b"content-security-policy", CONTENT_SECURITY_POLICY),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"same-origin"),  # no-referrer would make a form POST's Origin "null"
]
