"""The compiled literal scanner (_literals.pyx) against the regex normalisation it replaced.

The regex below is the reference: ``normalise`` must give the same template, base and literal values
as it for every text, and the same None ("plan as written") for texts with backslashes or dollar quotes.
"""

from __future__ import annotations

import random
import re
import sys

import pytest

from shardproxy.routing._literals import normalise
from shardproxy.routing.keys import number as _number

_LITERALS = re.compile(
    r"""(?=["'\-/\d.])
      (?:(?P<keep>"(?:[^"]|"")*"|--[^\n]*|/\*.*?\*/|(?<=[\w$&])'(?:[^']|'')*')
        |'(?P<str>(?:[^']|'')*)'
        |(?<![\w$.])(?P<num>(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?)(?![\w$.]))""",
    re.DOTALL | re.VERBOSE,
)
_DOLLAR_QUOTE = re.compile(r"\$(?!\d)")
_PARAM_NUMBER = re.compile(r"\$(\d+)")


def reference(sql: str) -> tuple[str, int, list[object]] | None:
    """The regex normalisation, as plan_simple ran it before the scanner was compiled."""
    if "\\" in sql or ("$" in sql and _DOLLAR_QUOTE.search(sql)):
        return None
    base = max(map(int, _PARAM_NUMBER.findall(sql)), default=0) if "$" in sql else 0
    literals: list[object] = []

    def placeholder(match: re.Match[str]) -> str:
        if match.lastgroup == "keep":
            return match[0]
        if match.lastgroup == "str":
            literals.append(match["str"].replace("''", "'"))
        else:
            literals.append(_number(match["num"]))
        return f"${base + len(literals)}"

    return _LITERALS.sub(placeholder, sql), base, literals


def check(sql: str) -> None:
    got = normalise(sql, _number)
    want = reference(sql)
    assert got == want, sql
    if got is not None:
        # Same types too (1 == 1.0 == True), and a template in canonical form (its narrowest kind).
        assert [type(v) for v in got[2]] == [type(v) for v in want[2]], sql
        assert type(got[1]) is int, sql
        assert sys.getsizeof(got[0]) == sys.getsizeof(want[0]), sql


TRICKY = [
    "",
    "SELECT 1",
    "SELECT * FROM orders WHERE user_id = 42 AND status = 'open' LIMIT 20",
    # strings: doubled quotes, empty, prefixes that keep them as written
    "SELECT 'it''s', '', '''', 'a''''b', ''''''",
    "SELECT E'x', B'101', X'ff', U&'d\\0061t', N'x', e'x', u&'x', n'x', date '2024-01-01', t.a'x'",
    "SELECT U&'x' UESCAPE '!', &'x', $1'x', _'x', é'x', 1'x', )'x', ('x', ,'x'",
    "SELECT 'x'::text, 'x'||'y', 'x''y'||'z', 'a' 'b', 'a'\n'b'",
    # unterminated strings and identifiers (with and without doubled quotes inside)
    "SELECT 'abc",
    "SELECT 'ab''c",
    "SELECT 'ab''c''d",
    "SELECT 'ab''",
    "SELECT ''",
    "SELECT '''",
    "SELECT x FROM t WHERE a = 'b' AND c = 'd",
    'SELECT "abc',
    'SELECT "ab""c',
    'SELECT "ab""c""d',
    'SELECT "a" "b',
    "SELECT \"unterminated 'str' 5",
    # quoted identifiers
    'SELECT "col 1", "a""b", "it\'s", "5", "-- no", "/* no */", "" FROM "t""x"',
    'SELECT "é", "😀", "a"."b", t."5"',
    # comments
    "SELECT 1 -- 'not a string' 5\n, 2",
    "SELECT 1 -- trailing 'x'",
    "SELECT 1 --\n'x'",
    "SELECT 1 - -2, 1-2, 1--2\n, -3, --",
    "SELECT /* 'x' 5 */ 1, /* a /* b */ 'c' */ 2",
    "SELECT /**/ 1, /*/ 2 */ 3, /* unterminated 'x' 5",
    "SELECT /* a */ /* b 'c' */ 'd' /**/ 7 /*",
    "/* shard_key: 42 */ SELECT * FROM orders WHERE x = 1",
    "SELECT 1 /* x */-- y 'z'\n'w'",
    "SELECT 1/2, 1 / 2, 4/*x*/2, 4*/2",
    "SELECT 'a /* b' */ 1, \"c -- d\" 2, 'e -- f' 3",
    # numbers next to identifiers, dots and parameters
    "SELECT t1, x1y, 1x, x.5, .5, 5., 5.5, 5.5.5, 1..2, 1e5, 1E5, 1e+5, 1e-5, 1e, 1e+, 1ex, 1.e5",
    "SELECT .5e3, .e3, ., .., 5.e, 5.x, x5.5, a.b.5, 1.5e3.2, 1e5e5, 0x1F, 0b101, 0o17, 1_000",
    "SELECT $1, $2 + 5, $10, 1::int, 5::numeric(10, 2), a[1], a[1:2], f(1,2), -1, +1, 1$",
    "SELECT * FROM t WHERE a = $3 AND b = 7 AND c = $1 AND d = 'x'",
    "SELECT $1$2, $01, $007 + 1, x$1, $1x",
    "SELECT 00, 007, 4.0, 4.00, 1e3, 1.5, 5000000000, 99999999999999999999999, 1e400, 1e-400",
    "SELECT 123456789012345678, 1234567890123456789, 000000000000000000001",
    "SELECT 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25,"
    " 26, 27, 28, 29, 30, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 'x', 'y', 'z'",
    "SELECT x FROM t LIMIT 10 OFFSET 20;SELECT 5;",
    "5", "'x'", ".5", "5.", "-5", "$1", "$9 5", "$99999999999999999999 5 'x'", "$1 $0000000000000000000000000007 9",
    # texts planned as written
    "SELECT E'a\\'b'",
    "SELECT 'a\\b'",
    "SELECT $$x$$",
    "SELECT $tag$x$tag$",
    "SELECT 1 WHERE $",
    "SELECT $1, $a",
    "SELECT 'x$'",
    "SELECT 5 $",
    # non-ASCII: letters glue like ASCII ones, Unicode digits are digits
    "SELECT é5, 5é, 'é', \"é\", 'naïve''s' FROM café WHERE ü = 'ö' AND x = 5",
    "SELECT '😀', \"😀\", 😀'x', x😀5, 5😀, '😀''😀' -- 😀 'x'\n, /* 😀 */ 7",
    "SELECT '日本語', 日本'語', 語5, 5語, 'Ω' FROM t WHERE a = 1",
    "SELECT ١٢, ٣.٤, x١, ١x, $١ + 5, 'x' ١e٢",
    "SELECT ５, ５.５, １e５ FROM t",
    "SELECT ², ²5, 5², ½, Ⅻ5, 5Ⅻ, ª'x', µ5",
    "SELECT 'é' FROM t WHERE a = 1",  # the only non-ASCII character is in a literal
    "SELECT 'Ā' || 'é', 'a' FROM t",
    "SELECT '😀', 'Ā', 'é' FROM t",
    "SELECT 'x', \"Ā\" FROM t",
    "\x00'a'\x00 5\x00",
    "SELECT '\ud800', \ud8005, '\udfff'",
    "SELECT 1\u00a02, 1\u20282, 'x'\u3000'y'",
    "SELECT\n'multi\nline'\r\n, 5\t, -- c\r\n6",
]


