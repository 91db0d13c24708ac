"""Talking to the proxy below the drivers: raw protocol messages, and logging in as a trust user."""

from __future__ import annotations

import struct
import time

import psycopg

PROTOCOL_3_0 = 196608
# Raw-socket tests log in as a trust user; the proxy still logs in to the server with the real password.
TRUST_USERS = [{"name": "app", "password": "secret", "auth": "trust"}]


def connect_soon(dsn: str, timeout: float = 2.0) -> psycopg.Connection:
    """Connect, retrying refusals for a little while."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return psycopg.connect(dsn, autocommit=True)
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def startup_packet(**params: str) -> bytes:
    body = struct.pack("!I", PROTOCOL_3_0) + b"".join(f"{k}\0{v}\0".encode() for k, v in params.items()) + b"\0"
    return struct.pack("!I", len(body) + 4) + body


def message(kind: bytes, body: bytes) -> bytes:
    return kind + struct.pack("!I", len(body) + 4) + body


def error_codes(replies: list[tuple[bytes, bytes]]) -> list[str]:
    """The SQLSTATE of every ErrorResponse among the replies."""
    codes = []
    for kind, body in replies:
        if kind == b"E":
            fields = {part[:1]: part[1:] for part in body.split(b"\0") if part}
            codes.append(fields[b"C"].decode())
    return codes
