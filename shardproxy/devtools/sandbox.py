"""Real, throwaway PostgreSQL clusters for tests, benchmarks and the demo.

A Sandbox runs initdb once into a template and copies that template for each
new primary, so a server costs a directory copy plus a start. Replicas are
made with pg_basebackup. Everything lives under one temporary base directory;
a watchdog process stops the servers and deletes that directory even if the
owning process is killed. Linux only: process checks read /proc.
"""

from __future__ import annotations

import argparse
import atexit
import glob
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import psycopg
import yaml

TOOLS = ("initdb", "pg_ctl", "postgres", "pg_basebackup", "pg_rewind")
METHODS = ("scram-sha-256", "md5", "trust")
STOP_MODES = ("smart", "fast", "immediate")
LOOPBACK = "127.0.0.1"
SUPERUSER = "postgres"
# sun_path holds 108 bytes including the terminating NUL.
MAX_SOCKET_PATH = 107
SOCKET_NAME = "/.s.PGSQL.65535"
# Creating the ~1000 files of a data directory is slow on some disks, so a
# RAM-backed directory is preferred when it has room for a few servers.
RAM_DIR = "/dev/shm"
RAM_DIR_MIN_FREE = 2 << 30
# Per-node settings live in their own file so copies can simply overwrite it.
NODE_CONF = "sandbox-node.conf"
PROXY_PID_SUFFIX = ".proxy-pid"
# Disposable servers: durability is traded for speed everywhere it is safe to.
BASE_SETTINGS = {
    "listen_addresses": f"'{LOOPBACK}'",
    "shared_buffers": "16MB",
    "max_connections": "200",
    "max_prepared_transactions": "20",  # DDL and reference-table writes commit on all shards in two phases
    "wal_level": "logical",  # RESHARD streams changes from logical replication slots
    "max_wal_senders": "10",
    "max_replication_slots": "10",
    "wal_keep_size": "64MB",
    "hot_standby": "on",
    "hot_standby_feedback": "on",
    "fsync": "off",
    "synchronous_commit": "on",
    "full_page_writes": "off",
    "log_destination": "stderr",
    "logging_collector": "off",
}


# Settings a cluster needs for pg_rewind to bring a failed primary back (Node.rewind).
REWINDABLE = {"wal_log_hints": "on", "full_page_writes": "on"}


class SandboxError(RuntimeError):
    """A sandbox server could not be set up or controlled."""


@dataclass(frozen=True)
class User:
    """A login role created in every server of a Sandbox."""

    name: str
    password: str
    method: str = "scram-sha-256"
    roles: tuple[str, ...] = ()  # roles it is a member of, e.g. pg_monitor

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"auth method {self.method!r} is not one of {METHODS}")


DEFAULT_USERS = (
    User("app", "secret", "scram-sha-256"),
    User("md5user", "md5secret", "md5"),
    # The proxy's health checks log in as the admin user: pg_monitor lets them see each replica's WAL receiver.
    User("admin", "adminpw", "scram-sha-256", ("pg_monitor",)),
)


def find_bindir() -> str:
    """The directory holding all of initdb, pg_ctl, postgres and pg_basebackup.

    pg_config and the distribution's versioned directories come before PATH,
    which may hold stray copies or version-switching wrappers.
    """
    for candidate in _bindir_candidates():
        if all(os.access(os.path.join(candidate, tool), os.X_OK) for tool in TOOLS):
            return candidate
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    detail = f"missing: {', '.join(missing)}" if missing else "they are in different directories"
    raise SandboxError(
        f"no directory holds all of {', '.join(TOOLS)} ({detail}); "
        "install the PostgreSQL server package or put its bin directory on PATH"
    )


def _bindir_candidates() -> list[str]:
    candidates = []
    pg_config = shutil.which("pg_config")
    if pg_config:
        done = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True)
        if done.returncode == 0:
            candidates.append(done.stdout.strip())
    versioned = glob.glob("/usr/lib/postgresql/*/bin")
    candidates += sorted(versioned, key=_version_key, reverse=True)
    return candidates + os.environ.get("PATH", "").split(os.pathsep)


