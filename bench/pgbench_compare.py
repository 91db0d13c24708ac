"""pgbench through shardproxy, PgBouncer and a direct connection, in one run, on sandbox servers.

    python bench/pgbench_compare.py [--seconds 5] [--repeat 3] [--clients 16] [--pool 8]

Targets are interleaved and each cell repeated; the table shows median TPS and the ratio to a direct connection,
and is appended to bench/RESULTS.md with the date and machine. PgBouncer (Debian's `pgbouncer` package) runs in
transaction mode with the same pool size; it is skipped when not installed.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from shardproxy.sandbox import Cluster, Sandbox  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md")
DATABASE = "bench"
USER, PASSWORD = "app", "secret"
WORKLOADS = {
    "-S simple": ["-S", "-M", "simple"],
    "-S extended": ["-S", "-M", "extended"],
    "-S prepared": ["-S", "-M", "prepared"],
    "TPC-B simple": ["-M", "simple"],
}


def pgbench(port: int, args: list[str], clients: int, seconds: int) -> float | None:
    """TPS of one pgbench run, or None when it failed."""
    cmd = ["pgbench", "-h", "127.0.0.1", "-p", str(port), "-U", USER, "-c", str(clients), "-j", "2",
           "-T", str(seconds), "-n", *args, DATABASE]
    run = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PGPASSWORD": PASSWORD})
    match = re.search(r"tps = ([\d.]+)", run.stdout)
    failed = re.search(r"number of failed transactions: (\d+)", run.stdout)
    if run.returncode != 0 or match is None or (failed and int(failed.group(1))):
        return None
    return float(match.group(1))


def start_pgbouncer(sandbox: Sandbox, cluster: Cluster, pool: int) -> tuple[subprocess.Popen, int] | None:
    binary = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"
    if not os.path.exists(binary):
        return None
    port = sandbox.free_port()
    folder = os.path.join(sandbox.base_dir, "pgbouncer")
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "userlist.txt"), "w") as f:
        f.write(f'"{USER}" "{PASSWORD}"\n')
    primary = cluster.primary
    with open(os.path.join(folder, "pgbouncer.ini"), "w") as f:
        f.write(f"[databases]\n{DATABASE} = host=127.0.0.1 port={primary.port} dbname={DATABASE}\n"
                f"[pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\n"
                f"auth_type = scram-sha-256\nauth_file = {folder}/userlist.txt\npool_mode = transaction\n"
                f"default_pool_size = {pool}\nmax_client_conn = 1000\nlogfile = {folder}/pgbouncer.log\n")
    os.system(f"chown -R postgres {folder} 2>/dev/null")
    user = ["-u", "postgres"] if os.geteuid() == 0 else []
    process = subprocess.Popen([binary, *user, os.path.join(folder, "pgbouncer.ini")],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)
    return process, port


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--pool", type=int, default=8)
    args = parser.parse_args()
    with Sandbox() as sandbox:
        cluster = sandbox.cluster("bench", settings={"max_connections": "300"})
        cluster.primary.sql(f"CREATE DATABASE {DATABASE} OWNER {USER}")
        subprocess.run(["pgbench", "-i", "-q", "-s", "10", "-h", "127.0.0.1", "-p", str(cluster.primary.port),
                        "-U", USER, DATABASE], check=True, capture_output=True, env={**os.environ, "PGPASSWORD": PASSWORD})
        proxy = sandbox.proxy("bench", [cluster], pool={"size": args.pool}, log={"level": "warning"})
        targets = {"direct": cluster.primary.port, "shardproxy": proxy.port}
        bouncer = start_pgbouncer(sandbox, cluster, args.pool)
        if bouncer is not None:
            targets["pgbouncer"] = bouncer[1]
        try:
            table = measure(targets, args)
        finally:
            if bouncer is not None:
                bouncer[0].terminate()
    report(table, targets, args)
    return 0


def measure(targets: dict[str, int], args: argparse.Namespace) -> dict[tuple[str, str], list[float | None]]:
    cells: dict[tuple[str, str], list[float | None]] = {}
    for _ in range(args.repeat):
        for workload, flags in WORKLOADS.items():
            for name, port in targets.items():  # interleaved: machine noise hits every target alike
                cells.setdefault((workload, name), []).append(pgbench(port, flags, args.clients, args.seconds))
    return cells


def report(cells: dict[tuple[str, str], list[float | None]], targets: dict[str, int], args: argparse.Namespace) -> None:
    names = list(targets)
    lines = [f"## {datetime.date.today()} pgbench, {args.clients} clients, pool {args.pool}, "
             f"{args.seconds}s x {args.repeat}, {platform.machine()} {os.cpu_count()} cores",
             "", "| workload | " + " | ".join(f"{n} tps" for n in names) + " | shardproxy/direct | shardproxy/pgbouncer |",
             "|---" * (len(names) + 3) + "|"]
    for workload in WORKLOADS:
        medians = {}
        for name in names:
            runs = cells[(workload, name)]
            medians[name] = statistics.median(runs) if all(r is not None for r in runs) else None
        def ratio(a: str, b: str) -> str:
            return f"{medians[a] / medians[b]:.2f}" if medians.get(a) and medians.get(b) else "n/a"
        shown = [f"{medians[n]:.0f}" if medians[n] else "failed" for n in names]
        lines.append(f"| {workload} | " + " | ".join(shown) + f" | {ratio('shardproxy', 'direct')} | "
                     f"{ratio('shardproxy', 'pgbouncer')} |")
    text = "\n".join(lines) + "\n"
    print(text)
    with open(RESULTS, "a") as f:
        f.write("\n" + text)


if __name__ == "__main__":
    raise SystemExit(main())
