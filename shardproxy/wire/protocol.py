"""PostgreSQL wire protocol v3: message framing helpers, builders and parsers.

Only what the proxy needs to understand is parsed; everything else is forwarded as the bytes it arrived in.
Every error the proxy itself sends to a client is built here (`error`), with SQLSTATEs named as PostgreSQL
names them.
"""

from __future__ import annotations

import struct

HEADER = struct.Struct("!cI")
INT32 = struct.Struct("!I")
INT16 = struct.Struct("!H")
INT32_PAIR = struct.Struct("!II")

PROTOCOL_3_0 = 196608
SSL_REQUEST = 80877103
GSSENC_REQUEST = 80877104
CANCEL_REQUEST = 80877102
MAX_STARTUP_SIZE = 10_000  # PostgreSQL's own limit for a startup packet



class Frontend:
    """Message types a client sends, by PostgreSQL's names for them (protocol.h's PqMsg_*), as the ints that
    indexing a buffer gives. The same byte means another message from a server: see Backend."""

    BIND = ord("B")
    CLOSE = ord("C")
    COPY_DATA = ord("d")
    COPY_DONE = ord("c")
    COPY_FAIL = ord("f")
    DESCRIBE = ord("D")
    EXECUTE = ord("E")
    FLUSH = ord("H")
    FUNCTION_CALL = ord("F")
    PARSE = ord("P")
    PASSWORD = ord("p")  # also SASLInitialResponse and SASLResponse
    QUERY = ord("Q")
    SYNC = ord("S")
    TERMINATE = ord("X")


class Backend:
    """Message types a server sends (PqMsg_* names), as ints."""

    AUTHENTICATION = ord("R")
    BACKEND_KEY_DATA = ord("K")
    BIND_COMPLETE = ord("2")
    CLOSE_COMPLETE = ord("3")
    COMMAND_COMPLETE = ord("C")
    COPY_DATA = ord("d")
    COPY_DONE = ord("c")
    COPY_IN_RESPONSE = ord("G")
    COPY_OUT_RESPONSE = ord("H")
    DATA_ROW = ord("D")
    EMPTY_QUERY_RESPONSE = ord("I")
    ERROR_RESPONSE = ord("E")
    NO_DATA = ord("n")
    NOTICE_RESPONSE = ord("N")
    NOTIFICATION_RESPONSE = ord("A")
    PARAMETER_DESCRIPTION = ord("t")
    PARAMETER_STATUS = ord("S")
    PARSE_COMPLETE = ord("1")
    PORTAL_SUSPENDED = ord("s")
    READY_FOR_QUERY = ord("Z")
    ROW_DESCRIPTION = ord("T")


# SQLSTATEs, as PostgreSQL names them.
PROTOCOL_VIOLATION = "08P01"
CONNECTION_FAILURE = "08006"
CONNECTION_EXCEPTION = "08000"
TRANSACTION_RESOLUTION_UNKNOWN = "08007"
INVALID_PASSWORD = "28P01"
INVALID_AUTHORIZATION = "28000"
TOO_MANY_CONNECTIONS = "53300"
INSUFFICIENT_PRIVILEGE = "42501"
INVALID_NAME = "42602"
UNDEFINED_PSTATEMENT = "26000"
QUERY_CANCELED = "57014"
ADMIN_SHUTDOWN = "57P01"
CANNOT_CONNECT_NOW = "57P03"
FEATURE_NOT_SUPPORTED = "0A000"
WARNING = "01000"
INTERNAL_ERROR = "XX000"
IDLE_IN_TRANSACTION_TIMEOUT = "25P03"
IN_FAILED_TRANSACTION = "25P02"
INVALID_PARAMETER_VALUE = "22023"

# Responses the proxy synthesises. Prebuilt: they are sent on the hot path.
PARSE_COMPLETE = b"1\x00\x00\x00\x04"
BIND_COMPLETE = b"2\x00\x00\x00\x04"
CLOSE_COMPLETE = b"3\x00\x00\x00\x04"
NO_DATA = b"n\x00\x00\x00\x04"
AUTH_OK = b"R\x00\x00\x00\x08\x00\x00\x00\x00"
IDLE, IN_TRANSACTION, FAILED_TRANSACTION = 73, 84, 69  # ReadyForQuery status bytes: I, T, E
READY = {status: b"Z\x00\x00\x00\x05" + bytes([status]) for status in (IDLE, IN_TRANSACTION, FAILED_TRANSACTION)}
SSL_NO = b"N"
TERMINATE = b"X\x00\x00\x00\x04"
SYNC = b"S\x00\x00\x00\x04"
FLUSH = b"H\x00\x00\x00\x04"


