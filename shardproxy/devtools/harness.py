"""The data path in process, without sockets or servers: a Proxy whose nodes are up and whose pools are full of
idle server connections that write nowhere, and clients logged in to it. Benchmarks time the proxy's own code with
it (bench/bench_handover.py); tests drive the pending-request queue through it, answering for the server."""

from __future__ import annotations

from shardproxy.cluster.topology import Probe
from shardproxy.config import parse_config
from shardproxy.datapath.client import ClientConnection
from shardproxy.datapath.params import REPORTED, shared
from shardproxy.datapath.pending import Action, Kind
from shardproxy.datapath.server import ServerConnection
from shardproxy.proxy import Proxy
from shardproxy.wire import protocol as pg

DATABASE = "bench"
USER = "app"
COMMON = "users: [{name: app, password: secret}]\nlog: {level: warning}\n"

# What PostgreSQL 15 reports at login: a client's and a server's parameters are compared at each hand-out.
LOGIN_PARAMETERS = {
    "application_name": "pgbench", "client_encoding": "UTF8", "DateStyle": "ISO, MDY",
    "default_transaction_read_only": "off", "in_hot_standby": "off", "integer_datetimes": "on",
    "IntervalStyle": "postgres", "is_superuser": "off", "server_encoding": "UTF8", "server_version": "15.18",
    "session_authorization": "app", "standard_conforming_strings": "on", "TimeZone": "Etc/UTC",
}

ROW = pg.message(b"T", b"\0\1balance\0" + b"\0" * 18) + pg.message(b"D", b"\0\1\0\0\0\4" + b"1234") + \
    pg.command_complete("SELECT 1")
# What a server answers to each kind of request the proxy records in a server connection's pending queue.
REPLIES = {Kind.PARSE: pg.PARSE_COMPLETE, Kind.BIND: b"2\0\0\0\4", Kind.EXECUTE: ROW, Kind.SYNC: pg.READY[pg.IDLE],
           Kind.QUERY: ROW + pg.READY[pg.IDLE], Kind.CLOSE: pg.CLOSE_COMPLETE,
           Kind.DESCRIBE: pg.message(b"t", b"\0\0") + pg.message(b"n")}


class Sink:
    """A transport that keeps what is written, unless told to keep nothing."""

    def __init__(self, keep: bool = False):
        self.keep = keep
        self.written: list[bytes] = []

    def write(self, data: bytes) -> None:
        if self.keep:
            self.written.append(bytes(data))

    def take(self) -> bytes:
        data = b"".join(self.written)
        self.written.clear()
        return data

    def resume_reading(self) -> None:
        pass

    pause_reading = close = resume_reading

    def set_protocol(self, protocol: object) -> None:
        pass

    def get_extra_info(self, name: str, default: object = None) -> object:
        return default

    def get_write_buffer_size(self) -> int:
        return 0


def proxy_with_servers(config: str, pool_size: int, clients: int,
                       keep: bool = False) -> tuple[Proxy, list[ClientConnection]]:
    """A proxy whose nodes are all up (replicas caught up: a node of even port in a config of several shards),
    each pool full of idle server connections, and `clients` clients logged in; keep: their sinks keep what is
    written to them (a test's), rather than nothing (a benchmark's)."""
    proxy = Proxy(parse_config(config + f"pool: {{size: {pool_size}}}\n" + COMMON))
    for node in proxy.topology.nodes():
        replica = node.port % 2 == 0 and len(proxy.config.shards) > 1
        probe = Probe(replica, 100, 1, 0.0 if replica else None, 1.0, 1.0, 1.0, receiving=replica or None)
        proxy.topology.report(node.address, probe, rise=1)
        pool = proxy.pools.pool_for(DATABASE, USER, node)
        pool.defaults = {}
        for _ in range(pool_size):
            server = ServerConnection(pool)
            server.transport = Sink(keep)
            server.end_login()
            for name, value in LOGIN_PARAMETERS.items():
                server._record_parameter(f"{name}\0{value}\0".encode())
            pool.servers.add(server)
            pool.idle.append(server)
    first = proxy.topology.nodes(proxy.config.shards[0].name)[0]
    logged_in = []
    for _ in range(clients):
        client = ClientConnection(proxy)
        client.transport = Sink(keep)
        client.user, client.database = USER, DATABASE
        client.pool = proxy.pools.pool_for(DATABASE, USER, first)
        client.params = shared({k: v for k, v in LOGIN_PARAMETERS.items() if k in REPORTED})  # as login sets them
        client.max_message_size = proxy.config.pool.max_message_size  # an authenticated client's limit
        client.end_login()
        logged_in.append(client)
    return proxy, logged_in


_SYNTH = Action.SYNTH  # a module global: read faster than the enum's attribute, in a loop a benchmark times


def answer(server: ServerConnection) -> None:
    """Answer every request pending on the server connection, as a server that runs each without error."""
    server.on_data(b"".join([REPLIES[request[0]] for request in server.pending if request[1] != _SYNTH]))
