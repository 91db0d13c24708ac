"""The admin interface: a unix socket that takes one command per line and answers each with one line of JSON,
and the same commands as simple queries in the virtual database `shardproxy`, for the users in `admin_users`.

Commands read the live state (pools, clients, and the topology once health checks run) on the event loop,
so they see it consistent; each runs to completion at once, except PAUSE, which waits for running
transactions to end.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import stat
import struct
import time
from collections.abc import Awaitable, Callable
from contextlib import suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from shardproxy import __version__
from shardproxy import protocol as pg
from shardproxy.cli import parse_key
from shardproxy.config import Config, ConfigError
from shardproxy.ring import Ring

if TYPE_CHECKING:
    from shardproxy.client import ClientConnection
    from shardproxy.pool import Pool
    from shardproxy.proxy import Proxy

log = logging.getLogger("shardproxy.admin")

ADMIN_DATABASE = "shardproxy"
HELP_HINT = "type HELP for the list of commands"
SYNTAX_ERROR = "42601"
NOT_POSSIBLE_NOW = "55000"  # object_not_in_prerequisite_state
PAUSE_POLL = 0.05
REPLY_LIMIT = 256 * 1024 * 1024  # one JSON line holds SHOW CLIENTS of every client, or a worker's metrics

Value = str | int | float | bool | None
# RowDescription field after the name: no table, type text (oid 25), variable length, no modifier, text format.
_TEXT_FIELD = struct.pack("!IhIhih", 0, 0, 25, -1, -1, 0)
_NULL = b"\xff\xff\xff\xff"
_EMPTY_QUERY = pg.message(b"I")
_Q, _S, _X = b"QSX"
_SESSION_PARAMETERS = b"".join(pg.parameter_status(k, v) for k, v in {
    "server_version": f"{__version__}/shardproxy", "server_encoding": "UTF8", "client_encoding": "UTF8",
    "DateStyle": "ISO", "integer_datetimes": "on", "standard_conforming_strings": "on",
}.items())


class AdminError(Exception):
    """A command failed: the reply's error, and the SQLSTATE the admin database reports it with."""

    def __init__(self, message: str, code: str = NOT_POSSIBLE_NOW):
        super().__init__(message)
        self.code = code


@dataclass
class Table:
    columns: list[str]
    rows: list[list[Value]] = field(default_factory=list)


@dataclass(frozen=True)
class Command:
    usage: str  # the name, then <required> and [optional] arguments
    description: str
    run: Callable[[list[str]], Awaitable[Table]]

    @property
    def name(self) -> str:
        return " ".join(word for word in self.usage.split() if word[0] not in "<[")


# -- views of the proxy's state, shared with the metrics -------------------------------------------------------
@dataclass(frozen=True)
class NodeView:
    shard: str
    host: str
    port: int
    region: str | None
    role: str
    state: str
    lag_bytes: int | None
    lag_seconds: float | None
    last_check: float | None  # wall time

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


def node_views(proxy: Proxy) -> list[NodeView]:
    """Every node, as health checks see it; without them, as the file lists it: up, of unknown role."""
    topology = getattr(proxy, "topology", None)
    if topology is None:
        return [NodeView(shard.name, node.host, node.port, node.region, "unknown", "up", None, None, None)
                for shard in proxy.config.shards for node in shard.nodes]
    return [NodeView(n.shard, n.host, n.port, n.region, n.role, n.state, n.lag_bytes, n.lag_seconds, n.last_check)
            for n in topology.nodes()]


def role_of(proxy: Proxy, address: str) -> str:
    topology = getattr(proxy, "topology", None)
    node = topology.node(address) if topology is not None else None
    return node.role if node is not None else "unknown"


def shard_of(config: Config) -> dict[str, str]:
    """Node address -> the name of the shard it belongs to."""
    return {node.address: shard.name for shard in config.shards for node in shard.nodes}


def client_state(client: ClientConnection) -> str:
    if client.server is not None:
        return "active"
    return "waiting" if client.wait_started else "idle"


