"""Session parameters that follow a client from one pooled server connection to the next.

Reported parameters (the server announces their values in ParameterStatus) are compared by value. The
others (search_path, extra_float_digits: not reported by PostgreSQL 15) are tracked by the SET statement that
changed them last, and so are the other settings a client gave at startup. When a client is linked to a connection
whose values differ, one hidden query brings the connection in line before the client's own messages. Reported
values are kept in shared dicts (`shared`), never changed in place, so that at each hand-out equal values are mostly
the same object and the check is an identity test.

The statements the proxy builds from a client's names and values keep them as names and values: a startup
parameter's name must be a plain (dotted) identifier, and is double-quoted; a value is an E'' string of ASCII,
which PostgreSQL reads the same whatever standard_conforming_strings and the client encoding are. A SET the proxy
keeps as the client wrote it (search_path) has no backslash nor dollar quote, which those settings would read
otherwise.
"""

from __future__ import annotations

import re

from shardproxy.wire import protocol as pg

REPORTED = frozenset(("application_name", "client_encoding", "DateStyle", "IntervalStyle", "TimeZone",
                      "standard_conforming_strings"))
UNREPORTED = ("search_path", "extra_float_digits")
_CANONICAL = {name.lower(): name for name in (*REPORTED, *UNREPORTED)}

# A SET or RESET alone, or as the first of several statements: a value ends at the first semicolon outside quotes.
# A backslash or a dollar sign in the value: not kept (the statement is forwarded, as any the proxy does not follow).
_SET = re.compile(r"""\s*(?:set\s+(?:session\s+)?(\w+)\s*(?:to|=)\s*((?:'(?:[^'\\]|'')*'|"(?:[^"]|"")*"|[^'";\\$])+?)"""
                  r"|reset\s+(\w+))\s*(?:;|\Z)", re.I | re.S)
_RESET_ALL = re.compile(r"\s*reset\s+all\s*(?:;|\Z)", re.I)

# PostgreSQL's encodings by the names it reports, and the other names it takes for each. A name is looked up as
# PostgreSQL does: lower case, with everything but letters and digits left out ("EUC-JP", "euc_jp" are "eucjp").
_ENCODING_NAMES = {
    "SQL_ASCII": (), "UTF8": ("unicode",), "MULE_INTERNAL": (), "EUC_JP": (), "EUC_CN": (), "EUC_KR": (),
    "EUC_TW": (), "EUC_JIS_2004": (), "SJIS": ("shiftjis", "mskanji", "win932", "windows932"),
    "SHIFT_JIS_2004": (), "BIG5": ("win950", "windows950"), "GBK": ("win936", "windows936"), "GB18030": (),
    "UHC": ("win949", "windows949"), "JOHAB": (), "KOI8R": ("koi8",), "KOI8U": (),
    "LATIN1": ("iso88591",), "LATIN2": ("iso88592",), "LATIN3": ("iso88593",), "LATIN4": ("iso88594",),
    "LATIN5": ("iso88599",), "LATIN6": ("iso885910",), "LATIN7": ("iso885913",), "LATIN8": ("iso885914",),
    "LATIN9": ("iso885915",), "LATIN10": ("iso885916",), "ISO_8859_5": (), "ISO_8859_6": (), "ISO_8859_7": (),
    "ISO_8859_8": (), "WIN866": ("alt", "windows866"), "WIN874": ("windows874",),
    "WIN1250": ("windows1250",), "WIN1251": ("win", "windows1251"), "WIN1252": ("windows1252",),
    "WIN1253": ("windows1253",), "WIN1254": ("windows1254",), "WIN1255": ("windows1255",),
    "WIN1256": ("windows1256",), "WIN1257": ("windows1257",),
    "WIN1258": ("windows1258", "abc", "tcvn", "tcvn5712", "vscii"),
}
_ENCODINGS = {re.sub(r"[^a-z0-9]", "", alias): name for name, aliases in _ENCODING_NAMES.items()
              for alias in (name.lower(), *aliases)}


# Reported values -> their one shared dict. Bounded: values unique to each client (application_name) would grow it
# without end; once cleared, equal values may be two dicts again, which costs a comparison, not correctness.
_SHARED: dict[frozenset[tuple[str, str]], dict[str, str]] = {}
_SHARED_MAX = 1024


