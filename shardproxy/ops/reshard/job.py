"""One RESHARD job, from the running ring to the config file's (see the package's docstring for its phases)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

import psycopg

from shardproxy.cluster.health import health_login
from shardproxy.config import Config, redact_dsn
from shardproxy.ops.admin.replies import AdminError
from shardproxy.ops.reshard import data
from shardproxy.ops.reshard.state import Progress, ReshardHost, ring_digest
from shardproxy.routing.ring import Ring, fraction_moved, moves

log = logging.getLogger("shardproxy.reshard")

CAUGHT_UP = 1000  # messages per catch-up pass below which the cut-over starts
RETRY_DELAY = 1.0  # between attempts at the cut-over


class Job:
    """One RESHARD, from the running ring to the ring of `target` (the config file when it was sent)."""

    def __init__(self, host: ReshardHost, target: Config) -> None:
        self.host = host
        self.target = target
        self.old = host.router.ring
        self.new = Ring.from_config(target)
        self.digest = ring_digest(self.new)
        self.progress = Progress(moved_share=fraction_moved(self.old, self.new))
        moving = moves(self.old, self.new)
        self.sources = [name for name in self.old.names if any(before == name for before, _ in moving)]
        self.gaining = [name for name in self.new.names if any(after == name for _, after in moving)]
        name, password = health_login(target)
        user = target.user(target.reshard.user) if target.reshard.user else None
        if user is not None:
            name, password = user.name, user.password
        self.login = data.Login.from_config(target, name, password)
        self.primaries: dict[str, data.Node] = {}
        self.slots: list[data.Slot] = []
        self.streams: list[data.Stream] = []
        self.connections: list[psycopg.AsyncConnection[Any]] = []
        self.switched = False
        self.task: asyncio.Task[None] | None = None

    @property
    def old_shards(self) -> list[str]:
        return list(self.old.names)

    @property
    def new_shards(self) -> list[str]:
        return [name for name in self.new.names if name not in self.old.names]

    async def run(self) -> None:
        log.info("RESHARD started: %.2f%% of the key space moves", self.progress.moved_share * 100,
                 extra={"event": "reshard"})
        try:
            await self._find_primaries()
            await self._abandon_leftovers()
            databases = await self._describe()
            await self._schema(databases)
            self._phase("copy")
            for database in databases:
                await self._clear_takers(database)
                await self._copy(database)
            self._phase("catchup")
            await self._catch_up()
            self._phase("cutover")
            await self._cut_over()
            self._phase("cleanup")
            await self._cleanup(databases)
            self._phase("done")
        except Exception as exc:  # any failure: SHOW RESHARD says why, and the data is put back
            await self._fail(exc)
        finally:
            await self._close()
            self.progress.ended = time.monotonic()

    def _phase(self, phase: str) -> None:
        self.progress.phase = phase
        log.info("RESHARD: %s", phase, extra={"event": "reshard"})

    # -- preparation -------------------------------------------------------------------------------------------
    async def _find_primaries(self) -> None:
        for shard in self.target.shards:
            nodes = [(node.host, node.port) for node in shard.nodes]
            self.primaries[shard.name] = await data.find_primary(self.login, shard.name, nodes)
        for name in self.old_shards:
            if name not in self.primaries:
                raise data.ReshardError(f"shard {name} leaves the ring: removing a shard needs its rows moved "
                                        f"away, which RESHARD does not do yet")

    async def _abandon_leftovers(self) -> None:
        """A job whose proxy died left slots: delete the rows the running ring does not give each shard (copies
        made before a switch, or moved rows after it), then drop the slots."""
        found = [(node, slot, database) for node in self.primaries.values()
                 for slot, database in await data.leftovers(self.login, node)]
        if not found:
            return
        log.warning("RESHARD: a job that did not finish left %d slots; deleting what it left", len(found))
        for node in self.primaries.values():
            for database, owner in await data.databases(self.login, node):
                described = await data.describe(self.login, node, database, owner, self._key, self._reference)
                await self._delete_strays(node, described, self.old)
        for node, slot, database in found:
            await data.drop_slot(self.login, node, database, slot)

    @property
    def _key(self) -> str:
        return self.target.sharding.key.lower()

    @property
    def _reference(self) -> set[str]:
        return {name.lower() for name in self.target.sharding.reference_tables}

    async def _describe(self) -> list[data.Database]:
        first = self.primaries[self.old_shards[0]]
        found = []
        for name, owner in await data.databases(self.login, first):
            database = await data.describe(self.login, first, name, owner, self._key, self._reference)
            if database.moved or database.other:
                found.append(database)
        self.progress.tables = sum(len(database.moved) for database in found)
        return found

    async def _schema(self, databases: list[data.Database]) -> None:
        first = self.primaries[self.old_shards[0]]
        for shard in self.new_shards:
            node = self.primaries[shard]
            for database in databases:
                await data.ensure_database(self.login, node, database)
                missing = await data.missing_tables(self.login, node, database)
                if missing:
                    await data.copy_schema(self.login, first, node, database.name, missing)

    # -- copy and catch-up -----------------------------------------------------------------------------------
    def _movers(self, source: str) -> Callable[[bytes | str | None], list[str]]:
        """The shards (other than source) that take a key's rows: its new owner, when that is another shard."""
        def owners(key: bytes | str | None) -> list[str]:
            if key is None:
                return []
            owner = self.new.owner(key)
            return [owner] if owner != source else []
        return owners

    async def _copy(self, database: data.Database) -> None:
        """Copy from each source (the first also copies the reference tables to the new shards)."""
        first = self.old_shards[0]
        references = database.reference if self.new_shards else []
        for source in self.sources:
            tables = database.sharded + (references if source == first else [])
            if tables:
                await self._copy_source(source, database, tables)
        if first not in self.sources and references:
            await self._copy_source(first, database, references)

    async def _clear_takers(self, database: data.Database) -> None:
        """Rows a failed earlier attempt copied (and could not delete, its shard being down) go first."""
        for name in self.gaining:
            await self._delete_strays(self.primaries[name], database, self.old)

    async def _copy_source(self, source: str, database: data.Database, tables: list[data.Table]) -> None:
        node = self.primaries[source]
        slot = await data.create_slot(self.login, node, database, tables)
        self.slots.append(slot)
        reference = self.new_shards if source == self.old_shards[0] else []
        takers = [name for name in self.gaining if name != source]
        sinks = await self._sinks(database.name, {*takers, *reference})
        reader = await self._open(node, database.name)
        await reader.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        await reader.execute(f"SET TRANSACTION SNAPSHOT '{slot.snapshot}'".encode())
        movers = self._movers(source)
        for table in tables:
            if table.key_index is None:
                await self._truncate(table, reference, sinks)  # a copy from an earlier attempt goes first
            targets, writers = (movers, takers) if table.key_index is not None else (_always(reference), reference)
            copied = await data.copy_rows(reader, table, targets, {name: sinks[name] for name in writers})
            self.progress.rows_copied += copied
            self.host.reshard_rows("copy", copied)
        await reader.execute("COMMIT")
        assert slot.holder is not None
        await slot.holder.close()  # the snapshot has served: the slot stays
        slot.holder = None
        self.streams.append(data.Stream(slot, reader, movers, reference, sinks))

    async def _truncate(self, table: data.Table, shards: Iterable[str], sinks: dict[str, Any]) -> None:
        for shard in shards:
            await sinks[shard].execute(psycopg.sql.SQL("TRUNCATE {}").format(table.ident))

    async def _sinks(self, database: str, shards: Iterable[str]) -> dict[str, psycopg.AsyncConnection[Any]]:
        return {name: await self._open(self.primaries[name], database) for name in shards}

    async def _open(self, node: data.Node, database: str) -> psycopg.AsyncConnection[Any]:
        conn = await data.connect(self.login, node, database)
        self.connections.append(conn)
        return conn

    async def _stream_pass(self, upto: dict[int, str] | None = None) -> int:
        """Apply what each slot holds (up to a position per stream); returns the messages read."""
        messages = 0
        for i, stream in enumerate(self.streams):
            applied = await stream.apply(upto.get(i) if upto else None)
            messages += applied.messages
            self.progress.rows_streamed += applied.rows
            self.host.reshard_rows("stream", applied.rows)
        self.progress.lag_bytes = sum([await data.slot_lag(s.conn, s.slot.name) for s in self.streams])
        return messages

    async def _catch_up(self) -> None:
        while await self._stream_pass() >= CAUGHT_UP:
            pass

    # -- the cut-over -----------------------------------------------------------------------------------------
    async def _cut_over(self) -> None:
        """Hold the moving keys everywhere, apply up to now, switch everywhere. Until all hold, any member can
        make all release and the job retry; once the first has switched, the others are told until they do."""
        deadline = time.monotonic() + self.target.reshard.cutover_timeout
        members = ["", *self.target.fleet]  # "" is this proxy (all its workers)
        while failed := await self._fleet(f"RESHARD HOLD {self.digest}", members):
            await self._fleet("RESHARD RELEASE", members)
            problem = "; ".join(failed)
            remaining = deadline - time.monotonic()
            if remaining <= 0:  # tried until cutover_timeout, a last time at its end
                raise data.ReshardError(f"cut-over: {problem}")
            log.warning("RESHARD cut-over: %s; retrying", problem)
            await asyncio.sleep(min(RETRY_DELAY, remaining))
            await self._stream_pass()
        await self._apply_until_now()
        self.switched = True  # from here on the new owners take writes: there is no way back
        while failed := await self._fleet(f"RESHARD SWITCH {self.digest}", members):
            members = [member for member in members if any(line.startswith(_label(member)) for line in failed)]
            if time.monotonic() + RETRY_DELAY > deadline:
                raise data.ReshardError("cut-over: switched, except " + "; ".join(failed))
            await asyncio.sleep(RETRY_DELAY)

    async def _apply_until_now(self) -> None:
        """With the moving keys held everywhere: apply each slot up to its source's current WAL position."""
        upto = {i: await data.current_lsn(stream.conn) for i, stream in enumerate(self.streams)}
        while await self._stream_pass(upto):
            pass

    async def _fleet(self, line: str, members: list[str]) -> list[str]:
        """Send one step to members ("" for this proxy's workers, else another's admin DSN); returns what failed,
        each as "<member>: <why>"."""
        steps = [_ask_member(dsn, line) if dsn else self.host.execute_for_all(line) for dsn in members]
        replies = await asyncio.gather(*steps, return_exceptions=True)
        return [f"{_label(member)}: {data.reason(reply)}" for member, reply in zip(members, replies)
                if isinstance(reply, BaseException)]

    # -- the end -------------------------------------------------------------------------------------------------
    async def _cleanup(self, databases: list[data.Database]) -> None:
        for source in self.sources:
            node = self.primaries[source]
            for database in databases:
                await self._delete_strays(node, database, self.new)
        await self._drop_slots()

    async def _delete_strays(self, node: data.Node, database: data.Database, ring: Ring) -> None:
        """Delete from the node the rows of sharded tables whose key the ring gives another shard."""
        if not database.sharded:
            return
        conn = await self._open(node, database.name)
        for table in database.sharded:
            if node.shard not in ring.names:  # all its rows are copies
                if await data.has_rows(conn, table):
                    await conn.execute(psycopg.sql.SQL("TRUNCATE {}").format(table.ident))
                continue
            deleted = await data.delete_keys(conn, table, lambda key: ring.owner(key) != node.shard,
                                             self.target.reshard.batch_size)
            self.host.reshard_rows("cleanup", deleted)

    async def _drop_slots(self) -> None:
        for slot in self.slots:
            if slot.holder is not None:
                await slot.holder.close()
            await data.drop_slot(self.login, slot.node, slot.database.name, slot.name)
        self.slots = []
        self.progress.lag_bytes = 0

    async def _fail(self, exc: Exception) -> None:
        message = data.reason(exc) if isinstance(exc, (psycopg.Error, data.ReshardError)) else repr(exc)
        log.error("RESHARD failed in phase %s: %s", self.progress.phase, message, extra={"event": "reshard"})
        if not isinstance(exc, data.ReshardError | psycopg.Error | AdminError | OSError):
            log.exception("RESHARD: unexpected error")
        self.progress.error = message
        if not self.switched:
            await self._undo()
        self.progress.phase = "failed"

    async def _undo(self) -> None:
        """Before the switch: delete what the job copied, and its slots; each step on its own, as shards may
        be down (what a down shard keeps, the next RESHARD deletes: its slot stays too)."""
        databases = {slot.database.name: slot.database for slot in self.slots}
        for name in self.new.names:
            node = self.primaries.get(name)
            for database in databases.values() if node is not None else []:
                await _quietly(self._delete_strays(node, database, self.old))
                if name in self.new_shards:
                    await _quietly(self._clear_reference(node, database))
        for slot in self.slots:
            if slot.holder is not None:
                await _quietly(slot.holder.close())
            await _quietly(data.drop_slot(self.login, slot.node, slot.database.name, slot.name))

    async def _clear_reference(self, node: data.Node, database: data.Database) -> None:
        conn = await self._open(node, database.name)
        for table in database.reference:
            await conn.execute(psycopg.sql.SQL("TRUNCATE {}").format(table.ident))

    async def _close(self) -> None:
        for conn in self.connections:
            await _quietly(conn.close())
        self.connections = []


def _always(shards: list[str]) -> Callable[[bytes | str | None], list[str]]:
    """Every row to these shards, whatever its key: a reference table's."""
    return lambda _key: shards


async def _quietly(step: Any) -> None:
    try:
        await step
    except Exception as exc:
        log.warning("RESHARD: undoing: %s", data.reason(exc))


def _label(member: str) -> str:
    """A member as the job's messages name it: its admin DSN without the password, or this proxy."""
    return redact_dsn(member) if member else "this proxy"


async def _ask_member(dsn: str, line: str) -> None:
    """One step of the cut-over on another proxy, through its admin database."""
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True, connect_timeout=5) as conn:
        await conn.execute(line.encode())
