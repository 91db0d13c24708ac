"""`shardproxy demo` as a newcomer runs it: every region's proxy, and both operator interfaces, usable as printed."""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import psycopg
import pytest

from shardproxy.devtools.demo import REGIONS, SAMPLE_USERS

pytestmark = pytest.mark.e2e  # it starts its own servers and proxies

ROOT = Path(__file__).resolve().parents[1]
READY = "Ctrl-C stops everything."


def read_until(process: subprocess.Popen[str], last: str, timeout: float) -> list[str]:
    """The lines the process prints up to and including `last`; fails past the timeout."""
    lines: list[str] = []

    def read() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            lines.append(line.rstrip("\n"))
            if line.strip() == last:
                return

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout)
    assert not reader.is_alive(), "\n".join(["the demo did not get ready", *lines])
    return lines


def test_demo_shows_every_region_and_both_operator_interfaces() -> None:
    demo = subprocess.Popen([sys.executable, "-m", "shardproxy", "demo"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        text = "\n".join(read_until(demo, READY, 180))
        urls = dict(re.findall(r"^  (\S+): DATABASE_URL=(\S+)$", text, re.M))
        assert list(urls) == list(REGIONS), text
        admin_commands = re.findall(r"^    admin database: (psql .*)$", text, re.M)
        metrics = re.findall(r"^    metrics: +(http://\S+)$", text, re.M)
        assert len(admin_commands) == len(metrics) == len(REGIONS), text
        # Each region's reads stay there: the primaries' region reads from them, the others from their replicas.
        served = re.findall(r"^    a read for user_id \d+ is served by \S+ \((\S+)\), a (\S+)$", text, re.M)
        assert served == [(region, "primary" if region == REGIONS[0] else "replica")
                          for region in REGIONS for _ in range(2)], text
        for url in urls.values():
            with psycopg.connect(url, connect_timeout=10) as conn:
                assert conn.execute("SELECT count(*) FROM users").fetchone() == (SAMPLE_USERS,)
        for command in admin_commands:  # as printed, in a shell
            done = subprocess.run(command, shell=True, capture_output=True, text=True, timeout=30, check=False,
                                  env={**os.environ, "PGCONNECT_TIMEOUT": "10"})
            assert done.returncode == 0 and "cl_active" in done.stdout, (command, done.stderr)
            assert shlex.split(command)[-1] == "SHOW POOLS"
        for address in metrics:
            with urllib.request.urlopen(address, timeout=10) as reply:
                assert "shardproxy_node_up" in reply.read().decode()
    finally:
        os.killpg(demo.pid, signal.SIGINT)  # Ctrl-C, to the demo's process group
        code = demo.wait(60)
    assert code == 0