def shared(values: dict[str, str]) -> dict[str, str]:
    """The one dict holding these values; it must not be changed in place (`with_value` makes the next)."""
    key = frozenset(values.items())
    found = _SHARED.get(key)
    if found is None:
        if len(_SHARED) >= _SHARED_MAX:
            _SHARED.clear()
        found = _SHARED[key] = dict(values)
    return found


def with_value(values: dict[str, str], name: str, value: str) -> dict[str, str]:
    """The shared dict of `values` with `name` set to `value`."""
    return values if values.get(name) == value else shared({**values, name: value})


def canonical_name(name: str) -> str | None:
    """The tracked parameter a startup or SET name refers to, or None if it is not tracked."""
    return _CANONICAL.get(name.lower())


def startup_values(startup: dict[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    """A client's startup parameters (and `options` -c settings), split into reported values and SET
    statements for the others, which follow the client like its own SETs."""
    values: dict[str, str] = {}
    statements: dict[str, str] = {}
    settings = {k: v for k, v in startup.items() if k not in _CONNECTION_KEYS}
    settings.update(_options(startup.get("options", "")))
    for key, value in settings.items():
        name = canonical_name(key) or key
        if not _PARAMETER_NAME.fullmatch(name):
            raise pg.PostgresError(pg.INVALID_NAME, f'invalid configuration parameter name "{name}"')
        if name == "client_encoding":
            values[name] = encoding_name(value) or value  # as the server will report it
        elif name in REPORTED:
            values[name] = value
        elif name == "search_path":
            statements[name] = f"SET {name} TO {_startup_list(value)}"
        else:
            statements[name] = f"SET {identifier(name)} TO {literal(value)}"
    return values, statements


def encoding_name(name: str) -> str | None:
    """The name PostgreSQL reports for an encoding it knows by this name (`euc-jp`: `EUC_JP`), else None."""
    return _ENCODINGS.get(re.sub(r"[^a-z0-9]", "", name.lower()))


_CONNECTION_KEYS = {"user", "database", "options", "replication"}
_PARAMETER_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*")  # PostgreSQL takes these
_OPTION = re.compile(r"(?:-c\s*|--)([\w.-]+)=((?:\\.|\S)*)")


def _options(options: str) -> dict[str, str]:
    """The `-c name=value` settings in a startup `options` string (backslash escapes a space)."""
    return {m.group(1).replace("-", "_"): re.sub(r"\\(.)", r"\1", m.group(2)) for m in _OPTION.finditer(options)}


def _startup_list(value: str) -> str:
    """A startup value of a list parameter as SET arguments: each element a quoted literal."""
    return ", ".join(literal(item.strip().strip('"')) for item in value.split(",")) or "''"


def tracked_set(sql: str) -> tuple[str, str | None] | None:
    """For a `SET name ...`/`RESET name` of an unreported parameter, alone or first in the query:
    (name, that SET statement alone or None for RESET). Only the SET is kept: it is replayed on other sessions."""
    match = _SET.match(sql)
    if match is None:
        return None
    name = canonical_name(match.group(1) or match.group(3))
    if name not in UNREPORTED:
        return None
    return name, (match.group(0).strip().removesuffix(";").rstrip() if match.group(1) else None)


def is_reset_all(sql: str) -> bool:
    """Whether the query starts with RESET ALL, which resets every unreported parameter too."""
    return _RESET_ALL.match(sql) is not None


def literal(value: str) -> str:
    """`value` as a string constant: E'...' (there a backslash escapes in every setting), of printable ASCII
    only, with every other character (and the quote, the backslash and the dollar sign) escaped."""
    return "E'" + _UNSAFE.sub(_escape, value) + "'"


_UNSAFE = re.compile(r"[^ -#%-&(-\[\]-~]")  # all but printable ASCII without $ ' \


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}"


def identifier(name: str) -> str:
    """A parameter name, double-quoted: so that one that is also a keyword (all, local) stays a name."""
    return '"' + name.replace('"', '""') + '"'


def sync_statements(client_values: dict[str, str], client_sql: dict[str, str],
                    server_values: dict[str, str], server_sql: dict[str, str]) -> list[str]:
    """The statements that make a server session match the client's parameters; updates server_sql."""
    statements = [f"SET {name} TO {literal(value)}" for name, value in client_values.items()
                  if name in REPORTED and server_values.get(name) != value]
    for name in client_sql.keys() | server_sql.keys():
        want = client_sql.get(name)
        if server_sql.get(name) != want:
            statements.append(want or f"RESET {identifier(name)}")
            if want is None:
                server_sql.pop(name, None)
            else:
                server_sql[name] = want
    return statements