def _version_key(bindir: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", os.path.basename(os.path.dirname(bindir))))


def _server_account() -> pwd.struct_passwd | None:
    """The unprivileged account to run servers as, or None to use our own.

    PostgreSQL refuses to run as root.
    """
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "shardproxy"):
        with suppress(KeyError):
            return pwd.getpwnam(name)
    subprocess.run(["useradd", "--system", "--no-create-home", "shardproxy"], check=True)
    return pwd.getpwnam("shardproxy")


@dataclass(frozen=True)
class _Runner:
    """Runs server programs, and owns files, as the account of the servers."""

    bindir: str
    cwd: str
    account: pwd.struct_passwd | None

    def run(self, tool: str, *args: str, log: str | None = None) -> None:
        command = [os.path.join(self.bindir, tool), *args]
        identity: dict[str, Any] = {}
        if self.account is not None:
            identity = {"user": self.account.pw_uid, "group": self.account.pw_gid, "extra_groups": []}
        done = subprocess.run(command, cwd=self.cwd, capture_output=True, text=True, **identity)
        if done.returncode != 0:
            message = f"{' '.join(command)} failed:\n{_tail(done.stdout + done.stderr)}"
            if log is not None:
                message += f"\n--- end of {log} ---\n{_tail(_read(log))}"
            raise SandboxError(message)

    def own(self, path: str) -> None:
        """Hand path, and everything below it, to the server account."""
        if self.account is None:
            return
        uid, gid = self.account.pw_uid, self.account.pw_gid
        os.chown(path, uid, gid)
        for root, dirs, files in os.walk(path):
            for name in dirs + files:
                os.chown(os.path.join(root, name), uid, gid, follow_symlinks=False)

    def write(self, path: str, text: str, mode: str = "w") -> None:
        with open(path, mode) as f:
            f.write(text)
        self.own(path)


