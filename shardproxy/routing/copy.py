"""COPY between a client and every shard: what a COPY statement asks for (`copy_spec`), and which shard owns each
row of the data a client sends (`RowSplitter`).

Data arrives in CopyData messages cut anywhere, so a row may span several. The splitter keeps the incomplete end
of each piece for the next one, reads the shard-key field of every complete row and hands back, per shard, the
rows that shard owns, byte for byte as they came: each server parses its rows again, so the proxy reads only row
ends and one field (plain rows in a compiled loop, _copyrows.pyx). A header (csv HEADER, binary's signature) and
the binary trailer go to every shard, whose server checks them; the end-of-data line `\\.` ends the data, as it
does for PostgreSQL. Pure: the data path feeds it (datapath/fanout/copy.py).
"""

from __future__ import annotations

import re
import struct
from collections.abc import Callable
from dataclasses import dataclass

import pglast
from pglast import ast
from pglast.stream import RawStream

from shardproxy._hash import HashRing
from shardproxy.routing._copyrows import route_lines, route_tuples
from shardproxy.routing.keys import Key, ShardKeyError, decode_key

NOT_NULL_VIOLATION = "23502"
BAD_COPY_FILE_FORMAT = "22P04"
INVALID_TEXT_REPRESENTATION = "22P02"
FEATURE_NOT_SUPPORTED = "0A000"

BINARY_SIGNATURE = b"PGCOPY\n\xff\r\n\0"
BINARY_HEADER = BINARY_SIGNATURE + b"\0\0\0\0\0\0\0\0"  # no flags, no header extension
BINARY_TRAILER = b"\xff\xff"
_END_OF_DATA = (b"\\.", b"\\.\r")  # a line that ends the data, in text and csv
_INT_TYPES = frozenset({20, 21, 23, 26})  # int8, int2, int4, oid
_SIGNED_TYPES = frozenset({20, 21, 23})  # in binary, a big-endian signed integer
_TEXT_TYPES = frozenset({25, 1043, 1042, 19})  # text, varchar, bpchar, name: the key is the field's bytes
# How the compiled loop reads a key (_copyrows.pyx): its bytes, a canonical integer's text, a binary integer, or
# not at all (the row goes the careful way).
TEXT_KEY, INTEGER_KEY, BINARY_INT_KEY, OTHER_KEY = range(4)
_CANONICAL_INT = re.compile(rb"-?[1-9][0-9]*|0")
_UNSIGNED16 = struct.Struct("!H")
_SIGNED32 = struct.Struct("!i")
_ESCAPES = {ord("b"): b"\b", ord("f"): b"\f", ord("n"): b"\n", ord("r"): b"\r", ord("t"): b"\t", ord("v"): b"\v"}


class CopyError(Exception):
    """A COPY the proxy refuses, or a row it cannot route: the client gets it with its SQLSTATE."""

    def __init__(self, sqlstate: str, message: str) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate
        self.message = message


@dataclass(frozen=True)
class CopyFormat:
    """How the data is written, as PostgreSQL reads COPY's options."""

    binary: bool = False
    csv: bool = False
    header: bool = False  # a first line to skip (or, with HEADER MATCH, to check): every shard's server gets it
    delimiter: bytes = b"\t"
    null: bytes = b"\\N"
    quote: bytes = b'"'
    escape: bytes = b'"'


@dataclass(frozen=True)
class CopySpec:
    """A COPY between the client and a table (or a query's rows)."""

    table: str | None  # the table as a qualified, quoted name; None for COPY (query)
    columns: tuple[str, ...] | None  # the column list, if given
    into: bool  # FROM STDIN
    stream: bool  # the data goes to or comes from the client (STDIN/STDOUT), not a server's file or program
    query: str | None  # COPY (query) TO: the query's text
    format: CopyFormat


