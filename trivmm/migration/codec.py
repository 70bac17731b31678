"""Payload encodings of state sections: named binary fields, and frozen attrs state as JSON.

Both decoders take untrusted bytes (a stream from elsewhere) and either return values of
exactly the expected shape or raise ``MigrationError`` naming the section; no other
exception escapes them.

* ``pack_fields``/``unpack_fields``: a sequence of ``(name, bytes)`` records -- u8 name
  length, ASCII name, u32 little-endian data length, data -- for raw KVM structures. The
  reader is told every name it accepts with its size bounds; an unknown, missing or
  repeated name, or a size out of bounds, is an error.
* ``encode_state``/``decode_state``: a frozen attrs state class (``SerialState``...) as JSON,
  bytes as ``{"$b": "<hex>"}``; decoding checks every field against the class's annotated
  type (int, bool, str, bytes, None, ``tuple[X, ...]``, dicts of str to those, nested
  attrs classes, unions of these) before the class is built. Unknown fields are refused;
  a field with a default may be missing (it was added after the stream was written).
"""

from __future__ import annotations

import json
import struct
import types
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

import attrs

from trivmm.errors import MigrationError

__all__ = ["Size", "pack_fields", "unpack_fields", "encode_state", "decode_state", "MAX_JSON_DEPTH"]

T = TypeVar("T")
_FIELD_HEADER = struct.Struct("<B")
_FIELD_LENGTH = struct.Struct("<I")
MAX_JSON_DEPTH = 8  # nesting a state class may have (JSON deeper than this is refused)


@attrs.frozen
class Size:
    """Bounds of one field's length: ``minimum..maximum`` bytes, a multiple of ``unit``."""

    minimum: int
    maximum: int
    unit: int = 1

    @classmethod
    def exact(cls, size: int) -> Size:
        return cls(size, size)

    def check(self, length: int) -> bool:
        return self.minimum <= length <= self.maximum and length % self.unit == 0


def pack_fields(fields: Mapping[str, bytes]) -> bytes:
    """``fields`` as records, in their order."""
    out = bytearray()
    for name, data in fields.items():
        raw = name.encode("ascii")
        if not 0 < len(raw) < 256:
            raise ValueError(f"field name {name!r} must be 1..255 ASCII bytes")
        out += _FIELD_HEADER.pack(len(raw)) + raw + _FIELD_LENGTH.pack(len(data)) + data
    return bytes(out)


def unpack_fields(payload: bytes, what: str, sizes: Mapping[str, Size], *,
                  optional: frozenset[str] = frozenset()) -> dict[str, bytes]:  # fmt: skip
    """The records of ``payload``; ``sizes`` names every accepted field (all required but
    those in ``optional``) with its bounds. ``what`` names the section in errors."""
    fields: dict[str, bytes] = {}
    view = memoryview(payload)
    at = 0
    while at < len(view):
        if at + 1 > len(view):
            raise MigrationError(f"{what}: truncated field header")
        (name_length,) = _FIELD_HEADER.unpack_from(view, at)
        at += 1
        if name_length == 0 or at + name_length + 4 > len(view):
            raise MigrationError(f"{what}: truncated or empty field name")
        try:
            name = bytes(view[at : at + name_length]).decode("ascii")
        except UnicodeDecodeError:
            raise MigrationError(f"{what}: a field name is not ASCII") from None
        at += name_length
        (length,) = _FIELD_LENGTH.unpack_from(view, at)
        at += 4
        size = sizes.get(name)
        if size is None:
            raise MigrationError(f"{what}: unknown field {name!r}")
        if name in fields:
            raise MigrationError(f"{what}: field {name!r} appears twice")
        if not size.check(length):
            raise MigrationError(f"{what}: field {name!r} is {length} bytes, "
                                 f"not {size.minimum}..{size.maximum} in units of {size.unit}")  # fmt: skip
        if at + length > len(view):
            raise MigrationError(f"{what}: field {name!r} runs past the end of the section")
        fields[name] = bytes(view[at : at + length])
        at += length
    missing = sorted(set(sizes) - set(fields) - optional)
    if missing:
        raise MigrationError(f"{what}: missing field(s) {', '.join(missing)}")
    return fields


# --- frozen attrs state as JSON ------------------------------------------------------------------


