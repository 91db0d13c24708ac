"""Hostile clients: fuzzed byte streams, slow and stuck clients, and a connection storm over the limit.

Each test runs its own proxy daemon in front of the session's shared server and checks that the proxy
stays alive, answers or hangs up on the abuser within a bound, keeps serving a well-behaved client
connected throughout, and does not grow without bound.
"""

from __future__ import annotations

import asyncio
import base64
import resource
import socket
import struct
import time
from collections import Counter
from collections.abc import Callable

import psycopg
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from shardproxy.devtools.sandbox import Cluster, ProxyProcess, Sandbox, wait_until
from shardproxy.devtools.workload import rss_kb
from shardproxy.wire.auth import ScramClientExchange
from tests.support import APP_DB
from tests.support.admin import table
from tests.support.wire import TRUST_USERS, connect_soon, error_codes, message, startup_packet

pytestmark = pytest.mark.e2e  # against servers and proxies the test starts itself

FUZZ_EXAMPLES = 1000
SLOW_EXAMPLES = 150
CLOSE_WITHIN = 3.0  # seconds from the abuser's last byte (and half-close) to the proxy hanging up
RSS_SLACK_KB = 40 * 1024


def hostile_proxy(sandbox: Sandbox, pg: Cluster | list[Cluster], name: str, **pool: object) -> ProxyProcess:
    """A proxy with trust logins for raw sockets, a 1MB message limit and a 2s login timeout, failed logins (the
    fuzzer's, all from one address) not slowed; over several clusters, each a shard."""
    settings_ = {"size": 4, "max_message_size": "1MB", "client_login_timeout": "2s", "query_wait_timeout": "5s",
                 "auth_failure_delay": 0}
    clusters = pg if isinstance(pg, list) else [pg]
    proxy = sandbox.proxy(name, clusters, start=False, admin_users=[], pool={**settings_, **pool})
    proxy.write_config({**proxy.config, "users": TRUST_USERS})
    proxy.start()
    return proxy


def read_until_closed(sock: socket.socket, deadline: float) -> bytes:
    """Everything the proxy sends until it hangs up; raises TimeoutError past the deadline."""
    received = bytearray()
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"still open; got {bytes(received[:200])!r}")
        sock.settimeout(left)
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return bytes(received)
        except TimeoutError:
            raise TimeoutError(f"still open; got {bytes(received[:200])!r}") from None
        if not chunk:
            return bytes(received)
        received += chunk


def split_messages(data: bytes) -> list[tuple[bytes, bytes]]:
    """Backend messages, as far as they frame (a one-byte 'N' answer to SSLRequest is skipped)."""
    out = []
    pos = 0
    while len(data) - pos >= 5:
        if data[pos:pos + 1] == b"N" and pos == 0 and data[1:2] in (b"E", b"R", b""):
            pos += 1
            continue
        (length,) = struct.unpack_from("!I", data, pos + 1)
        out.append((data[pos:pos + 1], data[pos + 5:pos + 1 + length]))
        pos += 1 + length
    return out


# -- the fuzzer -------------------------------------------------------------------------------------------------
def _parse(name: bytes, sql: bytes, types: list[int]) -> bytes:
    return message(b"P", name + b"\0" + sql + b"\0" + struct.pack("!H", len(types))
                   + b"".join(struct.pack("!I", t) for t in types))


def _bind(portal: bytes, statement: bytes, values: list[bytes]) -> bytes:
    params = b"".join(struct.pack("!i", len(v)) + v for v in values)
    return message(b"B", portal + b"\0" + statement + b"\0" + struct.pack("!H", 0)
                   + struct.pack("!H", len(values)) + params + struct.pack("!H", 0))


VALID = [
    message(b"Q", b"SELECT 1\0"),
    message(b"Q", b"\0"),
    message(b"Q", b"BEGIN\0"),
    message(b"Q", b"COMMIT\0"),
    message(b"Q", b"ROLLBACK\0"),
    message(b"Q", b"SELECT generate_series(1, 50)\0"),
    message(b"Q", b"COPY (SELECT 1) TO STDOUT\0"),
    message(b"Q", b"SET application_name = 'fuzzed'\0"),
    message(b"Q", b"SELECT 1; SELECT 2\0"),
    _parse(b"", b"SELECT $1::int", [23]),
    _parse(b"fz", b"SELECT 2", []),
    _bind(b"", b"", [b"7"]),
    _bind(b"", b"fz", []),
    message(b"D", b"S\0"),
    message(b"D", b"Sfz\0"),
    message(b"D", b"P\0"),
    message(b"E", b"\0" + struct.pack("!I", 0)),
    message(b"S", b""),
    message(b"H", b""),
    message(b"C", b"Sfz\0"),
    message(b"C", b"P\0"),
    message(b"d", b"copy data"),
    message(b"c", b""),
    message(b"f", b"copy failed\0"),
    message(b"F", struct.pack("!IHHIH", 1, 0, 0, 0, 0)),
    message(b"p", b"password\0"),
    # Statements with a shard key, which a sharded proxy reads from the text or from the Bind.
    message(b"Q", b"SELECT * FROM fuzz_keys WHERE user_id = 7\0"),
    _parse(b"key", b"SELECT * FROM fuzz_keys WHERE user_id = $1", [20]),
    _bind(b"", b"key", [b"42"]),
]
GOOD_STARTUP = startup_packet(user="app", database=APP_DB, application_name="fuzz")
SSL_REQUEST = struct.pack("!II", 8, 80877103)
GSS_REQUEST = struct.pack("!II", 8, 80877104)


def _with_length(frame: bytes, length: int) -> bytes:
    return frame[:1] + struct.pack("!I", length & 0xFFFFFFFF) + frame[5:]


