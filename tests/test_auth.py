"""Authentication with SCRAM verifiers: clients checked against a verifier, servers logged in to with the key
the client proved (the proxy never needs the plaintext password)."""

import psycopg
import pytest

from shardproxy.wire.auth import ProvenKey, ScramClientExchange, ScramException, ScramSecret, ScramServerExchange
from shardproxy.wire.protocol import PostgresError, ProtocolError
from tests.support import APP_DB


def exchange(secret: ScramSecret, client: ScramClientExchange) -> ScramServerExchange:
    server = ScramServerExchange(secret)
    server_first = server.first(client.first())
    client.verify(server.final(client.final(server_first)))
    return server


def test_scram_both_sides_agree_and_a_wrong_password_fails():
    secret = ScramSecret.from_password("s3cret")
    server = exchange(secret, ScramClientExchange("s3cret", None))
    with pytest.raises(ScramException):
        exchange(secret, ScramClientExchange("wrong", None))
    # The key the first client proved logs in without the password, where the verifier is the same.
    exchange(secret, ScramClientExchange(None, ProvenKey(server.client_key, secret)))
    with pytest.raises(PostgresError):  # another salt: the proven key does not fit
        exchange(ScramSecret.from_password("s3cret"), ScramClientExchange(None, ProvenKey(server.client_key, secret)))


@pytest.mark.parametrize("proof", ["@@@@", "\u5305" * 44, "", "AAAA" * 20])
def test_a_malformed_proof_is_a_protocol_error(proof: str) -> None:
    """Not base64, not even ASCII, empty, or of the wrong length: 08P01, never an exception of another kind."""
    server = ScramServerExchange(ScramSecret.from_password("s3cret"))
    server_first = server.first(b"n,,n=,r=abcdefgh").decode()
    nonce = server_first.split(",")[0]
    with pytest.raises(ProtocolError):
        server.final(f"c=biws,{nonce},p={proof}".encode())


@pytest.fixture(scope="module")
def verifier_proxy(sandbox, pg):
    """A proxy that knows `app` only by the SCRAM verifier the server stores for it."""
    verifier = pg.primary.sql("SELECT rolpassword FROM pg_authid WHERE rolname = 'app'")[0][0]
    assert verifier.startswith("SCRAM-SHA-256$")
    proxy = sandbox.proxy("verifier", [pg], start=False, pool={"size": 2})
    users = [{"name": "app", "password": verifier}, {"name": "admin", "password": "adminpw"}]
    proxy.write_config({**proxy.config, "users": users})
    proxy.start()
    return proxy


def test_verifier_only_user_logs_in_end_to_end(verifier_proxy, pg):
    with psycopg.connect(verifier_proxy.dsn(dbname=APP_DB), autocommit=True) as conn:
        assert conn.execute("SELECT current_user, 40 + 2").fetchone() == ("app", 42)
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(verifier_proxy.dsn(dbname=APP_DB, password="wrong"))
    assert "secret" not in verifier_proxy.log()
