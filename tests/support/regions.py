"""The roadmap's regions, and traffic that records how each statement fared while nodes fail over."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import psycopg

from shardproxy.devtools.sandbox import ProxyProcess
from tests.support import APP_DB

REGIONS = ("us-east-1", "eu-central-1", "ap-southeast-1")


def regions(interval: str) -> dict[str, dict[str, Any]]:
    """The roadmap's regions, polled every `interval`."""
    return {name: {"primary": rank == 0, "priority": rank + 1, "health_check_interval": interval}
            for rank, name in enumerate(REGIONS)}


class Loop(threading.Thread):
    """Runs `work(conn, i)` again and again on a proxy connection, reconnecting after errors; records every outcome.

    ok: (i, sent, done, row); errors: (i, sent, done, sqlstate, message), with monotonic times.
    """

    def __init__(self, proxy: ProxyProcess, work: Callable[[psycopg.Connection, int], tuple],
                 pause: float = 0.005) -> None:
        super().__init__(daemon=True)
        self.dsn = proxy.dsn(dbname=APP_DB)
        self.work = work
        self.pause = pause
        self.ok: list[tuple[int, float, float, tuple]] = []
        self.errors: list[tuple[int, float, float, str | None, str]] = []
        self.halt = threading.Event()

    def run(self) -> None:
        conn: psycopg.Connection | None = None
        i = 0
        while not self.halt.is_set():
            i += 1
            sent = time.monotonic()
            try:
                if conn is None:
                    conn = psycopg.connect(self.dsn, autocommit=True, connect_timeout=10)
                row = self.work(conn, i)
            except psycopg.Error as exc:
                self.errors.append((i, sent, time.monotonic(), exc.sqlstate, str(exc).strip()))
                if conn is not None:
                    conn.close()
                    conn = None
                time.sleep(0.02)
                continue
            self.ok.append((i, sent, time.monotonic(), row))
            time.sleep(self.pause)
        if conn is not None:
            conn.close()

    def finish(self, timeout: float = 15) -> None:
        self.halt.set()
        self.join(timeout)
        assert not self.is_alive(), "the loop is stuck"

    def successes_after(self, moment: float) -> list[tuple[int, float, float, tuple]]:
        return [entry for entry in self.ok if entry[2] > moment]