@pytest.mark.parametrize("sql", TRICKY)
def test_tricky_texts(sql: str) -> None:
    check(sql)


FRAGMENTS = [
    "'", "'", "''", '"', '""', "-", "--", "/", "*", "/*", "*/", "\n", " ", " ", " ",
    "$", "$1", "$2", "$12", "\\", "&", "U&", "E", "e", "E'x'", "x", "t1", "_", "é", "😀", "Ā", "١",
    "0", "1", "5", "42", "007", ".", ".5", "5.", "1e5", "e", "+", "-", "::", ":", ",", ";", "(", ")",
    "=", "SELECT", "WHERE", "a", "b.c", "'abc'", "'a''b'", '"id"', "/* c */", "-- c\n", "1.5",
]  # fmt: skip


def random_text(rng: random.Random) -> str:
    return "".join(rng.choice(FRAGMENTS) for _ in range(rng.randint(0, 24)))


def test_random_texts() -> None:
    rng = random.Random(20240611)
    for _ in range(20_000):
        check(random_text(rng))


def test_random_texts_without_fallbacks() -> None:
    """Random texts with no backslash or dollar quote, so that every one is normalised."""
    rng = random.Random(7)
    fragments = [f for f in FRAGMENTS if f not in ("\\", "$")]
    for _ in range(10_000):
        sql = "".join(rng.choice(fragments) for _ in range(rng.randint(0, 30)))
        assert normalise(sql, _number) is not None
        check(sql)


def test_every_code_point_as_a_neighbour() -> None:
    """Word and digit classes match the regex's for every character, next to numbers and quotes
    (planes 4 to 13 are unassigned, 15 and 16 private use: a sample of them is enough)."""
    code_points = [*range(0x40000), *range(0x40000, 0xE0000, 97), *range(0xE0000, sys.maxunicode + 1, 7)]
    for start in range(0, len(code_points), 512):
        chars = [chr(c) for c in code_points[start : start + 512] if chr(c) not in "\\$"]
        check(" ".join(f"{c}5 5{c} {c}'x' {c}.5 {c} {c}{c}" for c in chars))


def test_many_literals() -> None:
    """More literals than the scanner keeps on its stack."""
    for count in (31, 32, 33, 64, 65, 1000):
        check("SELECT " + ", ".join(f"{i}, 'v{i}'" for i in range(count)))
        check("SELECT $5, " + ", ".join(f"'é{i}'" for i in range(count)))


def test_unclosed_comments() -> None:
    """Text after an unclosed /* is scanned as if the comment were not there, in linear time."""
    check("/* 'x' 5 " * 1000)
    sql = "/* 'x' 5 " * 100_000
    template, base, literals = normalise(sql, _number)
    assert literals == ["x", 5] * 100_000 and template.endswith("/* $199999 $200000 ")


def test_texts_without_literals_are_their_own_template() -> None:
    sql = "SELECT a FROM t WHERE b = $1"
    template, base, literals = normalise(sql, _number)
    assert template is sql and base == 1 and literals == []


def test_numbers_go_through_the_given_function() -> None:
    seen: list[str] = []

    def number(text: str) -> object:
        seen.append(text)
        return text

    assert normalise("SELECT 7, 1.5, 1e3, ١٢, 12345678901234567890", number) == (
        "SELECT $1, $2, $3, $4, $5", 0, [7, "1.5", "1e3", "١٢", "12345678901234567890"]
    )
    assert seen == ["1.5", "1e3", "١٢", "12345678901234567890"]
