"""Configuration: a YAML file validated by pydantic, with every problem
reported as ``file:line: key.path: message`` so operators can fix a file in
one pass instead of one error at a time."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
)

ENV_REGION = "SHARDPROXY_REGION"

Loc = tuple[str | int, ...]
# Top-level key -> (value, where it came from) for values set outside the file.
Overrides = dict[str, tuple[object, str]]

_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h)?")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_SIZE_RE = re.compile(r"(\d+)\s*(b|kb|mb|gb)?", re.IGNORECASE)
_SIZE_UNITS = {"b": 1, "kb": 1024, "mb": 1024**2, "gb": 1024**3}
_MD5_RE = re.compile(r"md5[0-9a-f]{32}")
_B64 = r"[A-Za-z0-9+/]+={0,2}"
_SCRAM_RE = re.compile(rf"SCRAM-SHA-256\$\d+:{_B64}\${_B64}:{_B64}")
_SCRAM_PREFIX = "SCRAM-SHA-256$"
_MESSAGES = {"extra_forbidden": "unknown key", "model_type": "should be a mapping"}


class ConfigError(Exception):
    """Invalid or unreadable configuration; ``problems`` lists every issue."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


def parse_duration(value: Any) -> float:
    """Seconds from ``500ms``/``30s``/``5m``/``1h`` or a bare number."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if value < 0:
            raise ValueError("duration must not be negative")
        return float(value)
    match = _DURATION_RE.fullmatch(value.strip()) if isinstance(value, str) else None
    if match is None:
        raise ValueError(
            f"invalid duration {value!r}: use e.g. 500ms, 30s, 5m, 1h or seconds"
        )
    return float(match[1]) * _DURATION_UNITS[match[2] or "s"]


def parse_size(value: Any) -> int:
    """Bytes from an int or ``64kB``/``16MB`` style (1024-based, like PostgreSQL)."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise ValueError("size must not be negative")
        return value
    match = _SIZE_RE.fullmatch(value.strip()) if isinstance(value, str) else None
    if match is None:
        raise ValueError(f"invalid size {value!r}: use e.g. 65536, 64kB or 16MB")
    return int(match[1]) * _SIZE_UNITS[(match[2] or "b").lower()]


Duration = Annotated[float, BeforeValidator(parse_duration)]
Size = Annotated[int, BeforeValidator(parse_size)]


class _Model(BaseModel):
    # Numbers become strings so unquoted passwords or names like 2024 load.
    model_config = ConfigDict(extra="forbid", frozen=True, coerce_numbers_to_str=True)


class ListenSettings(_Model):
    host: str = "127.0.0.1"
    port: int = Field(default=6432, ge=0, le=65535)


