"""What the proxy builds into SQL from a client's session parameters: names that stay names, values that stay
values, whatever standard_conforming_strings and the client encoding say."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import psycopg
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shardproxy.datapath.params import identifier, literal, startup_values, tracked_set
from shardproxy.devtools.sandbox import Cluster, ProxyProcess, Sandbox
from shardproxy.wire.protocol import PostgresError
from tests.support import APP_DB
from tests.support.wire import TRUST_USERS, message, startup_packet

NASTY = ["it's", "back\\slash", "\\'; DROP TABLE x; --", "$shardproxy$", "$$", "é", "日本", "\U0001f600", "a\nb\tc",
         "E'x'", "\\u0041", "'", "\\", ""]


def test_a_literal_is_printable_ascii_in_an_escape_string() -> None:
    for value in NASTY:
        text = literal(value)
        assert text.startswith("E'") and text.endswith("'")
        inner = text[2:-1]
        assert inner.isascii() and inner.isprintable() and "'" not in inner and "$" not in inner


@pytest.mark.parametrize("name", ["x; CREATE TABLE t (); --", "a b", "1abc", "a..b", "a.", "", "tag\n", "é"])
def test_a_startup_parameter_that_is_not_a_plain_name_is_refused(name: str) -> None:
    with pytest.raises(PostgresError) as refused:
        startup_values({name: "1"})
    assert refused.value.code == "42602"


def test_startup_names_are_quoted_and_keywords_stay_names() -> None:
    _, statements = startup_values({"all": "1", "myapp.tag": "v", "options": "-c work_mem=3MB"})
    assert statements == {"all": f'SET "all" TO {literal("1")}', "myapp.tag": f'SET "myapp.tag" TO {literal("v")}',
                          "work_mem": f'SET "work_mem" TO {literal("3MB")}'}
    assert identifier('a"b') == '"a""b"'


@pytest.mark.parametrize("sql", ["SET search_path TO 'a\\', public", "SET search_path TO E'a\\'b'",
                                 "SET search_path = $$a$$", "set search_path to $q$x;y$q$"])
def test_a_set_that_settings_could_read_otherwise_is_not_kept(sql: str) -> None:
    """Replayed on another server connection, a backslash or a dollar quote could be read otherwise there."""
    assert tracked_set(sql) is None


def test_a_plain_set_is_kept_as_written() -> None:
    assert tracked_set("SET search_path TO \"$user\", 'x y', public") == (
        "search_path", "SET search_path TO \"$user\", 'x y', public")


@pytest.fixture(scope="module")
def direct(pg: Cluster) -> Iterator[psycopg.Connection]:
    with psycopg.connect(pg.primary.dsn(), autocommit=True) as conn:
        yield conn


@pytest.mark.parametrize("conforming", ["on", "off"])
def test_a_literal_reads_back_as_its_value(direct: psycopg.Connection, conforming: str) -> None:
    direct.execute(f"SET standard_conforming_strings = {conforming}")

    @settings(max_examples=200, deadline=None, database=None)
    @given(st.one_of(st.sampled_from(NASTY), st.text(st.characters(exclude_characters="\0", codec="utf-8"))))
    def round_trip(value: str) -> None:
        assert direct.execute(f"SELECT {literal(value)}", prepare=False).fetchone() == (value,)

    round_trip()


# -- end to end ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def one_server(sandbox: Sandbox, pg: Cluster) -> Iterator[ProxyProcess]:
    """Every client on the same server connection: one client's settings are there when the next comes. Trust
    logins, for raw sockets."""
    proxy = sandbox.proxy("params-one-server", [pg], start=False, admin_users=[], pool={"size": 1})
    proxy.write_config({**proxy.config, "users": TRUST_USERS})
    proxy.start()
    yield proxy
    proxy.stop()


def tables_named(pg: Cluster, name: str) -> int:
    return int(pg.primary.sql(f"SELECT count(*) FROM pg_class WHERE relname = '{name}'", dbname=APP_DB)[0][0])


def test_a_parameter_name_runs_no_sql(one_server: ProxyProcess, pg: Cluster) -> None:
    """A startup parameter whose name carries statements is refused (42602) rather than replayed in a SET."""
    name = "application_name = 'a'; CREATE TABLE params_pwned (); SET x.y"
    packet = startup_packet(user="app", database=APP_DB, **{name: "1"}) + message(b"Q", b"SELECT 1\0")
    with socket.create_connection((one_server.host, one_server.port), timeout=5) as sock:
        sock.sendall(packet)
        replies = b""
        while chunk := sock.recv(65536):
            replies += chunk
    assert b"C42602" in replies and b"invalid configuration parameter name" in replies
    with psycopg.connect(one_server.dsn(dbname=APP_DB), autocommit=True) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
    assert tables_named(pg, "params_pwned") == 0


def test_values_stay_values_on_a_session_without_standard_conforming_strings(one_server: ProxyProcess,
                                                                               pg: Cluster) -> None:
    """The server connection has standard_conforming_strings off (a client before asked for it), where a
    backslash escapes a quote: the next client's values still arrive as they are, and run nothing."""
    evil = "a\\'; CREATE TABLE params_pwned2 (); --"
    dsn = one_server.dsn(dbname=APP_DB)
    with psycopg.connect(dsn, autocommit=True, options="-c standard_conforming_strings=off") as first:
        assert first.execute("SHOW standard_conforming_strings").fetchone() == ("off",)
    options = "-c standard_conforming_strings=off -c myapp.note=" + evil.replace("\\", "\\\\").replace(" ", "\\ ")
    with psycopg.connect(dsn, autocommit=True, application_name=evil, options=options) as second:
        row = second.execute("SELECT current_setting('application_name'), current_setting('myapp.note')").fetchone()
    assert row == (evil, evil)
    assert tables_named(pg, "params_pwned2") == 0
