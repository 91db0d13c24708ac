"""Decoding pgoutput, PostgreSQL's logical replication output (protocol version 1), as RESHARD reads it from a
replication slot: relations, and the inserts, updates and deletes of committed transactions, with column values
in their text form (what pgoutput sends unless asked for binary).

Only what RESHARD applies is kept: a Relation tells each column's name and whether it is part of the replica
identity; Begin, Commit, Origin and Type carry nothing it needs and decode to None.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

_INT16 = struct.Struct("!h")
_INT32 = struct.Struct("!I")

# A column value: its text, None for SQL NULL, or UNCHANGED for a TOASTed value an update did not touch.
UNCHANGED = object()
Value = str | None | object


@dataclass(frozen=True)
class Relation:
    relid: int
    schema: str
    name: str
    columns: list[str]
    key_columns: list[str]  # the replica identity: what an old tuple of an update or delete carries


@dataclass(frozen=True)
class Change:
    """An insert (old is None), update (old is None when the key did not change) or delete (new is None)."""

    relid: int
    old: list[Value] | None
    new: list[Value] | None


@dataclass(frozen=True)
class Truncate:
    relids: list[int]


Message = Relation | Change | Truncate | None


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def byte(self) -> int:
        self.pos += 1
        return self.data[self.pos - 1]

    def int16(self) -> int:
        self.pos += 2
        return int(_INT16.unpack_from(self.data, self.pos - 2)[0])

    def int32(self) -> int:
        self.pos += 4
        return int(_INT32.unpack_from(self.data, self.pos - 4)[0])

    def cstring(self) -> str:
        end = self.data.index(b"\0", self.pos)
        text = self.data[self.pos:end].decode()
        self.pos = end + 1
        return text

    def tuple(self) -> list[Value]:
        values: list[Value] = []
        for _ in range(self.int16()):
            kind = self.byte()
            if kind == ord("n"):
                values.append(None)
            elif kind == ord("u"):
                values.append(UNCHANGED)
            elif kind == ord("t"):
                size = self.int32()
                values.append(self.data[self.pos:self.pos + size].decode())
                self.pos += size
            else:
                raise ValueError(f"pgoutput: unexpected tuple value kind {chr(kind)!r}")
        return values


def decode(data: bytes) -> Message:
    """One pgoutput message; raises ValueError on one it does not know."""
    reader = _Reader(data)
    kind = chr(reader.byte())
    if kind in "BCOYM":
        return None
    if kind == "R":
        return _relation(reader)
    if kind == "T":
        count = reader.int32()
        reader.byte()  # options: CASCADE, RESTART IDENTITY
        return Truncate([reader.int32() for _ in range(count)])
    relid = reader.int32()
    if kind == "I":
        reader.byte()  # 'N'
        return Change(relid, None, reader.tuple())
    if kind == "U":
        marker = chr(reader.byte())
        old = None
        if marker in "KO":
            old = reader.tuple()
            reader.byte()  # 'N'
        return Change(relid, old, reader.tuple())
    if kind == "D":
        reader.byte()  # 'K' or 'O'
        return Change(relid, reader.tuple(), None)
    raise ValueError(f"pgoutput: unknown message {kind!r}")


def _relation(reader: _Reader) -> Relation:
    relid = reader.int32()
    schema, name = reader.cstring(), reader.cstring()
    reader.byte()  # replica identity setting
    columns: list[str] = []
    keys: list[str] = []
    for _ in range(reader.int16()):
        flags = reader.byte()
        column = reader.cstring()
        reader.int32()  # type oid
        reader.int32()  # type modifier
        columns.append(column)
        if flags & 1:
            keys.append(column)
    return Relation(relid, schema, name, columns, keys)
