"""Microseconds of the proxy's own work per statement, in process: no sockets, no servers, no kernel.

Run: python bench/bench_handover.py

16 client connections and pools of 8 server connections whose transports only collect what is written. Each
client sends a statement; the servers linked to one answer it, which hands them to the clients queued behind.
What is timed is the proxy's code between a read and its writes: framing, pooling and, with several shards,
routing. "unrouted" is one node; "routed" is 4 shards of a primary and a replica each, a point read and an
update by a random user_id. Under load the same code costs 2-3x more (caches are shared with PostgreSQL and
pgbench); compare configurations and commits here, the suite (bench/run.py) for what a user sees.
"""

from __future__ import annotations

import random
import sys
import time
from collections.abc import Callable
from pathlib import Path

import uvloop

# Let the script run from a checkout without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from shardproxy import protocol as pg
from shardproxy._wire import BIND, EXECUTE, PARSE, QUERY, SYNC
from shardproxy.client import ClientConnection
from shardproxy.config import parse_config
from shardproxy.params import REPORTED, shared
from shardproxy.proxy import Proxy
from shardproxy.server import ServerConnection
from shardproxy.topology import Probe

CLIENTS = 16
POOL = 8
ROUNDS = 7
STATEMENTS = 4_000  # per round

UNROUTED = """
shards: [{name: s0, nodes: [{host: 127.0.0.1, port: 50000}]}]
"""
ROUTED = """
sharding: {key: user_id}
routing: {consistency: eventual}
shards:
""" + "".join(f"  - {{name: s{i}, nodes: [{{host: 127.0.0.1, port: {50001 + 2 * i}}}, "
              f"{{host: 127.0.0.1, port: {50002 + 2 * i}}}]}}\n" for i in range(4))
COMMON = f"pool: {{size: {POOL}}}\nusers: [{{name: app, password: secret}}]\nlog: {{level: warning}}\n"

# What PostgreSQL 15 reports at login: a client's and a server's parameters are compared at each hand-out.
LOGIN_PARAMETERS = {
    "application_name": "pgbench", "client_encoding": "UTF8", "DateStyle": "ISO, MDY",
    "default_transaction_read_only": "off", "in_hot_standby": "off", "integer_datetimes": "on",
    "IntervalStyle": "postgres", "is_superuser": "off", "server_encoding": "UTF8", "server_version": "15.18",
    "session_authorization": "app", "standard_conforming_strings": "on", "TimeZone": "Etc/UTC",
}

SELECT = b"SELECT balance FROM accounts WHERE user_id = "
UPDATE = b"UPDATE accounts SET balance = balance + 1 WHERE user_id = "
DONE = pg.message(b"T", b"\0\1balance\0" + b"\0" * 18) + pg.message(b"D", b"\0\1\0\0\0\4" + b"1234") + \
    pg.command_complete("SELECT 1")
# What a server answers to each request the proxy records in a server connection's pending queue.
REPLIES = {PARSE: pg.PARSE_COMPLETE, BIND: b"2\0\0\0\4", EXECUTE: DONE, SYNC: pg.READY[pg.IDLE],
           QUERY: DONE + pg.READY[pg.IDLE]}


class Sink:
    """A transport that keeps nothing: the proxy's writes end here."""

    def write(self, data: bytes) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    pause_reading = close = resume_reading

    def set_protocol(self, protocol: object) -> None:
        pass

    def get_extra_info(self, name: str, default: object = None) -> object:
        return default


def proxy_with_servers(config: str) -> tuple[Proxy, list[ClientConnection]]:
    """A proxy whose nodes are all up (replicas caught up), each pool full of idle server connections."""
    proxy = Proxy(parse_config(config + COMMON))
    for node in proxy.topology.nodes():
        replica = node.port % 2 == 0 and len(proxy.config.shards) > 1
        proxy.topology.report(node.address, Probe(replica, 100, 1, 0.0 if replica else None, 1.0, 1.0, 1.0), rise=1)
        pool = proxy.pool_for("bench", "app", node)
        pool.defaults = {}
        for _ in range(POOL):
            server = ServerConnection(pool)
            server.transport = Sink()
            server.end_login()
            for name, value in LOGIN_PARAMETERS.items():
                server._record_parameter(f"{name}\0{value}\0".encode())
            pool.servers.add(server)
            pool.idle.append(server)
    clients = []
    for _ in range(CLIENTS):
        client = ClientConnection(proxy)
        client.transport = Sink()
        client.user, client.database = "app", "bench"
        client.pool = proxy.pool_for("bench", "app", proxy.login_node())
        client.params = shared({k: v for k, v in LOGIN_PARAMETERS.items() if k in REPORTED})  # as login sets them
        client.end_login()
        clients.append(client)
    return proxy, clients


def simple(text: bytes, key: int) -> bytes:
    return pg.query((text + b"%d" % key).decode())


def extended(text: bytes, key: int) -> bytes:
    """A Bind of the client's named statement for text (prepared first, see prepare) with the key as text."""
    name = b"s1" if text is SELECT else b"s2"
    value = b"%d" % key
    bind = b"\0" + name + b"\0\0\0\0\1" + len(value).to_bytes(4, "big") + value + b"\0\0"
    return pg.message(b"B", bind) + pg.message(b"E", b"\0\0\0\0\0") + pg.SYNC


def prepare(clients: list[ClientConnection]) -> None:
    for client in clients:
        for name, text in ((b"s1", SELECT), (b"s2", UPDATE)):
            client.on_data(pg.message(b"P", name + b"\0" + text + b"$1\0\0\1\0\0\0\x14"))


def run(clients: list[ClientConnection], requests: list[bytes], rounds: int) -> None:
    """Rounds of one statement per client: all send (half of them queue for a server connection), then each
    linked server answers what it was asked (a fake server's work, included in the time), handing its
    connection to the next client queued."""
    for round_ in range(rounds):
        first = round_ * CLIENTS
        for i, client in enumerate(clients):
            client.on_data(requests[(first + i) % len(requests)])
        for client in clients:
            while (server := client.server) is not None:
                server.on_data(b"".join([REPLIES[request[0]] for request in server.pending]))


def measure(config: str, make: Callable[[bytes, int], bytes]) -> float:
    """Best of ROUNDS runs, in µs per statement."""
    async def main() -> float:
        _, clients = proxy_with_servers(config)
        if make is extended:
            prepare(clients)
        rng = random.Random(1)
        keys = [rng.randint(1, 100_000) for _ in range(256)]
        requests = [make(text, key) for key in keys for text in (SELECT, UPDATE)]
        rounds = STATEMENTS // CLIENTS
        run(clients, requests, rounds)  # warm up: statements prepared on servers, caches filled
        best = float("inf")
        for _ in range(ROUNDS):
            start = time.perf_counter()
            run(clients, requests, rounds)
            best = min(best, time.perf_counter() - start)
        return best / (rounds * CLIENTS) * 1e6

    return uvloop.run(main())


def main() -> None:
    for name, config in (("unrouted", UNROUTED), ("routed", ROUTED)):
        for make in (simple, extended):
            print(f"{name:9s} {make.__name__:9s} {measure(config, make):6.2f} µs per statement")


if __name__ == "__main__":
    main()
