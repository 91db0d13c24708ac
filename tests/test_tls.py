"""TLS to clients (tls.mode disable / allow / require) and to servers (server_tls.mode prefer / require /
verify-ca / verify-full, cancel requests included), against sandbox servers with ssl = on and certificates made
here by a throwaway CA."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ipaddress
import os
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator

import asyncpg
import psycopg
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from shardproxy.devtools.faults import Relay
from shardproxy.devtools.sandbox import Cluster, ProxyProcess, Sandbox
from shardproxy.wire import protocol as pg
from shardproxy.wire.dial import SSL_REQUEST_PACKET

SSL_QUERY = "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()"
GSSENC_REQUEST_PACKET = pg.INT32.pack(8) + pg.INT32.pack(pg.GSSENC_REQUEST)


# -- certificates ---------------------------------------------------------------------------------------
def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _make_ca(common_name: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name)).issuer_name(_name(common_name))
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                     crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


LOCAL_NAMES = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]


def _make_leaf(ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, common_name: str,
               names: list[x509.GeneralName] = LOCAL_NAMES) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A certificate for `names`; the default (localhost and 127.0.0.1) suits both the proxy and the server."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name)).issuer_name(ca_cert.subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                     crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return key, cert


@pytest.fixture(scope="module")
def certs(sandbox: Sandbox) -> dict[str, str]:
    """ca, cert, key (signed by ca, for localhost and 127.0.0.1), misnamed_cert and misnamed_key (signed by ca
    for db.invalid only) and other_ca, an unrelated CA; the files belong to the servers' account (a server
    refuses a key file others may read)."""
    directory = os.path.join(sandbox.base_dir, "tls")
    os.mkdir(directory, 0o755)
    ca_key, ca_cert = _make_ca("shardproxy test CA")
    _, other_ca = _make_ca("some other CA")
    key, cert = _make_leaf(ca_key, ca_cert, "localhost")
    misnamed_key, misnamed_cert = _make_leaf(ca_key, ca_cert, "db.invalid", [x509.DNSName("db.invalid")])
    pem = serialization.Encoding.PEM
    files = {
        "ca": ca_cert.public_bytes(pem),
        "other_ca": other_ca.public_bytes(pem),
        "cert": cert.public_bytes(pem),
        "key": key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
        "misnamed_cert": misnamed_cert.public_bytes(pem),
        "misnamed_key": misnamed_key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                                   serialization.NoEncryption()),
    }
    owner = os.stat(sandbox.base_dir)
    paths = {}
    for name, data in files.items():
        path = paths[name] = os.path.join(directory, f"{name}.pem")
        with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as f:
            f.write(data)
        if not name.endswith("key"):
            os.chmod(path, 0o644)
    for path in (directory, *paths.values()):
        os.chown(path, owner.st_uid, owner.st_gid)
    return paths


def _ssl_settings(cert: str, key: str) -> dict[str, str]:
    return {"ssl": "on", "ssl_cert_file": f"'{cert}'", "ssl_key_file": f"'{key}'"}


@pytest.fixture(scope="module")
def tls_pg(sandbox: Sandbox, certs: dict[str, str]) -> Cluster:
    return sandbox.cluster("tls", settings=_ssl_settings(certs["cert"], certs["key"]))


@pytest.fixture(scope="module")
def misnamed_pg(sandbox: Sandbox, certs: dict[str, str]) -> Cluster:
    """A server whose certificate chains to the CA but names neither localhost nor 127.0.0.1."""
    return sandbox.cluster("tls-misnamed", settings=_ssl_settings(certs["misnamed_cert"], certs["misnamed_key"]))


def _proxy(sandbox: Sandbox, name: str, cluster: Cluster, **sections) -> ProxyProcess:
    return sandbox.proxy(name, [cluster], pool={"size": 4, "server_connect_timeout": "3s"}, **sections)


@pytest.fixture(scope="module")
def secure(sandbox: Sandbox, tls_pg: Cluster, certs: dict[str, str]) -> ProxyProcess:
    """TLS required of clients (client certificates checked if sent), servers verified against the CA."""
    return _proxy(sandbox, "tls-require", tls_pg,
                  tls={"mode": "require", "cert": certs["cert"], "key": certs["key"], "ca": certs["ca"]},
                  server_tls={"mode": "verify-full", "ca": certs["ca"]})


@pytest.fixture(scope="module")
def lenient(sandbox: Sandbox, pg: Cluster, certs: dict[str, str]) -> ProxyProcess:
    """TLS allowed to clients; server_tls prefer in front of a server without ssl."""
    return _proxy(sandbox, "tls-allow", pg, tls={"mode": "allow", "cert": certs["cert"], "key": certs["key"]},
                  server_tls={"mode": "prefer"})


# -- helpers ------------------------------------------------------------------------------------------
def _conninfo(proxy: ProxyProcess, host: str = "127.0.0.1", **options: str) -> str:
    params = {"host": host, "port": str(proxy.port), "user": "app", "password": "secret", "dbname": "postgres",
              "connect_timeout": "10", **options}
    return " ".join(f"{key}={value}" for key, value in params.items())


def _psql(conninfo: str, sql: str) -> subprocess.CompletedProcess[str]:
    psql = shutil.which("psql")
    if psql is None:
        pytest.skip("psql is not installed")
    env = {key: value for key, value in os.environ.items() if not key.startswith("PG")}
    return subprocess.run([psql, "-X", "-At", "-d", conninfo, "-c", sql], check=False, capture_output=True, text=True,
                          timeout=30, env=env)


def _raw(proxy: ProxyProcess) -> socket.socket:
    return socket.create_connection((proxy.host, proxy.port), timeout=5)


def _read_error(sock: socket.socket) -> dict[str, str]:
    data = b""
    while len(data) < 5 or len(data) < 1 + pg.INT32.unpack_from(data, 1)[0]:
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    assert data[:1] == b"E", data
    return pg.parse_fields(data[5 : 1 + pg.INT32.unpack_from(data, 1)[0]])


# -- clients to the proxy -------------------------------------------------------------------------------
def test_psql_sslmode_require(secure: ProxyProcess) -> None:
    done = _psql(_conninfo(secure, sslmode="require"), "SELECT 40 + 2")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "42"


def test_psql_verify_full_reaches_a_tls_server(secure: ProxyProcess, certs: dict[str, str]) -> None:
    """The proxy's certificate verifies for localhost, and the server connection behind it is encrypted."""
    done = _psql(_conninfo(secure, host="localhost", sslmode="verify-full", sslrootcert=certs["ca"]), SSL_QUERY)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "t"