# -- the commands ---------------------------------------------------------------------------------------------
class Admin:
    def __init__(self, proxy: Proxy):
        self.proxy = proxy
        self.paused: set[str] = set()  # shard names
        self._ring: tuple[Config, Ring] | None = None
        self._socket: AdminSocket | None = None
        commands = [
            Command("SHOW POOLS", "server connection pools and their clients", self._show_pools),
            Command("SHOW NODES", "nodes: role, state and lag as health checks see them", self._show_nodes),
            Command("SHOW SHARDS", "shards: weight, share of the ring, primary and replicas", self._show_shards),
            Command("SHOW CLIENTS", "client connections", self._show_clients),
            Command("SHOW SERVERS", "server connections", self._show_servers),
            Command("SHOW STATS", "per pool: hand-outs, transactions, time in transactions and waiting (us)",
                    self._show_stats),
            Command("SHOW CONFIG", "the running configuration, passwords hidden", self._show_config),
            Command("SHOW VERSION", "the proxy's version", self._show_version),
            Command("HELP", "this list", self._help),
            Command("ROUTE <key>", "the shard, read node and write node a key goes to now", self._route),
            Command("RELOAD", "re-read the config file; live clients keep working", self._reload),
            Command("PAUSE [shard]", "hold new transactions; returns once running ones have ended", self._pause),
            Command("RESUME [shard]", "let held and new transactions run", self._resume),
            Command("BAN <host:port>", "take a node out of rotation", self._ban),
            Command("UNBAN <host:port>", "put a banned node back into rotation", self._unban),
            Command("KILL <id>", "close a client connection (id as in SHOW CLIENTS)", self._kill),
            Command("SHUTDOWN", "stop gracefully: running transactions end first", self._shutdown),
            Command("METRICS", "the Prometheus exposition text of /metrics, in one row", self._metrics),
        ]
        self.commands = {command.name: command for command in commands}

    async def execute(self, line: str) -> Table:
        """Run one command; raises AdminError with the reason it failed."""
        words = line.strip().rstrip(";").split()
        if not words:
            raise AdminError(f"empty command; {HELP_HINT}", SYNTAX_ERROR)
        size = 2 if words[0].upper() == "SHOW" else 1
        command = self.commands.get(" ".join(words[:size]).upper())
        if command is None:
            raise AdminError(f"unknown command {' '.join(words[:size])!r}; {HELP_HINT}", SYNTAX_ERROR)
        args = words[size:]
        required, optional = command.usage.count("<"), command.usage.count("[")
        if not required <= len(args) <= required + optional:
            raise AdminError(f"usage: {command.usage}", SYNTAX_ERROR)
        try:
            return await command.run(args)
        except AdminError:
            raise
        except Exception as exc:  # a bug must cost one reply, not the admin connection
            log.exception("admin command %r failed", line)
            raise AdminError(f"internal error: {exc}", pg.INTERNAL_ERROR) from exc

    def is_paused(self, address: str) -> bool:
        """Whether a new pool for this node starts paused."""
        return shard_of(self.proxy.config).get(address) in self.paused

    def _topology(self) -> Any:
        return getattr(self.proxy, "topology", None)

    def _current_ring(self) -> Ring:
        config = self.proxy.config
        if self._ring is None or self._ring[0] is not config:
            self._ring = (config, Ring.from_config(config))
        return self._ring[1]

    async def _show_pools(self, args: list[str]) -> Table:
        linked: dict[int, int] = {}  # id(pool) -> clients in a transaction there, or idle and last served there
        for client in self.proxy.clients.values():
            pool = client.server.pool if client.server is not None else client.pool
            if pool is not None and not client.wait_started:
                linked[id(pool)] = linked.get(id(pool), 0) + 1
        shards = shard_of(self.proxy.config)
        now = time.monotonic()
        rows: list[list[Value]] = []
        for pool in self.proxy.pools.values():
            node = pool.node
            waiting = [client for client in pool.waiting if not client.closed]
            maxwait = now - waiting[0].wait_started if waiting else 0.0
            # sv_used is always 0: idle connections are reused without a check query, so none awaits one.
            rows.append([pool.key.database, pool.key.user, shards.get(node.address), node.address,
                         role_of(self.proxy, node.address), node.region, linked.get(id(pool), 0), len(waiting),
                         pool.active, len(pool.idle), 0, pool.opening, round(maxwait, 3)])
        return Table(["database", "user", "shard", "node", "role", "region", "cl_active", "cl_waiting", "sv_active",
                      "sv_idle", "sv_used", "sv_login", "maxwait"], rows)

    async def _show_nodes(self, args: list[str]) -> Table:
        rows: list[list[Value]] = [
            [n.shard, n.host, n.port, n.region, n.role, n.state, n.lag_bytes, n.lag_seconds, _iso(n.last_check)]
            for n in node_views(self.proxy)]
        return Table(["shard", "host", "port", "region", "role", "state", "lag_bytes", "lag_seconds", "last_check"],
                     rows)

    async def _show_shards(self, args: list[str]) -> Table:
        ring = self._current_ring()
        rows: list[list[Value]] = []
        for shard in self.proxy.config.shards:
            primary, replicas = self._members(shard.name)
            rows.append([shard.name, shard.weight, round(ring.share(shard.name), 6), primary, ",".join(replicas)])
        return Table(["name", "weight", "ring_share", "primary", "replicas"], rows)

    def _members(self, shard: str) -> tuple[str | None, list[str]]:
        """The shard's primary and replicas; without health checks, the node every transaction goes to today."""
        topology = self._topology()
        if topology is None:
            config = self.proxy.config.shard(shard)
            return (config.nodes[0].address if config else None), []
        primary = topology.primary(shard)
        replicas = [node.address for node in topology.nodes(shard) if node.role == "replica"]
        return (primary.address if primary is not None else None), replicas

    async def _show_clients(self, args: list[str]) -> Table:
        rows: list[list[Value]] = []
        for client in self.proxy.clients.values():
            server = client.server
            rows.append([client.id, client.user, client.database, client.address, client_state(client),
                         _iso(client.connected_at), server.pool.node.address if server is not None else None])
        return Table(["id", "user", "database", "address", "state", "connected_at", "server"], rows)

    async def _show_servers(self, args: list[str]) -> Table:
        rows: list[list[Value]] = []
        for pool in self.proxy.pools.values():
            for server in pool.servers:
                client = server.client
                rows.append([pool.node.address, pool.key.user, pool.key.database,
                             "active" if client is not None else "idle", server.pid,
                             client.id if client is not None else None,
                             _iso(_wall(server.created)), _iso(_wall(server.last_used))])
        return Table(["node", "user", "database", "state", "pid", "client", "created", "last_used"], rows)

    async def _show_stats(self, args: list[str]) -> Table:
        shards = shard_of(self.proxy.config)
        rows: list[list[Value]] = []
        for pool in self.proxy.pools.values():
            stats = pool.stats
            rows.append([pool.key.database, pool.key.user, shards.get(pool.node.address), pool.node.address,
                         stats.assignments, stats.transactions, round(stats.transaction_time * 1e6),
                         round(stats.wait_time * 1e6)])
        return Table(["database", "user", "shard", "node", "total_server_assignment_count", "total_xact_count",
                      "total_xact_time", "total_wait_time"], rows)

    async def _show_config(self, args: list[str]) -> Table:
        return Table(["key", "value"], [[key, value] for key, value in _flatten(self.proxy.config.redacted(), "")])

    async def _show_version(self, args: list[str]) -> Table:
        return Table(["version"], [[f"shardproxy {__version__}"]])

    async def _help(self, args: list[str]) -> Table:
        return Table(["command", "description"], [[c.usage, c.description] for c in self.commands.values()])

    async def _route(self, args: list[str]) -> Table:
        shard = self._current_ring().owner(parse_key(args[0]))
        topology = self._topology()
        if topology is None:
            read = write = self._members(shard)[0]
        else:
            candidates = topology.read_candidates(shard)
            primary = topology.primary(shard)
            read = candidates[0].address if candidates else None
            write = primary.address if primary is not None else None
        return Table(["key", "shard", "read_node", "write_node"], [[args[0], shard, read, write]])

    async def _reload(self, args: list[str]) -> Table:
        try:
            new = self.proxy.reload()
        except ConfigError as exc:
            raise AdminError("reload rejected, the running config stays: " + "; ".join(exc.problems)) from None
        # The share of the key space whose shard changed: transactions that start from now on use the new ring.
        return Table(["config", "fraction_moved"], [[new.path, round(self.proxy.ring_moved, 6)]])

    async def _pause(self, args: list[str]) -> Table:
        shards = self._shards(args)
        self.paused.update(shards)
        pools = self._pools(shards)
        for pool in pools:
            pool.pause()
        # Like PgBouncer's PAUSE: answer once the running transactions have given their connections back.
        while any(pool.paused and pool.servers for pool in pools):
            await asyncio.sleep(PAUSE_POLL)
        return Table([])

    async def _resume(self, args: list[str]) -> Table:
        shards = self._shards(args)
        if not shards & self.paused:
            raise AdminError("not paused")
        self.paused -= shards
        for pool in self._pools(shards):
            pool.resume()
        return Table([])

    def _shards(self, args: list[str]) -> set[str]:
        names = {shard.name for shard in self.proxy.config.shards}
        if args and args[0] not in names:
            raise AdminError(f"unknown shard {args[0]!r} (shards: {', '.join(sorted(names))})")
        return set(args) if args else names

    def _pools(self, shards: set[str]) -> list[Pool]:
        owners = shard_of(self.proxy.config)
        return [pool for pool in self.proxy.pools.values() if owners.get(pool.node.address) in shards]

    async def _ban(self, args: list[str]) -> Table:
        return self._set_banned(args[0], True)

    async def _unban(self, args: list[str]) -> Table:
        return self._set_banned(args[0], False)

    def _set_banned(self, address: str, banned: bool) -> Table:
        topology = self._topology()
        if topology is None:
            raise AdminError("not available yet: nodes are banned through health checks, which do not run")
        if not (topology.ban(address) if banned else topology.unban(address)):
            raise AdminError(f"unknown node {address!r}; see SHOW NODES")
        return Table([])

    async def _kill(self, args: list[str]) -> Table:
        client = next((c for c in self.proxy.clients.values() if str(c.id) == args[0]), None)
        if client is None:
            raise AdminError(f"no client with id {args[0]!r}; see SHOW CLIENTS")
        if client.wait_started and client.pool is not None:
            client.pool.cancel_waiting(client)
        client.reason = "killed by admin (KILL)"
        client.fail(pg.PostgresError(pg.ADMIN_SHUTDOWN, "terminating connection due to administrator command"))
        return Table([])

    async def _shutdown(self, args: list[str]) -> Table:
        self.proxy.request_shutdown()
        return Table([])

    async def _metrics(self, args: list[str]) -> Table:
        return Table(["text"], [[(await self.proxy.metrics.exposition()).decode()]])

    # -- the unix socket ------------------------------------------------------------------------------------
    async def start(self, path: str, internal: bool = False) -> None:
        self._socket = AdminSocket(path, self.execute, internal)
        await self._socket.start()

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()

    # -- the admin database over the PostgreSQL protocol ----------------------------------------------------
    def open_session(self, client: ClientConnection) -> None:
        """Serve a logged-in client of the admin database; raises PostgresError for users not allowed."""
        if client.user not in self.proxy.config.admin_users:
            raise pg.PostgresError(pg.INVALID_AUTHORIZATION,
                                   f'shardproxy: user "{client.user}" may not use the admin database')
        client.pid, client.secret = self.proxy.register(client)
        client.write(_SESSION_PARAMETERS + pg.backend_key_data(client.pid, client.secret) + pg.READY[pg.IDLE])
        asyncio.get_running_loop().create_task(self._session(client))

    async def _session(self, client: ClientConnection) -> None:
        skipping = False  # after a refused extended-protocol message, until Sync, as PostgreSQL does
        try:
            while not client.closed:
                kind, body = await client.read_message()
                if kind == _Q:
                    client.write(await self._answer(body[:-1].decode(errors="replace")) + pg.READY[pg.IDLE])
                elif kind == _S:
                    skipping = False
                    client.write(pg.READY[pg.IDLE])
                elif kind == _X:
                    break
                elif not skipping:
                    skipping = True
                    client.write(pg.error(pg.FEATURE_NOT_SUPPORTED,
                                          "shardproxy: the admin database takes simple queries only"))
        except (ConnectionError, pg.ProtocolError):
            pass
        client.close()

    async def _execute_everywhere(self, line: str) -> Table:
        """The admin database answers for all workers: with several, the supervisor merges their replies."""
        worker = getattr(self.proxy, "worker", None)
        if worker is None:
            return await self.execute(line)
        try:
            return await ask(worker.supervisor_socket, line)
        except OSError as exc:
            raise AdminError(f"cannot reach the supervisor's admin socket: {exc.strerror or exc}") from None

    async def _answer(self, sql: str) -> bytes:
        """A simple query's replies, one command per statement; an error ends the query, as in PostgreSQL."""
        statements = [text for text in sql.split(";") if text.strip()]
        if not statements:
            return _EMPTY_QUERY
        out: list[bytes] = []
        for text in statements:
            try:
                table = await self._execute_everywhere(text)
            except AdminError as exc:
                out.append(pg.error(exc.code, str(exc)))
                break
            if table.columns:
                out.append(pg.message(b"T", pg.INT16.pack(len(table.columns))
                                      + b"".join(pg.cstring(name) + _TEXT_FIELD for name in table.columns)))
                out += [_data_row(row) for row in table.rows]
            out.append(pg.command_complete(text.split()[0].upper()))
        return b"".join(out)


