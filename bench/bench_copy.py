"""COPY rows per second through the proxy into two shards, beside COPY of the same rows straight into one server,
and the proxy's memory (RSS) while it loads them.

Run: python bench/bench_copy.py [--rows 1000000] [--format text|csv|binary] [--rounds 3]

Real servers (a sandbox of three: two shards behind a proxy process, and one server on its own), one psycopg client
sending the rows in 64 KiB pieces, the table without indexes so that what is timed is COPY itself. The proxy's
RSS is sampled every 50 ms during the load: a streamed COPY keeps it flat whatever the number of rows.
"""

from __future__ import annotations

import argparse
import statistics
import struct
import threading
import time

import psycopg

from shardproxy.devtools.sandbox import Sandbox

TABLE = "CREATE TABLE users (user_id bigint NOT NULL, name text, score int)"
PIECE = 64 * 1024


def data(rows: int, fmt: str) -> list[bytes]:
    """The rows in the COPY format, cut in pieces of PIECE bytes (rows span pieces, as clients send them)."""
    if fmt == "binary":
        head = b"PGCOPY\n\xff\r\n\0" + bytes(8)
        body = b"".join(struct.pack("!hiqi", 3, 8, n, 13) + b"user %08d" % n + struct.pack("!ii", 4, n % 100)
                        for n in range(rows))
        whole = head + body + b"\xff\xff"
    else:
        sep = b"," if fmt == "csv" else b"\t"
        whole = b"".join(b"%d%suser %08d%s%d\n" % (n, sep, n, sep, n % 100) for n in range(rows))
    return [whole[i:i + PIECE] for i in range(0, len(whole), PIECE)]


def copy(dsn: str, pieces: list[bytes], fmt: str) -> float:
    """Seconds a COPY of the pieces took, the table emptied first."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("TRUNCATE users")
        started = time.perf_counter()
        with conn.cursor().copy(f"COPY users FROM STDIN (FORMAT {fmt})") as writer:
            for piece in pieces:
                writer.write(piece)
        return time.perf_counter() - started


class RssSampler(threading.Thread):
    """The RSS of a process, in MiB, every 50 ms until stopped."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.samples: list[float] = []
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(0.05):
            with open(f"/proc/{self.pid}/status") as f:
                line = next(line for line in f if line.startswith("VmRSS:"))
            self.samples.append(int(line.split()[1]) / 1024)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--format", choices=["text", "csv", "binary"], default="text")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    pieces = data(args.rows, args.format)
    with Sandbox() as box:
        shards = [box.cluster(f"bench{i}") for i in range(2)]
        single = box.cluster("benchsingle")
        for cluster in [*shards, single]:
            cluster.primary.sql(TABLE + "; GRANT ALL ON users TO app")
        proxy = box.proxy("bench-copy", shards)
        assert proxy.process is not None
        direct_dsn, proxy_dsn = single.primary.dsn("app"), proxy.dsn()
        copy(proxy_dsn, data(1000, args.format), args.format)  # warm: the pools, the catalog
        direct, through = [], []
        sampler = RssSampler(proxy.process.pid)
        sampler.start()
        for _ in range(args.rounds):
            direct.append(copy(direct_dsn, pieces, args.format))
            through.append(copy(proxy_dsn, pieces, args.format))
        sampler.stopped.set()
        sampler.join()
    print(f"{args.rows} rows, {args.format}, best of {args.rounds}:")
    for label, seconds in (("one server directly", direct), ("proxy, two shards", through)):
        rate, median = args.rows / min(seconds), statistics.median(seconds)
        print(f"  {label + ':':22}{rate:>10,.0f} rows/s  (median {median:.2f}s)")
    print(f"  ratio: {min(direct) / min(through):.2f}x of direct")
    rss = sampler.samples
    print(f"  proxy RSS during the loads: first {rss[0]:.1f} MiB, max {max(rss):.1f} MiB, last {rss[-1]:.1f} MiB")


if __name__ == "__main__":
    main()
