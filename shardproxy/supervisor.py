"""Several worker processes (`workers: N`, N > 1): the supervisor.

It starts N copies of the daemon (`shardproxy run` with a hidden worker id), each a full Proxy with its own pools
and health checks, all listening on the same port with SO_REUSEPORT so the kernel spreads connections over them
(worker.py is each one's identity). It restarts a worker that dies, forwards SIGHUP, stops them all on
SIGTERM/SIGINT, and alone serves the admin socket and /metrics, merging what the workers answer on their internal
admin sockets.
"""

from __future__ import annotations

import asyncio
import logging
import math
import operator
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import suppress
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from shardproxy.config import Config
from shardproxy.ops.admin.replies import AdminError, Table
from shardproxy.ops.admin.socket import AdminSocket, ask, claim_socket
from shardproxy.ops.metrics import serve_metrics
from shardproxy.tasks import spawn
from shardproxy.worker import admin_path, cancel_path, supervisor_path

log = logging.getLogger("shardproxy.workers")

READY_POLL = 0.05
RESTART_DELAY = 0.5  # after a worker that died before it was ready, so a bad port does not spin
MAX_START_FAILURES = 3  # a worker dying this many times in a row before it is ready stops the supervisor


class Supervisor:
    def __init__(self, config: Config, log_format: str):
        self.config = config
        self.log_format = log_format
        self.count = config.workers
        self.runtime_dir = tempfile.mkdtemp(prefix="shardproxy-")  # mode 0700: the internal sockets are ours
        self.processes: list[asyncio.subprocess.Process | None] = [None] * self.count
        self.ready = [False] * self.count
        self.stopping = False
        self.exit_code = 0
        self._lifeline = os.pipe()  # the reading end is each worker's stdin; see Worker._lifeline
        self.held = Held()  # what PAUSE and BAN hold now, told to each restarted worker
        self._admin = AdminSocket(config.admin.socket, self.execute)
        self._internal_admin = AdminSocket(supervisor_path(self.runtime_dir), self.execute, internal=True)
        self._metrics: asyncio.AbstractServer | None = None
        self._stopped: asyncio.Event | None = None

    def run(self) -> int:
        import uvloop

        try:
            uvloop.run(self._main())
        finally:
            for fd in self._lifeline:
                os.close(fd)
            shutil.rmtree(self.runtime_dir, ignore_errors=True)
        return self.exit_code

    async def _main(self) -> None:
        loop = asyncio.get_running_loop()
        self._stopped = asyncio.Event()
        claim_socket(self.config.admin.socket)  # before any worker binds the port: refuse a running proxy
        loop.add_signal_handler(signal.SIGTERM, self.stop)
        loop.add_signal_handler(signal.SIGINT, self.stop)
        loop.add_signal_handler(signal.SIGHUP, self._signal_ready, signal.SIGHUP)
        keepers = [loop.create_task(self._keep(i)) for i in range(self.count)]
        while not (all(self.ready) or self.stopping):
            await asyncio.sleep(READY_POLL)
        if not self.stopping:  # the admin socket answers once every worker does
            await self._admin.start()
            await self._internal_admin.start()
            settings = self.config.metrics
            if settings.port:
                self._metrics = await serve_metrics(settings.host, settings.port, self.exposition)
            log.info("%d workers listening on %s:%d", self.count, self.config.listen.host, self.config.listen.port)
        await self._stopped.wait()
        await asyncio.gather(*keepers)

    def stop(self, code: int = 0) -> None:
        """Graceful: every worker finishes its running transactions, as one proxy would."""
        if self.stopping:
            return
        self.stopping, self.exit_code = True, code
        log.info("stopping %d workers", self.count)
        self._admin.close()
        self._internal_admin.close()
        if self._metrics is not None:
            self._metrics.close()
        for process in self.processes:
            if process is not None and process.returncode is None:
                process.send_signal(signal.SIGTERM)
        spawn(self._await_workers())

    async def _await_workers(self) -> None:
        await asyncio.gather(*(p.wait() for p in self.processes if p is not None))
        assert self._stopped is not None
        self._stopped.set()

    def _signal_ready(self, signum: int) -> None:
        """A worker still starting reads the config as it is now; the default action of SIGHUP would kill it."""
        for process, ready in zip(self.processes, self.ready):
            if process is not None and ready and process.returncode is None:
                process.send_signal(signum)

    async def _keep(self, i: int) -> None:
        """Run worker i until the supervisor stops, restarting it whenever it dies."""
        failures = 0
        while not self.stopping:
            process = self.processes[i] = await self._spawn(i)
            if self.stopping:  # stop() came while it was being spawned, and did not see it
                process.send_signal(signal.SIGTERM)
            was_ready = self.ready[i] = await self._wait_ready(i, process)
            if was_ready:
                await self._restore(i)
                log.info("worker %d (pid %d) ready", i, process.pid)
            code = await process.wait()
            self.ready[i] = False
            if self.stopping:
                return
            failures = 0 if was_ready else failures + 1
            log.error("worker %d (pid %d) exited with code %s; restarting it", i, process.pid, code)
            if failures >= MAX_START_FAILURES:
                log.error("worker %d died %d times before it was ready: stopping", i, failures)
                self.stop(1)
                return
            await asyncio.sleep(RESTART_DELAY * failures)

    async def _spawn(self, i: int) -> asyncio.subprocess.Process:
        for path in (admin_path(self.runtime_dir, i), cancel_path(self.runtime_dir, i)):
            with suppress(FileNotFoundError):  # left by a worker that was killed
                os.unlink(path)
        assert self.config.path is not None
        argv = [sys.executable, "-m", "shardproxy", "run", "-c", self.config.path, "--workers", str(self.count),
                "--worker", str(i), "--runtime-dir", self.runtime_dir, "--log-format", self.log_format]
        if self.config.region:
            argv += ["--region", self.config.region]
        # A session of its own: a terminal's Ctrl-C reaches the supervisor alone, which stops workers in order.
        return await asyncio.create_subprocess_exec(*argv, stdin=self._lifeline[0], start_new_session=True)

    async def _wait_ready(self, i: int, process: asyncio.subprocess.Process) -> bool:
        path = cancel_path(self.runtime_dir, i)
        while process.returncode is None:
            if os.path.exists(path):
                return True
            await asyncio.sleep(READY_POLL)
        return False

    async def _restore(self, i: int) -> None:
        """Tell a (re)started worker what PAUSE and BAN hold: its predecessor's state died with it.
        Not before it takes clients: a worker listens just before it is ready (it binds its cancel socket
        last), so a transaction it starts in between is not held."""
        for line in self.held.commands():
            try:
                await ask(admin_path(self.runtime_dir, i), line)
            except (AdminError, OSError) as exc:  # e.g. a shard or node a reload removed; or the worker died
                log.error("worker %d: %s failed: %s", i, line, exc)

    # -- the admin socket, for all workers ------------------------------------------------------------------
    async def execute(self, line: str) -> Table:
        words = line.strip().rstrip(";").split()
        name = " ".join(words[:2] if words and words[0].upper() == "SHOW" else words[:1]).upper()
        if name == "SHUTDOWN" and len(words) == 1:
            self.stop()
            return Table([])
        if name == "RESHARD":  # the job runs in one worker; each step of its cut-over must reach them all
            return await self._ask_one(line) if len(words) == 1 else first(await self._ask_all(line, every=True))
        if name in FROM_ONE or name not in MERGES and name not in TO_ALL:  # an unknown one: its error
            return await self._ask_one(line)
        targets = range(self.count)
        if name == "KILL" and len(words) == 2 and words[1].isdigit():
            targets = range(int(words[1]) % self.count, int(words[1]) % self.count + 1)  # the owner of the id
        if name not in HELD_BY:
            return MERGES.get(name, first)(await self._ask_all(line, targets))
        # Recorded before it is sent: a worker that restarts while it runs (PAUSE waits for transactions) and
        # misses it is told it by _restore.
        shards = await self._shard_names() if name == "PAUSE" and len(words) == 1 else []
        undo = self.held.record(name, words[1:], shards)
        try:
            return MERGES.get(name, first)(await self._ask_all(line, targets))
        except AdminError:  # refused (an unknown shard or node): it holds nothing
            undo()
            raise

    async def _shard_names(self) -> list[str]:
        """All shards, which PAUSE without one pauses: the workers' config, which a RELOAD may have changed."""
        return [str(row[0]) for row in (await self._ask_one("SHOW SHARDS")).rows]

    async def _ask_one(self, line: str) -> Table:
        for i in range(self.count):
            with suppress(OSError):
                return await ask(admin_path(self.runtime_dir, i), line)
        raise AdminError("no worker answers (restarting?)")

    async def _ask_all(self, line: str, targets: range | None = None, every: bool = False) -> list[tuple[int, Table]]:
        """Every target's reply (all workers by default); a worker that is restarting is left out unless
        `every`, an error from any is the answer."""
        targets = range(self.count) if targets is None else targets
        replies = await asyncio.gather(*(ask(admin_path(self.runtime_dir, i), line) for i in targets),
                                       return_exceptions=True)
        for i, reply in zip(targets, replies):
            if isinstance(reply, AdminError):
                raise reply
            if every and isinstance(reply, BaseException):
                raise AdminError(f"worker {i} did not answer: {reply}")
        answered = [(i, reply) for i, reply in zip(targets, replies) if isinstance(reply, Table)]
        if len(answered) < len(replies):
            log.warning("%r: %d of %d workers did not answer", line.strip(), len(replies) - len(answered),
                        len(replies))
        if not answered:
            for reply in replies:
                if isinstance(reply, BaseException) and not isinstance(reply, OSError):
                    raise reply  # a bug, not a worker restarting
            raise AdminError("no worker answers (restarting?)")
        return answered

    async def exposition(self) -> bytes:
        table = await self.execute("METRICS")
        return table.rows[0][0].encode()  # type: ignore[union-attr]


