"""RESHARD: move the rows whose owner changes between the running ring and the config file's, while clients keep
working, then switch every proxy of the fleet to the new ring together.

The job runs in the proxy that was sent RESHARD; SHOW RESHARD reports its phase:
- schema: shards that are new get the databases and tables they lack (pg_dump of the first source shard).
- copy: on each source shard and database, a publication of the sharded and reference tables and a logical
  replication slot whose exported snapshot the rows are copied from: a sharded row goes to the shard that owns its
  key under the new ring, when that is another shard; reference rows go whole to the new shards.
- catchup: what the slots recorded since their snapshot is applied on the new owners (data.Stream).
- cutover: every proxy of the fleet (its workers, and those in `fleet`) holds new transactions on the moving keys
  (and writes to reference tables) and lets running ones end (RESHARD HOLD); the new owners apply everything up
  to the sources' current WAL position; then all switch to the new ring (RESHARD SWITCH), and the held
  transactions go there. A member that cannot hold makes all release (RESHARD RELEASE): nobody switches, and the
  job retries until `reshard.cutover_timeout`, then fails as if it had never run.
- cleanup: the moved rows are deleted from their old owners in batches, and the slots and publications dropped.

A job that fails before the cut-over deletes what it copied. A proxy killed while its job runs leaves slots (which
keep WAL on the sources) and maybe copied rows: the next RESHARD finds the slots, deletes from every shard the
rows the running ring does not give it, drops the slots, and starts over; after a switch, that is the cleanup.

The package: this module is each proxy's side (the admin command and the hold); `job` runs a job and `data` does
its work on the servers, with psycopg, which is imported only once a proxy runs a job; `state` is what they share.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

from shardproxy.config import Config, ConfigError, load_config
from shardproxy.ops.admin.replies import AdminError, Table
from shardproxy.ops.reshard.state import COLUMNS, ReshardHost, ring_digest
from shardproxy.routing.ring import Ring
from shardproxy.tasks import spawn
from shardproxy.wire import protocol as pg

if TYPE_CHECKING:
    from shardproxy.ops.reshard.job import Job

log = logging.getLogger("shardproxy.reshard")

DRAIN_POLL = 0.005


class Resharding:
    """This proxy's side of RESHARD: the job it runs, if any, and the hold of moving keys the job asks for."""

    def __init__(self, host: ReshardHost) -> None:
        self.host = host
        self.job: Job | None = None
        self._passed = asyncio.Event()  # clear while keys are held
        self._passed.set()
        self._held: str | None = None  # the digest of the ring the held keys move to
        self._expiry: asyncio.TimerHandle | None = None

    # -- the admin commands ------------------------------------------------------------------------------------
    async def command(self, args: list[str]) -> Table:
        """RESHARD (start the job), or a step of a cut-over: HOLD <ring>, SWITCH <ring>, RELEASE."""
        step = args[0].upper() if args else ""
        if step == "HOLD" and len(args) == 2:
            await self.hold(args[1])
        elif step == "SWITCH" and len(args) == 2:
            await self.switch(args[1])
        elif step == "RELEASE" and len(args) == 1:
            self.release()
        elif not args:
            return self.start()
        else:
            raise AdminError("usage: RESHARD, or RESHARD HOLD|SWITCH <ring> or RESHARD RELEASE (the job's steps)")
        return Table([])

    def start(self) -> Table:
        if self.job is not None and self.job.task is not None and not self.job.task.done():
            raise AdminError("a RESHARD job is running; see SHOW RESHARD")
        try:
            target = self._file_config()
        except ConfigError as exc:
            raise AdminError("RESHARD: the config file is invalid: " + "; ".join(exc.problems)) from None
        from shardproxy.ops.reshard.job import Job  # psycopg: loaded by the proxies that run a job, only

        self.job = Job(self.host, target)
        self.job.task = spawn(self.job.run())
        return self.show()

    def show(self) -> Table:
        return Table(COLUMNS, [self.job.progress.row()] if self.job is not None else [])

    # -- holding moving keys (every member of the fleet) -----------------------------------------------------
    async def passed(self) -> None:
        """Returns once no key is held (the data path's transactions on moving keys wait here)."""
        await self._passed.wait()

    async def hold(self, digest: str) -> None:
        """Hold new transactions on the keys the config file's ring gives another owner, and wait for running
        ones to end; refused when this proxy's file has another ring than the job's."""
        try:
            new = Ring.from_config(self._file_config())
        except ConfigError as exc:
            raise AdminError("the config file is invalid: " + "; ".join(exc.problems)) from None
        if ring_digest(new) != digest:
            raise AdminError("this proxy's config file has other shards than the RESHARD job's")
        old = self.host.router.ring
        self.host.router.held = lambda key: bool(old.owner(key) != new.owner(key))
        self._held = digest
        self._passed.clear()
        timeout = self.host.config.reshard.cutover_timeout
        if self._expiry is not None:
            self._expiry.cancel()
        # A job that dies mid-cut-over must not hold clients for ever: the hold ends on its own.
        self._expiry = asyncio.get_running_loop().call_later(2 * timeout, self._expire)
        if not await self._running_end(timeout):
            self.release()
            raise AdminError(f"transactions still running after {timeout:g}s")

    async def switch(self, digest: str) -> None:
        if self._held != digest:
            raise AdminError("no hold for this ring: RESHARD HOLD first")
        held = self.host.router.held
        try:
            config = self.host.reload(force=True)
        except ConfigError as exc:
            self.release()
            raise AdminError("reload failed: " + "; ".join(exc.problems)) from None
        # The new router holds too, until health checks have found the new shards' primaries: a write to a
        # reference table, which goes to every shard at once, would fail on a shard without one.
        self.host.router.held = held
        timeout = config.routing.failover_timeout
        await asyncio.gather(*(self.host.wait_for_primary(shard.name, timeout) for shard in config.shards))
        self.host.router.held = None
        self._end_hold()
        log.info("switched to the new ring (RESHARD)", extra={"event": "reshard_switch"})

    def release(self) -> None:
        self.host.router.held = None
        self._end_hold()

    def _expire(self) -> None:
        log.error("RESHARD: no cut-over came for the held keys; releasing them on the running ring")
        self.release()

    def _end_hold(self) -> None:
        self._held = None
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        self._passed.set()

    async def _running_end(self, timeout: float) -> bool:
        """Wait until every transaction running now has ended: its server connection is idle, given back or
        linked anew (a session's, in session pooling, idles between transactions)."""
        running = [(server, server.linked_at) for pool in self.host.pools for server in pool.servers
                   if _in_transaction(server)]
        deadline = time.monotonic() + timeout
        while running:
            running = [(server, linked) for server, linked in running
                       if _in_transaction(server) and server.linked_at == linked and not server.closed]
            if time.monotonic() > deadline:
                return False
            if running:
                await asyncio.sleep(DRAIN_POLL)
        return True

    def _file_config(self) -> Config:
        config = self.host.config
        assert config.path is not None
        return load_config(config.path, region=config.region, workers=config.workers)


def _in_transaction(server: Any) -> bool:
    return server.client is not None and (bool(server.pending) or server.status != pg.IDLE)