def test_psql_verify_full_with_another_ca_fails(secure: ProxyProcess, certs: dict[str, str]) -> None:
    done = _psql(_conninfo(secure, host="localhost", sslmode="verify-full", sslrootcert=certs["other_ca"]),
                 "SELECT 1")
    assert done.returncode != 0
    assert "certificate verify failed" in done.stderr


def test_psycopg_verify_full_streams_large_results(secure: ProxyProcess, certs: dict[str, str]) -> None:
    info = _conninfo(secure, host="localhost", sslmode="verify-full", sslrootcert=certs["ca"])
    with psycopg.connect(info, autocommit=True) as conn:
        assert conn.pgconn.ssl_in_use
        rows = conn.execute("SELECT i, repeat('x', 100000) FROM generate_series(1, 60) AS i").fetchall()
        assert [i for i, _ in rows] == list(range(1, 61)) and all(len(text) == 100000 for _, text in rows)
        big = "y" * 3_000_000  # client to server: more than a TLS record and a socket buffer
        assert conn.execute("SELECT length(%s::text)", [big]).fetchone() == (3_000_000,)
        assert conn.execute(SSL_QUERY).fetchone() == (True,)


def test_asyncpg_with_ssl_context(secure: ProxyProcess, certs: dict[str, str]) -> None:
    async def run() -> tuple[int, bool]:
        context = ssl.create_default_context(cafile=certs["ca"])
        conn = await asyncpg.connect(host="localhost", port=secure.port, user="app", password="secret",
                                     database="postgres", ssl=context, timeout=10)
        try:
            statement = await conn.prepare("SELECT $1::int * 2")
            return await statement.fetchval(21), await conn.fetchval(SSL_QUERY)
        finally:
            await conn.close()

    assert asyncio.run(run()) == (42, True)


