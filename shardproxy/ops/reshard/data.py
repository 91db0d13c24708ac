"""RESHARD's work on the servers: reading the tables, copying the rows whose owner changes from a slot's exported
snapshot, applying what the slot streams afterwards, and deleting rows from the shards that no longer own them.

Rows are chosen in the proxy, by the same compiled ring the router uses: a sharded table's key column is read in
its text form, which is the ring's canonical form of the key (an integer's decimal digits, a uuid's lowercase
hyphenated text, a text's UTF-8 bytes), so no SQL re-implementation of MurmurHash3 can drift from the router.
Rows travel in COPY's text format, unparsed but for the key column; streamed changes arrive as pgoutput text
values and are applied with casts to each column's type.
"""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg import sql

from shardproxy.config import Config
from shardproxy.wire import pgoutput
from shardproxy.wire.tls import config_path

SLOT_PREFIX = "shardproxy_reshard"
PUBLICATION = "shardproxy_reshard"
CHANGES_PER_PASS = 5000  # changes read from a slot at once (whole transactions: it may return more)
COPY_CHUNK = 64 * 1024  # bytes of COPY rows sent to a new owner at once
_COPY_ESCAPES = {b"b": b"\b", b"f": b"\f", b"n": b"\n", b"r": b"\r", b"t": b"\t", b"v": b"\v", b"\\": b"\\"}
_ESCAPE = re.compile(rb"\\([bfnrtv\\]|[0-7]{1,3}|x[0-9a-fA-F]{1,2})")


@dataclass(frozen=True)
class Login:
    """How RESHARD reaches the servers: `reshard.user` (or the health checks' user), with server_tls."""

    user: str
    password: str | None
    sslmode: str
    sslrootcert: str | None

    @classmethod
    def from_config(cls, config: Config, user: str, password: str | None) -> Login:
        tls = config.server_tls
        return cls(user, password, tls.mode, config_path(config, tls.ca) if tls.ca else None)

    def conninfo(self, host: str, port: int, dbname: str, **extra: str) -> str:
        params: dict[str, Any] = {"host": host, "port": port, "user": self.user, "dbname": dbname,
                                  "sslmode": self.sslmode, "application_name": "shardproxy reshard",
                                  "connect_timeout": 5, **extra}
        if self.password is not None:
            params["password"] = self.password
        if self.sslrootcert:
            params["sslrootcert"] = self.sslrootcert
        return psycopg.conninfo.make_conninfo(**params)

    def environment(self, host: str, port: int, dbname: str) -> dict[str, str]:
        """pg_dump's environment: the login without a password on its command line."""
        env = dict(os.environ, PGHOST=host, PGPORT=str(port), PGUSER=self.user, PGDATABASE=dbname,
                   PGSSLMODE=self.sslmode)
        if self.password is not None:
            env["PGPASSWORD"] = self.password
        if self.sslrootcert:
            env["PGSSLROOTCERT"] = self.sslrootcert
        return env


@dataclass(frozen=True)
class Node:
    """A shard's primary, as the job found it."""

    shard: str
    host: str
    port: int


@dataclass
class Table:
    """A table of one database, as the catalog of the first source shard describes it."""

    schema: str
    name: str
    columns: list[str]  # stored columns (not generated), in order
    types: dict[str, str]  # column -> its type, as format_type() writes it
    primary_key: list[str]
    key_index: int | None  # the shard key's position in columns; None for a reference table

    @property
    def ident(self) -> sql.Composable:
        return sql.Identifier(self.schema, self.name)

    @property
    def qualified(self) -> str:
        return f"{self.schema}.{self.name}"

    def column_list(self) -> sql.Composable:
        return sql.SQL(", ").join(map(sql.Identifier, self.columns))


@dataclass
class Database:
    name: str
    owner: str
    sharded: list[Table] = field(default_factory=list)
    reference: list[Table] = field(default_factory=list)
    other: list[str] = field(default_factory=list)  # "schema.name" of tables without the key: schema only

    @property
    def moved(self) -> list[Table]:
        return self.sharded + self.reference


class ReshardError(Exception):
    """Why the job cannot go on, for SHOW RESHARD's error column."""


# -- connections ---------------------------------------------------------------------------------------------
async def connect(login: Login, node: Node, dbname: str, **extra: str) -> psycopg.AsyncConnection[Any]:
    try:
        return await psycopg.AsyncConnection.connect(login.conninfo(node.host, node.port, dbname, **extra),
                                                     autocommit=True)
    except psycopg.Error as exc:
        raise ReshardError(f"shard {node.shard} ({node.host}:{node.port}): {reason(exc)}") from None


