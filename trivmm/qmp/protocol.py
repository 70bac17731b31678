"""The QMP wire format: splitting a byte stream into JSON messages, decoding them, checking
a request's shape and its arguments, and encoding responses and events (QEMU's
docs/interop/qmp-spec.rst). No I/O here; ``trivmm.qmp.server`` does that.

Framing is QEMU's: a message is one top-level JSON value, however it is split into lines
(a client may pretty-print); a newline outside any object or array also ends a message,
so garbage (``nope``) gets its error at the end of its line and the stream goes on. A raw
newline inside a string (invalid JSON) ends the broken message the same way. Every
message has a size bound (``MAX_MESSAGE``) and a nesting bound (``MAX_DEPTH``).
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Mapping
from typing import Any

import attrs

__all__ = ["QmpError", "Frame", "MessageSplitter", "MessageTooLong", "Request", "Param", "decode_message",
           "parse_request", "check_arguments", "encode", "response", "error_response", "event_message",
           "MAX_MESSAGE", "MAX_DEPTH", "GENERIC_ERROR", "COMMAND_NOT_FOUND"]  # fmt: skip

MAX_MESSAGE = 1 << 20  # bytes in one message; a longer one ends the connection
MAX_DEPTH = 128  # nested objects and arrays in one message (QEMU allows 1024)
GENERIC_ERROR = "GenericError"
COMMAND_NOT_FOUND = "CommandNotFound"

_STRUCTURAL = re.compile(rb'[{}\[\]"\n]')  # what matters outside strings
_IN_STRING = re.compile(rb'["\\\n]')  # what matters inside one
_WHITESPACE = b" \t\r\n"


class QmpError(Exception):
    """A command's failure, sent to the client as ``{"error": {"class": ..., "desc": ...}}``.
    Raise it from a ``MigrationControl`` method to choose the text the client sees."""

    def __init__(self, desc: str, error_class: str = GENERIC_ERROR) -> None:
        super().__init__(desc)
        self.desc = desc
        self.error_class = error_class


class MessageTooLong(Exception):
    """A message grew past ``MAX_MESSAGE`` bytes: the stream cannot be resynchronised.
    ``frames`` are the whole messages that came before it."""

    def __init__(self, limit: int, frames: list[Frame]) -> None:
        super().__init__(f"a message is longer than {limit} bytes")
        self.frames = frames


@attrs.frozen
class Frame:
    """One message's bytes, or (``error`` set) bytes that cannot be one."""

    text: bytes
    error: str | None = None


class MessageSplitter:
    """Splits a client's byte stream into messages (top-level JSON values), bounded in size
    and nesting depth. ``feed()`` returns the frames completed by the bytes given."""

    def __init__(self, limit: int = MAX_MESSAGE, max_depth: int = MAX_DEPTH) -> None:
        self._limit = limit
        self._max_depth = max_depth
        self._buf = bytearray()
        self._pos = 0  # bytes of _buf scanned
        self._depth = 0
        self._deepest = 0
        self._in_string = False
        self._escape = False  # a backslash was the last byte scanned, inside a string

    def feed(self, data: bytes) -> list[Frame]:
        buf = self._buf
        buf += data
        frames: list[Frame] = []
        start = 0
        pos = self._pos
        while pos < len(buf):
            if self._in_string:
                if self._escape:
                    self._escape = False
                    pos += 1
                    continue
                found = _IN_STRING.search(buf, pos)
                if found is None:
                    pos = len(buf)
                    break
                pos = found.end()
                char = buf[found.start()]
                if char == 0x5C:  # backslash: the next byte is escaped, whatever it is
                    self._escape = True
                elif char == 0x22:  # the string's closing quote
                    self._in_string = False
                    if self._depth == 0:  # a top-level string: a whole (if useless) message
                        start = self._emit(frames, buf, start, pos)
                else:  # a raw newline inside a string: never valid JSON; resynchronise here
                    start = self._emit(frames, buf, start, pos, "JSON parse error, unterminated string")
                continue
            found = _STRUCTURAL.search(buf, pos)
            if found is None:
                pos = len(buf)
                break
            at = found.start()
            char = buf[at]
            if self._depth == 0 and char != 0x0A and buf[start:at].strip(_WHITESPACE):
                start = self._emit(frames, buf, start, at)  # garbage before a value: its own message
            pos = found.end()
            if char in b"{[":
                self._depth += 1
                self._deepest = max(self._deepest, self._depth)
            elif char in b"}]":
                if self._depth == 0:  # a stray closing bracket
                    start = self._emit(frames, buf, start, pos)
                    continue
                self._depth -= 1
                if self._depth == 0:
                    start = self._emit(frames, buf, start, pos)
            elif char == 0x22:
                self._in_string = True
            elif self._depth == 0:  # a newline outside any value ends a scalar or garbage
                start = self._emit(frames, buf, start, pos)
        del buf[:start]
        self._pos = pos - start
        if self._depth == 0 and not self._in_string and not buf.strip(_WHITESPACE):
            buf.clear()  # whitespace between messages is not kept
            self._pos = 0
        if len(buf) > self._limit:
            raise MessageTooLong(self._limit, frames)
        return frames

    def _emit(self, frames: list[Frame], buf: bytearray, start: int, end: int, error: str | None = None) -> int:
        text = bytes(buf[start:end]).strip(_WHITESPACE)
        if len(text) > self._limit:
            raise MessageTooLong(self._limit, frames)
        if error is None and self._deepest > self._max_depth:
            error = f"JSON parse error, nesting deeper than {self._max_depth}"
        if text:
            frames.append(Frame(text, error))
        self._depth = self._deepest = 0
        self._in_string = self._escape = False
        return end