class ProtocolError(Exception):
    """The peer broke the protocol; the connection cannot go on."""


class PostgresError(Exception):
    """An ErrorResponse, received from a server or made by the proxy: severity, SQLSTATE, message."""

    def __init__(self, code: str, message: str, severity: str = "ERROR", fields: dict[str, str] | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.severity = severity
        self.fields = fields or {"S": severity, "V": severity, "C": code, "M": message}

    @classmethod
    def from_body(cls, body: bytes) -> PostgresError:
        fields = parse_fields(body)
        return cls(fields.get("C", INTERNAL_ERROR), fields.get("M", ""), fields.get("S", "ERROR"), fields)

    def to_message(self, severity: str | None = None) -> bytes:
        fields = dict(self.fields)
        if severity:
            fields["S"] = fields["V"] = severity
        return message(b"E", b"".join(k.encode() + v.encode() + b"\0" for k, v in fields.items()) + b"\0")


def message(kind: bytes, body: bytes = b"") -> bytes:
    return kind + INT32.pack(len(body) + 4) + body


def error(code: str, text: str, severity: str = "ERROR") -> bytes:
    """An ErrorResponse made by the proxy."""
    return PostgresError(code, text, severity).to_message()


def notice(code: str, text: str, severity: str = "WARNING") -> bytes:
    """A NoticeResponse made by the proxy."""
    fields = {"S": severity, "V": severity, "C": code, "M": text}
    return message(b"N", b"".join(k.encode() + v.encode() + b"\0" for k, v in fields.items()) + b"\0")


def fatal(code: str, text: str) -> bytes:
    return error(code, text, "FATAL")


def cstring(text: str) -> bytes:
    return text.encode() + b"\0"


def parameter_status(name: str, value: str) -> bytes:
    return message(b"S", cstring(name) + cstring(value))


def backend_key_data(pid: int, secret: int) -> bytes:
    return message(b"K", INT32_PAIR.pack(pid, secret))


def command_complete(tag: str) -> bytes:
    return message(b"C", cstring(tag))


def query(sql: str) -> bytes:
    return message(b"Q", cstring(sql))


def auth_request(code: int, data: bytes = b"") -> bytes:
    return message(b"R", INT32.pack(code) + data)


def startup_message(params: dict[str, str]) -> bytes:
    body = INT32.pack(PROTOCOL_3_0) + b"".join(cstring(k) + cstring(v) for k, v in params.items()) + b"\0"
    return INT32.pack(len(body) + 4) + body


def cancel_request(pid: int, secret: int) -> bytes:
    return INT32.pack(16) + INT32.pack(CANCEL_REQUEST) + INT32_PAIR.pack(pid, secret)


def parse_startup_params(body: bytes) -> dict[str, str]:
    """The name/value pairs of a StartupMessage body (after the protocol version)."""
    parts = bytes(body).split(b"\0")
    if len(parts) < 2 or parts[-1] != b"" or parts[-2] != b"" or len(parts) % 2:
        raise ProtocolError("malformed startup packet")
    items = parts[:-2]
    try:
        return {items[i].decode(): items[i + 1].decode() for i in range(0, len(items), 2)}
    except UnicodeDecodeError as exc:
        raise ProtocolError("startup packet is not valid UTF-8") from exc


def parse_fields(body: bytes) -> dict[str, str]:
    """The fields of an ErrorResponse or NoticeResponse body."""
    fields = {}
    for part in bytes(body).split(b"\0"):
        if part:
            fields[chr(part[0])] = part[1:].decode(errors="replace")
    return fields


def read_cstring(buf: bytes | bytearray, start: int) -> tuple[bytes, int]:
    """The NUL-terminated string at `start` and the offset just past its NUL."""
    end = buf.index(0, start)
    return bytes(buf[start:end]), end + 1
