"""psycopg 3's own test suite, run straight against PostgreSQL and through the proxy, compared test by test.

A client must not be able to tell the proxy from one PostgreSQL server, except where pooling or sharding makes a
documented difference. psycopg's suite (some 6,000 tests of the protocol, types, COPY, pipelines, prepared
statements, notifications, cancellation) checks that far more widely than our own tests. A run takes 12 minutes
direct and over 20 through the proxy, so it is an on-demand check, not part of the default test run:

    python tools/psycopg_suite.py PSYCOPG_CHECKOUT [--mode session|transaction|both] [-k EXPR] [--jobs N]
                                  [--venv DIR] [--output DIR]

PSYCOPG_CHECKOUT is a checkout of psycopg's repository at the version of the installed psycopg; its tests/ run in
a venv of their own (temporary, or made or reused at --venv DIR) with that psycopg version and what the tests need.
Each run (direct, then one per pooling mode; up to --jobs at once) gets a server of its own from one Sandbox, so
what one run leaves in its database cannot change another's outcome; the proxy has one shard of that one node.
Every run selects and orders the tests alike (pytest-randomly is off; psycopg's type-annotation tests, which run
mypy and no server, are left out). A test gets TEST_TIMEOUT seconds, and a pytest that stops making progress is
stopped and started again after the test that hung. The report: each run's counts, then every test that passes
direct and fails or errors through the proxy, with the first line of its failure. Exit 0 (it is a report), 1 when
the servers or the venv cannot be set up, 2 for bad usage.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import venv
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import psycopg

from shardproxy.devtools.sandbox import DEFAULT_USERS, Sandbox, SandboxError, User

# psycopg's test extra (pytest-randomly left out: both runs must order tests alike), the pool its tests/pool
# covers, and the optional modules whose tests are otherwise skipped; plus per-test time limits and a report
# written as each test ends, so a run cut short still tells what it ran.
SUITE_PACKAGES = ("pytest", "anyio", "pproxy", "psycopg-pool", "dnspython", "numpy", "shapely",
                  "pytest-timeout", "pytest-reportlog")
USER = User("psycopg", "psycopg-test")
DATABASE = "psycopg_test"
POOL_SIZE = 150  # above what the suite opens at once: pool waits are not what is compared
TEST_TIMEOUT = 20  # the slowest test takes 4 s direct
STALL_TIMEOUT = TEST_TIMEOUT + 15  # no new report: past the time limit of a hung test, or a teardown hung
FAILED = ("failed", "error")
COLUMNS = ("passed", "failed", "error", "skipped", "xfailed")
STOP = threading.Event()  # set on Ctrl-C: each pytest runs in a session of its own, out of the terminal's reach

Outcome = tuple[str, str]  # (passed | failed | error | skipped | xfailed, the first line of a failure)


@dataclass
class Run:
    """One pass of the suite: direct (mode None) or through a proxy in a pooling mode."""

    name: str
    mode: str | None
    dsn: str = ""
    outcomes: dict[str, Outcome] = field(default_factory=dict)  # by pytest's test id
    seconds: float = 0.0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    runs = [Run("direct", None)] + [Run(mode, mode) for mode in args.modes]
    try:
        run_all(args, runs)
    except (SandboxError, subprocess.CalledProcessError) as exc:
        print(f"psycopg_suite: {exc}", file=sys.stderr)
        return 1
    report(args.checkout, runs)
    return 0


def run_all(args: argparse.Namespace, runs: list[Run]) -> None:
    """Make the venv and a server (and proxy) for each run, then run the suite for each."""
    with tempfile.TemporaryDirectory(prefix="psycopg-suite-") as work:
        output = args.output or work
        os.makedirs(output, exist_ok=True)
        python = suite_python(args.venv or os.path.join(work, "venv"))
        with Sandbox(users=[*DEFAULT_USERS, USER]) as sandbox, ThreadPoolExecutor(args.jobs) as pool:
            for run in runs:
                run.dsn = start_server(sandbox, run)
            try:
                list(pool.map(lambda run: run_suite(python, args, run, output), runs))
            except BaseException:
                STOP.set()  # the runs going stop their pytest; those not started never start
                pool.shutdown(cancel_futures=True)
                raise


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkout", help="a checkout of psycopg's repository (its tests/ directory is run)")
    parser.add_argument("--mode", choices=("session", "transaction", "both"), default="both")
    parser.add_argument("-k", dest="keyword", metavar="EXPR", help="pytest's -k: run only the tests it selects")
    parser.add_argument("--jobs", type=int, default=1, help="runs going at once, each on its own server")
    parser.add_argument("--venv", help="the venv for psycopg's tests, made here if missing (default: a temporary one)")
    parser.add_argument("--output", help="keep each run's pytest output and report log here (default: thrown away)")
    args = parser.parse_args(argv)
    if not os.path.isfile(os.path.join(args.checkout, "tests", "conftest.py")):
        parser.error(f"{args.checkout} has no tests/conftest.py: not a checkout of psycopg")
    if args.jobs < 1:
        parser.error("--jobs must be at least 1")
    args.checkout = os.path.abspath(args.checkout)
    args.modes = ["session", "transaction"] if args.mode == "both" else [args.mode]
    return args


def suite_python(path: str) -> str:
    """The python of a venv holding the installed psycopg version and what its tests need."""
    python = os.path.join(path, "bin", "python")
    if not os.path.exists(python):
        venv.create(path, with_pip=True)
    packages = [f"psycopg[binary]=={psycopg.__version__}", *SUITE_PACKAGES]
    subprocess.run([python, "-m", "pip", "install", "-q", *packages], check=True)
    return python


def start_server(sandbox: Sandbox, run: Run) -> str:
    """A server for this run, with a superuser and a database for psycopg's tests; the DSN the tests get."""
    cluster = sandbox.cluster(f"psycopg-{run.name}")
    cluster.primary.sql(f"ALTER ROLE {USER.name} SUPERUSER")
    cluster.primary.sql(f"CREATE DATABASE {DATABASE} OWNER {USER.name}")
    if run.mode is None:
        return cluster.primary.dsn(USER.name, dbname=DATABASE)
    proxy = sandbox.proxy(f"psycopg-{run.name}", [cluster], pool={"mode": run.mode, "size": POOL_SIZE})
    return proxy.dsn(USER.name, USER.password, DATABASE)


