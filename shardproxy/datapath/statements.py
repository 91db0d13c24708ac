"""Protocol-level prepared statements across pooled server connections.

A client's named statement is known by its Parse body (query text and parameter types). Every distinct body
gets one server-side name, so a server connection that prepared it for one client serves the next client without
preparing it again; a connection that lacks it gets the Parse injected just before first use.

PostgreSQL plans a statement when it is prepared, and a statement prepared again after a table or type changed
sees the change. So when a client drops a statement (Close, DEALLOCATE, DISCARD ALL), or a server finds a
statement's plan out of date, the statement is retired: the next Parse of its text gets a new server-side name,
prepared afresh wherever it runs, while clients that still hold the old one keep it, as they would on PostgreSQL.

The names carry a random mark of the process (`sp<12 digits>_<n>`) that clients cannot guess, and a client's
Query or Parse that names them anyway (they show in pg_prepared_statements) is refused (session.py), so that one
client cannot drop or replace the statements other clients run.
"""

from __future__ import annotations

import itertools
import re
import secrets

from shardproxy.routing.cache import SizedLru
from shardproxy.wire import protocol as pg


class Statement:
    __slots__ = ("name", "parse", "unnamed_parse", "bind_prefix", "verified", "sql", "param_types", "plan",
                 "bind_request")

    def __init__(self, name: bytes, body: bytes):
        self.name = name  # the server-side name
        self.parse = pg.message(b"P", name + b"\0" + body)
        self.unnamed_parse = pg.message(b"P", b"\0" + body)  # the client's own, when it used the unnamed statement
        self.bind_prefix = name + b"\0"
        self.verified = False  # a server has accepted it: a client's Parse of it can be answered without one
        self.sql, self.param_types = parse_body(body)  # types as declared; filled in from ParameterDescription
        self.plan: object | None = None  # the router's plan, made on first use
        self.bind_request: object | None = None  # what a Bind of it records in a server's queue (made by _core)

    @property
    def body(self) -> bytes:
        """The Parse body it was made from: the query text and the parameter types."""
        return self.parse[6 + len(self.name):]


def parse_body(body: bytes) -> tuple[str, list[int]]:
    """The query text and declared parameter type OIDs of a Parse body (after the statement name)."""
    end = body.index(0)
    (count,) = pg.INT16.unpack_from(body, end + 1)
    types = [pg.INT32.unpack_from(body, end + 3 + 4 * i)[0] for i in range(count)]
    return body[:end].decode(errors="replace"), types


def parameter_types(body: bytes) -> list[int]:
    """The type OIDs of a ParameterDescription body."""
    (count,) = pg.INT16.unpack_from(body, 0)
    return [pg.INT32.unpack_from(body, 2 + 4 * i)[0] for i in range(count)]


SERVER_NAME = re.compile(rb"sp\d{12}_\d+")  # what Registry names a statement on servers


class Registry:
    """Server-side names for Parse bodies, shared by every client and server connection of the process.

    Bounded by count and by the bytes of the bodies (least recently parsed first out), so that clients sending
    ever new or huge statement texts do not grow the proxy for good. A forgotten statement keeps working for the
    clients that hold it; parsed again, it gets a new name (names are never reused), and servers that had
    prepared the old one drop it in their own LRU."""

    def __init__(self, limit: int, max_bytes: int) -> None:
        self._by_body: SizedLru[bytes, Statement] = SizedLru(limit, max_bytes, len)
        self._names = itertools.count()
        # Digits have no case: the data path looks for them as they are, then for "sp" before them in any case.
        self.mark = b"%012d" % secrets.randbelow(10**12)
        self.prefix = b"sp" + self.mark + b"_"

    def resize(self, limit: int, max_bytes: int) -> None:
        """A reload's limits, met from the next new statement on."""
        self._by_body.max_entries, self._by_body.max_bytes = limit, max_bytes

    def get(self, body: bytes) -> Statement:
        return self._by_body.get(body, self._new)

    def _new(self, body: bytes) -> Statement:
        return Statement(self.prefix + b"%d" % next(self._names), body)

    def retire(self, statement: Statement) -> None:
        """The next Parse of the statement's text gets a new statement (those who hold this one keep it)."""
        if self._by_body.peek(statement.body) is statement:
            self._by_body.discard(statement.body)

    def renewed(self, statement: Statement) -> Statement:
        """A new statement in place of this one."""
        self.retire(statement)
        return self.get(statement.body)

    def known(self, body: bytes) -> Statement | None:
        """The statement for this body if a server has accepted it before."""
        statement = self._by_body.peek(body)
        return statement if statement is not None and statement.verified else None

    def __len__(self) -> int:
        return len(self._by_body)


_DEALLOCATE = re.compile(r'\s*deallocate\s+(?:prepare\s+)?(?:(all)|"?([^";\s]+)"?)\s*;?\s*\Z', re.I)


def deallocate_target(sql: str) -> str | None:
    """For a lone `DEALLOCATE name`/`DEALLOCATE ALL`, the name ("" for ALL); else None."""
    match = _DEALLOCATE.match(sql)
    if match is None:
        return None
    return "" if match.group(1) else match.group(2)

