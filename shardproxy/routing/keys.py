"""Shard key values: how a value read from SQL, a parameter or an operator's command line becomes a ring key.

The ring (ring.py) hashes a key's canonical form: an integer as decimal text, a UUID as lowercase hyphenated text,
text as its UTF-8 bytes. This module brings every spelling of a value to that form, and refuses what cannot be a
key with a ShardKeyError, whose message the client gets (SQLSTATE 0A000). Pure, and free of the SQL parser: the
compiled data path reads Bind parameters with it.
"""

from __future__ import annotations

import sys
import uuid
from decimal import Decimal, InvalidOperation

Key = int | str | uuid.UUID


class ShardKeyError(ValueError):
    """A shard key value that cannot be read; the message starts with ``shardproxy:``."""


def number(text: str) -> int | str:
    """A numeric literal as a key: an int when integral (5000000000, 4.0, 1e3), else its text. One of more
    digits than Python reads into an int stays text (no column holds it as an integer key): 1e999999999 as an
    int would take the proxy minutes to build."""
    if text.isdigit():
        return int(text) if len(text) <= MAX_DIGITS else text
    try:
        value = Decimal(text)
    except InvalidOperation:
        return text
    if value.is_finite() and value.adjusted() < MAX_DIGITS and value == value.to_integral_value():
        return int(value)
    return text


MAX_DIGITS = sys.int_info.default_max_str_digits


def canonical(raw: object, cast: str | None, negate: bool) -> Key:
    """The ring key of a value: cast as the SQL says, then negated if written -value."""
    if type(raw) is int and not negate and (cast is None or cast == "int"):
        return raw  # the usual key, already canonical
    if raw is None:
        raise ShardKeyError("shardproxy: the shard key is NULL")
    try:
        value = _cast(raw, cast)
        if negate:
            value = -_integer(value)
    except (ValueError, TypeError) as exc:
        raise ShardKeyError(f"shardproxy: invalid shard key {raw!r}: {exc}") from None
    if isinstance(value, bool) or not isinstance(value, (int, str, uuid.UUID)):
        raise ShardKeyError(f"shardproxy: unsupported shard key type {type(raw).__name__}")
    return value


def _cast(raw: object, cast: str | None) -> object:
    if cast == "int":
        return _integer(raw)
    if cast == "uuid":
        return raw if isinstance(raw, uuid.UUID) else uuid.UUID(str(raw))
    if cast == "text" and isinstance(raw, (int, uuid.UUID)):
        return str(raw)  # the same canonical bytes, spelled as text
    return raw


def _integer(value: object) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str):
        parsed = number(value.strip())
        if isinstance(parsed, int):
            return parsed
    raise ValueError("not an integer")


# -- parameter values from the wire --------------------------------------------------------------------
_INT_OIDS = {21: 2, 23: 4, 20: 8}  # int2, int4, int8: binary width
_OID_OID = 26
_NUMERIC_OID = 1700
_UUID_OID = 2950
_TEXT_OIDS = frozenset({0, 25, 705, 1043, 1042, 19})  # unspecified, text, unknown, varchar, bpchar, name


def decode_key(value: bytes, fmt: int, type_oid: int) -> Key:
    """A parameter's value as a shard key, by its format code and type (never by its length).

    Untyped and text values stay text: for an integer column, '42' has the same canonical bytes
    as the integer 42. Typed integers and UUIDs are brought to their canonical spelling.
    """
    try:
        if fmt == 0:
            return _decode_text(value.decode("utf-8"), type_oid)
        if fmt == 1:
            return _decode_binary(value, type_oid)
    except ShardKeyError:
        raise
    except ValueError as exc:  # also bad UTF-8
        raise ShardKeyError(f"shardproxy: invalid shard key parameter of type {type_oid}: {exc}") from None
    raise ShardKeyError(f"shardproxy: unknown parameter format code {fmt}")


def _decode_text(text: str, type_oid: int) -> Key:
    if type_oid in _INT_OIDS or type_oid == _OID_OID:
        return int(text.strip())
    if type_oid == _UUID_OID:
        return uuid.UUID(text.strip())
    if type_oid == _NUMERIC_OID:
        return number(text.strip())
    return text


def _decode_binary(value: bytes, type_oid: int) -> Key:
    width = _INT_OIDS.get(type_oid)
    if width is not None:
        _expect_length(value, width, type_oid)
        return int.from_bytes(value, "big", signed=True)
    if type_oid == _OID_OID:
        _expect_length(value, 4, type_oid)
        return int.from_bytes(value, "big")
    if type_oid == _UUID_OID:
        _expect_length(value, 16, type_oid)
        return uuid.UUID(bytes=bytes(value))
    if type_oid in _TEXT_OIDS and type_oid != 0:
        return value.decode("utf-8")
    raise ShardKeyError(
        f"shardproxy: cannot read a binary shard key parameter of type {type_oid}; "
        "send it in text format or as int2/int4/int8/uuid/text"
    )


def _expect_length(value: bytes, length: int, type_oid: int) -> None:
    if len(value) != length:
        raise ShardKeyError(
            f"shardproxy: binary parameter of type {type_oid} must be {length} bytes, not {len(value)}"
        )


def parse_key(text: str) -> Key:
    """A key typed by an operator: an integer, a UUID, or else text."""
    if text.lstrip("-").isdigit():
        return int(text)
    try:
        return uuid.UUID(text)
    except ValueError:
        return text