def _no_constants(name: str) -> Any:
    raise ValueError(f"invalid token {name!r}")


def _finite_float(text: str) -> float:
    """A JSON number that fits a double (``1e999`` would come back as ``Infinity``: not JSON)."""
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:40]!r} out of range")
    return value


def decode_message(frame: Frame) -> Any:
    """The JSON value of a frame; ``QmpError`` ("JSON parse error, ...") when it is not one."""
    if frame.error is not None:
        raise QmpError(frame.error)
    try:
        text = frame.text.decode("utf-8")
    except UnicodeDecodeError:
        raise QmpError("JSON parse error, invalid UTF-8 sequence") from None
    try:
        return json.loads(text, parse_constant=_no_constants, parse_float=_finite_float)
    except json.JSONDecodeError as exc:
        raise QmpError(f"JSON parse error, {exc.msg} (at byte {exc.pos})") from None
    except (ValueError, RecursionError) as exc:  # e.g. an integer of more digits than Python converts
        raise QmpError(f"JSON parse error, {exc}") from None


@attrs.frozen
class Request:
    """A well-formed request: ``execute`` and its ``arguments``; ``id`` is echoed back."""

    command: str
    arguments: dict[str, Any]
    id: Any = None
    has_id: bool = False


def parse_request(message: Any) -> Request:
    """Check a message's shape as QEMU does (qmp-dispatch.c); ``QmpError`` says what is wrong.
    A request that is an object with an ``id`` keeps it even when it fails here."""
    if not isinstance(message, dict):
        raise QmpError("QMP input must be a JSON object")
    for key in message:
        if key == "exec-oob":
            raise QmpError("QMP input member 'exec-oob' is unexpected: out-of-band execution is not supported")
        if key not in ("execute", "arguments", "id"):
            raise QmpError(f"QMP input member '{key}' is unexpected")
    if "execute" not in message:
        raise QmpError("QMP input lacks member 'execute'")
    command = message["execute"]
    if not isinstance(command, str):
        raise QmpError("QMP input member 'execute' must be a string")
    arguments = message.get("arguments", {})
    if not isinstance(arguments, dict):
        raise QmpError("QMP input member 'arguments' must be an object")
    return Request(command, arguments, message.get("id"), "id" in message)


@attrs.frozen
class Param:
    """One argument of a command: its JSON type (``str``, ``bool``, ``int``, ``list``) and
    whether it must be given; ``minimum`` and ``maximum`` for integers."""

    type: type
    required: bool = False
    minimum: int | None = None
    maximum: int | None = None


_TYPE_NAMES = {str: "string", bool: "boolean", int: "integer", list: "array", dict: "object"}


def check_arguments(arguments: Mapping[str, Any], params: Mapping[str, Param]) -> None:
    """Arguments against a command's parameters, with QEMU's messages for what is wrong."""
    for name, value in arguments.items():
        param = params.get(name)
        if param is None:
            raise QmpError(f"Parameter '{name}' is unexpected")
        is_bool = isinstance(value, bool)
        if (param.type is bool) != is_bool or not isinstance(value, param.type):
            raise QmpError(f"Invalid parameter type for '{name}', expected: {_TYPE_NAMES[param.type]}")
        if param.minimum is not None and isinstance(value, int) and value < param.minimum:
            raise QmpError(f"Parameter '{name}' expects a value of at least {param.minimum}")
        if param.maximum is not None and isinstance(value, int) and value > param.maximum:
            raise QmpError(f"Parameter '{name}' expects a value of at most {param.maximum}")
    for name, param in params.items():
        if param.required and name not in arguments:
            raise QmpError(f"Parameter '{name}' is missing")


def encode(message: Mapping[str, Any]) -> bytes:
    """One message on the wire: ASCII JSON and a newline."""
    return json.dumps(message, ensure_ascii=True, allow_nan=False).encode("ascii") + b"\n"


def response(value: Any, request: Request | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"return": value}
    if request is not None and request.has_id:
        out["id"] = request.id
    return out


def error_response(error: QmpError, request_id: Any = None, has_id: bool = False) -> dict[str, Any]:
    out: dict[str, Any] = {"error": {"class": error.error_class, "desc": error.desc}}
    if has_id:
        out["id"] = request_id
    return out


def event_message(name: str, data: Mapping[str, Any] | None = None, now: float | None = None) -> dict[str, Any]:
    """An event as QEMU sends it: ``data`` only when there is some."""
    seconds, fraction = divmod(time.time() if now is None else now, 1.0)
    out: dict[str, Any] = {"event": name}
    if data is not None:
        out["data"] = dict(data)
    out["timestamp"] = {"seconds": int(seconds), "microseconds": min(int(fraction * 1e6), 999_999)}
    return out