@dataclass
class Held:
    """What the operator's PAUSE and BAN hold now: recorded as each command goes out, taken back if refused."""

    paused: set[str] = field(default_factory=set)  # shard names
    banned: set[str] = field(default_factory=set)  # node addresses

    def record(self, name: str, args: list[str], shards: list[str]) -> Callable[[], None]:
        """A command on its way to the workers; `shards` are all shards, what PAUSE without a shard pauses.
        Returns what takes back its own change alone (not other commands' recorded meanwhile), if they refuse it."""
        paused, banned = set(self.paused), set(self.banned)
        if name == "PAUSE":
            self.paused.update(args or shards)
        elif name == "RESUME":
            self.paused = self.paused - set(args) if args else set()
        elif name == "BAN":
            self.banned.add(args[0])
        elif name == "UNBAN":
            self.banned.discard(args[0])
        added = (self.paused - paused, self.banned - banned)
        removed = (paused - self.paused, banned - self.banned)

        def undo() -> None:
            self.paused = self.paused - added[0] | removed[0]
            self.banned = self.banned - added[1] | removed[1]

        return undo

    def commands(self) -> list[str]:
        """The commands that bring a worker that holds nothing to this state."""
        return [f"PAUSE {shard}" for shard in sorted(self.paused)] + [f"BAN {node}" for node in sorted(self.banned)]


