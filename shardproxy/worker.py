"""Inside one of several worker processes (`workers: N`, N > 1): the worker's identity.

A Worker tags what must be unique or routable across workers with the worker's id: client ids (KILL <id> goes to
id % N) and cancel keys (the BackendKeyData pid is pid % N == id). A CancelRequest that the kernel hands to another
worker is forwarded to the owner's internal cancel socket, which speaks the startup protocol, so the owner's ordinary
login path cancels it (as PgBouncer's peering does). The supervisor (supervisor.py) starts the workers and answers
the admin socket and /metrics for all of them.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
from collections.abc import Callable
from contextlib import suppress

from shardproxy.tasks import spawn
from shardproxy.wire import protocol as pg

log = logging.getLogger("shardproxy.workers")

MAX_PID = 1 << 31  # BackendKeyData's pid is a positive int32


def admin_path(runtime_dir: str, worker: int) -> str:
    return os.path.join(runtime_dir, f"worker{worker}.admin")


def supervisor_path(runtime_dir: str) -> str:
    """The supervisor's internal admin socket, which the workers' admin databases ask: its errors carry SQLSTATEs."""
    return os.path.join(runtime_dir, "supervisor.admin")


def cancel_path(runtime_dir: str, worker: int) -> str:
    return os.path.join(runtime_dir, f"worker{worker}.cancel")


class Worker:
    def __init__(self, id: int, count: int, runtime_dir: str):
        self.id = id
        self.count = count
        self.runtime_dir = runtime_dir  # the supervisor's private directory of internal sockets
        self._cancels: asyncio.AbstractServer | None = None
        self.orphaned = False  # the supervisor died: nobody else will clean the runtime directory up

    @property
    def admin_socket(self) -> str:
        return admin_path(self.runtime_dir, self.id)

    @property
    def supervisor_socket(self) -> str:
        return supervisor_path(self.runtime_dir)

    def tag(self, number: int) -> int:
        """A number unique across workers, whose owner is number % count."""
        return number * self.count + self.id

    def new_pid(self) -> int:
        return self.tag(secrets.randbelow(MAX_PID // self.count))

    def owns(self, number: int) -> bool:
        return number % self.count == self.id

    async def start(self, connection: Callable[[], asyncio.Protocol], shutdown: Callable[[], None]) -> None:
        """Serve forwarded cancel requests with `connection`, and shut down if the supervisor dies.
        Bound last: the supervisor takes the cancel socket's existence as this worker being ready."""
        loop = asyncio.get_running_loop()
        self._cancels = await loop.create_unix_server(connection, cancel_path(self.runtime_dir, self.id))
        loop.add_reader(0, self._lifeline, shutdown)

    def _lifeline(self, shutdown: Callable[[], None]) -> None:
        """stdin is a pipe whose writing end only the supervisor holds: EOF means it is gone."""
        if not os.read(0, 1):
            asyncio.get_running_loop().remove_reader(0)
            log.error("the supervisor is gone: shutting down")
            self.orphaned = True
            shutdown()

    def close(self) -> None:
        """Stop serving forwarded cancels. Orphaned, remove this worker's sockets (its admin socket went with
        the admin console) and the dead supervisor's, then the directory: the last worker out succeeds."""
        if self._cancels is not None:
            self._cancels.close()
        if self.orphaned:
            for path in (cancel_path(self.runtime_dir, self.id), supervisor_path(self.runtime_dir)):
                with suppress(OSError):
                    os.unlink(path)
            with suppress(OSError):  # not empty while another worker is still shutting down
                os.rmdir(self.runtime_dir)

    def forward_cancel(self, pid: int, secret: int) -> None:
        log.debug("cancel request for pid %d forwarded to worker %d", pid, pid % self.count)
        spawn(self._forward_cancel(pid, secret))

    async def _forward_cancel(self, pid: int, secret: int) -> None:
        with suppress(OSError):  # the owner is gone, and its clients with it
            _, writer = await asyncio.open_unix_connection(cancel_path(self.runtime_dir, pid % self.count))
            writer.write(pg.cancel_request(pid, secret))
            await writer.drain()
            writer.close()