class Node:
    """One PostgreSQL server process of a Sandbox."""

    def __init__(
        self,
        name: str,
        port: int,
        node_dir: str,
        region: str | None,
        runner: _Runner,
        passwords: dict[str, str],
    ) -> None:
        self.name = name
        self.host = LOOPBACK
        self.port = port
        self.region = region
        self.node_dir = node_dir
        self.data_dir = os.path.join(node_dir, "data")
        self.log_path = os.path.join(node_dir, "server.log")
        self._runner = runner
        self._passwords = passwords
        self._settings: dict[str, str] = {}  # its own settings, as configure() last wrote them

    def __repr__(self) -> str:
        return f"Node({self.name!r}, port={self.port}, region={self.region!r})"

    def configure(self, settings: dict[str, str]) -> None:
        """Write this node's own settings; raw postgresql.conf values win over the shared ones."""
        self._settings = settings
        lines = {
            "port": str(self.port),
            "unix_socket_directories": _literal(self.node_dir),
            # Also the application_name of a replica's walreceiver on its primary.
            "cluster_name": _literal(self.name),
            **settings,
        }
        text = "".join(f"{key} = {value}\n" for key, value in lines.items())
        self._runner.write(os.path.join(self.data_dir, NODE_CONF), text)

    def authenticate(self, user: str, method: str) -> None:
        """From now on, ask `user` for `method` (a pg_hba.conf method: password, trust, ...) on TCP connections."""
        path = os.path.join(self.data_dir, "pg_hba.conf")
        self._runner.write(path, f"host all {_ident(user)} {LOOPBACK}/32 {method}\n" + _read(path))
        self.sql("SELECT pg_reload_conf()")

    def start(self, wait: bool = True) -> None:
        """Start the server; with wait, return once it accepts connections."""
        self._pg_ctl("start", "-l", self.log_path, "-w" if wait else "-W")

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (smart, fast or immediate); nothing to do if it is down."""
        if mode not in STOP_MODES:
            raise ValueError(f"stop mode {mode!r} is not one of {STOP_MODES}")
        if self.is_running():
            self._pg_ctl("stop", "-m", mode, "-w")

    def restart(self) -> None:
        self.stop()
        self.start()

    def pids(self) -> list[int]:
        """The postmaster and every process it started (benchmarks pin them to CPUs)."""
        return _server_pids(self.data_dir)

    def kill(self) -> None:
        """Simulate a crash: SIGKILL the postmaster and every process it started."""
        victims = self.pids()
        for pid in victims:
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if not wait_until(lambda: not _server_pids(self.data_dir), 10):
            raise SandboxError(f"{self.name}: processes {victims} survived SIGKILL")
        # A dead postmaster may linger as an unreaped zombie, which would make
        # the next start believe its stale lock files are still held.
        for lock in ("data/postmaster.pid", f".s.PGSQL.{self.port}.lock"):
            with suppress(FileNotFoundError):
                os.remove(os.path.join(self.node_dir, lock))

    def promote(self) -> None:
        """Turn this replica into a primary; return once it accepts writes."""
        self._pg_ctl("promote", "-w")
        if not wait_until(lambda: not self.sql("SELECT pg_is_in_recovery()")[0][0], 30):
            raise SandboxError(f"{self.name} is still in recovery after promote\n{_tail(self.log())}")

    def start_as_standby(self, upstream: Node | None) -> None:
        """Start this stopped node as a standby of `upstream` (None: of no server), as a failed primary is
        restarted before pg_rewind: if it wrote WAL that the new primary never had, it stays on its own
        timeline, readable and stale, as its WAL receiver cannot follow the new one."""
        conninfo = "" if upstream is None else upstream.replication_conninfo()
        self._runner.write(os.path.join(self.data_dir, "standby.signal"), "")
        self._runner.write(os.path.join(self.data_dir, "postgresql.auto.conf"),
                           f"primary_conninfo = {_literal(conninfo)}\n", mode="a")
        self.start()

    def rewind(self, source: Node) -> None:
        """Make this stopped node a standby of `source` on source's timeline (pg_rewind), and start it. The
        cluster needs wal_log_hints and full_page_writes on (see REWINDABLE)."""
        source.sql("CHECKPOINT")  # a promoted source's control file names its new timeline only after one
        self._runner.run("pg_rewind", "-D", self.data_dir, "--source-server", source.replication_conninfo(),
                         "--write-recovery-conf", log=self.log_path)
        self.configure(self._settings)  # pg_rewind copied the source's own port and name too
        self.start()

    def replication_conninfo(self) -> str:
        """How a standby of this node connects to it (and pg_rewind reads it): as the superuser."""
        return f"host={self.host} port={self.port} user={SUPERUSER} dbname=postgres"

    def is_running(self) -> bool:
        return _postmaster_pid(self.data_dir) is not None

    def dsn(self, user: str = SUPERUSER, password: str | None = None, dbname: str = "postgres") -> str:
        """A postgresql:// URL; a known sandbox user's password is filled in unless given."""
        if password is None:
            password = self._passwords.get(user)
        auth = quote(user, safe="") + (f":{quote(password, safe='')}" if password else "")
        return f"postgresql://{auth}@{self.host}:{self.port}/{quote(dbname, safe='')}"

    def sql(self, query: str, dbname: str = "postgres") -> list[tuple[Any, ...]]:
        """Run query as the superuser in autocommit mode; rows of its last statement."""
        with psycopg.connect(self.dsn(dbname=dbname), autocommit=True, connect_timeout=10) as conn:
            cursor = conn.execute(query)
            return cursor.fetchall() if cursor.description else []

    def log(self) -> str:
        return _read(self.log_path)

    def _pg_ctl(self, action: str, *args: str) -> None:
        self._runner.run("pg_ctl", action, "-D", self.data_dir, "-t", "60", *args, log=self.log_path)