# -- merging the workers' replies (pure) ----------------------------------------------------------------------
def first(replies: list[tuple[int, Table]]) -> Table:
    return replies[0][1]


def with_worker(replies: list[tuple[int, Table]]) -> Table:
    """Rows of all workers, each with the worker that holds it."""
    columns = [*replies[0][1].columns, "worker"]
    return Table(columns, [[*row, i] for i, table in replies for row in table.rows])


def summed(keys: int, maxed: tuple[str, ...] = ()) -> Callable[[list[tuple[int, Table]]], Table]:
    """Rows with the same first `keys` columns as one row: the other columns summed, those in `maxed` their max."""

    def merge(replies: list[tuple[int, Table]]) -> Table:
        columns = replies[0][1].columns
        combine = [max if name in maxed else operator.add for name in columns[keys:]]
        rows: dict[tuple, list] = {}
        for _, table in replies:
            for row in table.rows:
                key = tuple(row[:keys])
                kept = rows.get(key)
                rows[key] = row[keys:] if kept is None else [f(a, b) for f, a, b in zip(combine, kept, row[keys:])]
        return Table(columns, [[*key, *values] for key, values in rows.items()])

    return merge


def summed_metrics(replies: list[tuple[int, Table]]) -> Table:
    return Table(["text"], [[sum_expositions([str(table.rows[0][0]) for _, table in replies]).decode()]])


def _worst(a: float, b: float) -> float:
    """The larger, where NaN (unknown) counts less than any number."""
    return b if math.isnan(a) else a if math.isnan(b) else max(a, b)


# Samples that are not additive over workers: each worker checks node health itself, and a process's start
# time or fd limit summed means nothing.
COMBINE: dict[str, Callable[[float, float], float]] = {
    "shardproxy_node_up": min,
    "shardproxy_replica_lag_seconds": _worst,
    "shardproxy_replica_lag_bytes": _worst,
    "process_start_time_seconds": min,
    "process_max_fds": max,
    "python_info": max,
}


def sum_expositions(texts: list[str]) -> bytes:
    """Prometheus texts as one: each sample (name and labels) summed over the texts, or as COMBINE says."""
    families: dict[str, Metric] = {}
    values: dict[tuple[str, str, tuple[tuple[str, str], ...]], float] = {}
    for text in texts:
        for family in text_string_to_metric_families(text):
            families.setdefault(family.name, Metric(family.name, family.documentation, family.type))
            combine = COMBINE.get(family.name, operator.add)
            for sample in family.samples:
                key = (family.name, sample.name, tuple(sorted(sample.labels.items())))
                values[key] = combine(values[key], sample.value) if key in values else sample.value
    for (family_name, name, labels), value in values.items():
        families[family_name].add_sample(name, dict(labels), value)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(list(families.values())))
    return generate_latest(registry)


class _Families(Collector):
    def __init__(self, families: list[Metric]):
        self.families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self.families)


MERGES: dict[str, Callable[[list[tuple[int, Table]]], Table]] = {
    "SHOW POOLS": summed(6, ("maxwait",)),
    "SHOW STATS": summed(4),
    "SHOW CLIENTS": with_worker,
    "SHOW SERVERS": with_worker,
    "METRICS": summed_metrics,
}
TO_ALL = {"RELOAD", "PAUSE", "RESUME", "BAN", "UNBAN", "KILL"}  # the first worker's reply stands for all
HELD_BY = {"PAUSE", "RESUME", "BAN", "UNBAN"}  # what Held keeps
FROM_ONE = {"SHOW NODES", "SHOW SHARDS", "SHOW CONFIG", "SHOW VERSION", "SHOW RESHARD", "ROUTE", "HELP"}