def default_admin_socket() -> str:
    """admin.sock in a directory of the proxy's own under the user's private runtime directory ($XDG_RUNTIME_DIR),
    else /run for root, else /tmp/shardproxy-<uid>: never a name in a shared directory, which another local user
    could take first. The admin socket makes the directory 0700 and checks it is the proxy's user's."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        return os.path.join(runtime, "shardproxy", "admin.sock")
    uid = os.geteuid()
    return "/run/shardproxy/admin.sock" if uid == 0 else f"/tmp/shardproxy-{uid}/admin.sock"


class AdminSettings(_Model):
    socket: str = Field(default_factory=default_admin_socket)
    database: str = "shardproxy"  # the admin console's database name, for users in admin_users


class MetricsSettings(_Model):
    host: str = "127.0.0.1"
    port: int = Field(default=9930, ge=0, le=65535)  # 0 disables metrics


class RegionSettings(_Model):
    primary: bool = False
    priority: int = 1
    health_check_interval: Duration = 30.0


class ShardingSettings(_Model):
    key: str = "user_id"
    virtual_nodes: int = Field(default=256, ge=1)
    reference_tables: list[str] = Field(default_factory=list)


class NodeSettings(_Model):
    host: str
    port: int = Field(ge=1, le=65535)
    region: str | None = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


class ShardSettings(_Model):
    name: str
    weight: int = Field(default=1, ge=1)
    nodes: list[NodeSettings] = Field(min_length=1)


class PoolSettings(_Model):
    mode: Literal["transaction", "session"] = "transaction"
    size: int = Field(default=20, ge=1)
    min_size: int = Field(default=0, ge=0)
    max_client_conn: int = Field(default=10000, ge=1)
    max_login_conn: int = Field(default=100, ge=1)  # connections authenticating at once; the others wait
    query_wait_timeout: Duration = 30.0
    server_idle_timeout: Duration = 600.0
    server_lifetime: Duration = 3600.0
    server_connect_timeout: Duration = 5.0
    idle_transaction_timeout: Duration = 0.0  # 0 = off
    query_timeout: Duration = 0.0  # 0 = off
    client_login_timeout: Duration = 60.0
    auth_failure_delay: Duration = 1.0  # after repeated failed logins, an address's logins come this far apart
    max_message_size: Size = Field(default=64 * 1024**2, ge=1)
    prepared_statements_per_server: int = Field(default=1000, ge=1)  # a Bind needs its statement prepared
    statement_cache_size: int = Field(default=100_000, ge=1)
    statement_cache_bytes: Size = Field(default=64 * 1024**2, ge=1)  # of the statements' texts, and of the plans'


class RoutingSettings(_Model):
    consistency: Literal["eventual", "read_your_writes", "strong"] = "read_your_writes"
    max_replica_lag: Duration = 5.0
    strong_tables: list[str] = Field(default_factory=list)
    failover_timeout: Duration = 10.0
    in_doubt_after: Duration = Field(default=60.0, gt=0)  # a prepared two-phase commit older than this is in doubt
    cross_shard_transactions: Literal["two_phase", "refuse"] = "two_phase"
    keyless_writes: Literal["all_shards", "refuse"] = "all_shards"  # UPDATE/DELETE without a shard key
    deadlock_timeout: Duration = Field(default=1.0, gt=0)  # a wait this long across shards is checked for a cycle
    two_phase_secret: str | None = Field(default=None, repr=False)  # signs two-phase commits' names (gids)
    # What a read on every shard may hold in the proxy (its groups, the rows DISTINCT has seen) before it fails.
    scatter_memory_limit: Size = Field(default=64 * 1024**2, ge=1)


class TlsSettings(_Model):
    mode: Literal["disable", "allow", "require"] = "disable"
    cert: str | None = None
    key: str | None = None
    ca: str | None = None


class ServerTlsSettings(_Model):
    mode: Literal["disable", "prefer", "require", "verify-ca", "verify-full"] = "disable"
    ca: str | None = None


ServerAuthMethod = Literal["scram-sha-256", "md5", "password", "none"]
_DEFAULT_SERVER_AUTH: list[ServerAuthMethod] = ["scram-sha-256", "password"]


class ServerAuthSettings(_Model):
    """What a server may ask of the proxy when it logs in (libpq's require_auth): the proxy refuses the rest."""

    methods: list[ServerAuthMethod] = Field(default_factory=lambda: list(_DEFAULT_SERVER_AUTH), min_length=1)
    cleartext_needs_verified_tls: bool = True  # a cleartext password goes only where TLS verified the server


class UserSettings(_Model):
    name: str
    # Plaintext, "md5"+hex hash or SCRAM verifier; kept out of repr and logs.
    password: str | None = Field(default=None, repr=False)
    auth: Literal["scram-sha-256", "md5", "trust"] = "scram-sha-256"


class LogSettings(_Model):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["text", "json"] = "text"
    slow_queries: Duration = 0.0  # log transactions that held a server connection longer; 0 = off


class ReshardSettings(_Model):
    """RESHARD, the job that moves rows to the ring of the config file (ops/reshard.py)."""

    cutover_timeout: Duration = Field(default=30.0, gt=0)  # the cut-over retries this long, then the job fails
    batch_size: int = Field(default=1000, ge=1)  # rows deleted from their old owner per transaction at the cleanup
    user: str | None = None  # logs in to the servers (replication, DDL); default: the health checks' user


class Config(_Model):
    listen: ListenSettings = Field(default_factory=ListenSettings)
    admin: AdminSettings = Field(default_factory=AdminSettings)
    metrics: MetricsSettings = Field(default_factory=MetricsSettings)
    region: str | None = None
    regions: dict[str, RegionSettings] = Field(default_factory=dict)
    sharding: ShardingSettings = Field(default_factory=ShardingSettings)
    shards: list[ShardSettings] = Field(min_length=1)
    pool: PoolSettings = Field(default_factory=PoolSettings)
    routing: RoutingSettings = Field(default_factory=RoutingSettings)
    workers: int = Field(default=1, ge=1)
    tls: TlsSettings = Field(default_factory=TlsSettings)
    server_tls: ServerTlsSettings = Field(default_factory=ServerTlsSettings)
    server_auth: ServerAuthSettings = Field(default_factory=ServerAuthSettings)
    admin_users: list[str] = Field(default_factory=list)
    users: list[UserSettings] = Field(min_length=1)
    log: LogSettings = Field(default_factory=LogSettings)
    fleet: list[str] = Field(default_factory=list)  # the other proxies' admin databases (DSNs): they switch rings too
    reshard: ReshardSettings = Field(default_factory=ReshardSettings)
    shutdown_timeout: Duration = 30.0
    # Private so a "path:" key in the YAML is rejected as unknown.
    _path: str | None = PrivateAttr(default=None)

    @property
    def path(self) -> str | None:
        """The file this config was loaded from."""
        return self._path

    def user(self, name: str) -> UserSettings | None:
        return next((u for u in self.users if u.name == name), None)

    def shard(self, name: str) -> ShardSettings | None:
        return next((s for s in self.shards if s.name == name), None)

    def redacted(self) -> dict[str, Any]:
        """Plain data safe to show to admins: passwords replaced by ``***``."""
        data = self.model_dump(mode="json")
        for user in data["users"]:
            if user["password"] is not None:
                user["password"] = "***"
        if data["routing"]["two_phase_secret"] is not None:
            data["routing"]["two_phase_secret"] = "***"
        data["fleet"] = [redact_dsn(dsn) for dsn in data["fleet"]]
        return data


def redact_dsn(dsn: str) -> str:
    """A DSN with its password, if any, as ``***``."""
    return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", dsn)


def load_config(
    path: str, region: str | None = None, workers: int | None = None
) -> Config:
    """Load ``path``; ``region`` beats $SHARDPROXY_REGION beats the file's."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        raise ConfigError([f"{path}: cannot read: {reason}"]) from None
    overrides: Overrides = {}
    env_region = os.environ.get(ENV_REGION)
    if region is not None:
        overrides["region"] = (region, "--region")
    elif env_region:
        overrides["region"] = (env_region, f"${ENV_REGION}")
    if workers is not None:
        overrides["workers"] = (workers, "--workers")
    return _build(text, path, overrides)


def parse_config(text: str, path: str = "<string>") -> Config:
    """Parse config text; ``path`` only labels the problems."""
    return _build(text, path, {})


def _build(text: str, path: str, overrides: Overrides) -> Config:
    root, data = _compose(text, path)
    lines: dict[Loc, int] = {(): root.start_mark.line + 1 if root else 1}
    found: list[tuple[Loc, str]] = []
    for loc, line in _positions(root, ()) if root else ():
        if loc in lines:
            found.append((loc, "duplicate key"))
        lines[loc] = line
    if isinstance(data, dict):
        data.update({key: value for key, (value, _) in overrides.items()})
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        # include_input=False: a bad value may be a password.
        errors = exc.errors(include_input=False, include_url=False)
        found += [(err["loc"], _message(err["type"], err["msg"])) for err in errors]
    else:
        found += _semantic_problems(config)
    if found:
        found.sort(key=lambda item: _line_of(lines, item[0]))
        sources = {key: source for key, (_, source) in overrides.items()}
        raise ConfigError([_problem(path, lines, sources, *item) for item in found])
    config._path = path
    return config


def _problem(
    path: str, lines: dict[Loc, int], sources: dict[str, str], loc: Loc, message: str
) -> str:
    """``file:line: key.path: message``, naming the override that set the key."""
    if loc and loc[0] in sources:
        message += f" (set by {sources[str(loc[0])]})"
    key = _key_path(loc)
    where = f"{path}:{_line_of(lines, loc)}"
    return f"{where}: {key}: {message}" if key else f"{where}: {message}"


def _compose(text: str, path: str) -> tuple[yaml.Node | None, Any]:
    """The node tree (for line numbers) and the plain data, from one parse."""
    loader = yaml.SafeLoader(text)
    try:
        root = loader.get_single_node()
        data = loader.construct_document(root) if root is not None else {}
    except yaml.YAMLError as exc:
        # Only the problem text: the default str quotes the source line.
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark else 1
        parts = [getattr(exc, "context", None), getattr(exc, "problem", None)]
        detail = ": ".join(part for part in parts if part) or "parse error"
        raise ConfigError([f"{path}:{line}: invalid YAML: {detail}"]) from None
    finally:
        loader.dispose()
    return root, data


def _positions(node: yaml.Node, loc: Loc) -> Iterator[tuple[Loc, int]]:
    """Every key and list item under ``node`` with its 1-based line."""
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            child = (*loc, str(key.value))
            yield child, key.start_mark.line + 1
            yield from _positions(value, child)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            child = (*loc, index)
            yield child, item.start_mark.line + 1
            yield from _positions(item, child)


def _line_of(lines: dict[Loc, int], loc: Loc) -> int:
    """Line of ``loc``, or of its nearest ancestor present in the file."""
    for end in range(len(loc), -1, -1):
        if (line := lines.get(tuple(loc[:end]))) is not None:
            return line
    return 1


def _key_path(loc: Loc) -> str:
    """``("shards", 0, "name")`` -> ``shards[0].name``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else part
    return out


def _message(kind: str, msg: str) -> str:
    """Pydantic's message, minus wording that names Python internals."""
    return _MESSAGES.get(kind) or msg.removeprefix("Value error, ")


def _semantic_problems(config: Config) -> list[tuple[Loc, str]]:
    """Cross-field checks, run once every field has a valid type."""
    return [
        *_shard_problems(config),
        *_region_problems(config),
        *_user_problems(config),
        *_limit_problems(config),
        *_reshard_problems(config),
    ]


MAX_SHARD_NAME_BYTES = 150  # two-phase commits name their first shard, in PostgreSQL's 200-byte gid


def _shard_problems(config: Config) -> Iterator[tuple[Loc, str]]:
    names: set[str] = set()
    owners: dict[str, str] = {}
    for i, shard in enumerate(config.shards):
        if shard.name in names:
            yield ("shards", i, "name"), f"duplicate shard name {shard.name!r}"
        if len(shard.name.encode()) > MAX_SHARD_NAME_BYTES:
            yield ("shards", i, "name"), f"longer than {MAX_SHARD_NAME_BYTES} bytes"
        names.add(shard.name)
        for j, node in enumerate(shard.nodes):
            loc: Loc = ("shards", i, "nodes", j)
            if node.address in owners:
                owner = owners[node.address]
                yield loc, f"node {node.address} is already in shard {owner!r}"
            owners.setdefault(node.address, shard.name)
            if message := _unknown_region(node.region, config):
                yield (*loc, "region"), message


def _region_problems(config: Config) -> Iterator[tuple[Loc, str]]:
    if message := _unknown_region(config.region, config):
        yield ("region",), message
    primaries = [name for name, region in config.regions.items() if region.primary]
    for name in primaries[1:]:
        also = f"more than one primary region (also {primaries[0]!r})"
        yield ("regions", name, "primary"), also


def _unknown_region(name: str | None, config: Config) -> str | None:
    """Why ``name`` is wrong, when ``regions`` is given and lacks it."""
    if not config.regions or name is None or name in config.regions:
        return None
    return f"unknown region {name!r} (regions: {', '.join(config.regions)})"


def _user_problems(config: Config) -> Iterator[tuple[Loc, str]]:
    names: set[str] = set()
    for i, user in enumerate(config.users):
        if user.name in names:
            yield ("users", i, "name"), f"duplicate user {user.name!r}"
        names.add(user.name)
        yield from _password_problems(("users", i), user)
    for i, name in enumerate(config.admin_users):
        if name not in names:
            yield ("admin_users", i), f"{name!r} is not one of users"


def _password_problems(loc: Loc, user: UserSettings) -> Iterator[tuple[Loc, str]]:
    password = user.password
    if password == "":  # PostgreSQL takes none; here it would let in a client that sends an empty one
        yield (*loc, "password"), "empty: leave the key out for no password"
    elif user.auth == "trust":
        return
    elif password is None:
        yield (*loc, "password"), f"auth {user.auth} needs a password"
    elif password.startswith(_SCRAM_PREFIX):
        if not _SCRAM_RE.fullmatch(password):
            yield (*loc, "password"), "malformed SCRAM-SHA-256 verifier"
        elif user.auth == "md5":
            yield (*loc, "auth"), "md5 auth cannot use a SCRAM verifier password"
    elif user.auth == "scram-sha-256" and _MD5_RE.fullmatch(password):
        yield (*loc, "auth"), "scram-sha-256 auth cannot use an md5 hash password"


def _limit_problems(config: Config) -> Iterator[tuple[Loc, str]]:
    if config.pool.min_size > config.pool.size:
        yield ("pool", "min_size"), f"must not exceed pool.size ({config.pool.size})"
    if config.tls.mode != "disable":
        for field in ("cert", "key"):
            if getattr(config.tls, field) is None:
                yield ("tls", field), f"required when tls.mode is {config.tls.mode}"
    if config.server_tls.mode.startswith("verify") and config.server_tls.ca is None:
        yield ("server_tls", "ca"), f"required when server_tls.mode is {config.server_tls.mode}"


def _reshard_problems(config: Config) -> Iterator[tuple[Loc, str]]:
    user = config.reshard.user
    if user is not None and config.user(user) is None:
        yield ("reshard", "user"), f"unknown user {user!r} (not in users)"
    for i, dsn in enumerate(config.fleet):
        if not dsn.startswith(("postgresql://", "postgres://")):
            yield ("fleet", i), "should be a postgresql:// URI of another proxy's admin database"