@dataclass(eq=False)
class Cluster:
    """A primary and its streaming replicas."""

    name: str
    primary: Node
    replicas: list[Node] = field(default_factory=list)

    @property
    def nodes(self) -> list[Node]:
        return [self.primary, *self.replicas]

    def wait_replicas_caught_up(self, timeout: float = 10) -> None:
        """Wait until every replica has replayed the primary's current WAL position."""
        lsn = self.primary.sql("SELECT pg_current_wal_lsn()")[0][0]
        query = f"SELECT pg_last_wal_replay_lsn() >= '{lsn}'::pg_lsn"
        if not wait_until(lambda: all(r.sql(query)[0][0] for r in self.replicas), timeout):
            raise SandboxError(f"{self.name}: replicas did not replay up to {lsn} within {timeout}s")


class Sandbox:
    """Starts local PostgreSQL clusters and stops them all on close().

    base_dir is where the Sandbox's own temporary directory is created; by
    default a RAM-backed directory if one has room, else the system's temp dir.
    """

    def __init__(self, users: list[User] | None = None, base_dir: str | None = None) -> None:
        self.users = list(DEFAULT_USERS if users is None else users)
        bindir = find_bindir()
        account = _server_account()
        self.base_dir = tempfile.mkdtemp(prefix="shardproxy-sandbox-", dir=base_dir or _default_parent())
        self._closed = False
        self._ports: set[int] = set()
        self._proxies: list[ProxyProcess] = []
        self._watchdog, self._watch_fd = _start_watchdog(self.base_dir)
        atexit.register(self.close)
        try:
            os.chmod(self.base_dir, 0o755)  # the server account must reach into it
            self._runner = _Runner(bindir, self.base_dir, account)
            self._runner.own(self.base_dir)
            self._template = self._make_template()
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def cluster(
        self,
        name: str,
        replicas: int = 0,
        regions: Sequence[str] | None = None,
        settings: dict[str, str] | None = None,
    ) -> Cluster:
        """Start a primary and `replicas` streaming replicas, one region each if given.

        settings are extra raw postgresql.conf lines for every node.
        """
        if not re.fullmatch(r"[A-Za-z0-9_-]+", name):
            raise ValueError(f"cluster name {name!r} must be letters, digits, '_' or '-'")
        if regions is not None and len(regions) != replicas + 1:
            raise ValueError("regions needs one entry for the primary and one per replica")
        placement = list(regions) if regions is not None else [None] * (replicas + 1)
        extra = dict(settings or {})
        primary = self._node(f"{name}-primary", placement[0])
        shutil.copytree(self._template.data_dir, primary.data_dir)
        self._runner.own(primary.data_dir)
        primary.configure(extra)
        primary.start()
        standbys = [
            self._replica(primary, f"{name}-replica{i}", region, extra)
            for i, region in enumerate(placement[1:], 1)
        ]
        self._wait_streaming(primary, standbys)
        return Cluster(name, primary, standbys)

    def free_port(self) -> int:
        """A free loopback TCP port, never the same one twice per Sandbox."""
        while True:
            with socket.socket() as probe:
                probe.bind((LOOPBACK, 0))
                port: int = probe.getsockname()[1]
            if port not in self._ports:
                self._ports.add(port)
                return port

    def close(self) -> None:
        """Stop every server at once (immediate mode) and delete the base dir."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.close)
        for proxy in self._proxies:
            proxy.stop(timeout=2)
        _shut_down(self.base_dir)
        os.close(self._watch_fd)  # EOF tells the watchdog it may exit
        try:
            self._watchdog.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._watchdog.kill()

    def proxy(self, name: str, clusters: Sequence[Cluster], start: bool = True, **sections: Any) -> ProxyProcess:
        """A proxy daemon in front of `clusters`, on a free port; stopped by close(). `sections` are config
        sections, e.g. workers=2 for a supervisor and two workers (signals then go to the supervisor)."""
        # Not in base_dir itself, which belongs to the servers' account: the first proxy makes the directory, 0700.
        admin_socket = os.path.join(self.base_dir, "admin", f"{name}.sock")
        config = proxy_config(clusters, self.free_port(), admin_socket, self.users, **sections)
        proxy = ProxyProcess(name, config, self.base_dir)
        self._proxies.append(proxy)
        if start:
            proxy.start()
        return proxy

    def _node(self, name: str, region: str | None) -> Node:
        node_dir = os.path.join(self.base_dir, name)
        if len(node_dir + SOCKET_NAME) > MAX_SOCKET_PATH:
            raise SandboxError(f"{node_dir} is too long for a unix socket path; use a shorter base_dir")
        try:
            os.mkdir(node_dir, 0o700)
        except FileExistsError:
            raise SandboxError(f"node {name!r} already exists in this sandbox") from None
        self._runner.own(node_dir)
        passwords = {user.name: user.password for user in self.users}
        return Node(name, self.free_port(), node_dir, region, self._runner, passwords)

    def _make_template(self) -> Node:
        """initdb once, with the roles every server needs; servers start as copies of it."""
        template = self._node("template", None)
        self._runner.run(
            "initdb", "-D", template.data_dir, "-U", SUPERUSER, "-A", "trust", "--auth-host=scram-sha-256",
            "-E", "UTF8", "--locale=C", "--no-sync", "--no-instructions",
        )  # fmt: skip
        shared = "".join(f"{key} = {value}\n" for key, value in BASE_SETTINGS.items())
        conf = f"\n# shardproxy sandbox\n{shared}include_if_exists = '{NODE_CONF}'\n"
        self._runner.write(os.path.join(template.data_dir, "postgresql.conf"), conf, mode="a")
        self._runner.write(os.path.join(template.data_dir, "pg_hba.conf"), _hba(self.users))
        template.configure({})
        template.start()
        _create_roles(template, self.users)
        template.stop()
        return template

    def _replica(self, primary: Node, name: str, region: str | None, settings: dict[str, str]) -> Node:
        node = self._node(name, region)
        self._runner.run(
            "pg_basebackup", "-D", node.data_dir, "-h", primary.host, "-p", str(primary.port),
            "-U", SUPERUSER, "-R", "-X", "stream", "-c", "fast", "--no-sync",
        )  # fmt: skip
        node.configure(settings)
        node.start()
        return node

    def _wait_streaming(self, primary: Node, replicas: list[Node]) -> None:
        wanted = {node.name for node in replicas}
        query = "SELECT application_name FROM pg_stat_replication WHERE state = 'streaming'"
        if not wait_until(lambda: wanted <= {row[0] for row in primary.sql(query)}, 30):
            raise SandboxError(f"replicas of {primary.name} are not streaming\n{_tail(primary.log())}")


class ProxyProcess:
    """A `shardproxy run` daemon started by a Sandbox, on a config it wrote."""

    def __init__(self, name: str, config: dict[str, Any], base_dir: str) -> None:
        self.name = name
        self.config = config
        self.config_path = os.path.join(base_dir, f"proxy-{name}.yaml")
        self.log_path = os.path.join(base_dir, f"proxy-{name}.log")
        self._pid_path = os.path.join(base_dir, f"proxy-{name}{PROXY_PID_SUFFIX}")
        self.process: subprocess.Popen[bytes] | None = None
        self.write_config(config)

    @property
    def host(self) -> str:
        return str(self.config["listen"]["host"])

    @property
    def port(self) -> int:
        return int(self.config["listen"]["port"])

    @property
    def admin_socket(self) -> str:
        return str(self.config["admin"]["socket"])

    def write_config(self, config: dict[str, Any]) -> None:
        self.config = config
        with open(self.config_path, "w") as f:
            yaml.safe_dump(config, f, sort_keys=False)

    def dsn(self, user: str = "app", password: str | None = "secret", dbname: str = "postgres") -> str:
        auth = quote(user, safe="") + (f":{quote(password, safe='')}" if password else "")
        return f"postgresql://{auth}@{self.host}:{self.port}/{quote(dbname, safe='')}"

    def start(self, timeout: float = 15) -> None:
        package_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        path = os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "shardproxy", "run", "-c", self.config_path],
                stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": path},
            )
        with open(self._pid_path, "w") as f:
            f.write(str(self.process.pid))
        if not wait_until(lambda: self._ready() or self.process.poll() is not None, timeout) or not self._ready():
            self.stop()
            raise SandboxError(f"proxy {self.name} did not start\n{_tail(self.log())}")

    def _ready(self) -> bool:
        """The port accepts and the admin socket exists: a supervisor of several workers binds it only once
        every worker listens."""
        with socket.socket() as probe:
            probe.settimeout(0.2)
            return probe.connect_ex((self.host, self.port)) == 0 and os.path.exists(self.admin_socket)

    def worker_pids(self) -> list[int]:
        """The supervisor's worker processes (workers > 1), in no particular order."""
        if self.process is None:
            return []
        pid = self.process.pid
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(child) for child in f.read().split()]

    def signal(self, signum: int) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signum)

    def stop(self, timeout: float = 10) -> int | None:
        """SIGTERM (a graceful shutdown), SIGKILL past the timeout; returns the exit code."""
        if self.process is None:
            return None
        self.signal(signal.SIGTERM)
        try:
            code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            code = self.process.wait()
        with suppress(FileNotFoundError):
            os.unlink(self._pid_path)
        return code

    def log(self) -> str:
        return _read(self.log_path)


