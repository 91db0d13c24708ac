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
import time
from collections.abc import Callable

import uvloop

from shardproxy.datapath.client import ClientConnection
from shardproxy.devtools.harness import answer, proxy_with_servers
from shardproxy.wire import protocol as pg

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

SELECT = b"SELECT balance FROM accounts WHERE user_id = "
UPDATE = b"UPDATE accounts SET balance = balance + 1 WHERE user_id = "


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
                answer(server)


def measure(config: str, make: Callable[[bytes, int], bytes]) -> float:
    """Best of ROUNDS runs, in µs per statement."""
    async def main() -> float:
        _, clients = proxy_with_servers(config, POOL, CLIENTS)
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