def test_plaintext_refused_under_require(secure: ProxyProcess) -> None:
    with pytest.raises(psycopg.OperationalError, match="SSL required"):
        psycopg.connect(_conninfo(secure, sslmode="disable"))

    async def run() -> None:
        await asyncpg.connect(host="127.0.0.1", port=secure.port, user="app", password="secret",
                              database="postgres", ssl=False, timeout=10)

    with pytest.raises(asyncpg.InvalidAuthorizationSpecificationError) as caught:
        asyncio.run(run())
    assert caught.value.sqlstate == "28000"


def test_gssenc_answered_no_then_plaintext_refused(secure: ProxyProcess) -> None:
    with _raw(secure) as sock:
        sock.sendall(GSSENC_REQUEST_PACKET)
        assert sock.recv(1) == b"N"
        sock.sendall(pg.startup_message({"user": "app", "database": "postgres"}))
        assert _read_error(sock)["C"] == "28000"


def test_data_after_ssl_request_is_refused(secure: ProxyProcess) -> None:
    """Bytes sent with the SSLRequest could be injected by a man in the middle: refused, as PostgreSQL does."""
    with _raw(secure) as sock:
        sock.sendall(SSL_REQUEST_PACKET + pg.startup_message({"user": "app", "database": "postgres"}))
        fields = _read_error(sock)
        assert fields["C"] == pg.PROTOCOL_VIOLATION and "unencrypted data" in fields["M"]


def test_failed_handshake_closes_the_connection(secure: ProxyProcess) -> None:
    with _raw(secure) as sock:
        sock.sendall(SSL_REQUEST_PACKET)
        assert sock.recv(1) == b"S"
        sock.sendall(b"this is not a ClientHello" * 10)
        deadline = time.monotonic() + 5
        while sock.recv(4096):  # a TLS alert may come first; then the close
            assert time.monotonic() < deadline
    done = _psql(_conninfo(secure, sslmode="require"), "SELECT 1")
    assert done.returncode == 0, done.stderr


def _cancelled_sleep(conn: psycopg.Connection) -> None:
    """A long query cancelled after half a second gets 57014 well before it would have ended."""
    timer = threading.Timer(0.5, conn.cancel)
    timer.start()
    started = time.monotonic()
    with pytest.raises(psycopg.errors.QueryCanceled):
        conn.execute("SELECT pg_sleep(20)")
    timer.join()
    assert time.monotonic() - started < 10


def test_cancel_reaches_a_tls_session(secure: ProxyProcess) -> None:
    with psycopg.connect(_conninfo(secure, sslmode="require"), autocommit=True) as conn:
        _cancelled_sleep(conn)
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_allow_takes_plaintext_and_tls(lenient: ProxyProcess) -> None:
    """prefer against a server without ssl goes on in plaintext."""
    for sslmode, encrypted in (("disable", False), ("require", True)):
        with psycopg.connect(_conninfo(lenient, sslmode=sslmode), autocommit=True) as conn:
            assert conn.pgconn.ssl_in_use is encrypted
            assert conn.execute(SSL_QUERY).fetchone() == (False,)


def test_disable_refuses_ssl_clients_cleanly(proxy: ProxyProcess) -> None:
    with pytest.raises(psycopg.OperationalError, match="does not support SSL"):
        psycopg.connect(_conninfo(proxy, sslmode="require"))
    with psycopg.connect(_conninfo(proxy, sslmode="prefer"), autocommit=True) as conn:
        assert not conn.pgconn.ssl_in_use


