"""Tasks started and left to run on their own (a client's login, a background open of a connection, ...).

The event loop keeps only weak references to tasks: one that nothing else holds can be collected mid-await (when
the future it waits on is itself reachable only from the task) and silently stop. `spawn` holds each one until it
ends.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

_running: set[asyncio.Task[Any]] = set()


def spawn(coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
    """Run coro as a task of the running loop, held until it ends."""
    task = asyncio.get_running_loop().create_task(coro)
    _running.add(task)
    task.add_done_callback(_running.discard)
    return task