class AdminSocket:
    """A unix socket, born 0600, that answers each command line with one line of JSON from `execute`."""

    def __init__(self, path: str, execute: Callable[[str], Awaitable[Table]], internal: bool = False):
        self.path = path
        self.execute = execute
        self.internal = internal  # a worker's, asked by its supervisor: errors carry their SQLSTATE too
        self._server: asyncio.AbstractServer | None = None
        self._inode = 0  # of the socket we bound

    async def start(self) -> None:
        claim_socket(self.path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        umask = os.umask(0o177)  # born 0600: no moment where others could connect
        try:
            sock.bind(self.path)
        except OSError:
            sock.close()
            raise
        finally:
            os.umask(umask)
        self._inode = os.stat(self.path).st_ino
        self._server = await asyncio.start_unix_server(self._serve, sock=sock)
        log.info("admin socket %s", self.path)

    def close(self) -> None:
        if self._server is None:
            return
        self._server.close()
        with suppress(OSError):
            if os.stat(self.path).st_ino == self._inode:  # not one a newer proxy made
                os.unlink(self.path)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while line := await reader.readline():
                if not line.strip():
                    continue
                writer.write(json.dumps(await self._reply(line.decode(errors="replace"))).encode() + b"\n")
                await writer.drain()
        except (ConnectionError, ValueError):  # ValueError: a line longer than the reader's limit
            pass
        finally:
            writer.close()

    async def _reply(self, line: str) -> dict[str, Any]:
        try:
            table = await self.execute(line)
        except AdminError as exc:
            reply = {"ok": False, "error": str(exc)}  # the shape the contract gives operators' tools
            return {**reply, "code": exc.code} if self.internal else reply
        return {"ok": True, "columns": table.columns, "rows": table.rows}


# -- the client side, for `shardproxy admin` ------------------------------------------------------------------
def request(path: str, command: str, timeout: float = 5.0) -> str:
    """Send one command; returns the reply line. Raises OSError when the socket cannot be reached."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(path)
        sock.settimeout(None)  # PAUSE answers only once running transactions end
        sock.sendall(command.encode() + b"\n")
        with sock.makefile("rb") as replies:
            line = replies.readline()
    if not line:
        raise RuntimeError(f"the proxy closed {path} without answering")
    return line.decode()


async def ask(path: str, command: str) -> Table:
    """Send one command from the event loop; raises AdminError with a failed reply's error, OSError when the
    socket cannot be reached."""
    reader, writer = await asyncio.open_unix_connection(path, limit=REPLY_LIMIT)
    try:
        writer.write(command.encode() + b"\n")
        line = await reader.readline()
    finally:
        writer.close()
    if not line:
        raise ConnectionResetError(f"{path} closed without answering")
    reply = json.loads(line)
    if not reply["ok"]:
        raise AdminError(reply["error"], reply.get("code", NOT_POSSIBLE_NOW))
    return Table(reply["columns"], reply["rows"])


def format_table(columns: list[str], rows: list[list[Value]]) -> str:
    cells = [columns, *[["" if value is None else _text(value) for value in row] for row in rows]]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    lines = ["  ".join(text.ljust(width) for text, width in zip(line, widths)).rstrip() for line in cells]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


# -- helpers -------------------------------------------------------------------------------------------------
def claim_socket(path: str) -> None:
    """Remove a socket a dead proxy left behind; refuse a path that is not a socket or that a live proxy serves."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise RuntimeError(f"admin socket {path} exists and is not a socket")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1)
        try:
            probe.connect(path)
        except (ConnectionRefusedError, FileNotFoundError):  # nobody listens: stale
            with suppress(FileNotFoundError):
                os.unlink(path)
            return
    raise RuntimeError(f"admin socket {path} belongs to a running shardproxy")


def _data_row(row: list[Value]) -> bytes:
    values = [None if value is None else _text(value).encode() for value in row]
    return pg.message(b"D", pg.INT16.pack(len(values)) + b"".join(
        _NULL if value is None else pg.INT32.pack(len(value)) + value for value in values))


def _text(value: Value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _flatten(data: Any, prefix: str) -> list[tuple[str, Value]]:
    """Nested config data as (key.path[0].name, value) pairs; an empty list or mapping shows as itself."""
    if isinstance(data, dict) and data:
        return [pair for key, value in data.items() for pair in _flatten(value, f"{prefix}.{key}" if prefix else key)]
    if isinstance(data, list) and data:
        return [pair for i, value in enumerate(data) for pair in _flatten(value, f"{prefix}[{i}]")]
    if isinstance(data, (dict, list)):
        return [(prefix, json.dumps(data))]
    return [(prefix, data)]


def _wall(monotonic: float) -> float:
    return time.time() - (time.monotonic() - monotonic)


def _iso(wall: float | None) -> str | None:
    if wall is None:
        return None
    return datetime.fromtimestamp(wall, UTC).isoformat(timespec="seconds")
