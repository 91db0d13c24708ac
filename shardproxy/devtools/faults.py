"""Faults for tests and benchmarks, on TCP: a relay to put between a proxy and a server, and an impostor that
plays a server's login from a script.

The relay's modes: `pass` (forward), `latency` (forward each chunk after a delay), `stall` (accept, forward
nothing, close nothing) and `reset` (abort every connection, refuse new ones with a reset). The impostor plays what
no real server does (a forged AuthenticationOk, a malformed SCRAM message). Each runs its own event loop in a
daemon thread, so it serves synchronous and asynchronous tests alike.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
from collections.abc import Callable
from contextlib import suppress
from typing import Self

MODES = ("pass", "latency", "stall", "reset")
CHUNK = 64 * 1024


class _Listener:
    """A TCP server on its own event loop, in a daemon thread; subclasses serve each connection (`_serve`)."""

    def __init__(self, host: str, name: str) -> None:
        self.host = host
        self.port = 0
        self.connections = 0  # accepted so far
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.AbstractServer | None = None
        self._transports: set[asyncio.Transport] = set()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True, name=name)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> Self:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._listen(), self._loop).result(5)
        return self

    def close(self) -> None:
        if not self._loop.is_running():
            return

        async def shut() -> None:
            if self._server is not None:
                self._server.close()
            self._abort_all()

        with suppress(Exception):
            asyncio.run_coroutine_threadsafe(shut(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(self._accept, self.host, 0)
        self.port = self._server.sockets[0].getsockname()[1]

    def _abort_all(self) -> None:
        for transport in list(self._transports):
            transport.abort()
        self._transports.clear()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        await self._serve(reader, writer)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError


class Relay(_Listener):
    def __init__(self, target_host: str, target_port: int, host: str = "127.0.0.1") -> None:
        super().__init__(host, "fault-relay")
        self.target = (target_host, target_port)
        self.mode = "pass"
        self.latency = 0.0
        self.openings: list[bytes] = []  # each connection's first bytes from its client (8: a request code)

    def set_mode(self, mode: str, latency: float = 0.0) -> None:
        if mode not in MODES:
            raise ValueError(f"mode {mode!r} is not one of {MODES}")
        self.latency = latency
        self.mode = mode
        if mode == "reset":
            self._loop.call_soon_threadsafe(self._abort_all)

    # -- the loop's side ----------------------------------------------------------------------------------
    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.mode == "reset":
            _reset(writer)
            return
        self._transports.add(writer.transport)  # type: ignore[arg-type]
        if self.mode == "stall":  # never answer: the upstream is not even dialled
            while self.mode == "stall" and not writer.transport.is_closing():
                await asyncio.sleep(0.05)
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            _reset(writer)
            return
        self._transports.add(up_writer.transport)  # type: ignore[arg-type]
        await asyncio.gather(self._pipe(reader, up_writer, self.openings), self._pipe(up_reader, writer),
                             return_exceptions=True)
        for w in (writer, up_writer):
            self._transports.discard(w.transport)  # type: ignore[arg-type]
            w.transport.abort()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    openings: list[bytes] | None = None) -> None:
        while data := await reader.read(CHUNK):
            if openings is not None:  # the first chunk only
                openings.append(data[:8])
                openings = None
            while self.mode == "stall" and not writer.transport.is_closing():
                await asyncio.sleep(0.05)
            if self.mode == "reset":
                return
            if self.mode == "latency" and self.latency:
                await asyncio.sleep(self.latency)
            writer.write(data)
            await writer.drain()
        with suppress(OSError):
            writer.write_eof()


# What the impostor answers the message at `index` of a connection (0: its startup packet) with; None: hang up.
Script = Callable[[int, bytes], bytes | None]


class Impostor(_Listener):
    """Plays a PostgreSQL server's part of a login from a script: each message a connection sends (a startup
    packet first, then typed messages), as framed bytes, is answered with what `script` returns."""

    def __init__(self, script: Script, host: str = "127.0.0.1") -> None:
        super().__init__(host, "impostor")
        self.script = script
        self.open = 0  # connections the peer has not closed yet
        self.received: list[bytes] = []  # every message of every connection

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.open += 1
        self._transports.add(writer.transport)  # type: ignore[arg-type]
        try:
            index = 0
            while True:
                head = await reader.readexactly(4 if index == 0 else 5)
                (length,) = struct.unpack_from("!I", head, len(head) - 4)
                message = head + await reader.readexactly(length - 4)
                self.received.append(message)
                answer = self.script(index, message)
                if answer is None:
                    break
                writer.write(answer)
                index += 1
            writer.close()
            await reader.read()  # and wait for the peer's side to close too
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self.open -= 1
            self._transports.discard(writer.transport)  # type: ignore[arg-type]


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with an RST instead of a FIN."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    writer.transport.abort()