def copy_spec(sql: str) -> CopySpec:
    """The spec of a single COPY statement's text; raises CopyError for options PostgreSQL would refuse too."""
    statements = pglast.parse_sql(sql)
    if len(statements) != 1 or not isinstance(statements[0].stmt, ast.CopyStmt):
        raise CopyError(FEATURE_NOT_SUPPORTED, "shardproxy: COPY across shards must be the only statement of its query")
    statement = statements[0].stmt
    relation = statement.relation
    table = None if relation is None else ".".join(
        _quoted(part) for part in (relation.schemaname, relation.relname) if part)
    columns = None if statement.attlist is None else tuple(name.sval for name in statement.attlist)
    query = None if statement.query is None else RawStream()(statement.query)
    stream = statement.filename is None and not statement.is_program
    return CopySpec(table, columns, bool(statement.is_from), stream, query, _format(statement.options or ()))


def _quoted(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _format(options: tuple[ast.DefElem, ...]) -> CopyFormat:
    values = {str(option.defname): _option_value(option.arg) for option in options}
    kind = str(values.get("format", "text")).lower()
    csv = kind == "csv"
    header = values.get("header", False)
    quote = _one_byte(values, "quote", b'"')
    return CopyFormat(
        binary=kind == "binary",
        csv=csv,
        header=header if isinstance(header, bool) else str(header).lower() in ("on", "true", "1", "match"),
        delimiter=_one_byte(values, "delimiter", b"," if csv else b"\t"),
        null=str(values.get("null", "" if csv else "\\N")).encode(),
        quote=quote,
        escape=_one_byte(values, "escape", quote),
    )


def _option_value(arg: object) -> object:
    if arg is None:
        return True
    if isinstance(arg, ast.Boolean):
        return bool(arg.boolval)
    if isinstance(arg, ast.Integer):
        return bool(arg.ival)
    if isinstance(arg, ast.String):
        return arg.sval
    return None


def _one_byte(values: dict[str, object], name: str, default: bytes) -> bytes:
    value = values.get(name)
    if value is None:
        return default
    encoded = str(value).encode()
    if len(encoded) != 1:
        raise CopyError(FEATURE_NOT_SUPPORTED, f"shardproxy: COPY {name} must be a single one-byte character")
    return encoded


class RowSplitter:
    """Cuts a client's COPY data into rows and sorts them by the shard that owns each row's key.

    `feed` takes the payload of CopyData messages as they come, `end` the end of the data; both return, per
    shard, the bytes to send it (empty for none). Plain rows are routed by the compiled loop (_copyrows.pyx);
    the others, one at a time, here. Raises CopyError for a row whose key is NULL, missing or not a valid key;
    the row's line number is in the message.
    """

    def __init__(self, fmt: CopyFormat, key_index: int, key_type: int, ring: HashRing, table: str,
                 key_name: str) -> None:
        self.format = fmt
        self.key_index = key_index
        self.key_type = key_type
        self.ring = ring
        self.table = table
        self.key_name = key_name
        self.rows = 0  # rows routed so far
        self.done = False  # the end-of-data line, or the binary trailer, was read: the rest is ignored
        self._tail = b""  # the start of a row whose end has not arrived
        self._started = False  # the header (csv HEADER's line, binary's signature) went to every shard
        self._kind = _key_kind(key_type, fmt.binary)
        self._special = fmt.quote if fmt.csv else b"\\"  # what makes a row one for the careful path
        self._convert = self._converter()
        self._key = self._key_reader()
        if fmt.csv:
            self._csv_row = _csv_row_pattern(fmt.quote, fmt.escape)
            self._csv_field = _csv_field_pattern(fmt.delimiter, fmt.quote, fmt.escape)
            self._csv_quoted = re.compile(b"(" + _quoted_section(fmt.quote, fmt.escape) + b")", re.DOTALL)
            self._csv_escaped = re.compile(re.escape(fmt.escape) + b"(.)", re.DOTALL)
        elif not fmt.binary:
            self._text_field = re.compile(rb"((?:[^\\" + re.escape(fmt.delimiter) + rb"]|\\.)*)", re.DOTALL)

    def feed(self, data: bytes) -> list[bytearray]:
        out = [bytearray() for _ in self.ring.names]
        if not self.done:
            buf = self._tail + data if self._tail else data
            self._tail = b""
            self._tail = buf[self._binary(buf, out) if self.format.binary else self._lines(buf, out):]
        return out

    def end(self) -> list[bytearray]:
        """The end of the data: a last line without its newline is a row too (as PostgreSQL reads it). What
        cannot be read (a cut binary tuple, an open csv quote) goes to the first shard, whose server says why."""
        out = [bytearray() for _ in self.ring.names]
        tail, self._tail = self._tail, b""
        if self.format.binary:
            if not self._started:
                out = [bytearray(tail) for _ in self.ring.names]  # nothing read: every server says what is wrong
            elif tail and not self.done:
                out[0] += tail
        elif tail and not self.done:
            line = tail + (b"\r\n" if tail.endswith(b"\r") else b"\n")
            if self._lines(line, out) < len(line):
                out[0] += tail
        return out

    # -- text and csv ----------------------------------------------------------------------------------------
    def _lines(self, buf: bytes, out: list[bytearray]) -> int:
        """Route the complete lines at the start of buf; returns where the incomplete rest starts."""
        cut = buf.rfind(b"\n") + 1
        pos = 0
        if cut and not self._started:
            pos = self._header(buf, cut, out)
        fmt = self.format
        while 0 <= pos < cut and not self.done:
            rows, pos = route_lines(buf, pos, cut, out, self.ring, fmt.delimiter, self.key_index, fmt.null,
                                    self._kind, self._special)
            self.rows += rows
            if pos < cut:
                end = self._row_end(buf, pos, cut)
                if end < 0:
                    break
                self._route_row(buf[pos:end - 1], out)
                pos = end
        return max(pos, 0)

    def _header(self, buf: bytes, cut: int, out: list[bytearray]) -> int:
        """The start of the data: a header line goes to every shard, whose server skips or checks it."""
        if not self.format.header:
            self._started = True
            return 0
        end = self._row_end(buf, 0, cut)
        if end > 0:
            self._started = True
            for shard in out:
                shard += buf[:end]
        return end

    def _route_row(self, row: bytes, out: list[bytearray]) -> None:
        """One row the compiled loop left (row: without its newline)."""
        if row in _END_OF_DATA:
            self.done = True
            return
        self.rows += 1
        out[self.ring.owner_index(self._key(row, self.rows))] += row + b"\n"

    def _row_end(self, buf: bytes, pos: int, cut: int) -> int:
        """Just past the newline that ends the row at pos, or -1 if it does not end before cut."""
        if self.format.csv:
            match = self._csv_row.match(buf, pos, cut)
            return match.end() if match else -1
        end = pos
        while True:
            end = buf.find(b"\n", end, cut) + 1
            if end == 0:
                return -1
            backslashes = end - 1 - len(buf[pos:end - 1].rstrip(b"\\")) - pos
            if backslashes % 2 == 0:  # (an odd number escapes the newline: it is data)
                return end

    # -- the key of a row --------------------------------------------------------------------------------------
    def _key_reader(self) -> Callable[[bytes, int], object]:
        """The function that reads a text or csv row's key (the row without its newline, and its line number)."""
        fmt = self.format
        index, delimiter, quote, null, convert = self.key_index, fmt.delimiter, fmt.quote, fmt.null, self._convert

        def key(row: bytes, number: int) -> object:
            if fmt.csv:
                if quote in row:
                    return self._csv_key(row, number)
            elif b"\\" in row:
                return self._escaped_key(row, number)
            fields = row.split(delimiter, index + 1)
            if len(fields) <= index:
                raise self._missing(number)
            field = fields[index]
            if len(fields) == index + 1 and field.endswith(b"\r"):  # the last field, before a \r\n line end
                field = field[:-1]
            if field == null:
                raise self._null(number)
            return convert(field, number)

        return key

    def _converter(self) -> Callable[[bytes, int], object]:
        """A text field's value to what the ring hashes; canonical integers and text are hashed as their bytes."""
        key_type = self.key_type

        def convert(field: bytes, number: int) -> object:
            if key_type in _TEXT_TYPES or key_type in _INT_TYPES and _CANONICAL_INT.fullmatch(field):
                return field
            return self._decoded(field, 0, number)

        return convert

    def _decoded(self, value: bytes, fmt: int, number: int) -> Key:
        try:
            return decode_key(value, fmt, self.key_type)
        except ShardKeyError as exc:
            raise CopyError(INVALID_TEXT_REPRESENTATION, f"{exc} ({self._where(number)})") from None

    def _escaped_key(self, row: bytes, number: int) -> object:
        """The key of a text row that holds backslash escapes (which may hide a delimiter)."""
        field = self._key_field(self._text_field, 1, row, number)
        if field == self.format.null:
            raise self._null(number)
        return self._convert(_unescape(field), number)

    def _csv_key(self, row: bytes, number: int) -> object:
        """The key of a csv row with quotes: a quoted field is never NULL (FORCE_NULL aside)."""
        raw = self._key_field(self._csv_field, 0, row, number)
        if raw == self.format.null:
            raise self._null(number)
        return self._convert(self._unquoted(raw) if self.format.quote in raw else raw, number)

    def _key_field(self, pattern: re.Pattern[bytes], group: int, row: bytes, number: int) -> bytes:
        """The key's field of a row as `pattern` reads fields (its `group`), without the line's closing \\r."""
        delimiter = self.format.delimiter
        pos = 0
        for _ in range(self.key_index):
            pos = _matched(pattern, row, pos).end()
            if row[pos:pos + 1] != delimiter:
                raise self._missing(number)
            pos += 1
        field = _matched(pattern, row, pos).group(group)
        if field.endswith(b"\r") and pos + len(field) == len(row):
            field = field[:-1]
        return field

    def _unquoted(self, raw: bytes) -> bytes:
        """A csv field's value: its quoted sections without their quotes, an escaped character as itself."""
        quote = self.format.quote
        parts = self._csv_quoted.split(raw)
        return b"".join(self._csv_escaped.sub(rb"\1", part[1:-1]) if part.startswith(quote) and len(part) > 1
                        else part for part in parts)

    # -- binary ----------------------------------------------------------------------------------------------
    def _binary(self, buf: bytes, out: list[bytearray]) -> int:
        """Route the complete tuples at the start of buf; returns where the incomplete rest starts."""
        pos = 0 if self._started else self._signature(buf, out)
        while 0 <= pos < len(buf) and not self.done:
            rows, pos = route_tuples(buf, pos, out, self.ring, self.key_index, self._kind)
            self.rows += rows
            after = self._tuple(buf, pos, out)
            if after < 0:
                break
            pos = after
        return len(buf) if self.done else max(pos, 0)

    def _signature(self, buf: bytes, out: list[bytearray]) -> int:
        """The file header, to every shard; where the tuples start, or -1 while it has not all arrived."""
        if len(buf) < len(BINARY_HEADER):
            return -1
        (extension,) = _SIGNED32.unpack_from(buf, 15)
        if buf[:11] != BINARY_SIGNATURE or extension < 0:
            raise CopyError(BAD_COPY_FILE_FORMAT, "COPY file signature not recognized")
        pos: int = len(BINARY_HEADER) + extension
        if len(buf) < pos:
            return -1
        for shard in out:
            shard += buf[:pos]
        self._started = True
        return pos

    def _tuple(self, buf: bytes, pos: int, out: list[bytearray]) -> int:
        """One tuple the compiled loop left, or the trailer; past it, or -1 if it has not all arrived."""
        n = len(buf)
        if n - pos < 2:
            return -1
        (count,) = _UNSIGNED16.unpack_from(buf, pos)
        if count == 0xFFFF:
            for shard in out:
                shard += BINARY_TRAILER
            self.done = True
            return n
        end = pos + 2
        key: bytes | None = None
        for field in range(count):
            if n - end < 4:
                return -1
            (length,) = _SIGNED32.unpack_from(buf, end)
            end += 4
            if field == self.key_index and length >= 0:
                key = buf[end:end + length]
            end += max(length, 0)
        if end > n:
            return -1
        self.rows += 1
        if count <= self.key_index:
            raise self._missing(self.rows)
        if key is None:
            raise self._null(self.rows)
        out[self.ring.owner_index(self._decoded(key, 1, self.rows))] += buf[pos:end]
        return end

    # -- errors ------------------------------------------------------------------------------------------------
    def _where(self, number: int) -> str:
        return f"COPY {self.table}, {'tuple' if self.format.binary else 'line'} {number + self.format.header}"

    def _null(self, number: int) -> CopyError:
        return CopyError(NOT_NULL_VIOLATION, f"shardproxy: the shard key {self.key_name} is NULL; a row needs one to "
                                             f"find its shard ({self._where(number)})")

    def _missing(self, number: int) -> CopyError:
        return CopyError(BAD_COPY_FILE_FORMAT, f"shardproxy: missing data for the shard key {self.key_name} "
                                               f"({self._where(number)})")


def _key_kind(key_type: int, binary: bool) -> int:
    if key_type in _TEXT_TYPES:
        return TEXT_KEY
    if binary:
        return BINARY_INT_KEY if key_type in _SIGNED_TYPES else OTHER_KEY
    return INTEGER_KEY if key_type in _INT_TYPES else OTHER_KEY


def _matched(pattern: re.Pattern[bytes], row: bytes, pos: int) -> re.Match[bytes]:
    """A field pattern's match at pos (it matches even an empty field)."""
    match = pattern.match(row, pos)
    assert match is not None
    return match


def _csv_row_pattern(quote: bytes, escape: bytes) -> re.Pattern[bytes]:
    """A whole csv row and its newline: quoted sections may hold newlines."""
    return re.compile(b"(?:" + _quoted_section(quote, escape) + b"|[^" + re.escape(quote) + b"\n])*\n", re.DOTALL)


def _csv_field_pattern(delimiter: bytes, quote: bytes, escape: bytes) -> re.Pattern[bytes]:
    """One csv field: quoted sections and plain bytes, up to a delimiter outside quotes."""
    return re.compile(b"(?:" + _quoted_section(quote, escape) + b"|[^" + re.escape(quote + delimiter) + b"])*",
                      re.DOTALL)


def _quoted_section(quote: bytes, escape: bytes) -> bytes:
    q, e = re.escape(quote), re.escape(escape)
    if quote == escape:
        return q + b"(?:[^" + q + b"]|" + q + q + b")*" + q
    return q + b"(?:[^" + q + e + b"]|" + e + b".)*" + q


def _unescape(field: bytes) -> bytes:
    """A text-format field's value: PostgreSQL's backslash sequences (\\n, octal, \\x hex, any other character)."""
    out = bytearray()
    i, n = 0, len(field)
    while i < n:
        c = field[i]
        if c != 0x5C or i + 1 == n:
            out.append(c)
            i += 1
            continue
        nxt = field[i + 1]
        octal = re.match(rb"[0-7]{1,3}", field[i + 1:i + 4])
        hexa = re.match(rb"x([0-9a-fA-F]{1,2})", field[i + 1:i + 4])
        if octal:
            out.append(int(octal.group(0), 8) & 0xFF)
            i += 1 + len(octal.group(0))
        elif hexa:
            out.append(int(hexa.group(1), 16))
            i += 1 + len(hexa.group(0))
        else:
            out += _ESCAPES.get(nxt, bytes((nxt,)))
            i += 2
    return bytes(out)