def run_suite(python: str, args: argparse.Namespace, run: Run, output: str) -> None:
    """Run psycopg's tests against run.dsn. A pytest that stops making progress (a test hung where its time
    limit cannot reach, such as an async test whose event loop the limit broke) is killed, and a new one goes on
    with the tests not yet run; the hung test counts as failed."""
    started = time.monotonic()
    outcomes = run.outcomes
    for attempt in itertools.count():
        base = os.path.join(output, f"{run.name}-{attempt}")
        with open(base + ".args", "w") as f:
            f.writelines(f"--deselect={test}\n" for test in outcomes)
        command = [python, "-m", "pytest", "tests", "-p", "no:randomly", "-m", "not mypy", f"@{base}.args",
                   f"--report-log={base}.jsonl", f"--timeout={TEST_TIMEOUT}", "-o", f"cache_dir={base}.cache"]
        if args.keyword:
            command += ["-k", args.keyword]
        finished = run_until_stalled(command, args.checkout, run.dsn, base)
        reports = read_reports(base + ".jsonl")
        outcomes.update(outcomes_of(reports))
        hung = None if finished or STOP.is_set() else in_progress(reports)
        if hung is None:
            break
        outcomes.setdefault(hung, ("failed", f"hung: no progress in {STALL_TIMEOUT} s, pytest stopped"))
    run.seconds = time.monotonic() - started