# -- the proxy to servers -----------------------------------------------------------------------------------
def _login_error(proxy: ProxyProcess) -> asyncpg.PostgresError:
    async def run() -> None:
        await asyncpg.connect(host="127.0.0.1", port=proxy.port, user="app", password="secret",
                              database="postgres", ssl=False, timeout=15)

    started = time.monotonic()
    with pytest.raises(asyncpg.PostgresError) as caught:
        asyncio.run(run())
    assert time.monotonic() - started < 10
    return caught.value


@contextlib.contextmanager
def _running(sandbox: Sandbox, name: str, cluster: Cluster, **sections) -> Iterator[ProxyProcess]:
    proxy = _proxy(sandbox, name, cluster, **sections)
    try:
        yield proxy
    finally:
        proxy.stop()


def _server_ssl(proxy: ProxyProcess) -> bool:
    with psycopg.connect(_conninfo(proxy, sslmode="disable"), autocommit=True) as conn:
        return conn.execute(SSL_QUERY).fetchone()[0]


@pytest.mark.parametrize("mode", ["require", "verify-ca", "verify-full"])
def test_a_wrong_ca_fails_fast(sandbox: Sandbox, tls_pg: Cluster, certs: dict[str, str], mode: str) -> None:
    """Given a ca, require checks the chain as verify-ca and verify-full do (libpq's rule)."""
    with _running(sandbox, f"tls-wrong-ca-{mode}", tls_pg, server_tls={"mode": mode, "ca": certs["other_ca"]}) as wrong:
        error = _login_error(wrong)
    assert error.sqlstate == "08006"
    assert "certificate verify failed" in str(error)


def test_require_without_a_ca_checks_nothing(sandbox: Sandbox, misnamed_pg: Cluster) -> None:
    with _running(sandbox, "tls-require-unchecked", misnamed_pg, server_tls={"mode": "require"}) as proxy:
        assert _server_ssl(proxy)


def test_verify_ca_ignores_the_host_name(sandbox: Sandbox, misnamed_pg: Cluster, certs: dict[str, str]) -> None:
    """The server's certificate chains to the ca but is for another name: verify-ca takes it, verify-full not."""
    with _running(sandbox, "tls-verify-ca", misnamed_pg, server_tls={"mode": "verify-ca", "ca": certs["ca"]}) as proxy:
        assert _server_ssl(proxy)
    with _running(sandbox, "tls-verify-full-misnamed", misnamed_pg,
                  server_tls={"mode": "verify-full", "ca": certs["ca"]}) as proxy:
        error = _login_error(proxy)
    assert error.sqlstate == "08006"
    assert "certificate verify failed" in str(error) and "mismatch" in str(error)


def test_require_against_a_server_without_ssl(sandbox: Sandbox, pg: Cluster) -> None:
    with _running(sandbox, "tls-server-require", pg, server_tls={"mode": "require"}) as strict:
        error = _login_error(strict)
    assert error.sqlstate == "08006"
    assert "does not support SSL" in str(error)


@pytest.fixture(scope="module")
def cleartext_pg(sandbox: Sandbox, certs: dict[str, str]) -> Cluster:
    """A TLS server that asks `app` for a cleartext password."""
    cluster = sandbox.cluster("tls-cleartext", settings=_ssl_settings(certs["cert"], certs["key"]))
    cluster.primary.authenticate("app", "password")
    return cluster


@pytest.mark.parametrize(("mode", "with_ca", "sent"), [("verify-full", True, True), ("verify-ca", True, True),
                                                       ("require", True, True), ("require", False, False),
                                                       ("prefer", False, False)])
