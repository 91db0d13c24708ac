"""Config loading: parsing, line-accurate problems, overrides and secrecy."""

import os
import re
import traceback
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from shardproxy.cli import main
from shardproxy.config import (
    ENV_REGION,
    Config,
    ConfigError,
    load_config,
    parse_config,
    parse_duration,
    parse_size,
)

REFERENCE = Path(__file__).resolve().parent.parent / "conf" / "shardproxy.yaml"

BASE = """\
region: east
regions:
  east: {primary: true}
  west: {priority: 2}
shards:
  - name: s0
    nodes:
      - {host: db0, port: 5432, region: east}
  - name: s1
    nodes:
      - {host: db1, port: 5432, region: west}
admin_users: [admin]
users:
  - name: app
    password: hunter2
  - {name: admin, password: adminpw}
"""


def line_of(text: str, needle: str) -> int:
    """1-based line of the first line containing ``needle``."""
    return next(i for i, line in enumerate(text.splitlines(), 1) if needle in line)


def problems_of(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(text, "x.yaml")
    return info.value.problems


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "shardproxy.yaml"
    path.write_text(text)
    return str(path)


@pytest.fixture(autouse=True)
def no_env_region(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_REGION, raising=False)


def test_reference_file_loads() -> None:
    config = load_config(str(REFERENCE))
    assert config.path == str(REFERENCE)
    assert config.region == "us-east-1"
    assert [name for name, r in config.regions.items() if r.primary] == ["us-east-1"]
    assert [s.name for s in config.shards] == ["shard0", "shard1"]
    assert [n.address for n in config.shards[1].nodes] == [
        "127.0.0.1:5434",
        "127.0.0.1:5435",
    ]
    assert config.sharding.reference_tables == ["countries"]
    assert config.pool.server_idle_timeout == 600.0
    assert config.pool.max_message_size == 64 * 1024 * 1024
    assert config.routing.strong_tables == ["audit_log"]
    assert config.admin_users == ["admin"]
    assert config.user("admin") is not None and config.shard("shard1") is not None
    assert config.user("nobody") is None and config.shard("nope") is None


def test_reference_file_documents_every_key() -> None:
    text = REFERENCE.read_text()
    config = load_config(str(REFERENCE))
    assert_keys_present(config.model_dump(), yaml.safe_load(text))
    for number, line in enumerate(text.splitlines(), 1):
        previous = text.splitlines()[number - 2].lstrip() if number > 1 else ""
        if re.match(r"\s*(- )?[\w-]+:", line):
            assert "#" in line or previous.startswith("#"), f"line {number}"


def assert_keys_present(model: Any, data: Any) -> None:
    if isinstance(model, dict):
        assert isinstance(data, dict) and set(model) == set(data)
        for key in model:
            assert_keys_present(model[key], data[key])
    elif isinstance(model, list) and model and isinstance(model[0], dict):
        for item, raw in zip(model, data, strict=True):
            assert_keys_present(item, raw)


def test_defaults() -> None:
    config = parse_config("shards: [{name: s, nodes: [{host: h, port: 1}]}]\n"
                          "users: [{name: u, auth: trust}]\n")
    assert config.listen.port == 6432 and config.metrics.port == 9930
    assert config.pool.idle_transaction_timeout == 0.0
    assert config.routing.consistency == "read_your_writes"
    assert config.workers == 1 and config.shutdown_timeout == 30.0
    assert config.path == "<string>"


@pytest.mark.parametrize(
    ("raw", "seconds"),
    [("500ms", 0.5), ("30s", 30.0), ("5m", 300.0), ("1h", 3600.0), ("1.5s", 1.5),
     ("2", 2.0), (10, 10.0), (0.25, 0.25), (0, 0.0)],
)
def test_durations(raw: Any, seconds: float) -> None:
    assert parse_duration(raw) == seconds


@pytest.mark.parametrize("raw", ["5x", "-1s", "", "s", True, None, -1, [1]])
def test_bad_durations(raw: Any) -> None:
    with pytest.raises(ValueError):
        parse_duration(raw)


@pytest.mark.parametrize(
    ("raw", "size"),
    [(1024, 1024), ("512", 512), ("512B", 512), ("64kB", 65536), ("16MB", 16 << 20),
     ("1gb", 1 << 30)],
)
def test_sizes(raw: Any, size: int) -> None:
    assert parse_size(raw) == size


@pytest.mark.parametrize("raw", ["1.5MB", "64 parsecs", "", True, -1, 1.5])
def test_bad_sizes(raw: Any) -> None:
    with pytest.raises(ValueError):
        parse_size(raw)


def test_durations_and_sizes_in_yaml() -> None:
    text = BASE + "pool: {query_wait_timeout: 250ms, server_lifetime: 2h,\n" \
                  "       max_message_size: 1MB}\nshutdown_timeout: 7\n"
    config = parse_config(text)
    assert config.pool.query_wait_timeout == 0.25
    assert config.pool.server_lifetime == 7200.0
    assert config.pool.max_message_size == 1 << 20
    assert config.shutdown_timeout == 7.0


def test_bad_duration_reported_at_its_line() -> None:
    text = BASE + "routing:\n  consistency: strong\n  failover_timeout: soon\n"
    assert problems_of(text) == [
        f"x.yaml:{line_of(text, 'soon')}: routing.failover_timeout: invalid duration"
        " 'soon': use e.g. 500ms, 30s, 5m, 1h or seconds"
    ]


def test_unknown_key() -> None:
    text = BASE.replace("    password: hunter2", "    password: hunter2\n    role: x")
    line = line_of(text, "role")
    assert problems_of(text) == [f"x.yaml:{line}: users[0].role: unknown key"]


def test_unknown_top_level_path_key() -> None:
    text = BASE + "path: elsewhere.yaml\n"
    assert problems_of(text) == [f"x.yaml:{line_of(text, 'path:')}: path: unknown key"]


def test_wrong_type() -> None:
    text = BASE.replace("port: 5432, region: west", "port: five, region: west")
    [problem] = problems_of(text)
    assert problem.startswith(
        f"x.yaml:{line_of(text, 'five')}: shards[1].nodes[0].port: "
        "Input should be a valid integer"
    )


def test_missing_required_key_reported_at_parent() -> None:
    text = BASE.replace("  - name: s1\n", "  - weight: 2\n")
    assert problems_of(text) == [
        f"x.yaml:{line_of(text, 'weight: 2')}: shards[1].name: Field required"
    ]


def test_missing_top_level_key() -> None:
    text = "users: [{name: u, auth: trust}]\n"
    assert problems_of(text) == ["x.yaml:1: shards: Field required"]


def test_duplicate_shard_names() -> None:
    text = BASE.replace("name: s1", "name: s0")
    assert problems_of(text) == ["x.yaml:9: shards[1].name: duplicate shard name 's0'"]


def test_shard_name_fits_a_two_phase_commit_gid() -> None:
    text = BASE.replace("name: s1", f"name: {'s' * 151}")
    assert problems_of(text) == ["x.yaml:9: shards[1].name: longer than 150 bytes"]


def test_node_in_unknown_region() -> None:
    text = BASE.replace("region: west}", "region: mars}")
    assert problems_of(text) == [
        f"x.yaml:{line_of(text, 'mars')}: shards[1].nodes[0].region: "
        "unknown region 'mars' (regions: east, west)"
    ]


def test_regions_optional() -> None:
    text = re.sub(r"region: east\nregions:\n.*\n.*\n", "", BASE)
    config = parse_config(text.replace("region: west", "region: anywhere"))
    assert config.regions == {} and config.region is None


def test_admin_user_must_be_a_user() -> None:
    text = BASE.replace("admin_users: [admin]", "admin_users: [admin, root]")
    assert problems_of(text) == [
        f"x.yaml:{line_of(text, 'root')}: admin_users[1]: 'root' is not one of users"
    ]


def test_other_cross_field_checks() -> None:
    text = BASE.replace("west: {priority: 2}", "west: {primary: true}").replace(
        "host: db1", "host: db0"
    ) + "pool: {size: 5, min_size: 6}\ntls: {mode: require, key: k.pem}\n"
    assert problems_of(text) == [
        "x.yaml:4: regions.west.primary: more than one primary region (also 'east')",
        "x.yaml:11: shards[1].nodes[0]: node db0:5432 is already in shard 's0'",
        "x.yaml:17: pool.min_size: must not exceed pool.size (5)",
        "x.yaml:18: tls.cert: required when tls.mode is require",
    ]


def test_duplicate_user_and_yaml_key() -> None:
    text = BASE.replace("name: admin,", "name: app,") + "workers: 2\nworkers: 3\n"
    assert problems_of(text) == [
        "x.yaml:12: admin_users[0]: 'admin' is not one of users",
        "x.yaml:16: users[1].name: duplicate user 'app'",
        "x.yaml:18: workers: duplicate key",
    ]


@pytest.mark.parametrize(
    ("user", "problem"),
    [
        ("{name: u}", "users[2].password: auth scram-sha-256 needs a password"),
        ("{name: u, auth: md5}", "users[2].password: auth md5 needs a password"),
        ("{name: u, auth: md5, password: 'SCRAM-SHA-256$4096:c2FsdA==$c3Q=:c2U='}",
         "users[2].auth: md5 auth cannot use a SCRAM verifier password"),
        ("{name: u, password: 'SCRAM-SHA-256$oops'}",
         "users[2].password: malformed SCRAM-SHA-256 verifier"),
        ("{name: u, password: md50123456789abcdef0123456789abcdef}",
         "users[2].auth: scram-sha-256 auth cannot use an md5 hash password"),
        ("{name: u, password: ''}", "users[2].password: empty: leave the key out for no password"),
        ("{name: u, auth: md5, password: ''}", "users[2].password: empty: leave the key out for no password"),
        ("{name: u, auth: trust, password: ''}", "users[2].password: empty: leave the key out for no password"),
    ],
)
def test_user_password_checks(user: str, problem: str) -> None:
    text = BASE + f"  - {user}\n"
    assert problems_of(text) == [f"x.yaml:{line_of(text, '{name: u')}: {problem}"]


@pytest.mark.parametrize(
    "user",
    ["{name: u, auth: trust}",
     "{name: u, auth: md5, password: md50123456789abcdef0123456789abcdef}",
     "{name: u, password: 'SCRAM-SHA-256$4096:c2FsdA==$c3Q=:c2U='}",
     "{name: u, auth: md5, password: 12345}"],
)
def test_valid_users(user: str) -> None:
    assert parse_config(BASE + f"  - {user}\n").user("u") is not None


def test_check_refuses_an_empty_password(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, BASE + "  - {name: u, password: ''}\n")
    assert main(["check", "-c", path]) == 2
    assert "users[2].password: empty" in capsys.readouterr().err


@pytest.mark.parametrize(("environment", "uid", "expected"), [
    ({"XDG_RUNTIME_DIR": "/run/user/1000"}, 1000, "/run/user/1000/shardproxy/admin.sock"),
    ({}, 0, "/run/shardproxy/admin.sock"),
    ({}, 1000, "/tmp/shardproxy-1000/admin.sock"),
])
def test_the_default_admin_socket_is_in_a_directory_of_its_own(monkeypatch: pytest.MonkeyPatch,
                                                                environment: dict[str, str], uid: int,
                                                                expected: str) -> None:
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    for key, value in environment.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(os, "geteuid", lambda: uid)
    config = parse_config("shards: [{name: s, nodes: [{host: h, port: 1}]}]\nusers: [{name: u, auth: trust}]\n")
    assert config.admin.socket == expected


def test_a_server_connection_has_room_for_a_prepared_statement() -> None:
    """0 would close each statement as soon as it is prepared, before its Bind."""
    text = BASE + "pool: {prepared_statements_per_server: 0}\n"
    assert problems_of(text) == [f"x.yaml:{line_of(text, 'pool:')}: pool.prepared_statements_per_server: "
                                 "Input should be greater than or equal to 1"]


def test_several_problems_all_reported() -> None:
    text = BASE.replace("  - name: s1\n", "  - weight: 0\n").replace(
        "port: 5432, region: east", "port: x, region: east"
    ) + "log: {level: loud}\nbogus: 1\n"
    assert [p.split(": ")[0:2] for p in problems_of(text)] == [
        [f"x.yaml:{line_of(text, 'port: x')}", "shards[0].nodes[0].port"],
        [f"x.yaml:{line_of(text, 'weight: 0')}", "shards[1].name"],
        [f"x.yaml:{line_of(text, 'weight: 0')}", "shards[1].weight"],
        [f"x.yaml:{line_of(text, 'loud')}", "log.level"],
        [f"x.yaml:{line_of(text, 'bogus')}", "bogus"],
    ]


def test_several_cross_field_problems_all_reported() -> None:
    text = BASE.replace("name: s1", "name: s0").replace("west}", "mars}")
    text = text.replace("[admin]", "[root]")
    assert problems_of(text) == [
        "x.yaml:9: shards[1].name: duplicate shard name 's0'",
        "x.yaml:11: shards[1].nodes[0].region: unknown region 'mars'"
        " (regions: east, west)",
        "x.yaml:12: admin_users[0]: 'root' is not one of users",
    ]


def test_yaml_syntax_error_line() -> None:
    text = BASE.replace("    password: hunter2", "    password: [hunter2")
    [problem] = problems_of(text)
    line = line_of(text, "[hunter2")
    assert problem.startswith(f"x.yaml:{line + 1}: invalid YAML: ")


def test_top_level_must_be_mapping() -> None:
    assert problems_of("- a\n") == ["x.yaml:1: should be a mapping"]


def test_missing_file(tmp_path: Path) -> None:
    missing = str(tmp_path / "absent.yaml")
    with pytest.raises(ConfigError) as info:
        load_config(missing)
    assert info.value.problems == [f"{missing}: cannot read: No such file or directory"]


def test_region_override_precedence(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(tmp_path, BASE)
    assert load_config(path).region == "east"
    monkeypatch.setenv(ENV_REGION, "west")
    assert load_config(path).region == "west"
    assert load_config(path, region="east").region == "east"


def test_workers_override(tmp_path: Path) -> None:
    path = write(tmp_path, BASE + "workers: 2\n")
    assert load_config(path).workers == 2
    assert load_config(path, workers=8).workers == 8


def test_bad_override_names_its_source(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(tmp_path, BASE)
    with pytest.raises(ConfigError) as info:
        load_config(path, region="mars")
    assert info.value.problems == [
        f"{path}:1: region: unknown region 'mars' (regions: east, west)"
        " (set by --region)"
    ]
    monkeypatch.setenv(ENV_REGION, "mars")
    with pytest.raises(ConfigError, match=r"set by \$SHARDPROXY_REGION"):
        load_config(path)


def test_passwords_never_shown() -> None:
    config = parse_config(BASE)
    assert config.user("app").password == "hunter2"  # type: ignore[union-attr]
    for shown in (repr(config), str(config), repr(config.users), str(config.users[0])):
        assert "hunter2" not in shown and "adminpw" not in shown


@pytest.mark.parametrize(
    "broken",
    [
        "    password: hunter2\n    extra: 1",
        "    password: hunter2\n    auth: [hunter2]",
        "    password: {hunter2: 1}",
        "    password: 'SCRAM-SHA-256$hunter2'",
        "    password: hunter2: x",
    ],
)
def test_passwords_not_in_errors(broken: str) -> None:
    text = BASE.replace("    password: hunter2", broken)
    with pytest.raises(ConfigError) as info:
        parse_config(text)
    formatted = "".join(traceback.format_exception(info.value))
    assert "hunter2" not in formatted and "adminpw" not in formatted


def test_redacted_hides_passwords() -> None:
    config = parse_config(BASE + "  - {name: guest, auth: trust}\n")
    data = config.redacted()
    assert [u["password"] for u in data["users"]] == ["***", "***", None]
    assert data["shards"][0]["nodes"][0]["port"] == 5432
    assert "hunter2" not in repr(data)


def test_config_is_frozen() -> None:
    config = parse_config(BASE)
    with pytest.raises(ValidationError):
        config.workers = 4  # type: ignore[misc]
    assert isinstance(config, Config)