def proxy_config(clusters: Sequence[Cluster], port: int, admin_socket: str, users: Sequence[User] = DEFAULT_USERS,
                 region: str | None = None, **sections: Any) -> dict[str, Any]:
    """A proxy config for these clusters, one shard each, with every sandbox user; `sections` override."""
    # Regions by first appearance: the primaries' region first, as the first priority.
    regions = list(dict.fromkeys(node.region for cluster in clusters for node in cluster.nodes if node.region))
    config: dict[str, Any] = {
        "listen": {"host": LOOPBACK, "port": port},
        "admin": {"socket": admin_socket},
        "metrics": {"host": LOOPBACK, "port": 0},
        "shards": [
            {"name": cluster.name, "nodes": [
                {"host": node.host, "port": node.port, **({"region": node.region} if node.region else {})}
                for node in cluster.nodes]}
            for cluster in clusters
        ],
        "users": [{"name": u.name, "password": u.password, "auth": u.method} for u in users],
        "admin_users": ["admin"] if any(u.name == "admin" for u in users) else [],
    }
    if regions:
        config["regions"] = {name: {"priority": i + 1, "primary": i == 0} for i, name in enumerate(regions)}
        config["region"] = region or regions[0]
    config.update(sections)
    return config


def demo_topology(
    sandbox: Sandbox,
    shards: int = 2,
    regions: Sequence[str] = ("us-east-1", "eu-central-1", "ap-southeast-1"),
) -> list[Cluster]:
    """Clusters shard0.. with the primary in regions[0] and a replica in each other region."""
    return [sandbox.cluster(f"shard{i}", replicas=len(regions) - 1, regions=regions) for i in range(shards)]


