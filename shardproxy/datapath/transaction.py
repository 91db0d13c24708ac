"""A client transaction that spans shards: its legs (one server connection per shard it touched), the log of what
every leg must have run (BEGIN, SETs, savepoints), and its end across the legs.

The client forwards to one leg at a time (placement.py); the others wait, parked, inside the transaction. A leg
that joins late, or has been parked while the client ran a SET or a SAVEPOINT elsewhere, first runs what it missed
of the log, so every leg is in the same transaction state when it runs a statement; a ROLLBACK TO reaches each leg
the same way, which undoes exactly the work that leg did after the savepoint. A leg the client moves off tells,
hidden, whether it wrote, for the commit to come (park). The end (COMMIT, ROLLBACK, or the Sync of a batch whose
implicit transaction spans shards) runs on every leg here, each through a collecting session (fanout/legs.py),
with two-phase commit where two or more legs wrote (fanout/twophase.py).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from shardproxy.datapath._core import ClientCore, PoolCore, row_values
from shardproxy.datapath.fanout.legs import Leg, Message, exchange, split_messages
from shardproxy.datapath.fanout.twophase import UNKNOWN, WRITING, commit, error_of, read_xid, wrote_columns
from shardproxy.datapath.pending import Action, Kind, Request
from shardproxy.datapath.session import ClientSession, raising_statement
from shardproxy.wire import protocol as pg
from shardproxy.wire.protocol import Backend, Frontend

if TYPE_CHECKING:
    from shardproxy.datapath.pool import Pool
    from shardproxy.datapath.server import ServerConnection

# The first key of the advisory lock the legs of a transaction on several shards take, shared, until it ends (with
# a leg's first statement once the transaction spans shards, or as the client moves off a leg): its second key (the
# transaction's tag) names the transaction on every server, so deadlock detection (deadlocks.py) in any proxy
# process sees which backends of different shards are one transaction.
TAG_KEY = 0x53505844
_ROLLBACK = pg.query("ROLLBACK")
_NOTHING: list[bytes] = []  # (never changed)


@dataclass
class Ending:
    """How the end of a transaction on several legs went."""

    error: pg.PostgresError | None  # what the client gets; None: committed, or rolled back as asked
    two_phase: bool = False
    seconds: float = 0.0  # that the commit took
    committed_at: dict[int, int] = field(default_factory=dict)  # per shard: where the commit ends in its WAL


class Transaction:
    """The legs of a client's transaction, by shard index, and the log each must have run."""

    def __init__(self, replay: list[bytes]):
        self.replay = replay  # the client's (ClientCore.replay): simple Queries, in order
        self.legs: dict[int, ServerConnection] = {}
        self.applied: dict[int, int] = {}  # per shard: how much of the log its leg has run
        self.data: set[int] = set()  # shards whose leg ran a statement naming that shard
        self.writes: set[int] = set()  # (once it spans shards) shards whose leg ran a statement that writes
        self.xids: dict[int, int | None] = {}  # per shard, once learnt since its leg last ran: its xid (None: none)
        self.started = 0.0  # when its first leg joined
        self.tag = 0  # once it spans shards: its number in every leg's advisory lock (TAG_KEY); 0 before
        self._tagged: set[int] = set()  # shards whose leg holds it or has been sent it
        self._asking: set[int] = set()  # shards whose leg has yet to tell whether it wrote (park)

    def join(self, shard: int, server: ServerConnection) -> list[bytes]:
        """The shard's leg is linked: it is one of the transaction's (if new, with what `applied` says it ran),
        and runs first what it missed of the log."""
        legs = self.legs
        if shard not in legs:
            if not legs:
                self.started = time.monotonic()
            legs[shard] = server
        else:
            self._may_write(shard)
        if len(legs) > 1 and shard not in self._tagged:  # it spans shards: the leg takes the tag before it can wait
            return [*self.missed(shard), pg.query("SELECT " + self._tag_for(shard))]
        if self.applied.get(shard, 0) == len(self.replay):
            return _NOTHING
        return self.missed(shard)

    def park(self, shard: int, server: ServerConnection) -> None:
        """The client moves off the shard's leg, which waits inside the transaction: hidden, it tells whether its
        transaction wrote (so that the commit needs no round to ask, twophase.py), and takes the tag, if it holds
        none yet (the transaction spans shards now: deadlock detection must see what this leg holds)."""
        asks, tags = shard not in self.xids, shard not in self._tagged
        if server.status != pg.IN_TRANSACTION or not (asks or tags):
            return
        listed = [self._tag_for(shard)] if tags else []  # (first: its void is no part of what read_xid reads)
        if asks:
            listed.append(wrote_columns(server))

        def told(_: ServerConnection, t: int, body: bytes) -> None:
            if t == Backend.DATA_ROW and shard in self._asking and self.legs.get(shard) is server:
                self.xids[shard] = read_xid(server, row_values(body)[tags:])
                self._asking.discard(shard)

        if asks:
            self._asking.add(shard)

        server.pending.append(Request(Kind.QUERY, Action.HIDE, told))
        server.write(pg.query("SELECT " + ", ".join(listed)))

    def wrote_on(self, shard: int) -> None:
        """The shard's leg ran a statement the router takes for a write. (Kept once the transaction spans shards:
        before, the leg tells whether it wrote as the client leaves it, see park.)"""
        if self.tag:
            self.writes.add(shard)

    def _may_write(self, shard: int) -> None:
        """The shard's leg runs statements again: that it wrote nothing so far no longer tells, nor does an answer
        to park still on its way (the client may come back to a leg before it arrives)."""
        if shard in self.xids and self.xids[shard] is None:
            del self.xids[shard]
        self._asking.discard(shard)

    def _tag_for(self, shard: int) -> str:
        """What tags the shard's leg (see TAG_KEY), to select; from now on it counts as tagged."""
        if not self.tag:  # made of the time, so that the youngest transaction of a cycle has the highest tag
            self.tag = ((int(time.time() * 1000) & 0x7FFFF) << 12 | random.getrandbits(12)) or 1
        self._tagged.add(shard)
        return f"pg_advisory_xact_lock_shared({TAG_KEY}, {self.tag})"

    def missed(self, shard: int) -> list[bytes]:
        """What of the log the shard's leg has not run; from now on it counts as run."""
        done = self.applied.get(shard, 0)
        self.applied[shard] = len(self.replay)
        return self.replay[done:]

    def clear(self) -> None:
        self.legs.clear()
        self.applied.clear()
        self.data.clear()
        if self.tag:  # it spanned shards (what follows is kept only then)
            self.tag = 0
            self._tagged.clear()
            self.writes.clear()
            self.xids.clear()
            self._asking.clear()

    def sessions(self, client: ClientSession) -> dict[int, Leg]:
        """A collecting session on every leg (in shard order), which its first batch links in place of the client
        (see Transaction.release)."""
        return {shard: Leg(client, server.pool, None, server) for shard, server in sorted(self.legs.items())}

    async def every_leg(self, client: ClientSession, pool_of: Callable[[int], Pool | None], shards: Iterable[int],
                        kind: str) -> list[Leg]:
        """A collecting session on a leg of each of the shards (in their order), each caught up with the log: the
        transaction joins the shards it has no leg on (from pool_of(shard)). kind: what each leg's part counts
        as in queries_total. Raises PostgresError when a shard cannot join (no primary, a refused BEGIN)."""
        sessions: dict[int, Leg] = {}
        for shard in shards:
            server = self.legs.get(shard)
            if server is None:
                pool = pool_of(shard)
                if pool is None:
                    self.detach(client, list(sessions.values()))
                    raise pg.PostgresError(pg.CANNOT_CONNECT_NOW, "shardproxy: a shard has no primary")
                sessions[shard] = Leg(client, pool, kind)
                self.applied[shard] = 0
            else:
                sessions[shard] = Leg(client, server.pool, kind, server)
                self._may_write(shard)
        try:
            failed = await self.catch_up(sessions, tag=True)  # a new leg joins here: its BEGIN is the first of the log
        finally:
            for shard, leg in sessions.items():
                if leg.server is not None:
                    self.legs[shard] = leg.server
        if failed is not None:
            self.detach(client, list(sessions.values()))
            raise failed
        return list(sessions.values())

    async def abort(self, client: ClientSession, error: pg.PostgresError) -> None:
        """The proxy's own error aborts the transaction as a server's would: one leg raises it, so that the
        client's next statements get PostgreSQL's 25P02 there (placement.py sends them to a failed leg) until the
        transaction ends."""
        server = self.legs[min(self.legs)]
        session = Leg(client, server.pool, None, server)
        try:
            await session.run(pg.query(raising_statement(error.code, error.message)))
        finally:
            self.detach(client, [session])

    def detach(self, client: ClientCore, sessions: list[Leg]) -> None:
        """Collecting sessions leave their legs, which stay the client's, parked."""
        for leg in sessions:
            server = leg.server
            leg.server, leg.on_server_ready = None, None  # (its bound method would keep it in a cycle)
            if server is not None:
                server.client, server.peer, server.on_ready = client, None, None

    async def catch_up(self, sessions: dict[int, Leg], tag: bool = False) -> pg.PostgresError | None:
        """Run on each leg what it missed of the log (and, if `tag` and the transaction spans shards, the tag, for
        the statement to come); the first error, if any leg refused."""
        spans = tag and len(self.legs.keys() | sessions.keys()) > 1
        pending: dict[int, bytes] = {}
        for shard in sessions:
            pending[shard] = b"".join(self.missed(shard))
            if spans and shard not in self._tagged:
                pending[shard] += pg.query("SELECT " + self._tag_for(shard))
        todo = [shard for shard, batch in pending.items() if batch]
        if not todo:  # (the usual: each leg ran the whole log when it was last used)
            return None
        answers = await exchange([sessions[shard] for shard in todo], [pending[shard] for shard in todo])
        return next((error for messages in answers if (error := error_of(messages)) is not None), None)

    async def end(self, client: ClientSession, commit_it: bool, follow: list[int]) -> Ending:
        """Commit (or roll back) on every leg, then give every leg back to its pool. After a commit, the legs on
        the shards in `follow` are asked where the commit ends in their WAL (read-your-writes)."""
        sessions = self.sessions(client)
        try:
            failed = await self.catch_up(sessions)
            if failed is not None or not commit_it:
                await exchange(list(sessions.values()), [_ROLLBACK] * len(sessions))
                return Ending(failed if commit_it else None)
            started = time.monotonic()
            for shard in self._asking & sessions.keys():  # its answer is on its way: a round to ask costs more
                await sessions[shard].settled()
            xids = [self.xids.get(shard, WRITING if shard in self.writes else UNKNOWN) for shard in sessions]
            for shard in follow:
                sessions[shard].follow = True
            outcome = await commit(list(sessions.values()), client.core.two_phase_key, xids)
            return Ending(outcome.error, outcome.two_phase, time.monotonic() - started, committed_at(sessions))
        finally:
            self.release(client, sessions)

    def release(self, client: ClientCore, sessions: dict[int, Leg]) -> None:
        """Every leg back to its pool; one whose transaction may still be open is closed instead."""
        for shard, server in self.legs.items():
            leg = sessions.get(shard)
            if leg is not None:  # (its bound method would keep it in a cycle)
                leg.server, leg.on_server_ready = None, None
            server.client = client  # the hand-out is counted as the client's (PoolCore.unlink)
            pool: PoolCore = server.pool
            if server.status == pg.IDLE and not server.pending and not server.closed:
                pool.release(server)
            else:
                pool.unlink(server)
                pool.discard(server)
        self.clear()