def run_until_stalled(command: list[str], checkout: str, dsn: str, base: str) -> bool:
    """Run pytest until it ends (True) or its report log stops growing for STALL_TIMEOUT seconds (False)."""
    env = {**os.environ, "PSYCOPG_TEST_DSN": dsn, "PYTHONDONTWRITEBYTECODE": "1"}
    with open(base + ".out", "w") as out:
        process = subprocess.Popen(command, cwd=checkout, env=env, stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True)  # its own group: pproxy processes of tests die too
        size, changed = -1, time.monotonic()
        while not STOP.wait(1) and process.poll() is None:
            if (now := file_size(base + ".jsonl")) != size:
                size, changed = now, time.monotonic()
            elif time.monotonic() - changed > STALL_TIMEOUT:
                break
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            return False
    return True


def file_size(path: str) -> int:
    return os.path.getsize(path) if os.path.exists(path) else 0


def read_reports(path: str) -> list[dict[str, Any]]:
    """The per-phase test reports of a pytest report log, in order."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        reports = [json.loads(line) for line in f]
    return [report for report in reports if report.get("$report_type") == "TestReport"]


def in_progress(reports: list[dict[str, Any]]) -> str | None:
    """The test that was set up and never torn down, if any."""
    done = {report["nodeid"] for report in reports if report["when"] == "teardown"}
    return next((report["nodeid"] for report in reversed(reports) if report["nodeid"] not in done), None)


def outcomes_of(reports: list[dict[str, Any]]) -> dict[str, Outcome]:
    """Each test's outcome: a failed call is a failure, a failed setup or teardown an error, and either one
    stands over what the other phases say."""
    outcomes: dict[str, Outcome] = {}
    for report in reports:
        if (outcome := phase_outcome(report)) is None:
            continue
        previous = outcomes.get(report["nodeid"])
        if previous is None or previous[0] not in FAILED:
            outcomes[report["nodeid"]] = outcome
    return outcomes


def phase_outcome(report: dict[str, Any]) -> Outcome | None:
    """The outcome one phase (setup, call, teardown) of a test gives it, or None if it says nothing."""
    if report["outcome"] == "failed":
        return ("failed" if report["when"] == "call" else "error"), first_line(report["longrepr"])
    if report["outcome"] == "skipped":
        return ("xfailed" if "wasxfail" in report else "skipped"), ""
    return ("passed", "") if report["when"] == "call" else None


def first_line(longrepr: Any) -> str:
    """The first line of what pytest says about a failure: the exception and its message."""
    crash = longrepr.get("reprcrash") if isinstance(longrepr, dict) else None
    text = (crash or {}).get("message") or str(longrepr)
    return next((line.strip() for line in text.splitlines() if line.strip()), "")


def report(checkout: str, runs: list[Run]) -> None:
    tests = set().union(*(run.outcomes for run in runs))
    print(f"psycopg {psycopg.__version__}, the tests of {checkout}: {len(tests)} tests")
    print(f"{'run':<12}" + "".join(f"{column:>9}" for column in (*COLUMNS, "not run", "seconds")))
    for run in runs:
        counts = Counter(outcome for outcome, _ in run.outcomes.values())
        cells = [counts[column] for column in COLUMNS] + [len(tests) - len(run.outcomes)]
        print(f"{run.name:<12}" + "".join(f"{cell:>9}" for cell in cells) + f"{run.seconds:>9.0f}")
    for run in runs[1:]:
        lost = sorted(test for test, (outcome, _) in runs[0].outcomes.items()
                      if outcome == "passed" and run.outcomes.get(test, ("",))[0] in FAILED)
        print(f"\nPassed direct, failed through the proxy in {run.name} mode: {len(lost)}")
        for test in lost:
            outcome, line = run.outcomes[test]
            print(f"  {test}  [{outcome}]\n      {line}")


if __name__ == "__main__":
    sys.exit(main())