def _default_parent() -> str | None:
    if os.path.isdir(RAM_DIR) and shutil.disk_usage(RAM_DIR).free >= RAM_DIR_MIN_FREE:
        return RAM_DIR
    return None


def _hba(users: list[User]) -> str:
    lines = ["local all all trust", f"host replication all {LOOPBACK}/32 trust"]
    lines += [f"host all {_ident(user.name)} {LOOPBACK}/32 {user.method}" for user in users]
    lines += [f"host all {SUPERUSER} {LOOPBACK}/32 trust", f"host all all {LOOPBACK}/32 scram-sha-256"]
    return "\n".join(lines) + "\n"


def _create_roles(node: Node, users: list[User]) -> None:
    with psycopg.connect(node.dsn(), autocommit=True, connect_timeout=10) as conn:
        for user in users:
            # The hash is chosen when the password is stored, so md5 users need md5 here.
            encryption = "md5" if user.method == "md5" else "scram-sha-256"
            conn.execute(f"SET password_encryption = {_literal(encryption)}")
            conn.execute(f"CREATE ROLE {_ident(user.name)} LOGIN CREATEDB PASSWORD {_literal(user.password)}")
            for role in user.roles:
                conn.execute(f"GRANT {_ident(role)} TO {_ident(user.name)}")


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _read(path: str) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except FileNotFoundError:
        return ""


