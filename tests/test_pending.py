"""The pending-request queue, in process: requests the proxy injects are answered out of the client's sight (HIDE),
requests it answers itself are answered in their place in the stream (SYNTH), and after an error the server skips
to the next Sync and the proxy's books on statements are taken back as if the skipped messages never came.

The server side is played by the test (shardproxy.devtools.harness): no sockets, so every byte each side sees is
checked exactly.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from shardproxy.datapath.client import ClientConnection
from shardproxy.datapath.pending import Action, Kind
from shardproxy.datapath.server import ServerConnection
from shardproxy.devtools.harness import answer, proxy_with_servers
from shardproxy.wire import protocol as pg

ONE_NODE = "shards: [{name: s0, nodes: [{host: 127.0.0.1, port: 50000}]}]\n"
SERVER_ERROR = pg.error("42P01", 'relation "missing" does not exist')


def messages(data: bytes) -> list[bytes]:
    """The type bytes of the messages in data, in order."""
    kinds, pos = [], 0
    while pos < len(data):
        kinds.append(data[pos : pos + 1])
        pos += 1 + pg.INT32.unpack_from(data, pos + 1)[0]
    return kinds


def parse(name: bytes, sql: bytes) -> bytes:
    return pg.message(b"P", name + b"\0" + sql + b"\0\0\0")


def bind(name: bytes) -> bytes:
    return pg.message(b"B", b"\0" + name + b"\0\0\0\0\0\0\0")


EXECUTE = pg.message(b"E", b"\0\0\0\0\0")


@pytest.fixture
def client() -> Iterator[ClientConnection]:
    """A logged-in client of a one-node proxy whose pool has one idle server connection."""
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    _, clients = proxy_with_servers(ONE_NODE, pool_size=1, clients=1, keep=True)
    yield clients[0]
    asyncio.set_event_loop(None)
    loop.close()


def linked(client: ClientConnection) -> ServerConnection:
    assert client.server is not None, "the client holds no server connection"
    return client.server  # type: ignore[return-value]


def test_a_hidden_set_is_answered_out_of_the_clients_sight(client: ClientConnection) -> None:
    client.params = {**client.params, "application_name": "other"}  # differs from the server's session
    client.on_data(pg.query("SELECT 1"))
    server = linked(client)
    assert [(r[0], r[1]) for r in server.pending] == [(Kind.QUERY, Action.HIDE), (Kind.QUERY, Action.FORWARD)]
    assert b"SET application_name TO E'other'" in server.transport.take()
    answer(server)
    assert messages(client.transport.take()) == [b"T", b"D", b"C", b"Z"]  # one query's answer, not two
    assert client.server is None and not server.pending  # given back to the pool


def test_a_close_the_proxy_answers_comes_in_its_place(client: ClientConnection) -> None:
    """Close of a named statement is answered by the proxy (the server keeps the statement for other clients),
    but after the answers to what the client sent before it, and before those to what it sent after."""
    client.on_data(parse(b"s1", b"SELECT 1") + bind(b"s1") + EXECUTE + pg.message(b"C", b"Ss1\0") + pg.SYNC)
    server = linked(client)
    assert [r[1] for r in server.pending].count(Action.SYNTH) == 1
    answer(server)
    assert messages(client.transport.take()) == [b"1", b"2", b"T", b"D", b"C", b"3", b"Z"]
    assert b"s1" not in client.statements


def test_after_an_error_the_skipped_messages_are_taken_back_from_the_books(client: ClientConnection) -> None:
    """A Parse the server refuses: the server skips the Bind and Execute after it, up to the Sync; the client's
    name for the statement and the server's note that it holds it are undone."""
    client.on_data(parse(b"s1", b"SELECT * FROM missing") + bind(b"s1") + EXECUTE + pg.SYNC)
    server = linked(client)
    assert b"s1" in client.statements
    statement = client.statements[b"s1"]
    assert statement.name in server.prepared
    server.on_data(SERVER_ERROR)  # the answer to the Parse; the server skips to the Sync
    assert [r[0] for r in server.pending] == [Kind.SYNC]
    assert b"s1" not in client.statements and statement.name not in server.prepared
    server.on_data(pg.READY[pg.IDLE])
    assert messages(client.transport.take()) == [b"E", b"Z"]
    assert client.server is None


def test_a_statement_used_again_is_prepared_once_per_server_connection(client: ClientConnection) -> None:
    client.on_data(parse(b"s1", b"SELECT 1") + bind(b"s1") + EXECUTE + pg.SYNC)
    server = linked(client)
    answer(server)
    client.transport.take(), server.transport.take()
    client.on_data(parse(b"s2", b"SELECT 1") + bind(b"s2") + EXECUTE + pg.SYNC)  # the same text, another name
    server = linked(client)
    assert Kind.PARSE not in [r[0] for r in server.pending]  # the proxy answered the Parse itself
    assert b"P" not in messages(server.transport.take())  # nothing prepared again
    answer(server)
    assert messages(client.transport.take()) == [b"1", b"2", b"T", b"D", b"C", b"Z"]

