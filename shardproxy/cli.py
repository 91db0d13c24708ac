"""The `shardproxy` command line. Exit codes: 0 success, 1 runtime failure, 2 bad usage or bad config."""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING

from shardproxy import __version__
from shardproxy.config import AdminSettings, Config, ConfigError, load_config
from shardproxy.ops.logs import setup_logging

if TYPE_CHECKING:
    from shardproxy.cluster.topology import NodeState, Probe


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="shardproxy", description="A sharding, pooling PostgreSQL proxy.")
    parser.add_argument("--version", action="version", version=f"shardproxy {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run the proxy in the foreground")
    run.add_argument("-c", "--config", required=True)
    run.add_argument("--region")
    run.add_argument("--workers", type=int)
    run.add_argument("--log-format", choices=["text", "json"])
    run.add_argument("--worker", type=int, help=argparse.SUPPRESS)  # set by the supervisor for its workers
    run.add_argument("--runtime-dir", help=argparse.SUPPRESS)  # the supervisor's directory of internal sockets
    commands.add_parser("demo", help="start a local sandbox of PostgreSQL servers and proxies")
    check = commands.add_parser("check", help="validate a config file")
    check.add_argument("-c", "--config", required=True)
    check.add_argument("--connect", action="store_true",
                       help="also check every node once, as health checks do, and say what fails")
    route = commands.add_parser("route", help="print the shard that owns a key")
    route.add_argument("-c", "--config", required=True)
    route.add_argument("key")
    admin = commands.add_parser("admin", help="send one command to a running proxy's admin socket")
    where = admin.add_mutually_exclusive_group()
    where.add_argument("-s", "--socket", help="the admin socket (default: the config's, else the built-in one)")
    where.add_argument("-c", "--config", help="take the admin socket from this config file")
    admin.add_argument("--json", action="store_true", help="print the reply as the proxy sent it")
    admin.add_argument("words", nargs="+", metavar="COMMAND", help="e.g. SHOW POOLS; HELP lists them all")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _COMMANDS[args.command](args)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0
    except Exception as exc:  # one line, never a bare traceback
        print(f"shardproxy: {exc}", file=sys.stderr)
        return 1


def _run(args: argparse.Namespace) -> int:
    import uvloop

    from shardproxy.proxy import Proxy
    from shardproxy.supervisor import Supervisor
    from shardproxy.worker import Worker

    config = load_config(args.config, region=args.region, workers=args.workers)
    log_format = args.log_format or config.log.format
    setup_logging(config.log.level, log_format, args.worker)
    if config.workers > 1 and args.worker is None:
        return Supervisor(config, log_format).run()
    worker = None if args.worker is None else Worker(args.worker, config.workers, args.runtime_dir)

    async def serve() -> None:
        proxy = Proxy(config, worker)
        await proxy.start()
        await proxy.serve_forever()

    uvloop.run(serve())
    return 0


def _check(args: argparse.Namespace) -> int:
    from shardproxy.wire.tls import client_context, server_context

    config = load_config(args.config)
    client_context(config)  # certificate, key and CA files load (ConfigError if not)
    server_context(config)
    print(f"{args.config}: ok ({len(config.shards)} shards, {sum(len(s.nodes) for s in config.shards)} nodes)")
    return _check_nodes(config) if args.connect else 0


def _check_nodes(config: Config) -> int:
    """Each node once, as health checks log in: its role, or why the check failed (exit 1 if any did)."""
    import asyncio

    from shardproxy.cluster.health import NO_TWO_PHASE, HealthChecker, health_login
    from shardproxy.cluster.topology import Topology

    user, password = health_login(config)

    async def survey() -> list[tuple[NodeState, Probe | str]]:
        return await HealthChecker(Topology(config), config, user, password).survey()

    failed = 0
    for node, seen in asyncio.run(survey()):
        where = f"{node.shard} {node.address}" + (f" ({node.region})" if node.region else "")
        if isinstance(seen, str):
            failed += 1
            print(f"{where}: the health check as user {user} failed: {seen}", file=sys.stderr)
        else:
            print(f"{where}: {'replica' if seen.in_recovery else 'primary'}, timeline {seen.timeline}")
            if not seen.in_recovery and not seen.prepared_transactions:
                print(f"{where}: warning: {NO_TWO_PHASE}", file=sys.stderr)
    return 1 if failed else 0


def _route(args: argparse.Namespace) -> int:
    from shardproxy.routing.keys import parse_key
    from shardproxy.routing.ring import Ring

    config = load_config(args.config)
    print(Ring.from_config(config).owner(parse_key(args.key)))
    return 0


def _admin(args: argparse.Namespace) -> int:
    from shardproxy.ops.admin.replies import format_table
    from shardproxy.ops.admin.socket import request

    path = args.socket or (load_config(args.config).admin.socket if args.config else AdminSettings().socket)
    try:
        line = request(path, " ".join(args.words))
    except OSError as exc:
        print(f"shardproxy: cannot reach the admin socket {path}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    reply = json.loads(line)
    if args.json:
        print(line, end="")
    elif reply["ok"]:
        print(format_table(reply["columns"], reply["rows"]) if reply["columns"] else "OK")
    if not reply["ok"]:
        print(f"shardproxy: {reply['error']}", file=sys.stderr)
        return 1
    return 0


def _demo(args: argparse.Namespace) -> int:
    from shardproxy.devtools.demo import run_demo

    return run_demo()


_COMMANDS = {"run": _run, "check": _check, "route": _route, "demo": _demo, "admin": _admin}