def _tail(text: str, lines: int = 30) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


def wait_until(condition: Callable[[], object], timeout: float = 10.0) -> bool:
    """Whether `condition()` came true within `timeout` seconds, polled (tests: `assert wait_until(...), why`)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def _runs_in(pid: int, data_dir: str) -> bool:
    """Whether pid is a live process working in data_dir, as every server process does.

    Unlike a bare PID check this ignores stale lock files, reused PIDs and
    zombies: pg_ctl leaves postmasters to init, which may never reap them.
    """
    try:
        return os.path.samefile(f"/proc/{pid}/cwd", data_dir)
    except OSError:
        return False


def _postmaster_pid(data_dir: str) -> int | None:
    try:
        with open(os.path.join(data_dir, "postmaster.pid")) as f:
            pid = int(f.readline())
    except (OSError, ValueError):
        return None
    return pid if _runs_in(pid, data_dir) else None


def _server_pids(data_dir: str) -> list[int]:
    """The postmaster of data_dir and all its children."""
    return [int(entry) for entry in os.listdir("/proc") if entry.isdigit() and _runs_in(int(entry), data_dir)]


def _shut_down(base_dir: str) -> None:
    """Stop every proxy and server under base_dir at once, then delete base_dir."""
    for pid_file in glob.glob(os.path.join(glob.escape(base_dir), f"*{PROXY_PID_SUFFIX}")):
        with suppress(OSError, ValueError):
            os.kill(int(_read(pid_file)), signal.SIGKILL)
    data_dirs = glob.glob(os.path.join(glob.escape(base_dir), "*", "data"))
    for data_dir in data_dirs:
        pid = _postmaster_pid(data_dir)
        if pid is not None:
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGQUIT)  # what pg_ctl stop -m immediate sends
    if not wait_until(lambda: all(_postmaster_pid(d) is None for d in data_dirs), 10):
        for pid in (pid for d in data_dirs for pid in _server_pids(d)):
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    shutil.rmtree(base_dir, ignore_errors=True)


def _start_watchdog(base_dir: str) -> tuple[subprocess.Popen[bytes], int]:
    """Start a process that cleans base_dir up once our end of its stdin pipe closes.

    The kernel closes that end when we exit in any way, SIGKILL included. The
    watchdog gets its own session so a terminal's Ctrl-C does not reach it.
    """
    read_end, write_end = os.pipe()
    package_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    path = os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))
    watchdog = subprocess.Popen(
        [sys.executable, "-m", "shardproxy.devtools.sandbox", "--watch", base_dir],
        stdin=read_end,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        env={**os.environ, "PYTHONPATH": path},
    )
    os.close(read_end)
    return watchdog, write_end


def _watch(base_dir: str) -> None:
    sys.stdin.buffer.read()  # returns at EOF: the owner closed the sandbox or died
    _shut_down(base_dir)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Clean up a sandbox once its owner is gone.")
    parser.add_argument("--watch", required=True, metavar="BASE_DIR")
    _watch(parser.parse_args().watch)
