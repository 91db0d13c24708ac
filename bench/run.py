"""The performance suite: shardproxy against a direct connection, PgBouncer and a bare byte relay.

    python bench/run.py [--quick] [--profile | --workers-only]

Starts its own PostgreSQL servers (sandbox), PgBouncer (Debian's `pgbouncer`, transaction mode, the same pool
size as shardproxy) and bench/byte_relay.py (asyncio + uvloop, one server connection per client, no parsing: the floor).
Every pgbench cell is repeated and the targets are interleaved within each repetition so machine noise hits them
alike; figures are medians. Measured:

1. pgbench -S (simple, extended, prepared) and TPC-B with 16 clients; pgbench -S with 1 client, whose per-transaction
   latencies (pgbench --log) give the latency each target adds to a direct connection (avg, p50, p99). -S prepared
   also runs through shardproxy with one server connection per client, as many as the relay opens: the like-for-like
   comparison with the relay (at the suite's pool size, clients also queue for server connections, which the relay
   never does).
2. CPU per transaction of each proxy process: utime + stime from /proc/PID/stat around each run / transactions;
   and the time the machine's cores stood idle per transaction (/proc/stat), which with PostgreSQL, pgbench and
   the proxy sharing the cores is the part of the throughput that CPU time does not explain.
3. Sharded: a pgbench script of a point read and an update by random user_id, through shardproxy with 4 shards,
   1 shard (one node: the proxy skips routing) and 1 shard with a replica (the proxy routes); routing cost per
   query = (CPU/transaction with 4 shards - with 1 shard) / 2 queries.
4. Ring lookups/s and router key extraction µs/query (bench_ring.py, bench_router.py).
5. Memory per idle client (proxy RSS growth / clients, N clients logged in and idle) and the accept rate of a
   connection storm (logins completed per second).
6. Several cores: pgbench -S simple, 16 clients, through shardproxy with workers: 1 and workers: 2 (the same
   number of server connections in all: pool size / workers each), interleaved: what a second worker gives where
   the proxy is the bottleneck; CPU counts every process of the proxy (supervisor and workers).

The tables are printed and appended to docs/bench-results.md with the date and the machine. pgbench logs in as a
`trust` user so that per-transaction CPU is not skewed by SCRAM hashing at connect time. --profile samples
shardproxy with py-spy under pgbench -S -M extended and prints where its time goes.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import datetime
import glob
import os
import platform
import re
import resource
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

import bench_ring  # beside this script, which Python puts first on the path
import bench_router

from shardproxy.devtools.sandbox import DEFAULT_USERS, Cluster, Sandbox, User

BENCH = os.path.dirname(os.path.abspath(__file__))

RESULTS = os.path.join(os.path.dirname(BENCH), "docs", "bench-results.md")
DATABASE = "bench"
USER = User("bench", "benchpw", "trust")
# The bench user's servers ask it for no password (trust), which server_auth refuses unless told.
SERVER_AUTH = {"methods": ["scram-sha-256", "none"]}
CLK_TCK = os.sysconf("SC_CLK_TCK")
EQUAL = "shardproxy, one server connection per client"  # the relay's count: the like-for-like comparison
WORKLOADS = {
    "-S simple": ["-S", "-M", "simple"],
    "-S extended": ["-S", "-M", "extended"],
    "-S prepared": ["-S", "-M", "prepared"],
    "TPC-B": ["-M", "simple"],
}
SHARDED_SCRIPT = """\\set uid random(1, 100000)
SELECT balance FROM accounts WHERE user_id = :uid;
UPDATE accounts SET balance = balance + 1 WHERE user_id = :uid;
"""
QUERIES_PER_SCRIPT = 2
CLIENTS = 16  # pgbench clients of every cell but the 1-client latency


@dataclass
class Target:
    name: str
    port: int
    pid: int | None = None  # the process whose CPU is counted; None for a direct connection


@dataclass
class Run:
    tps: float = 0.0
    transactions: int = 0
    errors: int = 0
    cpu_us: float | None = None  # proxy CPU per transaction
    sys_share: float | None = None  # of that CPU, the part spent in the kernel
    writes: float | None = None  # proxy write and read syscalls per transaction (/proc/PID/io)
    reads: float | None = None
    idle_us: float | None = None  # CPU time the whole machine spent idle, per transaction (summed over cores)
    latencies: list[float] = field(default_factory=list)  # µs, with --log


# ---------------------------------------------------------------------------------------------------- processes


def _children(pid: int) -> list[int]:
    found = []
    for path in glob.glob(f"/proc/{pid}/task/*/children"):
        try:
            with open(path) as f:
                found += [int(c) for c in f.read().split()]
        except OSError:
            pass
    return found + [grand for child in found for grand in _children(child)]


def cpu_split(pid: int) -> tuple[float, float]:
    """(utime, stime) of pid and its child processes, in seconds."""
    user = system = 0.0
    for proc in [pid, *_children(pid)]:
        try:
            with open(f"/proc/{proc}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        user += int(fields[11]) / CLK_TCK
        system += int(fields[12]) / CLK_TCK
    return user, system


def cpu_seconds(pid: int) -> float:
    """utime + stime of pid and of its child processes, in seconds."""
    return sum(cpu_split(pid))


def syscalls(pid: int) -> tuple[int, int] | None:
    """(write, read) system calls so far of pid and its child processes; None if /proc/PID/io is unreadable
    (a process that changed its user, as PgBouncer does with -u, needs ptrace rights to read it)."""
    writes = reads = 0
    for proc in [pid, *_children(pid)]:
        try:
            with open(f"/proc/{proc}/io") as f:
                counts = dict(line.split(": ") for line in f.read().splitlines())
        except OSError:
            if proc == pid:
                return None
            continue
        writes, reads = writes + int(counts["syscw"]), reads + int(counts["syscr"])
    return writes, reads


def idle_seconds() -> float:
    """Idle and I/O-wait time of all cores so far (/proc/stat)."""
    with open("/proc/stat") as f:
        fields = f.readline().split()
    return (int(fields[4]) + int(fields[5])) / CLK_TCK


def rss_bytes(pid: int) -> int:
    total = 0
    for proc in [pid, *_children(pid)]:
        with open(f"/proc/{proc}/status") as f:
            total += next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))
    return total


def start_pgbouncer(sandbox: Sandbox, cluster: Cluster, pool: int) -> tuple[subprocess.Popen[bytes], int] | None:
    binary = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"
    if not os.path.exists(binary):
        return None
    port = sandbox.free_port()
    folder = os.path.join(sandbox.base_dir, "pgbouncer")
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "userlist.txt"), "w") as f:
        f.write(f'"{USER.name}" "{USER.password}"\n')
    primary = cluster.primary
    with open(os.path.join(folder, "pgbouncer.ini"), "w") as f:
        f.write(f"[databases]\n{DATABASE} = host=127.0.0.1 port={primary.port} dbname={DATABASE}\n"
                f"[pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\n"
                f"auth_type = trust\nauth_file = {folder}/userlist.txt\npool_mode = transaction\n"
                f"default_pool_size = {pool}\nmax_client_conn = 1000\nlogfile = {folder}/pgbouncer.log\n")
    if os.geteuid() == 0:
        shutil.chown(folder, "postgres")
        for name in os.listdir(folder):
            shutil.chown(os.path.join(folder, name), "postgres")
    user = ["-u", "postgres"] if os.geteuid() == 0 else []
    process = subprocess.Popen([binary, *user, os.path.join(folder, "pgbouncer.ini")],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)
    return process, port


def start_relay(sandbox: Sandbox, cluster: Cluster) -> tuple[subprocess.Popen[bytes], int]:
    port = sandbox.free_port()
    process = subprocess.Popen([sys.executable, os.path.join(BENCH, "byte_relay.py"), "--port", str(port),
                                "--target", f"{cluster.primary.host}:{cluster.primary.port}"])
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        probe = subprocess.run(["pg_isready", "-q", "-h", "127.0.0.1", "-p", str(port)], check=False)
        if probe.returncode == 0:
            break
        time.sleep(0.1)
    return process, port


# ---------------------------------------------------------------------------------------------------- pgbench


def pgbench(target: Target, args: list[str], clients: int, seconds: float, log_dir: str | None = None) -> Run:
    cmd = ["pgbench", "-h", "127.0.0.1", "-p", str(target.port), "-U", USER.name, "-c", str(clients),
           "-j", str(min(clients, 2)), "-T", str(int(seconds)), "-n", *args]
    if log_dir is not None:
        cmd += ["--log", f"--log-prefix={log_dir}/lat"]
    pid = target.pid
    before, split0, io0 = (cpu_seconds(pid), cpu_split(pid), syscalls(pid)) if pid else (0.0, (0, 0), (0, 0))
    idle0 = idle_seconds()
    done = subprocess.run([*cmd, DATABASE], capture_output=True, text=True, cwd=log_dir, check=False)
    idle1 = idle_seconds()
    after, split1, io1 = (cpu_seconds(pid), cpu_split(pid), syscalls(pid)) if pid else (0.0, (0, 0), (0, 0))
    run = Run()
    tps = re.search(r"tps = ([\d.]+)", done.stdout)
    processed = re.search(r"number of transactions actually processed: (\d+)", done.stdout)
    failed = re.search(r"number of failed transactions: (\d+)", done.stdout)
    run.tps = float(tps.group(1)) if tps else 0.0
    run.transactions = int(processed.group(1)) if processed else 0
    run.errors = (int(failed.group(1)) if failed else 0) + (done.returncode != 0) + len(
        re.findall(r"error|aborted", done.stderr, re.IGNORECASE))
    if run.transactions:
        run.idle_us = (idle1 - idle0) / run.transactions * 1e6
    if target.pid and run.transactions:
        run.cpu_us = (after - before) / run.transactions * 1e6
        user, system = split1[0] - split0[0], split1[1] - split0[1]
        run.sys_share = system / (user + system) if user + system else None
        # Zero counts over a run with transactions mean the kernel hid them (also a permission matter).
        if io0 is not None and io1 is not None and io1 != io0:
            run.writes = (io1[0] - io0[0]) / run.transactions
            run.reads = (io1[1] - io0[1]) / run.transactions
    if log_dir is not None:
        for path in glob.glob(os.path.join(log_dir, "lat.*")):
            with open(path) as f:
                run.latencies += [float(line.split()[2]) for line in f if line.strip()]
            os.unlink(path)
    return run


def median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


# ---------------------------------------------------------------------------------------------------- idle clients


def startup_packet(user: str, database: str) -> bytes:
    body = struct.pack("!I", 196608) + b"".join(
        k.encode() + b"\0" + v.encode() + b"\0" for k, v in (("user", user), ("database", database))) + b"\0"
    return struct.pack("!I", len(body) + 4) + body


async def login(port: int, packet: bytes) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Connect and log in (trust); return once the server sent ReadyForQuery."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(packet)
    while True:
        kind, length = struct.unpack("!cI", await reader.readexactly(5))
        body = await reader.readexactly(length - 4)
        if kind == b"E" or (kind == b"R" and body[:4] != b"\0\0\0\0"):
            raise RuntimeError(f"login refused: {body!r}")
        if kind == b"Z":
            return reader, writer


async def idle_clients(port: int, pid: int, clients: int, in_flight: int = 500) -> dict[str, float]:
    """RSS growth per idle logged-in client, and logins/s of a storm of `clients` (`in_flight` at a time)."""
    packet = startup_packet(USER.name, DATABASE)
    warm = [await login(port, packet) for _ in range(50)]  # first-use allocations are not per-client memory
    await asyncio.sleep(0.5)
    rss_before = rss_bytes(pid)
    gate = asyncio.Semaphore(in_flight)

    async def one() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        async with gate:
            return await login(port, packet)

    start = time.perf_counter()
    conns = await asyncio.gather(*(one() for _ in range(clients)))
    elapsed = time.perf_counter() - start
    await asyncio.sleep(1.0)
    rss_after = rss_bytes(pid)
    for _, writer in [*warm, *conns]:
        writer.write(b"X\0\0\0\4")
        writer.close()
    return {"clients": clients, "kib_per_client": (rss_after - rss_before) / clients / 1024,
            "rss_mib": rss_after / 2**20, "logins_per_s": clients / elapsed, "in_flight": in_flight}


# ---------------------------------------------------------------------------------------------------- the suite


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="short runs (a few minutes in all)")
    parser.add_argument("--seconds", type=int, help="per pgbench run (default 2 quick, 10 full)")
    parser.add_argument("--repeat", type=int, help="runs per cell (default 3 quick, 5 full)")
    parser.add_argument("--pool", type=int, default=8, help="server pool size of shardproxy and PgBouncer")
    parser.add_argument("--idle-clients", type=int, default=10_000)
    parser.add_argument("--profile", action="store_true", help="also sample shardproxy with py-spy")
    parser.add_argument("--workers-only", action="store_true", help="run only section 6 (workers 1 vs 2)")
    parser.add_argument("--no-append", action="store_true", help="print only; leave docs/bench-results.md alone")
    args = parser.parse_args()
    args.seconds = args.seconds or (2 if args.quick else 10)
    args.repeat = args.repeat or (3 if args.quick else 5)
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # inherited by the proxies started below
    args.idle_clients = min(args.idle_clients, hard - 500)  # each of client and proxy holds one fd per client
    started = time.monotonic()
    sections: list[str] = []
    with Sandbox(users=[*DEFAULT_USERS, USER]) as sandbox:
        print("starting servers ...", flush=True)
        settings = {"max_connections": "300", "shared_buffers": "128MB"}
        main_cluster = sandbox.cluster("bench", settings=settings)
        if args.workers_only:
            prepare_databases(main_cluster, [])
            sections.append(several_workers(sandbox, main_cluster, args))
        else:
            sections += full_suite(sandbox, main_cluster, settings, args)
    options = "".join(f" --{name.replace('_', '-')}" for name in ("quick", "profile", "workers_only")
                      if getattr(args, name))
    header = (f"## {datetime.datetime.now():%Y-%m-%d %H:%M} bench/run.py{options}: {machine()}; "
              f"{args.seconds:g}s x {args.repeat} per cell, pool {args.pool}, "
              f"{time.monotonic() - started:.0f}s in all\n")
    text = header + "\n" + "\n\n".join(sections) + "\n"
    print("\n" + text)
    if not args.no_append:
        with open(RESULTS, "a") as f:
            f.write("\n" + text)
    return 0


def full_suite(sandbox: Sandbox, main_cluster: Cluster, settings: dict[str, str],
               args: argparse.Namespace) -> list[str]:
    """Sections 1-6, or with --profile the profile alone."""
    shards = [sandbox.cluster("s0", replicas=1, settings=settings)]
    shards += [sandbox.cluster(f"s{i}", settings=settings) for i in range(1, 4)]
    prepare_databases(main_cluster, shards)
    proxy = sandbox.proxy("bench", [main_cluster], pool={"size": args.pool}, log={"level": "warning"},
                          server_auth=SERVER_AUTH)
    assert proxy.process is not None
    targets = [Target("direct", main_cluster.primary.port)]
    relay, relay_port = start_relay(sandbox, main_cluster)
    targets.append(Target("relay", relay_port, relay.pid))
    bouncer = start_pgbouncer(sandbox, main_cluster, args.pool)
    if bouncer is not None:
        targets.append(Target("pgbouncer", bouncer[1], bouncer[0].pid))
    targets.append(Target("shardproxy", proxy.port, proxy.process.pid))
    equal = sandbox.proxy("equal", [main_cluster], pool={"size": CLIENTS}, log={"level": "warning"},
                          server_auth=SERVER_AUTH)
    assert equal.process is not None
    targets.append(Target(EQUAL, equal.port, equal.process.pid))
    try:
        if args.profile:
            return [profile(sandbox, proxy.process.pid, proxy.port, args)]
        return [*run_suite(sandbox, main_cluster, shards, targets, args), several_workers(sandbox, main_cluster, args)]
    finally:
        relay.terminate()
        if bouncer is not None:
            bouncer[0].terminate()


def several_workers(sandbox: Sandbox, cluster: Cluster, args: argparse.Namespace) -> str:
    """6: pgbench -S simple, 16 clients, through one and through two workers, interleaved."""
    print("workers 1 vs 2 ...", flush=True)
    counts = (1, 2)
    proxies = [sandbox.proxy(f"workers{n}", [cluster], workers=n, pool={"size": max(1, args.pool // n)},
                             log={"level": "warning"}, server_auth=SERVER_AUTH) for n in counts]
    targets = [Target(f"workers: {n}", p.port, p.process.pid) for n, p in zip(counts, proxies) if p.process]
    runs: dict[str, list[Run]] = collections.defaultdict(list)
    for _ in range(args.repeat):
        for target in targets:
            runs[target.name].append(pgbench(target, WORKLOADS["-S simple"], CLIENTS, args.seconds))
    for proxy in proxies:
        proxy.stop()
    lines = [f"### Several cores: pgbench -S simple, 16 clients, {args.pool} server connections in all", "",
             "| shardproxy | tps (min–max) | CPU µs/tx, all processes | tps vs workers: 1 |", "|---" * 4 + "|"]
    one = median([r.tps for r in runs[targets[0].name]])
    for target in targets:
        tps = median([r.tps for r in runs[target.name]])
        errors = sum(r.errors for r in runs[target.name])
        lines.append(f"| {target.name} | {fmt(tps)}{f' ({errors} errors)' if errors else ''} "
                     f"({min(r.tps for r in runs[target.name]):.0f}–{max(r.tps for r in runs[target.name]):.0f}) | "
                     f"{fmt(median([r.cpu_us for r in runs[target.name]]), '.1f')} | "
                     f"{fmt(tps / one if tps and one else None, '.2f')} |")
    return "\n".join(lines)


def machine() -> str:
    model = ""
    with open("/proc/cpuinfo") as f:
        model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    pg = subprocess.run(["pgbench", "--version"], capture_output=True, text=True, check=False).stdout.split()[-3:-2]
    bouncer = subprocess.run(["pgbouncer", "--version"], capture_output=True, text=True,
                             check=False).stdout.split("\n")[0]
    return (f"{platform.machine()} {model}, {os.cpu_count()} cores, Linux {platform.release()}, "
            f"Python {platform.python_version()}, PostgreSQL {''.join(pg)}, {bouncer}")


def prepare_databases(main_cluster: Cluster, shards: list[Cluster]) -> None:
    env = {**os.environ, "PGPASSWORD": USER.password}
    for cluster in [main_cluster, *shards]:
        cluster.primary.sql(f"CREATE DATABASE {DATABASE} OWNER {USER.name}")
    subprocess.run(["pgbench", "-i", "-q", "-s", "10", "-h", "127.0.0.1", "-p", str(main_cluster.primary.port),
                    "-U", USER.name, DATABASE], check=True, capture_output=True, env=env)
    for cluster in shards:  # every shard holds every user_id: each read and update finds its row
        cluster.primary.sql("CREATE TABLE accounts (user_id int PRIMARY KEY, balance int NOT NULL DEFAULT 0, "
                            "note text)", dbname=DATABASE)
        cluster.primary.sql("INSERT INTO accounts (user_id, note) SELECT g, md5(g::text) "
                            "FROM generate_series(1, 100000) g", dbname=DATABASE)
        cluster.primary.sql(f"GRANT ALL ON accounts TO {USER.name}", dbname=DATABASE)
        cluster.primary.sql("VACUUM ANALYZE accounts", dbname=DATABASE)
        if cluster.replicas:
            cluster.wait_replicas_caught_up(30)


def run_suite(sandbox: Sandbox, main_cluster: Cluster, shards: list[Cluster], targets: list[Target],
              args: argparse.Namespace) -> list[str]:
    log_dir = tempfile.mkdtemp(dir=sandbox.base_dir)
    # 1 + 2: pgbench through every target, interleaved.
    cells: dict[tuple[str, str], list[Run]] = collections.defaultdict(list)
    for rep in range(args.repeat):
        print(f"pgbench, repetition {rep + 1}/{args.repeat} ...", flush=True)
        for workload, flags in WORKLOADS.items():
            for target in targets:
                if target.name == "pgbouncer" and workload == "-S prepared":
                    continue  # PgBouncer < 1.21 cannot keep protocol-level prepared statements in transaction mode
                if target.name == EQUAL and workload != "-S prepared":
                    continue
                cells[(workload, target.name)].append(pgbench(target, flags, CLIENTS, args.seconds))
        for target in targets:
            if target.name == EQUAL:
                continue
            cells[("1 client", target.name)].append(
                pgbench(target, ["-S", "-M", "simple"], 1, args.seconds, log_dir=log_dir))
    # 3: sharded.
    print("sharded ...", flush=True)
    script = os.path.join(log_dir, "point.sql")
    with open(script, "w") as f:
        f.write(SHARDED_SCRIPT)
    only_primary = [Cluster(c.name, c.primary) for c in shards]
    eventual = {"consistency": "eventual"}  # no LSN query after each write: routing is what is measured
    configs = {
        "1 shard, 1 node (no routing)": [only_primary[0]],
        "1 shard + replica (routed)": [shards[0]],
        "4 shards": only_primary,
    }
    sharded_targets = []
    for i, (label, clusters) in enumerate(configs.items()):
        p = sandbox.proxy(f"sharded{i}", clusters, pool={"size": args.pool}, routing=eventual,
                          log={"level": "warning"}, server_auth=SERVER_AUTH)
        assert p.process is not None
        sharded_targets.append((label, Target(label, p.port, p.process.pid)))
    sharded: dict[tuple[str, str], list[Run]] = collections.defaultdict(list)
    for _ in range(args.repeat):
        for mode in ("simple", "prepared"):
            for label, target in sharded_targets:
                sharded[(mode, label)].append(pgbench(target, ["-f", script, "-M", mode], CLIENTS, args.seconds))
    # 4: ring and router.
    print("ring and router ...", flush=True)
    if args.quick:
        bench_ring.ROUNDS, bench_router.ROUNDS, bench_router.N = 3, 3, 1000
    ring = bench_ring.measure(50_000 if args.quick else bench_ring.N_KEYS)
    router = bench_router.make_router()
    routes = {name: bench_router.measure(router, query) for name, query in bench_router.QUERIES.items()}
    # 5: idle clients and a connection storm, on a proxy of their own.
    print(f"{args.idle_clients} idle clients ...", flush=True)
    idle_proxy = sandbox.proxy("idle", [main_cluster], pool={"size": 2, "max_client_conn": args.idle_clients + 1000},
                               log={"level": "warning"}, server_auth=SERVER_AUTH)
    assert idle_proxy.process is not None
    idle = asyncio.run(idle_clients(idle_proxy.port, idle_proxy.process.pid, args.idle_clients))
    idle_proxy.stop()
    return report(cells, sharded, list(configs), ring, routes, idle, [t.name for t in targets if t.name != EQUAL])


# ---------------------------------------------------------------------------------------------------- report


def fmt(value: float | None, spec: str = ".0f") -> str:
    return "n/a" if value is None else format(value, spec)


def report(cells: dict[tuple[str, str], list[Run]], sharded: dict[tuple[str, str], list[Run]], configs: list[str],
           ring: dict[str, tuple[float, float]], routes: dict[str, dict[str, float]], idle: dict[str, float],
           names: list[str]) -> list[str]:
    def tps(workload: str, name: str) -> float | None:
        runs = cells.get((workload, name))
        return median([r.tps for r in runs]) if runs else None

    def errors(workload: str, name: str) -> int:
        return sum(r.errors for r in cells.get((workload, name), []))

    def cpu(store: dict[tuple[str, str], list[Run]], key: tuple[str, str]) -> float | None:
        runs = store.get(key)
        return median([r.cpu_us for r in runs]) if runs else None

    def spread(runs: list[Run]) -> str:
        values = [r.cpu_us for r in runs if r.cpu_us is not None]
        return f"{min(values):.0f}–{max(values):.0f}" if values else "n/a"

    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a and b else None

    def paired(workload: str, name: str, other: str) -> str:
        """The tps ratio within each repetition, where the two ran a minute apart at most: its spread shows how
        far a ratio of medians can move between runs on a shared machine."""
        pairs = [a.tps / b.tps for a, b in zip(cells.get((workload, name), []), cells.get((workload, other), []))
                 if a.tps and b.tps]
        return f" (per repetition {min(pairs):.2f}–{max(pairs):.2f})" if pairs else ""

    out = []
    lines = ["### pgbench, 16 clients: median tps (errors), proxy CPU µs per transaction", "",
             "| workload | " + " | ".join(f"{n} tps" for n in names) + " | "
             + " | ".join(f"{n} CPU µs/tx" for n in names if n != "direct")
             + " | shardproxy/pgbouncer tps | shardproxy/relay tps | shardproxy/pgbouncer CPU |",
             "|---" * (1 + 2 * len(names) - 1 + 3) + "|"]
    for workload in WORKLOADS:
        shown = []
        for n in names:
            value, err = tps(workload, n), errors(workload, n)
            shown.append(("skipped" if value is None else f"{value:.0f}") + (f" ({err} errors)" if err else ""))
        shown += [fmt(cpu(cells, (workload, n)), ".1f") for n in names if n != "direct"]
        shown += [fmt(ratio(tps(workload, "shardproxy"), tps(workload, "pgbouncer")), ".2f"),
                  fmt(ratio(tps(workload, "shardproxy"), tps(workload, "relay")), ".2f"),
                  fmt(ratio(cpu(cells, (workload, "shardproxy")), cpu(cells, (workload, "pgbouncer"))), ".2f")]
        lines.append(f"| {workload} | " + " | ".join(shown) + " |")
    lines.append("")
    lines.append("PgBouncer's -S prepared is skipped: before 1.21 it cannot keep protocol-level prepared "
                  "statements in transaction mode.")
    equal = tps("-S prepared", EQUAL)
    if equal is not None:
        failed = errors("-S prepared", EQUAL)
        lines += ["", (f"-S prepared through shardproxy with {CLIENTS} server connections (one per client, "
                       f"as the relay opens): {equal:.0f} tps{f' ({failed} errors)' if failed else ''}, "
                       f"CPU {fmt(cpu(cells, ('-S prepared', EQUAL)), '.1f')} µs/tx, "
                       f"{fmt(ratio(equal, tps('-S prepared', 'relay')), '.2f')}x the relay.")]
    out.append("\n".join(lines))

    lines = [("### Per transaction: proxy system calls (write / read, /proc/PID/io), proxy CPU µs split into user + "
              "kernel (/proc/PID/stat), and the µs the machine's cores stood idle (/proc/stat: the throughput "
              "that CPU time does not explain)"), "",
             "| workload | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for workload in WORKLOADS:
        shown = []
        for n in names:
            runs = cells.get((workload, n))
            if not runs:
                shown.append("skipped")
                continue
            w, r, k, c, idle_us = (median([getattr(run, a) for run in runs])
                                   for a in ("writes", "reads", "sys_share", "cpu_us", "idle_us"))
            split = f"{c * (1 - k):.1f} + {c * k:.1f}" if c is not None and k is not None else "n/a"
            proxy = "" if n == "direct" else f"{fmt(w, '.2f')} / {fmt(r, '.2f')}; {split} µs; "
            shown.append(f"{proxy}idle {fmt(idle_us, '.1f')} µs")
        lines.append(f"| {workload} | " + " | ".join(shown) + " |")
    out.append("\n".join(lines))

    latency: dict[str, dict[str, float]] = {}
    for n in names:
        runs = [r for r in cells[("1 client", n)] if r.latencies]
        latency[n] = {
            "tps": statistics.median(r.tps for r in runs) if runs else 0.0,
            "avg": statistics.median(statistics.fmean(r.latencies) for r in runs) if runs else 0.0,
            "p50": statistics.median(percentile(r.latencies, 50) for r in runs) if runs else 0.0,
            "p99": statistics.median(percentile(r.latencies, 99) for r in runs) if runs else 0.0,
        }
    lines = ["### pgbench -S, 1 client: latency per transaction (pgbench --log), µs", "",
             "| target | tps | avg | p50 | p99 | added avg | added p50 | added p99 |", "|---" * 8 + "|"]
    base = latency["direct"]
    for n in names:
        row = latency[n]
        lines.append(f"| {n} | {row['tps']:.0f} | {row['avg']:.1f} | {row['p50']:.1f} | {row['p99']:.1f} | "
                     + " | ".join(f"{row[k] - base[k]:+.1f}" for k in ("avg", "p50", "p99")) + " |")
    out.append("\n".join(lines))

    lines = ["### Sharded: point read + update by random user_id (2 queries per transaction), 16 clients", "",
             "| shardproxy config | simple tps | simple CPU µs/tx (min–max) | prepared tps "
             "| prepared CPU µs/tx (min–max) |",
             "|---" * 5 + "|"]
    for label in configs:
        lines.append(f"| {label} | " + " | ".join(
            f"{fmt(median([r.tps for r in sharded[(m, label)]]))}"
            + (f" ({e} errors)" if (e := sum(r.errors for r in sharded[(m, label)])) else "")
            + f" | {fmt(cpu(sharded, (m, label)), '.1f')} ({spread(sharded[(m, label)])})"
            for m in ("simple", "prepared")) + " |")
    routing: dict[str, dict[str, float | None]] = {}
    for m in ("simple", "prepared"):
        four = cpu(sharded, (m, configs[2]))
        routing[m] = {}
        for label in configs[:2]:
            one = cpu(sharded, (m, label))
            routing[m][label] = None if four is None or one is None else (four - one) / QUERIES_PER_SCRIPT
    lines += ["", ("Routing cost per query, µs of proxy CPU ((4 shards - 1 shard) / 2 queries). The 1-shard, 1-node "
              "config skips routing, and its one pool serves both statements; with a replica, reads and writes "
              "use two pools as with 4 shards, so that is the like-for-like baseline. A difference below the "
              "run-to-run spread (compare the repetitions) is noise, not a cost."), "",
              "| protocol | vs 1 shard, 1 node (no routing) | vs 1 shard + replica (routed) |", "|---|---|---|"]
    for m in ("simple", "prepared"):
        lines.append(f"| {m} | " + " | ".join(fmt(routing[m][label], "+.1f") for label in configs[:2]) + " |")
    out.append("\n".join(lines))

    lines = ["### Ring lookups/s (8 shards x 256 virtual nodes) and router µs per query", "",
             "| keys | compiled/s | python/s | speedup |", "|---|---|---|---|"]
    for name, (fast, slow) in ring.items():
        lines.append(f"| {name} | {fast:,.0f} | {slow:,.0f} | {fast / slow:.1f}x |")
    kinds = list(next(iter(routes.values())))
    lines += ["", "| query | " + " | ".join(kinds) + " |", "|---" * (len(kinds) + 1) + "|"]
    for name, values in routes.items():
        lines.append(f"| {name} | " + " | ".join(f"{values[k]:.1f}" for k in kinds) + " |")
    out.append("\n".join(lines))

    out.append(f"### Idle clients and connection storm (shardproxy)\n\n"
               f"{idle['clients']:.0f} clients logged in and idle: RSS {idle['rss_mib']:.0f} MiB, "
               f"**{idle['kib_per_client']:.1f} KiB per client**; storm: {idle['logins_per_s']:.0f} logins/s "
               f"completed ({idle['in_flight']:.0f} in flight, trust auth, raw sockets).")

    def check(ok: bool | None) -> str:
        return "n/a" if ok is None else ("met" if ok else "**missed**")

    def at_least(value: float | None, goal: float) -> bool | None:
        return None if value is None else value >= goal

    def at_most(value: float | None, goal: float) -> bool | None:
        return None if value is None else value <= goal

    rows = []
    for workload in ("-S simple", "-S extended", "TPC-B"):
        value = ratio(tps(workload, "shardproxy"), tps(workload, "pgbouncer"))
        rows.append((f"{workload} 16 clients, shardproxy/PgBouncer tps", "≥ 1.0",
                     fmt(value, ".2f") + paired(workload, "shardproxy", "pgbouncer"), check(at_least(value, 1.0))))
    # Judged like for like: as many server connections as the relay; the suite's pool size is shown beside it.
    prep = ratio(tps("-S prepared", EQUAL), tps("-S prepared", "relay"))
    pooled = ratio(tps("-S prepared", "shardproxy"), tps("-S prepared", "relay"))
    prep_errors = errors("-S prepared", "shardproxy") + errors("-S prepared", EQUAL)
    rows.append(("-S prepared 16 clients: errors; shardproxy/relay tps, one server connection per client as the "
                 "relay; with the suite's pool", "0, ≥ 0.95",
                 f"{prep_errors}; {fmt(prep, '.2f')}{paired('-S prepared', EQUAL, 'relay')}; "
                 f"{fmt(pooled, '.2f')}{paired('-S prepared', 'shardproxy', 'relay')}",
                 check(None if prep is None else prep_errors == 0 and prep >= 0.95)))
    for workload in ("-S simple", "-S extended", "TPC-B"):
        value = ratio(cpu(cells, (workload, "shardproxy")), cpu(cells, (workload, "pgbouncer")))
        rows.append((f"CPU per transaction shardproxy/PgBouncer, {workload}", "≤ 1.2", fmt(value, ".2f"),
                     check(at_most(value, 1.2))))
    added = latency["shardproxy"]["avg"] - base["avg"]
    rows.append(("added latency, -S 1 client (avg; p50 / p99)", "≤ 25 µs",
                 (f"{added:+.1f} µs; {latency['shardproxy']['p50'] - base['p50']:+.1f} / "
                 f"{latency['shardproxy']['p99'] - base['p99']:+.1f} µs"), check(added <= 25)))
    # The router's own work per query, measured directly: a cached plan plus the ring lookup.
    direct_cost = {"prepared": max(v["extended cached plan"] + v["extended route"] for v in routes.values()),
                   "simple": max(v["simple plan + route"] for v in routes.values())}
    for m, goal in (("prepared", 3.0), ("simple", 10.0)):
        vs_routed, vs_plain = routing[m][configs[1]], routing[m][configs[0]]
        rows.append(((f"routing cost per query, {m}: CPU/tx 4 shards minus 1 shard routed; minus 1 shard unrouted; "
                     "router microbenchmark (worst query)"), f"≤ {goal:g} µs",
                     f"{fmt(vs_routed, '+.1f')}; {fmt(vs_plain, '+.1f')}; {direct_cost[m]:.1f} µs",
                     check(at_most(vs_routed, goal))))
    slowest = min(fast for fast, _ in ring.values())
    rows.append(("ring lookups/s, compiled (slowest key type)", "≥ 3M/s", f"{slowest / 1e6:.1f}M/s",
                 check(slowest >= 3e6)))
    rows.append((f"memory per idle client ({idle['clients']:.0f} clients)", "≤ 10 KiB",
                 f"{idle['kib_per_client']:.1f} KiB", check(idle["kib_per_client"] <= 10)))
    lines = ["### Targets", "", "| target | goal | measured | |", "|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    out.insert(0, "\n".join(lines))
    return out


# ---------------------------------------------------------------------------------------------------- profile


def profile(sandbox: Sandbox, pid: int, port: int, args: argparse.Namespace) -> str:
    """py-spy samples of shardproxy under pgbench -S -M extended -c 16: where its time goes.

    Two passes: --native (system calls and C frames visible; py-spy pauses the process for each sample) and
    Python-only --nonblocking (no pauses), whose hottest lines are shown with their source text.
    """
    seconds = max(5, int(args.seconds))
    parts = []
    for native in (True, False):
        raw = os.path.join(sandbox.base_dir, f"profile-{native}.txt")
        mode = ["--native"] if native else ["--nonblocking"]
        spy = subprocess.Popen(["py-spy", "record", "-p", str(pid), "-f", "raw", "-o", raw, "-d", str(seconds + 1),
                                "-r", "250", *mode], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(1)
        run = pgbench(Target("shardproxy", port, pid), WORKLOADS["-S extended"], CLIENTS, seconds)
        _, err = spy.communicate()
        if not os.path.exists(raw):
            return f"py-spy failed: {err.decode(errors='replace')[-500:]}"
        stacks: collections.Counter[tuple[str, ...]] = collections.Counter()
        with open(raw) as f:
            for line in f:
                stack, _, count = line.rstrip().rpartition(" ")
                if stack:
                    stacks[tuple(stack.split(";"))] += int(count)
        parts.append(_native_report(stacks, run, seconds) if native else _python_report(stacks, run))
    return "\n\n".join(parts)


def _native_report(stacks: collections.Counter[tuple[str, ...]], run: Run, seconds: int) -> str:
    total = sum(stacks.values()) or 1
    leaf: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    in_python: collections.Counter[str] = collections.Counter()  # samples outside system calls
    writes = reads = 0
    for frames, n in stacks.items():
        leaf[re.sub(r":\d+\)$", ")", _short(frames[-1]))] += n
        names = {re.sub(r" \(.*", "", frame) for frame in frames}
        for name in names:
            inclusive[name] += n
        writes += n if "UVStream_write" in names or "uv__write" in names else 0
        reads += n if "uv__read" in names else 0
        if "libc.so" not in frames[-1]:
            python = [f for f in frames if re.search(r"\.py:\d+\)$", f)]
            in_python[re.sub(r":\d+\)$", ")", _short(python[-1])) if python else "(no Python frame)"] += n
    busy = sum(in_python.values()) or 1
    lines = [(f"### Profile: py-spy --native ({seconds}s, 250 Hz) of shardproxy under pgbench -S -M extended -c 16 "
             f"({run.tps:.0f} tps while sampled)"), "",
             (f"{total} samples; stacks inside a transport write: {100 * writes / total:.0f}%, inside a socket "
             f"read callback: {100 * reads / total:.0f}%. Proxy CPU {fmt(run.cpu_us, '.1f')} µs per transaction, "
             f"{fmt(run.sys_share and 100 * run.sys_share)}% of it in the kernel (/proc/PID/stat); "
             f"{fmt(run.writes, '.2f')} write and {fmt(run.reads, '.2f')} read system calls per transaction."), "",
             ("py-spy counts the wall-clock time of a thread it sees as active: on a machine with few cores that "
             "includes time the proxy waits, runnable, for a CPU, typically right after a write() woke a peer; "
             "the kernel share above is the on-CPU split."), "",
             "| self % | leaf frame |", "|---|---|"]
    lines += [f"| {100 * n / total:.1f} | `{name}` |" for name, n in leaf.most_common(12)]
    lines += ["", f"Samples outside system calls ({100 * busy / total:.0f}%), by innermost Python function:", "",
              "| % of those | function |", "|---|---|"]
    lines += [f"| {100 * n / busy:.1f} | `{name}` |" for name, n in in_python.most_common(12)]
    lines += ["", "| inclusive % | function |", "|---|---|"]
    lines += [f"| {100 * n / total:.1f} | `{name}` |" for name, n in inclusive.most_common(40)
              if not re.match(r"(Py_X?DECREF|0x|_run|<module>|main|run|Runner|uv_run|Loop__)", name)][:15]
    return "\n".join(lines)


def _python_report(stacks: collections.Counter[tuple[str, ...]], run: Run) -> str:
    total = sum(stacks.values()) or 1
    leaf: collections.Counter[str] = collections.Counter()
    for frames, n in stacks.items():
        leaf[frames[-1]] += n
    lines = [f"### Profile: py-spy --nonblocking, Python frames only ({run.tps:.0f} tps while sampled)", "",
             "Hottest lines (self time; a C call such as transport.write counts on the line that makes it):", "",
             "| self % | line | source |", "|---|---|---|"]
    for frame, n in leaf.most_common(20):
        lines.append(f"| {100 * n / total:.1f} | `{_short(frame)}` | `{_source(frame)}` |")
    return "\n".join(lines)


def _source(frame: str) -> str:
    match = re.search(r"\((.*\.py):(\d+)\)$", frame)
    if not match:
        return ""
    try:
        with open(match.group(1)) as f:
            text = f.read().splitlines()[int(match.group(2)) - 1].strip()
    except (OSError, IndexError):
        return ""
    return text.replace("|", "\\|").replace("`", "'")[:90]


def _short(frame: str) -> str:
    """'func (/long/path/shardproxy/x.py:12)' -> 'func (shardproxy/x.py:12)'; no machine paths in reports."""
    return re.sub(r"\((?:[^()]*/)?((?:shardproxy|asyncio|uvloop|bench)/[^()/]*|[^()/]*)\)", r"(\1)", frame)


if __name__ == "__main__":
    raise SystemExit(main())
