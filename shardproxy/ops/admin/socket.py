"""The admin socket: a unix socket, born 0600, that takes one command per line and answers each with one line of
JSON; and its client side, for `shardproxy admin` and for the supervisor asking its workers.

Its directory is made 0700 when missing, and must be the proxy's user's (or root's) and writable by nobody else
unless sticky (as /tmp): where another user could create or replace entries, the name could be taken first."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import stat
from collections.abc import Awaitable, Callable
from contextlib import suppress
from typing import Any

from shardproxy.ops.admin.replies import NOT_POSSIBLE_NOW, AdminError, Table

log = logging.getLogger("shardproxy.admin")

REPLY_LIMIT = 256 * 1024 * 1024  # one JSON line holds SHOW CLIENTS of every client, or a worker's metrics


class AdminSocket:
    """A unix socket, born 0600, that answers each command line with one line of JSON from `execute`."""

    def __init__(self, path: str, execute: Callable[[str], Awaitable[Table]], internal: bool = False):
        self.path = path
        self.execute = execute
        self.internal = internal  # a worker's, asked by its supervisor: errors carry their SQLSTATE too
        self._server: asyncio.AbstractServer | None = None
        self._inode = 0  # of the socket we bound

    async def start(self) -> None:
        private_directory(os.path.dirname(os.path.abspath(self.path)))
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


# -- the client side -------------------------------------------------------------------------------------
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


def private_directory(path: str) -> None:
    """Make the socket's directory (0700) if missing; raise RuntimeError if another user could take names in it."""
    os.makedirs(path, mode=0o700, exist_ok=True)
    info = os.stat(path)
    if info.st_uid not in (os.geteuid(), 0):
        raise RuntimeError(f"admin socket directory {path} belongs to another user (uid {info.st_uid})")
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not info.st_mode & stat.S_ISVTX:
        raise RuntimeError(f"admin socket directory {path} is writable by other users")


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