def committed_at(legs: dict[int, Leg]) -> dict[int, int]:
    """Per shard, where the commit ends in its WAL, of the legs that learnt it."""
    return {shard: leg.committed_at for shard, leg in legs.items() if leg.committed_at is not None}


def statement_messages(buf: bytes | bytearray) -> tuple[list[Message], int]:
    """The messages of the statement at the start of buf, which the proxy answers itself: a simple Query, or
    extended-protocol messages up to and including the first Execute and a Sync right after it."""
    end = 0
    messages: list[Message] = []
    for t, body in split_messages(bytes(buf)):
        messages.append((t, body))
        end += 5 + len(body)
        if t == Frontend.QUERY or t == Frontend.SYNC:
            break
        if t == Frontend.EXECUTE:
            if len(buf) > end and buf[end] == Frontend.SYNC:
                messages.append((Frontend.SYNC, b""))
                end += 5
            break
    return messages, end


def reply(messages: list[Message], tag: str, error: pg.PostgresError | None, status: int) -> bytes:
    """What the server would have answered to a statement's messages that ran as `tag` (or failed with error):
    the client's ReadyForQuery says `status`. After an error, the rest up to Sync gets no answer, as PostgreSQL
    does."""
    out: list[bytes] = []
    failed = False
    for t, _ in messages:
        if failed and t != Frontend.SYNC and t != Frontend.QUERY:
            continue
        if t == Frontend.PARSE:
            out.append(pg.PARSE_COMPLETE)
        elif t == Frontend.BIND:
            out.append(pg.BIND_COMPLETE)
        elif t == Frontend.DESCRIBE:
            out.append(pg.NO_DATA)
        elif t == Frontend.EXECUTE or t == Frontend.QUERY:
            if error is None:
                out.append(pg.command_complete(tag))
            else:
                out.append(error.to_message())
                failed = True
        if t == Frontend.SYNC or t == Frontend.QUERY:
            out.append(pg.READY[status])
    return b"".join(out)