valid = st.sampled_from(VALID)
mutated = st.one_of(
    st.builds(lambda f, d: _with_length(f, len(f) - 1 + d), valid, st.integers(-8, 8).filter(bool)),
    st.builds(lambda t, n: bytes([t]) + struct.pack("!I", n), st.integers(0, 255), st.integers(2**20, 2**32 - 1)),
    st.builds(lambda f, cut: f[:cut], valid, st.integers(1, 12)),
    st.builds(lambda f, t: bytes([t]) + f[1:], valid, st.integers(0, 255)),
    st.builds(lambda t, body: message(bytes([t]), body), st.integers(0, 255), st.binary(max_size=40)),
    st.binary(min_size=1, max_size=200),
    st.just(GOOD_STARTUP),
    st.builds(lambda tail: message(b"X", b"") + tail, st.binary(min_size=1, max_size=40)),
    st.builds(lambda value: _bind(b"", b"key", [value]), st.binary(max_size=12)),  # any key bytes, text format
    st.builds(lambda value, fmt: message(b"B", b"\0key\0" + struct.pack("!HHH", 1, fmt, 1)
                                         + struct.pack("!i", len(value)) + value + struct.pack("!H", 0)),
              st.binary(max_size=12), st.integers(0, 3)),  # any key bytes, in any format code
    st.builds(lambda text: message(b"Q", b"SELECT * FROM fuzz_keys WHERE user_id = " + text + b"\0"),
              st.binary(max_size=24).filter(lambda text: b"\0" not in text)),
)
startups = st.one_of(
    st.just(GOOD_STARTUP),
    st.just(GOOD_STARTUP),
    st.just(GOOD_STARTUP),
    st.builds(lambda s: SSL_REQUEST + s, st.sampled_from([GOOD_STARTUP, SSL_REQUEST, b""])),
    st.just(GSS_REQUEST + GOOD_STARTUP),
    st.builds(lambda a, b: struct.pack("!IIII", 16, 80877102, a, b), st.integers(0, 2**32 - 1),
              st.integers(0, 2**32 - 1)),  # a cancel request for a random key
    st.builds(lambda d: struct.pack("!I", len(GOOD_STARTUP) + d) + GOOD_STARTUP[4:], st.integers(-12, 12)),
    st.builds(lambda v: struct.pack("!I", len(GOOD_STARTUP)) + struct.pack("!I", v) + GOOD_STARTUP[8:],
              st.integers(0, 2**32 - 1)),  # another protocol version
    st.builds(lambda p: startup_packet(**p), st.dictionaries(st.sampled_from(["user", "database", "options", "x"]),
                                                             st.text(max_size=12).filter(lambda s: "\0" not in s))),
    st.binary(max_size=64),
)
streams = st.tuples(startups, st.lists(st.one_of(valid, valid, mutated), max_size=8))


def with_keyed_table(cluster: Cluster) -> Cluster:
    """The table the fuzzer's keyed statements read."""
    cluster.primary.sql("CREATE TABLE IF NOT EXISTS fuzz_keys (user_id bigint)", dbname=APP_DB)
    cluster.primary.sql("GRANT ALL ON fuzz_keys TO app", dbname=APP_DB)
    return cluster


@pytest.fixture(scope="module")
def fuzz_proxy(sandbox: Sandbox, pg: Cluster) -> ProxyProcess:
    return hostile_proxy(sandbox, with_keyed_table(pg), "hostile-fuzz")


@pytest.fixture(scope="module")
def sharded_fuzz_proxy(sandbox: Sandbox, pg: Cluster) -> ProxyProcess:
    """The same over two shards: every statement goes through the router, which reads Queries and Binds."""
    other = sandbox.cluster("hostile-shard")
    other.primary.sql(f"CREATE DATABASE {APP_DB} OWNER app")
    return hostile_proxy(sandbox, [with_keyed_table(pg), with_keyed_table(other)], "hostile-fuzz-sharded")


@pytest.mark.parametrize("proxy_fixture", ["fuzz_proxy", "sharded_fuzz_proxy"])
def test_fuzzed_streams_never_hang_or_hurt_the_proxy(proxy_fixture: str, request: pytest.FixtureRequest) -> None:
    proxy: ProxyProcess = request.getfixturevalue(proxy_fixture)
    pid = proxy.process.pid
    bystander = psycopg.connect(proxy.dsn(dbname=APP_DB), autocommit=True)
    cases = {"run": 0, "errors": 0, "closed_by_proxy": 0}

    def run(stream: tuple[bytes, list[bytes]]) -> None:
        startup, frames = stream
        sock = socket.create_connection((proxy.host, proxy.port), timeout=CLOSE_WITHIN)
        try:
            try:
                sock.sendall(startup + b"".join(frames))
                sock.shutdown(socket.SHUT_WR)  # whatever was incomplete stays so: the proxy sees the end
            except (BrokenPipeError, ConnectionResetError):
                pass  # the proxy hung up already
            received = read_until_closed(sock, time.monotonic() + CLOSE_WITHIN)
        finally:
            sock.close()
        if b"E" in [kind for kind, _ in split_messages(received)]:
            cases["errors"] += 1
        assert proxy.process.poll() is None, proxy.log()[-3000:]
        assert bystander.execute("SELECT 41 + 1").fetchone() == (42,)

    @settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(streams)
    def one_stream(stream: tuple[bytes, list[bytes]]) -> None:
        cases["run"] += 1
        run(stream)

    for _ in range(20):  # warm up: first connections, pools and caches allocate their memory
        run((GOOD_STARTUP, [VALID[0], VALID[5]]))
    before = rss_kb(pid)
    one_stream()
    after = rss_kb(pid)
    print(f"fuzz: {cases['run']} streams, {cases['errors']} answered with an ErrorResponse; "
          f"RSS {before} kB -> {after} kB")
    assert cases["run"] >= FUZZ_EXAMPLES
    assert after - before < RSS_SLACK_KB
    assert bystander.execute("SELECT 'still serving'").fetchone() == ("still serving",)
    bystander.close()
    log = proxy.log()  # every stream was refused or served, none crashed
    assert "Traceback" not in log, log[log.index("Traceback") - 600:log.index("Traceback") + 2500]