def _to_json(value: Any) -> Any:
    if isinstance(value, bool | int | str) or value is None:
        return value
    if isinstance(value, bytes | bytearray):
        return {"$b": bytes(value).hex()}
    if isinstance(value, tuple | list):
        return [_to_json(v) for v in value]
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            raise TypeError("state dicts must have str keys")
        return {"$d": {k: _to_json(v) for k, v in value.items()}}
    if attrs.has(type(value)):
        return {f.name: _to_json(getattr(value, f.name)) for f in attrs.fields(type(value))}
    raise TypeError(f"cannot encode a {type(value).__name__} in a state section")


def encode_state(state: Any) -> bytes:
    """A frozen attrs state object as compact JSON (see the module docstring)."""
    if not attrs.has(type(state)):
        raise TypeError(f"{type(state).__name__} is not an attrs state class")
    return json.dumps(_to_json(state), separators=(",", ":"), sort_keys=True).encode()


class _Bad(Exception):
    """A value that does not have its field's type (turned into MigrationError)."""


def _from_json(value: Any, tp: Any, depth: int) -> Any:
    if depth > MAX_JSON_DEPTH:
        raise _Bad("nested too deeply")
    origin = typing.get_origin(tp)
    if origin is typing.Union or origin is types.UnionType:
        for arm in typing.get_args(tp):
            try:
                return _from_json(value, arm, depth)
            except _Bad:
                continue
        raise _Bad(f"{_short(value)} is none of {tp}")
    if tp is type(None):
        if value is not None:
            raise _Bad(f"{_short(value)} is not null")
        return None
    if tp is bool:
        if not isinstance(value, bool):
            raise _Bad(f"{_short(value)} is not a boolean")
        return value
    if tp is int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise _Bad(f"{_short(value)} is not an integer")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise _Bad(f"{_short(value)} is not a string")
        return value
    if tp is bytes:
        if not isinstance(value, dict) or set(value) != {"$b"} or not isinstance(value["$b"], str):
            raise _Bad(f"{_short(value)} is not bytes")
        try:
            return bytes.fromhex(value["$b"])
        except ValueError:
            raise _Bad("bad hex in bytes") from None
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, list):
            raise _Bad(f"{_short(value)} is not a list")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_from_json(v, args[0], depth + 1) for v in value)
        if len(value) != len(args):
            raise _Bad(f"a list of {len(value)} items where {len(args)} belong")
        return tuple(_from_json(v, a, depth + 1) for v, a in zip(value, args, strict=True))
    if origin is dict:
        key_type, value_type = typing.get_args(tp)
        if key_type is not str or not isinstance(value, dict) or set(value) != {"$d"} \
                or not isinstance(value["$d"], dict):  # fmt: skip
            raise _Bad(f"{_short(value)} is not a mapping")
        return {k: _from_json(v, value_type, depth + 1) for k, v in value["$d"].items()}
    if isinstance(tp, type) and attrs.has(tp):
        return _build(tp, value, depth + 1)
    raise _Bad(f"fields of type {tp} are not supported")


def _build(cls: Any, value: Any, depth: int) -> Any:
    if not isinstance(value, dict):
        raise _Bad(f"{cls.__name__}: {_short(value)} is not an object")
    hints = typing.get_type_hints(cls)
    fields = attrs.fields(cls)
    names = {f.name for f in fields}
    # A field added later has a default: a stream written before it may leave it out.
    required = {f.name for f in fields if f.default is attrs.NOTHING}
    if not set(value) <= names or not required <= set(value):
        extra, missing = sorted(set(value) - names), sorted(required - set(value))
        raise _Bad(f"{cls.__name__}: unknown fields {extra}, missing fields {missing}")
    kwargs = {}
    for f in fields:
        if f.name not in value:
            continue
        try:
            kwargs[f.name] = _from_json(value[f.name], hints[f.name], depth)
        except _Bad as exc:
            raise _Bad(f"{cls.__name__}.{f.name}: {exc}") from None
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:  # the class's own validators
        raise _Bad(f"{cls.__name__}: {exc}") from None


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def decode_state(cls: type[T], data: bytes, what: str) -> T:
    """An instance of ``cls`` from ``encode_state``'s bytes, every field type-checked;
    ``MigrationError`` naming ``what`` otherwise."""
    try:
        value = json.loads(data)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise MigrationError(f"{what}: not valid JSON state ({type(exc).__name__})") from None
    try:
        return _build(cls, value, 0)
    except _Bad as exc:
        raise MigrationError(f"{what}: {exc}") from None
