"""The admin database over the PostgreSQL protocol: the admin commands as simple queries in the virtual database
`admin.database` (default `shardproxy`), for the users in `admin_users`."""

from __future__ import annotations

import struct
from collections.abc import Awaitable, Callable
from typing import Protocol

from shardproxy import __version__
from shardproxy.ops.admin.replies import AdminError, Table, Value, text
from shardproxy.tasks import spawn
from shardproxy.wire import protocol as pg
from shardproxy.wire.protocol import Frontend

# RowDescription field after the name: no table, type text (oid 25), variable length, no modifier, text format.
_TEXT_FIELD = struct.pack("!IhIhih", 0, 0, 25, -1, -1, 0)
_NULL = b"\xff\xff\xff\xff"
_EMPTY_QUERY = pg.message(b"I")
_SESSION_PARAMETERS = b"".join(pg.parameter_status(k, v) for k, v in {
    "server_version": f"{__version__}/shardproxy", "server_encoding": "UTF8", "client_encoding": "UTF8",
    "DateStyle": "ISO", "integer_datetimes": "on", "standard_conforming_strings": "on",
}.items())


class ConsoleClient(Protocol):
    """A logged-in client connection of the admin database."""

    user: str
    closed: bool
    pid: int
    secret: int

    def write(self, data: bytes) -> None: ...
    def close(self) -> None: ...
    async def read_message(self) -> tuple[int, bytes]: ...


class Console:
    """Serves clients of the admin database: each simple query's statements run as admin commands."""

    def __init__(self, execute: Callable[[str], Awaitable[Table]]):
        """execute: runs one command (with several workers, the supervisor's, which answers for all)."""
        self.execute = execute

    def open_session(self, client: ConsoleClient) -> None:
        """Serve a logged-in client of the admin database (its cancel key issued already)."""
        client.write(_SESSION_PARAMETERS + pg.backend_key_data(client.pid, client.secret) + pg.READY[pg.IDLE])
        spawn(self._session(client))

    async def _session(self, client: ConsoleClient) -> None:
        skipping = False  # after a refused extended-protocol message, until Sync, as PostgreSQL does
        try:
            while not client.closed:
                kind, body = await client.read_message()
                if kind == Frontend.QUERY:
                    client.write(await self._answer(body[:-1].decode(errors="replace")) + pg.READY[pg.IDLE])
                elif kind == Frontend.SYNC:
                    skipping = False
                    client.write(pg.READY[pg.IDLE])
                elif kind == Frontend.TERMINATE:
                    break
                elif not skipping:
                    skipping = True
                    client.write(pg.error(pg.FEATURE_NOT_SUPPORTED,
                                          "shardproxy: the admin database takes simple queries only"))
        except (ConnectionError, pg.ProtocolError):
            pass
        client.close()

    async def _answer(self, sql: str) -> bytes:
        """A simple query's replies, one command per statement; an error ends the query, as in PostgreSQL."""
        statements = [statement for statement in sql.split(";") if statement.strip()]
        if not statements:
            return _EMPTY_QUERY
        out: list[bytes] = []
        for statement in statements:
            try:
                table = await self.execute(statement)
            except AdminError as exc:
                out.append(pg.error(exc.code, str(exc)))
                break
            if table.columns:
                out.append(pg.message(b"T", pg.INT16.pack(len(table.columns))
                                      + b"".join(pg.cstring(name) + _TEXT_FIELD for name in table.columns)))
                out += [_data_row(row) for row in table.rows]
            out.append(pg.command_complete(statement.split()[0].upper()))
        return b"".join(out)


def _data_row(row: list[Value]) -> bytes:
    values = [None if value is None else text(value).encode() for value in row]
    return pg.message(b"D", pg.INT16.pack(len(values)) + b"".join(
        _NULL if value is None else pg.INT32.pack(len(value)) + value for value in values))