async def find_primary(login: Login, shard: str, nodes: Iterable[tuple[str, int]]) -> Node:
    """The first of the shard's nodes that is not in recovery."""
    problems = []
    for host, port in nodes:
        node = Node(shard, host, port)
        try:
            conn = await connect(login, node, "postgres")
        except ReshardError as exc:
            problems.append(str(exc))
            continue
        async with conn:
            row = await (await conn.execute("SELECT pg_is_in_recovery()")).fetchone()
        if row is not None and not row[0]:
            return node
    raise ReshardError(f"shard {shard} has no primary: " + ("; ".join(problems) or "every node is in recovery"))


def reason(exc: BaseException) -> str:
    """An error in one line: the server's message and SQLSTATE, else the exception's text."""
    if isinstance(exc, psycopg.Error) and exc.diag.message_primary:
        return f"{exc.diag.message_primary} (SQLSTATE {exc.sqlstate})"
    return str(exc).strip() or type(exc).__name__


# -- the catalog ---------------------------------------------------------------------------------------------
_DATABASES = """SELECT datname, pg_get_userbyid(datdba) FROM pg_database
WHERE datallowconn AND NOT datistemplate ORDER BY datname"""
_TABLES = """SELECT c.oid, n.nspname, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind = 'r' AND NOT c.relispartition AND n.nspname <> 'information_schema' AND n.nspname NOT LIKE 'pg\\_%'
ORDER BY 2, 3"""
_COLUMNS = """SELECT attname, format_type(atttypid, atttypmod) FROM pg_attribute
WHERE attrelid = %s AND attnum > 0 AND NOT attisdropped AND attgenerated = '' ORDER BY attnum"""
_PRIMARY_KEY = """SELECT a.attname FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid
WHERE i.indrelid = %s AND i.indisprimary AND a.attnum = ANY(i.indkey)"""


async def databases(login: Login, node: Node) -> list[tuple[str, str]]:
    """(name, owner) of the databases clients can use."""
    async with await connect(login, node, "postgres") as conn:
        return [(name, owner) for name, owner in await (await conn.execute(_DATABASES)).fetchall()]


async def describe(login: Login, node: Node, name: str, owner: str, key: str, reference: set[str]) -> Database:
    """A database's tables: sharded (they have the key column), reference (sharding.reference_tables), other."""
    database = Database(name, owner)
    async with await connect(login, node, name) as conn:
        for oid, schema, table in await (await conn.execute(_TABLES)).fetchall():
            columns = await (await conn.execute(_COLUMNS, (oid,))).fetchall()
            names = [column for column, _ in columns]
            pk = [row[0] for row in await (await conn.execute(_PRIMARY_KEY, (oid,))).fetchall()]
            info = Table(schema, table, names, dict(columns), pk, None)
            if table.lower() in reference or f"{schema}.{table}".lower() in reference:
                database.reference.append(info)
            elif key in names:
                info.key_index = names.index(key)
                database.sharded.append(info)
            else:
                database.other.append(info.qualified)
    for table_ in database.moved:
        if not table_.primary_key or table_.key_index is not None and key not in table_.primary_key:
            needs = f"a primary key that includes {key}" if table_.key_index is not None else "a primary key"
            raise ReshardError(f"table {name}.{table_.qualified} needs {needs} for RESHARD: its changes are "
                               f"applied by that key on the new owner")
    return database


# -- schema ----------------------------------------------------------------------------------------------------
async def ensure_database(login: Login, node: Node, database: Database) -> None:
    async with await connect(login, node, "postgres") as conn:
        found = await (await conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (database.name,))).fetchone()
        if found is None:
            await conn.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(
                sql.Identifier(database.name), sql.Identifier(database.owner)))


async def missing_tables(login: Login, node: Node, database: Database) -> list[str]:
    """The database's tables (schema.name) that the node lacks."""
    async with await connect(login, node, database.name) as conn:
        present = {f"{schema}.{name}" for _, schema, name in await (await conn.execute(_TABLES)).fetchall()}
    wanted = [table.qualified for table in database.moved] + database.other
    return [name for name in wanted if name not in present]