def test_fatal_frame_after_valid_ones_is_refused_without_waiting_for_the_end(fuzz_proxy: ProxyProcess) -> None:
    """Valid frames, then one no server could accept: 08P01 and a hang-up while the socket stays open."""
    invalid_types = [t for t in range(256) if bytes([t]) not in b"BCDEFHPQSXcdfp"]

    @settings(max_examples=60, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(st.lists(st.sampled_from([f for f in VALID if f[:1] not in b"dcfp"]), max_size=5),
           st.one_of(st.builds(lambda t: message(bytes([t]), b"junk"), st.sampled_from(invalid_types)),
                     st.builds(lambda n: b"Q" + struct.pack("!I", n), st.integers(2**20 + 5, 2**31 - 1))))
    def one_stream(frames: list[bytes], fatal: bytes) -> None:
        sock = socket.create_connection((fuzz_proxy.host, fuzz_proxy.port), timeout=CLOSE_WITHIN)
        try:
            sock.sendall(GOOD_STARTUP + b"".join(frames) + fatal)
            received = read_until_closed(sock, time.monotonic() + CLOSE_WITHIN)
        finally:
            sock.close()
        assert "08P01" in error_codes(split_messages(received))
        assert fuzz_proxy.process.poll() is None

    one_stream()


def exchange(proxy: ProxyProcess, data: bytes, until: bytes = b"") -> list[tuple[bytes, bytes]]:
    """What the proxy answers to data sent at once, up to a message of type `until`, else to its hang-up."""
    sock = socket.create_connection((proxy.host, proxy.port), timeout=CLOSE_WITHIN)
    received = b""
    try:
        sock.sendall(data)
        while chunk := sock.recv(65536):
            received += chunk
            if until and until in [kind for kind, _ in split_messages(received)]:
                break
        return split_messages(received)
    finally:
        sock.close()


@pytest.mark.parametrize("proxy_fixture", ["fuzz_proxy", "sharded_fuzz_proxy"])
def test_startup_packet_sent_with_the_ssl_request_is_read_as_one(proxy_fixture: str,
                                                                 request: pytest.FixtureRequest) -> None:
    """A client may send its startup packet before reading the answer to SSLRequest (N, without TLS)."""
    proxy: ProxyProcess = request.getfixturevalue(proxy_fixture)
    for encryption_request in (SSL_REQUEST, GSS_REQUEST):
        replies = exchange(proxy, encryption_request + GOOD_STARTUP + VALID[0], until=b"C")
        assert error_codes(replies) == []
        assert (b"D", struct.pack("!HI", 1, 1) + b"1") in replies  # SELECT 1 answered


@pytest.mark.parametrize("proxy_fixture", ["fuzz_proxy", "sharded_fuzz_proxy"])
def test_messages_cut_short_are_refused(proxy_fixture: str, request: pytest.FixtureRequest) -> None:
    """A Parse cut short in its text or its parameter types, a Query without text: 08P01, not an internal
    error, routed or not, first in a batch or after another message."""
    proxy: ProxyProcess = request.getfixturevalue(proxy_fixture)
    whole = _parse(b"cut", b"SELECT $1::int", [23])[5:]
    cut = [message(b"P", body) for body in (b"", whole[:8], whole[:-5], whole[:-1], b"\0SELECT 1")]
    for frame in [*cut, message(b"Q", b"")]:
        for before in (b"", VALID[9]):  # alone, or after an unnamed Parse
            for then in (message(b"S", b""), _bind(b"", b"cut", [b"1"]) + message(b"S", b"")):
                replies = exchange(proxy, GOOD_STARTUP + before + frame + then)
                assert error_codes(replies) == ["08P01"], (frame, replies)
    assert "Traceback" not in proxy.log()


@pytest.mark.parametrize("proxy_fixture", ["fuzz_proxy", "sharded_fuzz_proxy"])
def test_terminate_after_pipelined_statements_comes_after_their_answers(proxy_fixture: str,
                                                                       request: pytest.FixtureRequest) -> None:
    """As with PostgreSQL, statements sent together with a Terminate are answered before the connection
    closes: a slow Query, then an extended batch."""
    proxy: ProxyProcess = request.getfixturevalue(proxy_fixture)
    statements = (message(b"Q", b"SELECT 5 FROM pg_sleep(0.2)\0") + _parse(b"", b"SELECT $1::int", [23])
                  + _bind(b"", b"", [b"7"]) + message(b"E", b"\0\0\0\0\0") + message(b"S", b""))
    replies = exchange(proxy, GOOD_STARTUP + statements + message(b"X", b""))  # read to the hang-up
    after_login = replies[[kind for kind, _ in replies].index(b"Z") + 1:]
    assert [kind for kind, _ in after_login] == [b"T", b"D", b"C", b"Z", b"1", b"2", b"D", b"C", b"Z"], replies
    assert [body for kind, body in after_login if kind == b"D"] == [struct.pack("!HI", 1, 1) + b"5",
                                                                    struct.pack("!HI", 1, 1) + b"7"]
    assert "Traceback" not in proxy.log()


@pytest.mark.parametrize("proxy_fixture", ["fuzz_proxy", "sharded_fuzz_proxy"])
def test_terminate_in_a_batch_with_no_sync_ends_the_session_at_once(proxy_fixture: str,
                                                                     request: pytest.FixtureRequest) -> None:
    """A Terminate after extended messages with no Sync: the server holds their answers until a Sync that never
    comes, so, as PostgreSQL does, the session ends at once, and its server connection does not stay linked."""
    proxy: ProxyProcess = request.getfixturevalue(proxy_fixture)
    batch = _parse(b"", b"SELECT $1::int", [23]) + _bind(b"", b"", [b"7"]) + message(b"E", b"\0\0\0\0\0")
    for _ in range(5):  # more than the pool's 4 server connections, were they kept
        exchange(proxy, GOOD_STARTUP + message(b"Q", b"SELECT 1\0") + batch + message(b"X", b""))
    assert wait_until(lambda: not table(proxy, "SHOW CLIENTS"), 3), table(proxy, "SHOW CLIENTS")
    with psycopg.connect(proxy.dsn(dbname=APP_DB), autocommit=True) as conn:
        assert conn.execute("SELECT 41 + 1").fetchone() == (42,)


@pytest.mark.parametrize("proxy_fixture", ["fuzz_proxy", "sharded_fuzz_proxy"])
def test_an_error_skips_the_answers_the_proxy_would_give_itself(proxy_fixture: str,
                                                                request: pytest.FixtureRequest) -> None:
    """After an error PostgreSQL ignores the rest of the batch: a Parse the proxy would answer itself (its
    statement is prepared on the server already) gets no answer either, and costs no internal error."""
    proxy: ProxyProcess = request.getfixturevalue(proxy_fixture)
    prepare = _parse(b"skip1", b"SELECT 11", []) + message(b"S", b"")
    failing = _bind(b"", b"skip0", []) + _parse(b"skip2", b"SELECT 11", []) + message(b"S", b"")  # no skip0
    replies = exchange(proxy, GOOD_STARTUP + prepare + failing + message(b"X", b""))
    after_login = replies[[kind for kind, _ in replies].index(b"Z") + 1:]
    assert [kind for kind, _ in after_login] == [b"1", b"Z", b"E", b"Z"], replies
    assert error_codes(after_login) == ["26000"]
    assert "Traceback" not in proxy.log()


# -- the SCRAM exchange -----------------------------------------------------------------------------------------
SCRAM_EXAMPLES = 300
SCRAM_USERS = {"app": "secret", "admin": "adminpw"}  # admin is configured by its verifier only


def sasl_initial(mechanism: bytes, client_first: bytes, length_delta: int = 0, extra: bytes = b"") -> bytes:
    return message(b"p", mechanism + b"\0" + struct.pack("!i", len(client_first) + length_delta) + client_first
                   + extra)


def _with_nonce(client_first: bytes, nonce: bytes) -> bytes:
    return client_first.rpartition(b"r=")[0] + b"r=" + nonce


# Each mutation takes the good message (SASLInitialResponse: client-first; SASLResponse: client-final) and
# returns the frame sent instead, or None to send the good one. The expected answer is 08P01 or a hang-up,
# except after a well-formed but wrong proof: 28P01.
_printable = st.text(st.characters(min_codepoint=33, max_codepoint=126, exclude_characters=","), min_size=1,
                     max_size=20).map(str.encode)
_frame_cuts = st.integers(1, 40)
initial_mutations = st.one_of(
    st.builds(lambda m: lambda cf: sasl_initial(m, cf),
              st.sampled_from([b"SCRAM-SHA-256-PLUS", b"PLAIN", b"", b"scram-sha-256", b"SCRAM-SHA-256\xff"])),
    st.builds(lambda bad: lambda cf: sasl_initial(b"SCRAM-SHA-256", bad), st.sampled_from([
        b"p=tls-server-end-point,,n=,r=abc", b"x,,n=,r=abc", b"n,a=someone,n=,r=abc", b"n=,r=abc", b"n,,r=abc",
        b"n,,n=", b"n,,n=,r=", b"n,,n=,r=a b", b"n,,n=,r=\xff\xfe", b"n,,", b"n", b"", b"n,,m=ext,n=,r=abc",
    ])),
    st.builds(lambda noise: lambda cf: sasl_initial(b"SCRAM-SHA-256", noise), st.binary(max_size=60)),
    st.builds(lambda d: lambda cf: sasl_initial(b"SCRAM-SHA-256", cf, d), st.integers(-40, 40).filter(bool)),
    st.builds(lambda tail: lambda cf: sasl_initial(b"SCRAM-SHA-256", cf, extra=tail), st.binary(min_size=1,
                                                                                               max_size=20)),
    st.builds(lambda cut: lambda cf: sasl_initial(b"SCRAM-SHA-256", cf)[:cut], _frame_cuts),
    st.just(lambda cf: message(b"p", b"SCRAM-SHA-256")),  # no NUL, no length
    st.builds(lambda t: lambda cf: bytes([t]) + sasl_initial(b"SCRAM-SHA-256", cf)[1:],
              st.integers(0, 255).filter(lambda t: t != ord("p"))),
    st.builds(lambda n: lambda cf: b"p" + struct.pack("!I", n), st.integers(2**20 + 5, 2**32 - 1)),
)


def _flip_proof(final: bytes, index: int) -> bytes:
    head, _, proof = final.rpartition(b",p=")
    raw = bytearray(base64.b64decode(proof))
    raw[index % len(raw)] ^= 0x01
    return head + b",p=" + base64.b64encode(bytes(raw))


final_mutations = st.one_of(
    st.builds(lambda i: lambda f: message(b"p", _flip_proof(f, i)), st.integers(0, 31)),  # the one 28P01 case
    st.builds(lambda nonce: lambda f: message(b"p", f.replace(f.split(b",")[1], b"r=" + nonce, 1)), _printable),
    st.builds(lambda proof: lambda f: message(b"p", f.rpartition(b",p=")[0] + b",p=" + proof), st.sampled_from([
        b"", b"!!!not base64!!!", base64.b64encode(b"x" * 31), base64.b64encode(b"x" * 33), b"YWJj", b"=",
    ])),
    st.builds(lambda cbind: lambda f: message(b"p", cbind + f[f.index(b","):]),
              st.sampled_from([b"c=eSws", b"c=", b"c=cD10bHMtc2VydmVyLWVuZC1wb2ludCws", b"x=biws", b""])),
    st.just(lambda f: message(b"p", f.rpartition(b",p=")[0])),  # no proof
    st.builds(lambda tail: lambda f: message(b"p", f + tail), st.binary(min_size=1, max_size=20)),
    st.builds(lambda noise: lambda f: message(b"p", noise), st.binary(max_size=80)),
    st.builds(lambda cut: lambda f: message(b"p", f)[:cut], _frame_cuts),
    st.builds(lambda t: lambda f: bytes([t]) + message(b"p", f)[1:],
              st.integers(0, 255).filter(lambda t: t != ord("p"))),
    st.builds(lambda n: lambda f: b"p" + struct.pack("!I", n), st.integers(2**20 + 5, 2**32 - 1)),
)
scram_cases = st.tuples(st.sampled_from(sorted(SCRAM_USERS)), st.one_of(
    st.tuples(st.just("initial"), initial_mutations), st.tuples(st.just("final"), final_mutations)))


@pytest.fixture(scope="module")
def scram_proxy(sandbox: Sandbox, pg: Cluster) -> ProxyProcess:
    """`app` with a plaintext password, `admin` with the SCRAM verifier the server stores: both scram-sha-256."""
    verifier = pg.primary.sql("SELECT rolpassword FROM pg_authid WHERE rolname = 'admin'")[0][0]
    proxy = sandbox.proxy("hostile-scram", [pg], start=False, admin_users=[],
                          pool={"size": 4, "max_message_size": "1MB", "client_login_timeout": "2s",
                                "auth_failure_delay": 0})  # hundreds of failed logins, from one address
    users = [{"name": "app", "password": "secret", "auth": "scram-sha-256"},
             {"name": "admin", "password": verifier, "auth": "scram-sha-256"}]
    proxy.write_config({**proxy.config, "users": users})
    proxy.start()
    return proxy


class ScramAbuser:
    """A raw-socket SCRAM client that follows the exchange up to the message it replaces."""

    def __init__(self, proxy: ProxyProcess, user: str) -> None:
        self.sock = socket.create_connection((proxy.host, proxy.port), timeout=CLOSE_WITHIN)
        self.client = ScramClientExchange(SCRAM_USERS[user], None)
        self.sock.sendall(startup_packet(user=user, database=APP_DB))
        assert self.expect_auth() == 10  # AuthenticationSASL

    def expect_auth(self) -> int:
        header = self._recv(5)
        body = self._recv(struct.unpack("!I", header[1:])[0] - 4)
        assert header[:1] == b"R", (header, body)
        self.last = body[4:]
        return struct.unpack_from("!I", body)[0]

    def _recv(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            assert chunk, "the proxy hung up in the middle of a good exchange"
            data += chunk
        return data

    def abuse(self, stage: str, mutate: Callable[[bytes], bytes]) -> list[tuple[bytes, bytes]]:
        """Send the mutated message at its stage, then hang up the sending side; what the proxy answered."""
        if stage == "final":
            self.sock.sendall(sasl_initial(b"SCRAM-SHA-256", self.client.first()))
            assert self.expect_auth() == 11  # AuthenticationSASLContinue: the server-first message
            frame = mutate(self.client.final(self.last))
        else:
            frame = mutate(self.client.first())
        try:
            self.sock.sendall(frame)
            self.sock.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass
        try:
            return split_messages(read_until_closed(self.sock, time.monotonic() + CLOSE_WITHIN))
        finally:
            self.sock.close()


def test_fuzzed_scram_exchanges_are_refused(scram_proxy: ProxyProcess) -> None:
    """Mutated SASLInitialResponse and SASLResponse messages, sent where a real exchange has them: each gets
    08P01 (or a hang-up), a wrong proof 28P01; nobody gets in, failures are logged, good clients still log in."""
    proxy = scram_proxy
    outcomes: Counter[str] = Counter()

    def good_login(user: str) -> None:
        with psycopg.connect(proxy.dsn(user, SCRAM_USERS[user], dbname=APP_DB), autocommit=True,
                             connect_timeout=5) as conn:
            assert conn.execute("SELECT current_user").fetchone() == (user,)

    @settings(max_examples=SCRAM_EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(scram_cases)
    def one_case(case: tuple[str, tuple[str, Callable[[bytes], bytes]]]) -> None:
        user, (stage, mutate) = case
        replies = ScramAbuser(proxy, user).abuse(stage, mutate)
        assert (b"R", struct.pack("!I", 0)) not in replies, "a mutated exchange logged in"
        codes = error_codes(replies)
        outcomes[codes[0] if codes else "closed"] += 1
        assert set(codes) <= {"08P01", "28P01"}, replies
        assert proxy.process.poll() is None, proxy.log()[-3000:]
        good_login(user)

    for user in SCRAM_USERS:  # the verifier-only user's first login gives the proxy its key to the server
        good_login(user)
    one_case()
    failures = proxy.log().count("authentication failed for user")
    print(f"SCRAM fuzz: {sum(outcomes.values())} cases: {dict(outcomes)}; {failures} failed logins logged")
    assert sum(outcomes.values()) >= SCRAM_EXAMPLES
    assert outcomes["28P01"] > 0 and outcomes["08P01"] > 0
    assert failures >= outcomes["28P01"] + outcomes["08P01"]
    text = proxy.log()
    problem = max(text.find("Traceback"), text.find("never retrieved"))
    assert problem < 0, text[max(0, problem - 1500):problem + 3000]


# -- slow and stuck clients ---------------------------------------------------------------------------------------
def test_one_byte_a_second_login_is_cut_by_client_login_timeout(fuzz_proxy: ProxyProcess) -> None:
    sock = socket.create_connection((fuzz_proxy.host, fuzz_proxy.port), timeout=5)
    started = time.monotonic()
    sent = 0
    try:
        for byte in GOOD_STARTUP:
            try:
                sock.sendall(bytes([byte]))
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += 1
            sock.settimeout(1.0)
            try:
                reply = sock.recv(65536)
            except TimeoutError:
                continue
            received = reply + read_until_closed(sock, time.monotonic() + 2)
            break
        else:
            pytest.fail("the whole startup packet went through, one byte a second")
    finally:
        sock.close()
    assert 1.9 < time.monotonic() - started < 3.5
    assert sent < len(GOOD_STARTUP)
    assert error_codes(split_messages(received)) == ["08P01"]


def test_client_that_never_reads_a_huge_result_is_held_back_not_buffered(
    sandbox: Sandbox, pg: Cluster
) -> None:
    proxy = hostile_proxy(sandbox, pg, "hostile-stuck")
    pid = proxy.process.pid
    with psycopg.connect(proxy.dsn(dbname=APP_DB), autocommit=True) as other:
        other.execute("SELECT 1")
        before = rss_kb(pid)
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect((proxy.host, proxy.port))
        sock.sendall(startup_packet(user="app", database=APP_DB, application_name="hostile-stuck"))
        time.sleep(0.3)
        sock.sendall(message(b"Q", b"SELECT repeat('x', 1000) FROM generate_series(1, 2000000)\0"))
        # ~2 GB of rows: the server blocks writing to the proxy once the proxy stops reading it.
        stuck = ("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'hostile-stuck'"
                 " AND state = 'active' AND wait_event = 'ClientWrite'")
        try:
            assert wait_until(lambda: pg.primary.sql(stuck) == [(1,)], 10), "the server was never held back"
            samples = []
            for _ in range(6):
                time.sleep(0.5)
                samples.append(rss_kb(pid))
                assert other.execute("SELECT 'unaffected'").fetchone() == ("unaffected",)
            print(f"stuck reader: RSS {before} kB before, samples {samples} kB")
            assert max(samples) - before < 150 * 1024
            assert samples[-1] - samples[0] < 10 * 1024  # flat, not growing
        finally:
            sock.close()
        gone = "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'hostile-stuck'"
        assert wait_until(lambda: pg.primary.sql(gone) == [(0,)], 5), pg.primary.sql(
            "SELECT pid, state, wait_event, query FROM pg_stat_activity WHERE application_name = 'hostile-stuck'")
        assert other.execute("SELECT 'still fine'").fetchone() == ("still fine",)
    assert proxy.process.poll() is None


def test_huge_statement_texts_are_remembered_within_statement_cache_bytes(sandbox: Sandbox, pg: Cluster) -> None:
    """Distinct statements of 1MB each, in the extended protocol (unnamed: the client keeps none) and simple,
    through a routing proxy: the statement registry and the router's plans keep within statement_cache_bytes of
    text, not within their counts."""
    other = sandbox.cluster("hostile-huge")
    other.primary.sql(f"CREATE DATABASE {APP_DB} OWNER app")
    proxy = hostile_proxy(sandbox, [pg, other], "hostile-huge", statement_cache_bytes="4MB", max_message_size="2MB")
    pid = proxy.process.pid
    pad = "x" * 1024 * 1024
    with psycopg.connect(proxy.dsn(dbname=APP_DB), autocommit=True) as conn:
        conn.execute("SELECT 1")
        before = rss_kb(pid)
        for i in range(40):
            assert conn.execute(f"SELECT {i} AS n, %s::int /* {i} {pad} */", [i], prepare=False).fetchone() == (i, i)
            assert conn.execute(f"SELECT {i} AS n /* {i} {pad} */").fetchone() == (i,)
        grown = rss_kb(pid) - before
    print(f"80 statements of 1MB: RSS grew {grown} kB")
    assert grown < 40 * 1024


# -- before authentication -----------------------------------------------------------------------------------
AUTH_TOKEN_LIMIT = 65535  # PostgreSQL's limit for the body of a password or SASL message
LOGIN_USERS = [{"name": "app", "password": "secret", "auth": "scram-sha-256"},
               {"name": "md5user", "password": "md5secret", "auth": "md5"}]


@pytest.fixture(scope="module")
def login_proxy(sandbox: Sandbox, pg: Cluster) -> ProxyProcess:
    """Password users only, the default max_message_size (64MB), a 5s login timeout; failed logins, of which
    the fuzzer makes many, not slowed."""
    proxy = sandbox.proxy("hostile-login", [pg], start=False, admin_users=[],
                          pool={"size": 2, "client_login_timeout": "5s", "auth_failure_delay": 0})
    proxy.write_config({**proxy.config, "users": LOGIN_USERS})
    proxy.start()
    return proxy


def auth_request(sock: socket.socket, user: str) -> int:
    """Send a startup packet for `user` and read the proxy's authentication request: its code."""
    sock.sendall(startup_packet(user=user, database=APP_DB))
    header = sock.recv(5, socket.MSG_WAITALL)
    body = sock.recv(struct.unpack("!I", header[1:])[0] - 4, socket.MSG_WAITALL)
    assert header[:1] == b"R", (header, body)
    return int(struct.unpack_from("!I", body)[0])


@pytest.mark.parametrize("user", ["app", "md5user"])
def test_a_huge_password_message_is_refused_as_soon_as_announced(login_proxy: ProxyProcess, user: str) -> None:
    """Announced past PostgreSQL's limit for authentication messages (far below max_message_size), a password
    or SASL message gets 08P01 at once, while the sender keeps its socket open: the proxy never holds it."""
    socks = [socket.create_connection((login_proxy.host, login_proxy.port), timeout=CLOSE_WITHIN) for _ in range(12)]
    pid = login_proxy.process.pid
    before = rss_kb(pid)
    try:
        for sock in socks:
            auth_request(sock, user)
            sock.sendall(b"p" + struct.pack("!I", 64 * 1024 * 1024 - 1) + b"x" * 65536)
        for sock in socks:
            replies = split_messages(read_until_closed(sock, time.monotonic() + 1))  # the login timeout is 5s
            assert error_codes(replies) == ["08P01"], replies
    finally:
        for sock in socks:
            sock.close()
    assert rss_kb(pid) - before < 8 * 1024
    with psycopg.connect(login_proxy.dsn(dbname=APP_DB), autocommit=True) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


@pytest.mark.parametrize(("size", "code"), [(AUTH_TOKEN_LIMIT, "28P01"), (AUTH_TOKEN_LIMIT + 1, "08P01")])
def test_the_pre_auth_limit_is_postgresqls(login_proxy: ProxyProcess, size: int, code: str) -> None:
    """A wrong md5 answer of the largest size PostgreSQL reads is a wrong password; one byte more, 08P01."""
    with socket.create_connection((login_proxy.host, login_proxy.port), timeout=CLOSE_WITHIN) as sock:
        assert auth_request(sock, "md5user") == 5
        sock.sendall(message(b"p", b"m" * (size - 1) + b"\0"))
        replies = split_messages(read_until_closed(sock, time.monotonic() + CLOSE_WITHIN))
    assert error_codes(replies) == [code]


def _startup_of_size(size: int) -> bytes:
    """A startup packet for `app` of exactly `size` bytes (an application_name pads it)."""
    bare = len(startup_packet(user="app", database=APP_DB, application_name=""))
    return startup_packet(user="app", database=APP_DB, application_name="a" * max(0, size - bare))


def _announced(kind: bytes, length: int, sent: int) -> bytes:
    """A header announcing `length`, and the first `sent` bytes of the body."""
    return kind + struct.pack("!I", length) + b"m" * sent


pre_auth_startups = st.one_of(
    st.builds(lambda user: startup_packet(user=user, database=APP_DB), st.sampled_from(["app", "md5user", "nobody"])),
    st.builds(_startup_of_size, st.sampled_from([9_999, 10_000, 10_001, 65_536])),  # PostgreSQL's limit: 10000
    st.builds(lambda n, sent: struct.pack("!II", n, 196608) + b"m" * sent,
              st.sampled_from([10_001, 2**20, 2**31 - 1, 2**32 - 1]), st.integers(0, 5_000)),
)
pre_auth_frames = st.one_of(
    st.builds(_announced, st.sampled_from([b"p", b"Q", b"X"]),
              st.sampled_from([AUTH_TOKEN_LIMIT + 3, AUTH_TOKEN_LIMIT + 4, AUTH_TOKEN_LIMIT + 5, 2**20, 2**26,
                               2**31 - 1, 2**32 - 1]),
              st.integers(0, 70_000)),
    st.builds(lambda n: message(b"p", b"m" * n + b"\0"), st.sampled_from([0, 1, 32, 1_000, AUTH_TOKEN_LIMIT - 1])),
    st.builds(lambda body: message(b"p", body), st.binary(max_size=64)),
    st.builds(lambda cf: sasl_initial(b"SCRAM-SHA-256", cf), st.binary(max_size=80)),
    st.sampled_from(VALID),
)
pre_auth_streams = st.tuples(pre_auth_startups, st.lists(pre_auth_frames, max_size=4),
                             st.lists(st.tuples(st.integers(1, 40_000), st.floats(0, 0.03)), max_size=12))


def test_fuzzed_pre_auth_streams_of_any_size_sent_slowly(login_proxy: ProxyProcess) -> None:
    """Startup packets and authentication messages around the size limits, sent in pieces with pauses between:
    each stream is refused (08P01, or a failed login) or hung up on within a bound of its last byte, nobody
    gets in, the proxy holds no more than the limits allow, and a client connected throughout is served."""
    proxy = login_proxy
    pid = proxy.process.pid
    bystander = psycopg.connect(proxy.dsn(dbname=APP_DB), autocommit=True)
    outcomes: Counter[str] = Counter()

    @settings(max_examples=SLOW_EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(pre_auth_streams)
    @example((startup_packet(user="md5user", database=APP_DB), [message(b"p", b"m" * 35 + b"\0")], [(9, 0.01)]))
    def one_stream(stream: tuple[bytes, list[bytes], list[tuple[int, float]]]) -> None:
        startup, frames, pieces = stream
        data = startup + b"".join(frames)
        with socket.create_connection((proxy.host, proxy.port), timeout=CLOSE_WITHIN) as sock:
            try:
                for size, pause in pieces:
                    sock.sendall(data[:size])
                    data = data[size:]
                    time.sleep(pause)
                sock.sendall(data)
                sock.shutdown(socket.SHUT_WR)
            except OSError:  # the proxy hung up already
                pass
            replies = split_messages(read_until_closed(sock, time.monotonic() + CLOSE_WITHIN))
        assert (b"R", struct.pack("!I", 0)) not in replies, "a stream logged in"
        codes = error_codes(replies)
        assert set(codes) <= {"08P01", "28P01"}, replies
        outcomes[codes[0] if codes else "closed"] += 1
        assert bystander.execute("SELECT 41 + 1").fetchone() == (42,)

    before = rss_kb(pid)
    one_stream()
    grown = rss_kb(pid) - before
    print(f"slow pre-auth fuzz: {dict(outcomes)}; RSS grew {grown} kB")
    assert grown < RSS_SLACK_KB
    assert outcomes["08P01"] > 0 and outcomes["28P01"] > 0
    bystander.close()
    assert proxy.process.poll() is None
    assert "Traceback" not in proxy.log()


def stalled_logins(proxy: ProxyProcess, count: int) -> list[socket.socket]:
    """Connections that send half a startup packet and then nothing."""
    socks = []
    for _ in range(count):
        sock = socket.create_connection((proxy.host, proxy.port), timeout=10)
        sock.sendall(GOOD_STARTUP[:10])
        socks.append(sock)
    return socks


def test_logins_in_progress_do_not_take_the_places_of_clients(sandbox: Sandbox, pg: Cluster) -> None:
    """max_client_conn counts clients that have authenticated: connections stuck at the login do not keep
    clients out, and the clients in still fill it."""
    proxy = hostile_proxy(sandbox, pg, "hostile-places", max_client_conn=3, max_login_conn=20,
                          client_login_timeout="10s")
    stalled = stalled_logins(proxy, 6)
    try:
        clients = [psycopg.connect(proxy.dsn(dbname=APP_DB), autocommit=True, connect_timeout=5) for _ in range(3)]
        with pytest.raises(psycopg.OperationalError, match="sorry, too many clients already"):
            psycopg.connect(proxy.dsn(dbname=APP_DB), connect_timeout=5)
        assert [c.execute("SELECT 1").fetchone() for c in clients] == [(1,)] * 3
        for client in clients:
            client.close()
    finally:
        for sock in stalled:
            sock.close()


def test_logins_over_max_login_conn_wait_their_turn(sandbox: Sandbox, pg: Cluster) -> None:
    """Two stalled logins hold both login slots: a client that comes next waits, unread, until their login
    timeout frees a slot, and then logs in."""
    proxy = hostile_proxy(sandbox, pg, "hostile-login-slots", max_login_conn=2, client_login_timeout="3s")
    stalled = stalled_logins(proxy, 2)
    try:
        time.sleep(1)
        started = time.monotonic()
        with psycopg.connect(proxy.dsn(dbname=APP_DB), autocommit=True, connect_timeout=10) as conn:
            waited = time.monotonic() - started
            assert conn.execute("SELECT 1").fetchone() == (1,)
        for sock in stalled:
            assert error_codes(split_messages(read_until_closed(sock, time.monotonic() + 1))) == ["08P01"]
    finally:
        for sock in stalled:
            sock.close()
    assert 1.5 < waited < 3.5


# -- logins: names, guesses, log lines -----------------------------------------------------------------------------
def scram_until_refused(proxy: ProxyProcess, user: str, password: str,
                        source: str = "127.0.0.1") -> tuple[bytes, list[tuple[bytes, bytes]]]:
    """A SCRAM login from `source` with a password: the server-first message, and what came after the proof;
    b"" and the answer if the proxy asks for no SCRAM exchange."""
    with socket.create_connection((proxy.host, proxy.port), timeout=10, source_address=(source, 0)) as sock:
        sock.sendall(startup_packet(user=user, database=APP_DB))
        header = sock.recv(5, socket.MSG_WAITALL)
        body = sock.recv(struct.unpack("!I", header[1:])[0] - 4, socket.MSG_WAITALL)
        if header[:1] != b"R" or struct.unpack_from("!I", body)[0] != 10:  # not AuthenticationSASL
            return b"", [(header[:1], body), *split_messages(read_until_closed(sock, time.monotonic() + 10))]
        client = ScramClientExchange(password, None)
        sock.sendall(sasl_initial(b"SCRAM-SHA-256", client.first()))
        header = sock.recv(5, socket.MSG_WAITALL)
        body = sock.recv(struct.unpack("!I", header[1:])[0] - 4, socket.MSG_WAITALL)
        assert header[:1] == b"R" and struct.unpack_from("!I", body)[0] == 11, (header, body)
        sock.sendall(message(b"p", client.final(body[4:])))
        return body[4:], split_messages(read_until_closed(sock, time.monotonic() + 10))


def salt(server_first: bytes) -> bytes:
    return dict(part.split(b"=", 1) for part in server_first.split(b","))[b"s"]


def test_an_unknown_user_gets_a_scram_exchange_that_fails_as_a_wrong_password(login_proxy: ProxyProcess) -> None:
    """As PostgreSQL's mock authentication: the same salt for the same unknown name every time, and the same
    failure as a known user's wrong password."""
    first, known = scram_until_refused(login_proxy, "app", "wrong")
    nobody_first, nobody = scram_until_refused(login_proxy, "nobody", "secret")
    again_first, _ = scram_until_refused(login_proxy, "nobody", "other")
    _, somebody_else = scram_until_refused(login_proxy, "somebody_else", "secret")
    assert nobody_first, "an unknown user was refused without a SCRAM exchange"
    assert error_codes(known) == error_codes(nobody) == error_codes(somebody_else) == ["28P01"]
    assert salt(nobody_first) == salt(again_first) != salt(first)
    assert [kind for kind, _ in nobody] == [kind for kind, _ in known]


def md5_wrong_password(proxy: ProxyProcess, source: str = "127.0.0.1") -> float:
    """Seconds from connecting to the refusal of a wrong md5 password."""
    started = time.monotonic()
    with socket.create_connection((proxy.host, proxy.port), timeout=10, source_address=(source, 0)) as sock:
        assert auth_request(sock, "md5user") == 5
        sock.sendall(message(b"p", b"md5" + b"0" * 32 + b"\0"))
        assert error_codes(split_messages(read_until_closed(sock, time.monotonic() + 10))) == ["28P01"]
    return time.monotonic() - started


async def test_repeated_failed_logins_from_an_address_are_slowed(sandbox: Sandbox, pg: Cluster) -> None:
    """Five failures are free; then the address's logins take turns auth_failure_delay apart, also when it
    opens them all at once, while another address logs in at once."""
    proxy = sandbox.proxy("hostile-guesses", [pg], start=False, admin_users=[],
                          pool={"size": 2, "auth_failure_delay": "400ms"})
    proxy.write_config({**proxy.config, "users": LOGIN_USERS})
    proxy.start()
    try:
        free = [md5_wrong_password(proxy) for _ in range(5)]
        slowed = [md5_wrong_password(proxy) for _ in range(3)]
        started = time.monotonic()
        await asyncio.gather(*(asyncio.to_thread(md5_wrong_password, proxy) for _ in range(5)))
        together = time.monotonic() - started
        elsewhere = md5_wrong_password(proxy, source="127.0.0.2")
    finally:
        proxy.stop()
    print(f"failed logins: {free} free, {slowed} slowed, 5 at once in {together:.2f}s, elsewhere {elsewhere:.3f}s")
    assert max(free) < 0.3 and min(slowed) > 0.3 and together > 5 * 0.4 - 0.1 and elsewhere < 0.3


def test_a_user_name_cannot_forge_a_log_line(login_proxy: ProxyProcess) -> None:
    forged = "2030-01-01 00:00:00,000 INFO shardproxy.client: client 1 127.0.0.1:1 connected: user=admin"
    scram_until_refused(login_proxy, f"evil\n{forged}\r\u2028", "secret")
    lines = login_proxy.log().splitlines()
    assert not [line for line in lines if line.startswith(forged)]
    assert [line for line in lines if "evil\\n2030-01-01" in line]


# -- a connection storm over max_client_conn ------------------------------------------------------------------
MAX_CLIENTS = 200
STORM_EXCESS = 10_000
STORM_CONCURRENCY = 1000


async def _raw_login(host: str, port: int) -> tuple[str, asyncio.StreamReader | None, asyncio.StreamWriter | None]:
    """'ok' with the open streams, or the SQLSTATE the proxy refused with."""
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(GOOD_STARTUP)
    while True:
        header = await reader.readexactly(5)
        body = await reader.readexactly(struct.unpack("!I", header[1:])[0] - 4)
        if header[:1] == b"Z":
            return "ok", reader, writer
        if header[:1] == b"E":
            writer.close()
            return error_codes([(b"E", body)])[0], None, None


async def _raw_query(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, sql: bytes) -> list[bytes]:
    writer.write(message(b"Q", sql + b"\0"))
    kinds = []
    while True:
        header = await reader.readexactly(5)
        await reader.readexactly(struct.unpack("!I", header[1:])[0] - 4)
        kinds.append(header[:1])
        if header[:1] == b"Z":
            return kinds


async def test_connection_storm_over_max_client_conn(sandbox: Sandbox, pg: Cluster) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = MAX_CLIENTS + STORM_CONCURRENCY + 500
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, wanted), hard))  # the proxy inherits it too
    if resource.getrlimit(resource.RLIMIT_NOFILE)[0] < wanted:
        pytest.skip("not enough file descriptors for the storm")
    proxy = hostile_proxy(sandbox, pg, "hostile-storm", max_client_conn=MAX_CLIENTS, client_login_timeout="10s")

    admitted = await asyncio.gather(*(_raw_login(proxy.host, proxy.port) for _ in range(MAX_CLIENTS)))
    assert [state for state, _, _ in admitted] == ["ok"] * MAX_CLIENTS

    limit = asyncio.Semaphore(STORM_CONCURRENCY)
    outcomes: dict[str, int] = {}

    async def attempt() -> None:
        async with limit:
            try:
                state, _, writer = await asyncio.wait_for(_raw_login(proxy.host, proxy.port), 10)
                if writer is not None:
                    writer.close()
            except (TimeoutError, OSError, asyncio.IncompleteReadError) as exc:
                state = type(exc).__name__
            outcomes[state] = outcomes.get(state, 0) + 1

    started = time.monotonic()
    await asyncio.gather(*(attempt() for _ in range(STORM_EXCESS)))
    took = time.monotonic() - started
    print(f"storm: {MAX_CLIENTS} held, {STORM_EXCESS} over the limit in {took:.1f}s: {outcomes}")
    assert outcomes == {"53300": STORM_EXCESS}
    assert proxy.process.poll() is None

    results = await asyncio.gather(*(_raw_query(r, w, b"SELECT 1") for _, r, w in admitted))
    assert all(kinds[-1] == b"Z" and b"E" not in kinds for kinds in results)
    for _, _, writer in admitted:
        writer.close()
    await asyncio.gather(*(writer.wait_closed() for _, _, writer in admitted), return_exceptions=True)
    with connect_soon(proxy.dsn(dbname=APP_DB), 5) as late:  # the places are free again, once the goodbyes arrive
        assert late.execute("SELECT 1").fetchone() == (1,)
