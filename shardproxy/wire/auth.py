"""Authentication: the proxy checks clients (as a server would) and logs in to servers (as a client would).

SCRAM-SHA-256 (RFC 5802, 7677) is written here for both sides: PostgreSQL clients send an empty user name
(the startup packet named the user), and a user configured with a verifier only logs in to servers with the
ClientKey its client just proved, which a library working from passwords cannot do. md5 and cleartext are a
few lines of hashing.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import struct
from dataclasses import dataclass

from shardproxy.wire import protocol as pg

SCRAM = "SCRAM-SHA-256"
AUTH_OK, AUTH_CLEARTEXT, AUTH_MD5, AUTH_SASL, AUTH_SASL_CONTINUE, AUTH_SASL_FINAL = 0, 3, 5, 10, 11, 12


class ScramException(Exception):
    """A SCRAM exchange failed: wrong proof, malformed message."""


def _malformed(detail: str) -> pg.ProtocolError:
    """A client's SCRAM message PostgreSQL would refuse with 08P01."""
    return pg.ProtocolError(f"malformed SCRAM message: {detail}")


def _text(message: bytes) -> str:
    try:
        return message.decode()
    except UnicodeDecodeError:
        raise _malformed("not UTF-8") from None


def md5_hex(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def md5_answer(user: str, password: str, salt: bytes) -> bytes:
    """The md5 PasswordMessage payload. `password` may be plaintext or an already hashed `md5...` value."""
    inner = password[3:] if is_md5_hash(password) else md5_hex(password.encode() + user.encode())
    return b"md5" + md5_hex(inner.encode() + salt).encode()


def is_md5_hash(password: str) -> bool:
    return len(password) == 35 and password.startswith("md5")


def is_scram_verifier(password: str) -> bool:
    return password.startswith(SCRAM + "$")


def _hmac(key: bytes, msg: bytes) -> bytes:
    return hmac.new(key, msg, hashlib.sha256).digest()


@dataclass(frozen=True)
class ScramSecret:
    """What a server needs to check a SCRAM client: salt, StoredKey, ServerKey, iterations."""

    salt: bytes
    stored_key: bytes
    server_key: bytes
    iterations: int

    @classmethod
    def from_password(cls, password: str, iterations: int = 4096) -> ScramSecret:
        if is_scram_verifier(password):
            return cls.from_verifier(password)
        salt = os.urandom(16)
        salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
        stored = hashlib.sha256(_hmac(salted, b"Client Key")).digest()
        return cls(salt, stored, _hmac(salted, b"Server Key"), iterations)

    @classmethod
    def mock(cls, user: str, key: bytes) -> ScramSecret:
        """For a user the proxy does not know: a secret that no password matches, the same for the same name
        and key (a process's), so that repeated tries see the same salt, as PostgreSQL's mock authentication."""
        derived = [_hmac(key, f"{part}\0{user}".encode()) for part in ("salt", "stored", "server")]
        return cls(derived[0][:16], derived[1], derived[2], 4096)

    @classmethod
    def from_verifier(cls, verifier: str) -> ScramSecret:
        """Parse `SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>`, as pg_authid stores it."""
        try:
            _, params, keys = verifier.split("$")
            iterations, salt = params.split(":")
            stored, server = keys.split(":")
            return cls(base64.b64decode(salt), base64.b64decode(stored), base64.b64decode(server), int(iterations))
        except ValueError as exc:
            raise ValueError("malformed SCRAM verifier") from exc


class ScramServerExchange:
    """One SCRAM-SHA-256 exchange with a client, the proxy playing the server."""

    def __init__(self, secret: ScramSecret):
        self.secret = secret
        self._gs2_header = ""
        self._client_first_bare = ""
        self._server_first = ""
        self._nonce = ""

    def first(self, client_first: bytes) -> bytes:
        """The server-first message; raises ProtocolError when the client-first message is malformed."""
        parts = _text(client_first).split(",", 2)
        if len(parts) < 3 or parts[0] not in ("n", "y"):
            raise _malformed("channel binding is not supported" if parts[0].startswith("p=") else "bad GS2 header")
        if parts[1]:
            raise _malformed("authorization identities are not supported")
        bare = parts[2]
        attributes = bare.split(",")
        nonce = attributes[1][2:] if len(attributes) > 1 and attributes[1].startswith("r=") else ""
        if not attributes[0].startswith("n=") or not nonce or not all(33 <= ord(c) <= 126 for c in nonce):
            raise _malformed("client-first message needs n= and a printable r=")
        self._gs2_header = f"{parts[0]},,"
        self._client_first_bare = bare
        self._nonce = nonce + base64.b64encode(os.urandom(18)).decode()
        salt = base64.b64encode(self.secret.salt).decode()
        self._server_first = f"r={self._nonce},s={salt},i={self.secret.iterations}"
        return self._server_first.encode()

    def final(self, client_final: bytes) -> bytes:
        """The server-final message; raises ScramException when the proof is wrong, ProtocolError when the
        message is malformed or does not continue this exchange."""
        without_proof, _, proof = _text(client_final).rpartition(",p=")
        attributes = without_proof.split(",")
        if attributes[0] != "c=" + base64.b64encode(self._gs2_header.encode()).decode():
            raise _malformed("unexpected channel binding")
        if len(attributes) < 2 or attributes[1] != f"r={self._nonce}":
            raise _malformed("nonce mismatch")
        try:
            proof_bytes = base64.b64decode(proof, validate=True)
        except ValueError:  # binascii.Error, or a proof that is not even ASCII
            raise _malformed("proof is not base64") from None
        if len(proof_bytes) != len(self.secret.stored_key):
            raise _malformed("proof has the wrong length")
        auth_message = f"{self._client_first_bare},{self._server_first},{without_proof}".encode()
        signature = _hmac(self.secret.stored_key, auth_message)
        client_key = bytes(a ^ b for a, b in zip(proof_bytes, signature))
        if not hmac.compare_digest(hashlib.sha256(client_key).digest(), self.secret.stored_key):
            raise ScramException("wrong password")
        self.client_key = client_key  # proven: it can log in to servers that hold the same verifier
        return b"v=" + base64.b64encode(_hmac(self.secret.server_key, auth_message))


@dataclass(frozen=True)
class ProvenKey:
    """A client's SCRAM ClientKey, recovered from its proof, with the verifier it was checked against."""

    client_key: bytes
    secret: ScramSecret


class ScramClientExchange:
    """One SCRAM-SHA-256 exchange with a server, the proxy playing the client: from the plaintext password,
    or from a client's proven key when the config holds only a verifier (the server must hold the same one,
    same salt and iterations, as `pg_authid.rolpassword` gives)."""

    def __init__(self, password: str | None, proven: ProvenKey | None):
        self.password = password
        self.proven = proven
        self._bare = f"n=,r={base64.b64encode(os.urandom(18)).decode()}"
        self._server_signature = b""

    def first(self) -> bytes:
        return f"n,,{self._bare}".encode()

    def final(self, server_first: bytes) -> bytes:
        text = server_first.decode()
        attributes = dict(part.split("=", 1) for part in text.split(",") if "=" in part)
        nonce, salt = attributes.get("r", ""), base64.b64decode(attributes.get("s", ""))
        iterations = int(attributes.get("i", 0))
        if not nonce.startswith(self._bare[5:]):
            raise ScramException("the server's nonce does not extend ours")
        client_key, server_key = self._keys(salt, iterations)
        without_proof = f"c=biws,r={nonce}"
        auth_message = f"{self._bare},{text},{without_proof}".encode()
        signature = _hmac(hashlib.sha256(client_key).digest(), auth_message)
        proof = bytes(a ^ b for a, b in zip(client_key, signature))
        self._server_signature = _hmac(server_key, auth_message)
        return f"{without_proof},p={base64.b64encode(proof).decode()}".encode()

    def verify(self, server_final: bytes) -> None:
        """Check the server's signature: it knows the verifier too (no one in between)."""
        if not hmac.compare_digest(server_final.decode().removeprefix("v=").encode(),
                                   base64.b64encode(self._server_signature)):
            raise ScramException("the server's signature is wrong")

    def _keys(self, salt: bytes, iterations: int) -> tuple[bytes, bytes]:
        if self.password is not None:
            salted = hashlib.pbkdf2_hmac("sha256", self.password.encode(), salt, iterations)
            return _hmac(salted, b"Client Key"), _hmac(salted, b"Server Key")
        proven = self.proven
        secret = proven.secret if proven is not None else None
        if proven is None or secret is None or secret.salt != salt or secret.iterations != iterations:
            raise pg.PostgresError(pg.INVALID_AUTHORIZATION,
                                   "the server's SCRAM verifier differs from the configured one")
        return proven.client_key, secret.server_key


def sasl_mechanisms(body: bytes) -> list[str]:
    return [m.decode() for m in bytes(body[4:]).split(b"\0") if m]


def parse_sasl_initial(body: bytes) -> tuple[str, bytes]:
    """The mechanism and client-first message of a SASLInitialResponse body; raises ProtocolError when the
    body does not frame (PostgreSQL refuses missing and extra bytes alike)."""
    try:
        mechanism, offset = pg.read_cstring(body, 0)
        (length,) = pg.INT32.unpack_from(body, offset)
    except (ValueError, struct.error):
        raise pg.ProtocolError("malformed SASLInitialResponse") from None
    if offset + 4 + length != len(body):
        raise pg.ProtocolError("malformed SASLInitialResponse")
    return mechanism.decode(errors="replace"), bytes(body[offset + 4 :])


@dataclass(frozen=True)
class ServerAuthPolicy:
    """What a server may ask for on one connection (server_auth, in libpq's require_auth names: scram-sha-256,
    md5, password, none), and whether a cleartext password may go on it."""

    methods: frozenset[str]
    cleartext: bool
    server: str  # host:port, as errors name it


ANY_AUTH = frozenset(("scram-sha-256", "md5", "password", "none"))


class ServerLogin:
    """The proxy's side of a server's authentication requests: answers each AuthenticationXXX message, as far as
    the policy allows, and accepts AuthenticationOk only from a server that asked for an allowed method (or for
    none, if allowed) and, when that was SCRAM, proved it knows the verifier."""

    def __init__(self, user: str, password: str | None, proven: ProvenKey | None, policy: ServerAuthPolicy):
        self.user = user
        self.password = password
        self.proven = proven  # for a user configured with a SCRAM verifier only
        self.policy = policy
        self._scram: ScramClientExchange | None = None
        self._asked: str | None = None  # the method the server asked for
        self._proved = False  # the server's SCRAM signature checked out

    def answer(self, body: bytes) -> bytes | None:
        """The reply to one Authentication message body, or None when there is nothing to send. Raises
        PostgresError (28000) where the policy or the server's proof fails, (08006) for a malformed SCRAM message."""
        (code,) = pg.INT32.unpack_from(body, 0)
        if code == AUTH_OK:
            self._accept_ok()
            return None
        try:
            return self._answer(code, bytes(body[4:]))
        except ScramException as exc:
            raise self._refused(f"failed SCRAM authentication: {exc}") from None
        except ValueError as exc:  # also binascii.Error and UnicodeDecodeError
            raise pg.PostgresError(pg.CONNECTION_FAILURE,
                                   f"shardproxy: server {self.policy.server} sent a malformed SCRAM message: {exc}"
                                   ) from None

    def _answer(self, code: int, data: bytes) -> bytes | None:
        if code == AUTH_SASL_FINAL:
            self._require_scram().verify(data)
            self._proved = True
            return None
        if code == AUTH_SASL_CONTINUE:
            return pg.message(b"p", self._require_scram().final(data))
        if code == AUTH_SASL:
            self._allow("scram-sha-256", "SCRAM-SHA-256 authentication")
            if SCRAM not in sasl_mechanisms(pg.INT32.pack(code) + data):
                raise pg.PostgresError(pg.INVALID_AUTHORIZATION, "server offers no SASL mechanism the proxy supports")
            plaintext = self.password if self.password and not is_scram_verifier(self.password) else None
            if plaintext is None and self.proven is None:
                self._require_password()  # raises: nothing to log in with
            self._scram = ScramClientExchange(plaintext, self.proven)
            first = self._scram.first()
            return pg.message(b"p", pg.cstring(SCRAM) + pg.INT32.pack(len(first)) + first)
        if code == AUTH_MD5:  # an md5 hash in the config is enough here
            self._allow("md5", "md5 authentication")
            password = self._require_password(allow_md5_hash=True)
            return pg.message(b"p", md5_answer(self.user, password, data[:4]) + b"\0")
        if code == AUTH_CLEARTEXT:
            self._allow("password", "a cleartext password")
            if not self.policy.cleartext:
                raise self._refused("asked for a cleartext password, which server_auth sends only over TLS that "
                                    "verified the server (server_tls.mode verify-ca or verify-full)")
            return pg.message(b"p", self._require_password().encode() + b"\0")
        raise pg.PostgresError(pg.INVALID_AUTHORIZATION, f"server asks for an unsupported authentication (code {code})")

    def _allow(self, method: str, what: str) -> None:
        if method not in self.policy.methods:
            raise self._refused(f"asked for {what}, which server_auth.methods does not allow")
        self._asked = method

    def _accept_ok(self) -> None:
        if self._scram is not None and not self._proved:
            raise self._refused("ended SCRAM authentication before proving it knows the password")
        if self._asked is None and "none" not in self.policy.methods:
            raise self._refused("asked for no authentication, which server_auth.methods does not allow (none)")

    def _refused(self, reason: str) -> pg.PostgresError:
        return pg.PostgresError(pg.INVALID_AUTHORIZATION, f"shardproxy: server {self.policy.server} {reason}")

    def _require_password(self, allow_md5_hash: bool = False) -> str:
        password = self.password
        if password is None or is_scram_verifier(password) or (is_md5_hash(password) and not allow_md5_hash):
            raise pg.PostgresError(
                pg.INVALID_AUTHORIZATION, f'no plaintext password configured to log in to the server as "{self.user}"'
            )
        return password

    def _require_scram(self) -> ScramClientExchange:
        if self._scram is None:
            raise pg.ProtocolError("SASL message out of order")
        return self._scram


__all__ = ["ANY_AUTH", "ProvenKey", "ScramException", "ScramSecret", "ScramServerExchange", "ServerAuthPolicy",
           "ServerLogin", "md5_answer", "parse_sasl_initial"]