def test_a_cleartext_password_goes_only_where_tls_verified_the_server(sandbox: Sandbox, cleartext_pg: Cluster,
                                                                      certs: dict[str, str], mode: str,
                                                                      with_ca: bool, sent: bool) -> None:
    """server_auth's default: over TLS whose chain was checked against the ca, else refused with 28000."""
    server_tls = {"mode": mode, **({"ca": certs["ca"]} if with_ca else {})}
    with _running(sandbox, f"tls-cleartext-{mode}-{with_ca}", cleartext_pg, server_tls=server_tls) as proxy:
        if sent:
            assert _server_ssl(proxy)
        else:
            error = _login_error(proxy)
            assert error.sqlstate == "28000" and "cleartext password" in str(error)


@pytest.mark.parametrize("use_ca", [False, True], ids=["require", "verify-full"])
def test_cancel_to_the_server_is_encrypted(sandbox: Sandbox, tls_pg: Cluster, certs: dict[str, str],
                                           use_ca: bool) -> None:
    """The cancel key is a credential: the proxy opens its CancelRequest with an SSLRequest, as its pool
    connections do. A relay in front of the server sees how every connection to it opens."""
    server_tls = {"mode": "verify-full", "ca": certs["ca"]} if use_ca else {"mode": "require"}
    node = tls_pg.primary
    with Relay(node.host, node.port) as relay, \
            _running(sandbox, f"tls-cancel-{server_tls['mode']}", tls_pg, server_tls=server_tls,
                     shards=[{"name": "tls", "nodes": [{"host": "127.0.0.1", "port": relay.port}]}]) as proxy, \
            psycopg.connect(_conninfo(proxy, sslmode="disable"), autocommit=True) as conn:
        assert conn.execute(SSL_QUERY).fetchone() == (True,)
        before = len(relay.openings)
        _cancelled_sleep(conn)
        cancels = relay.openings[before:]
        assert conn.execute("SELECT 1").fetchone() == (1,)
    assert cancels, "no connection reached the server for the cancel"
    assert all(opening == SSL_REQUEST_PACKET for opening in cancels), cancels


def test_proxy_logs_no_tracebacks(secure: ProxyProcess, lenient: ProxyProcess) -> None:
    """Failed handshakes, refusals and cancels above are ordinary events, not crashes."""
    for proxy in (secure, lenient):
        text = proxy.log()
        assert "Traceback" not in text and "never retrieved" not in text, text[-3000:]


def test_check_loads_the_certificate_files(tmp_path, certs: dict[str, str], capsys) -> None:
    """`shardproxy check` fails (exit 2) on a certificate that cannot be loaded; relative names are found
    next to the config file."""
    from shardproxy.cli import main

    shutil.copy(certs["cert"], tmp_path / "server.crt")
    shutil.copy(certs["key"], tmp_path / "server.key")
    base = "shards: [{name: s0, nodes: [{host: 127.0.0.1, port: 5432}]}]\nusers: [{name: app, password: x}]\n"
    good = tmp_path / "good.yaml"
    good.write_text(base + "tls: {mode: require, cert: server.crt, key: server.key}\n")
    bad = tmp_path / "bad.yaml"
    bad.write_text(base + "tls: {mode: allow, cert: missing.crt, key: server.key}\n")
    assert main(["check", "-c", str(good)]) == 0
    assert main(["check", "-c", str(bad)]) == 2
    assert "tls: cannot load cert/key" in capsys.readouterr().err


@pytest.mark.parametrize("mode", ["verify-ca", "verify-full"])
def test_check_wants_a_ca_to_verify_servers(tmp_path, capsys, mode: str) -> None:
    from shardproxy.cli import main

    config = tmp_path / "shardproxy.yaml"
    config.write_text("shards: [{name: s0, nodes: [{host: 127.0.0.1, port: 5432}]}]\n"
                      "users: [{name: app, password: x}]\n"
                      f"server_tls:\n  mode: {mode}\n")
    assert main(["check", "-c", str(config)]) == 2
    assert f"{config}:3: server_tls.ca: required when server_tls.mode is {mode}" in capsys.readouterr().err