async def copy_schema(login: Login, source: Node, target: Node, database: str, tables: list[str]) -> None:
    """Create tables (with their indexes, constraints and owned sequences) on target as pg_dump describes them."""
    patterns = [arg for name in tables for arg in ("-t", _dump_pattern(name))]
    process = await asyncio.create_subprocess_exec(
        "pg_dump", "--schema-only", "--no-publications", "--no-subscriptions", *patterns,
        env=login.environment(source.host, source.port, database),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await process.communicate()
    if process.returncode:
        raise ReshardError(f"pg_dump of shard {source.shard}, database {database}: {err.decode().strip()}")
    # psql's meta-commands (\restrict in recent pg_dump) mean nothing to the server.
    script = "\n".join(line for line in out.decode().splitlines() if not line.startswith("\\"))
    async with await connect(login, target, database) as conn:
        try:
            await conn.execute(script.encode())
        except psycopg.Error as exc:
            raise ReshardError(f"schema on shard {target.shard}, database {database}: {reason(exc)}") from None


def _dump_pattern(qualified: str) -> str:
    schema, name = qualified.split(".", 1)
    return '"' + schema.replace('"', '""') + '"."' + name.replace('"', '""') + '"'


# -- slots ----------------------------------------------------------------------------------------------------
def slot_name(database_oid: int) -> str:
    return f"{SLOT_PREFIX}_{database_oid}"


async def leftovers(login: Login, node: Node) -> list[tuple[str, str]]:
    """(slot, database) of RESHARD's slots on the node: a job that did not finish (its proxy died)."""
    async with await connect(login, node, "postgres") as conn:
        rows = await (await conn.execute("SELECT slot_name, database FROM pg_replication_slots WHERE slot_name "
                                         "LIKE %s", (SLOT_PREFIX + "%",))).fetchall()
    return [(slot, database) for slot, database in rows]


async def drop_slot(login: Login, node: Node, database: str, slot: str) -> None:
    async with await connect(login, node, database) as conn:
        await conn.execute("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
                           "WHERE slot_name = %s", (slot,))
        await conn.execute(sql.SQL("DROP PUBLICATION IF EXISTS {}").format(sql.Identifier(PUBLICATION)))


@dataclass
class Slot:
    """A source's slot in one database, and the snapshot its rows are copied from while `holder` stays open."""

    node: Node
    database: Database
    name: str
    snapshot: str
    holder: psycopg.AsyncConnection[Any] | None


async def create_slot(login: Login, node: Node, database: Database, tables: list[Table]) -> Slot:
    async with await connect(login, node, database.name) as conn:
        row = await (await conn.execute("SELECT oid FROM pg_database WHERE datname = current_database()")).fetchone()
        assert row is not None
        await conn.execute(sql.SQL("CREATE PUBLICATION {} FOR TABLE {}").format(
            sql.Identifier(PUBLICATION), sql.SQL(", ").join(table.ident for table in tables)))
    name = slot_name(row[0])
    holder = await connect(login, node, database.name, replication="database")
    # A simple query (no parameters): the replication protocol takes no other.
    cursor = await holder.execute(f"CREATE_REPLICATION_SLOT {name} LOGICAL pgoutput (SNAPSHOT 'export')".encode())
    created = await cursor.fetchone()
    assert created is not None
    return Slot(node, database, name, created[2], holder)


# -- copying ----------------------------------------------------------------------------------------------------
def key_text(line: bytes, index: int) -> bytes | None:
    """The key column of one COPY text line: its text (the ring's canonical bytes), None when NULL."""
    raw = line.split(b"\t", index + 1)[index] if index else line.split(b"\t", 1)[0]
    raw = raw.rstrip(b"\n")
    if raw == b"\\N":
        return None
    return _ESCAPE.sub(_unescape, raw) if b"\\" in raw else raw


def _unescape(match: re.Match[bytes]) -> bytes:
    code = match.group(1)
    if code in _COPY_ESCAPES:
        return _COPY_ESCAPES[code]
    return bytes([int(code[1:], 16) if code[:1] == b"x" else int(code, 8)])


async def copy_rows(source: psycopg.AsyncConnection[Any], table: Table,
                    targets: Callable[[bytes | None], list[str]],
                    sinks: dict[str, psycopg.AsyncConnection[Any]]) -> int:
    """Copy the table's rows from source (in its snapshot) to the shards `targets` names for each row's key;
    returns the rows written."""
    copied = 0
    select = sql.SQL("COPY (SELECT {} FROM {}) TO STDOUT").format(table.column_list(), table.ident)
    insert = sql.SQL("COPY {} ({}) FROM STDIN").format(table.ident, table.column_list())
    pending = {shard: bytearray() for shard in sinks}  # rows go on in chunks: a write per row costs more
    async with _copies(sinks, insert) as writers, source.cursor().copy(select) as reader:
        async for chunk in reader:
            line = bytes(chunk)
            key = key_text(line, table.key_index) if table.key_index is not None else None
            for shard in targets(key):
                buffer = pending[shard]
                buffer += line
                copied += 1
                if len(buffer) >= COPY_CHUNK:
                    await writers[shard].write(bytes(buffer))
                    buffer.clear()
        for shard, buffer in pending.items():
            if buffer:
                await writers[shard].write(bytes(buffer))
    return copied


@asynccontextmanager
async def _copies(sinks: dict[str, psycopg.AsyncConnection[Any]],
                  statement: sql.Composable) -> AsyncIterator[dict[str, Any]]:
    """A COPY FROM STDIN open on each sink, committed together on the way out."""
    async with _nested([sink.cursor().copy(statement) for sink in sinks.values()]) as copies:
        yield dict(zip(sinks, copies))


@asynccontextmanager
async def _nested(managers: list[Any]) -> AsyncIterator[list[Any]]:
    if not managers:
        yield []
        return
    async with managers[0] as first, _nested(managers[1:]) as rest:
        yield [first, *rest]


# -- streaming -------------------------------------------------------------------------------------------------
@dataclass
class Applied:
    messages: int  # read from the slot: none means it has nothing more (up to the position asked)
    rows: int  # written or deleted on other shards


class Stream:
    """Reads a source's slot and applies each change of a moving row on the shard that owns it now."""

    def __init__(self, slot: Slot, conn: psycopg.AsyncConnection[Any], owners: Callable[[str | None], list[str]],
                 reference_owners: list[str], sinks: dict[str, psycopg.AsyncConnection[Any]]) -> None:
        self.slot = slot
        self.conn = conn  # an ordinary connection to the source, in the slot's database
        self.owners = owners  # the shards (other than the source) that take a key's rows
        self.reference_owners = reference_owners  # the shards that take every reference row from this source
        self.sinks = sinks  # by shard name
        self.tables = {table.qualified: table for table in slot.database.moved}
        self.relations: dict[int, tuple[pgoutput.Relation, Table]] = {}

    async def apply(self, upto: str | None = None) -> Applied:
        """Apply the next changes (up to the LSN `upto`), then let the slot forget them."""
        rows = await (await self.conn.execute(
            "SELECT lsn::text, data FROM pg_logical_slot_peek_binary_changes(%s, %s::pg_lsn, %s, 'proto_version', "
            "'1', 'publication_names', %s)", (self.slot.name, upto, CHANGES_PER_PASS, PUBLICATION))).fetchall()
        if not rows:
            return Applied(0, 0)
        work: dict[str, list[tuple[sql.Composable, list[Any]]]] = {}
        for _, data in rows:
            message = pgoutput.decode(bytes(data))
            if isinstance(message, pgoutput.Relation):
                self._relation(message)
            elif isinstance(message, pgoutput.Change):
                for shard, statement in self._statements(message):
                    work.setdefault(shard, []).append(statement)
            elif isinstance(message, pgoutput.Truncate):
                raise ReshardError("a table was truncated during RESHARD: its rows cannot be followed")
        written = sum(await asyncio.gather(*(self._run(shard, statements) for shard, statements in work.items())))
        last = rows[-1][0]
        await self.conn.execute("SELECT pg_replication_slot_advance(%s, %s::pg_lsn)", (self.slot.name, last))
        return Applied(len(rows), written)

    def _relation(self, relation: pgoutput.Relation) -> None:
        name = f"{relation.schema}.{relation.name}"
        table = self.tables.get(name)
        if table is None or not set(relation.columns) <= set(table.columns):
            raise ReshardError(f"table {name} changed during RESHARD (DDL): the new shards do not have it as it is")
        self.relations[relation.relid] = (relation, table)

    def _statements(self, change: pgoutput.Change) -> Iterable[tuple[str, tuple[sql.Composable, list[Any]]]]:
        relation, table = self.relations[change.relid]
        new = dict(zip(relation.columns, change.new)) if change.new is not None else None
        old = dict(zip(relation.columns, change.old)) if change.old is not None else None
        if old is not None:  # a delete, or an update of the row's key: the old row leaves its owner
            for shard in self._owners_of(table, old):
                yield shard, _delete(table, old)
        if new is not None:
            for shard in self._owners_of(table, new):
                yield shard, _upsert(table, new)

    def _owners_of(self, table: Table, row: dict[str, pgoutput.Value]) -> list[str]:
        if table.key_index is None:
            return self.reference_owners
        key = row[table.columns[table.key_index]]
        return self.owners(key if isinstance(key, str) else None)

    async def _run(self, shard: str, statements: list[tuple[sql.Composable, list[Any]]]) -> int:
        conn = self.sinks[shard]
        async with conn.transaction(), conn.pipeline():
            for statement, params in statements:
                await conn.execute(statement, params)
        return len(statements)


def _cast(table: Table, column: str) -> sql.Composable:
    return sql.SQL("{}::{}").format(sql.Placeholder(), sql.SQL(table.types[column]))


def _delete(table: Table, row: dict[str, pgoutput.Value]) -> tuple[sql.Composable, list[Any]]:
    where = sql.SQL(" AND ").join(sql.SQL("{} = {}").format(sql.Identifier(c), _cast(table, c))
                                  for c in table.primary_key)
    return sql.SQL("DELETE FROM {} WHERE {}").format(table.ident, where), [row[c] for c in table.primary_key]


def _upsert(table: Table, row: dict[str, pgoutput.Value]) -> tuple[sql.Composable, list[Any]]:
    """INSERT, or UPDATE where the key is there; a TOASTed value the update did not change is left alone."""
    columns = [c for c in table.columns if c in row and row[c] is not pgoutput.UNCHANGED]
    updates = [c for c in columns if c not in table.primary_key]
    conflict = sql.SQL(", ").join(map(sql.Identifier, table.primary_key))
    action = sql.SQL("DO UPDATE SET {}").format(sql.SQL(", ").join(
        sql.SQL("{0} = EXCLUDED.{0}").format(sql.Identifier(c)) for c in updates)) if updates else sql.SQL("DO NOTHING")
    statement = sql.SQL("INSERT INTO {} ({}) VALUES ({}) ON CONFLICT ({}) {}").format(
        table.ident, sql.SQL(", ").join(map(sql.Identifier, columns)),
        sql.SQL(", ").join(_cast(table, c) for c in columns), conflict, action)
    return statement, [row[c] for c in columns]


# -- deleting --------------------------------------------------------------------------------------------------
async def delete_keys(conn: psycopg.AsyncConnection[Any], table: Table, leaves: Callable[[str], bool],
                      batch_size: int) -> int:
    """Delete, batch_size rows per transaction, the rows whose key `leaves` says does not belong here."""
    assert table.key_index is not None
    key = sql.Identifier(table.columns[table.key_index])
    found = await (await conn.execute(sql.SQL("SELECT DISTINCT {}::text FROM {} WHERE {} IS NOT NULL").format(
        key, table.ident, key))).fetchall()
    gone = [row[0] for row in found if leaves(row[0])]
    statement = sql.SQL("DELETE FROM {0} WHERE ctid = ANY(ARRAY(SELECT ctid FROM {0} WHERE {1} = ANY({2}::{3}[]) "
                        "LIMIT {4}))").format(table.ident, key, sql.Placeholder(),
                                              sql.SQL(table.types[table.columns[table.key_index]]),
                                              sql.Literal(batch_size))
    deleted = 0
    for start in range(0, len(gone), batch_size):
        keys = gone[start:start + batch_size]
        while True:
            count = (await conn.execute(statement, (keys,))).rowcount
            deleted += count
            if count < batch_size:
                break
    return deleted


async def has_rows(conn: psycopg.AsyncConnection[Any], table: Table) -> bool:
    row = await (await conn.execute(sql.SQL("SELECT EXISTS (SELECT FROM {})").format(table.ident))).fetchone()
    return bool(row and row[0])


async def current_lsn(conn: psycopg.AsyncConnection[Any]) -> str:
    row = await (await conn.execute("SELECT pg_current_wal_lsn()::text")).fetchone()
    assert row is not None
    return str(row[0])


async def slot_lag(conn: psycopg.AsyncConnection[Any], slot: str) -> int:
    """Bytes of WAL written since what the slot has applied."""
    row = await (await conn.execute("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::bigint "
                                    "FROM pg_replication_slots WHERE slot_name = %s", (slot,))).fetchone()
    return int(row[0]) if row is not None and row[0] is not None else 0
