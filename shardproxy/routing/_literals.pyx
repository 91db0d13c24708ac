# cython: boundscheck=False, wraparound=False, cdivision=True
"""Compiled literal scanner for simple-protocol texts (Router.plan_simple in router.py uses it).

plan_simple turns each simple-protocol text into a template whose literals are ``$n`` placeholders, so
that texts differing only in literal values share one cached plan. That runs for every routed simple
query, so it is done here in one pass over the str's own characters (1, 2 or 4 bytes each) instead of a
regex with a Python callback per literal.

The rules are those of the regex it replaces, character for character (tests/test_literals.py keeps
that regex as the reference): double-quoted identifiers, ``--`` and ``/* */`` comments and quoted
strings glued to a word character, ``$`` or ``&`` (E'', B'', X'', U&'', type '...') are kept; other
quoted strings and numbers standing alone become placeholders. "Word" and "digit" are Unicode's, as
for ``\\w`` and ``\\d`` in str patterns.
"""

from cpython.mem cimport PyMem_Free, PyMem_Malloc
from cpython.unicode cimport (
    Py_UNICODE_ISALNUM, Py_UNICODE_ISDECIMAL, Py_UNICODE_TODECIMAL, PyUnicode_1BYTE_KIND,
    PyUnicode_2BYTE_KIND, PyUnicode_DATA, PyUnicode_KIND, PyUnicode_New, PyUnicode_Substring,
    PyUnicode_WRITE,
)
from libc.stdint cimport uint8_t, uint16_t, uint32_t
from libc.string cimport memcpy


cdef extern from "Python.h":
    bint PyUnicode_IS_ASCII(object o)


ctypedef fused uchar:  # the characters of a str: Py_UCS1, Py_UCS2 or Py_UCS4
    uint8_t
    uint16_t
    uint32_t

# Bases below this are formatted in C; larger $n numbers take a Python path.
cdef long long _SMALL_BASE = 10 ** 15
cdef enum:
    _SPANS = 32  # literals whose spans fit on the stack, before the span array moves to the heap


cdef inline bint _digit(Py_UCS4 c) noexcept:
    """\\d of a str pattern: a Unicode decimal digit."""
    cdef unsigned int u = c
    if u < 128:
        return u - 48 < 10
    return Py_UNICODE_ISDECIMAL(c)


cdef inline bint _word(Py_UCS4 c) noexcept:
    """\\w of a str pattern: a Unicode letter or number, or _."""
    cdef unsigned int u = c
    if u < 128:
        return u - 48 < 10 or (u | 32) - 97 < 26 or u == 95
    return Py_UNICODE_ISALNUM(c)


cdef object _param_base(const uchar* s, Py_ssize_t n, str sql):
    """The highest $n of the text (0 if none), or None if it has a backslash or a dollar quote."""
    cdef long long top = 0, value
    cdef Py_ssize_t i = 0, start
    big = None
    while i < n:
        if s[i] == 92:  # a backslash: E'' escapes, or standard_conforming_strings off
            return None
        if s[i] != 36:  # $
            i += 1
            continue
        i += 1
        if i == n or not _digit(s[i]):
            return None  # a dollar quote (or a lone $)
        start = i
        value = 0
        while i < n and _digit(s[i]):
            if i - start < 18:
                value = value * 10 + Py_UNICODE_TODECIMAL(s[i])
            i += 1
        if i - start <= 18:
            top = value if value > top else top
        else:
            value_obj = int(PyUnicode_Substring(sql, start, i))
            big = value_obj if big is None or value_obj > big else big
    return big if big is not None and big > top else top


cdef Py_ssize_t _quoted(const uchar* s, Py_ssize_t n, Py_ssize_t i, bint* doubled) noexcept:
    """End of the quoted text that opens at s[i], past its closing quote, or -1 if none.

    As q(?:[^q]|qq)*q matches: a doubled quote is part of the text; when no closing quote follows,
    the regex backtracks, and the text ends at the first quote of its last doubled pair.
    """
    cdef uchar q = s[i]
    cdef Py_ssize_t j = i + 1, last = -1
    while j < n:
        if s[j] != q:
            j += 1
        elif j + 1 < n and s[j + 1] == q:
            last = j
            doubled[0] = True
            j += 2
        else:
            return j + 1
    return last + 1 if last >= 0 else -1


cdef Py_ssize_t _number_end(const uchar* s, Py_ssize_t n, Py_ssize_t i) noexcept:
    """End of the number that starts at s[i] (a digit or a dot), or -1 if it is no standalone number.

    Standalone: no word character, $ or . just before or just after. The longest match is the only
    candidate: every shorter one is followed by a digit, a dot or an e.
    """
    cdef uint32_t c
    if i > 0:
        c = s[i - 1]
        if c == 36 or c == 46 or _word(c):
            return -1
    cdef Py_ssize_t j = i
    while j < n and _digit(s[j]):
        j += 1
    if j == i:  # .5
        j += 1
        if j == n or not _digit(s[j]):
            return -1
        while j < n and _digit(s[j]):
            j += 1
    elif j < n and s[j] == 46:  # 5. and 5.25
        j += 1
        while j < n and _digit(s[j]):
            j += 1
    cdef Py_ssize_t k
    if j < n and (s[j] == 101 or s[j] == 69):  # an exponent, if digits follow e[+-]
        k = j + 1
        if k < n and (s[k] == 43 or s[k] == 45):
            k += 1
        if k < n and _digit(s[k]):
            while k < n and _digit(s[k]):
                k += 1
            j = k
    if j < n:
        c = s[j]
        if c == 36 or c == 46 or _word(c):
            return -1
    return j


cdef object _number_value(const uchar* s, Py_ssize_t start, Py_ssize_t end, str sql, object number):
    """The key value of a number: plain ASCII digits here, anything else through number(text)."""
    cdef long long value = 0
    cdef Py_ssize_t i
    if end - start <= 18:
        for i in range(start, end):
            if <unsigned int>s[i] - 48 >= 10:  # unsigned: anything but 0-9
                break
            value = value * 10 + (<unsigned int>s[i] - 48)
        else:
            return value
    return number(PyUnicode_Substring(sql, start, end))


cdef Py_ssize_t _digits(unsigned long long v) noexcept nogil:
    cdef Py_ssize_t n = 1
    while v >= 10:
        v //= 10
        n += 1
    return n


cdef Py_ssize_t _copy(const uchar* s, Py_ssize_t start, Py_ssize_t end, int kind, void* data,
                      Py_ssize_t at) noexcept:
    """Write s[start:end] at data[at] (kind: the output's width, never narrower than what is
    copied) and return the position after it."""
    cdef Py_ssize_t i
    if kind == sizeof(uchar):
        memcpy(<char*>data + at * kind, s + start, (end - start) * kind)
        return at + end - start
    for i in range(start, end):
        PyUnicode_WRITE(kind, data, at, s[i])
        at += 1
    return at


cdef str _template(const uchar* s, Py_ssize_t n, str sql, Py_ssize_t* spans, Py_ssize_t count,
                   long long base):
    """sql with spans[2k]:spans[2k+1] replaced by $(base + k + 1), built in place."""
    cdef Py_ssize_t k, i, at = 0, size = n
    cdef uint32_t maxchar = 127
    for k in range(count):
        size += 1 + _digits(base + k + 1) - (spans[2 * k + 1] - spans[2 * k])
    if not PyUnicode_IS_ASCII(sql):  # the widest kept character decides the kind
        maxchar = 0
        for k in range(count + 1):
            for i in range(spans[2 * k - 1] if k else 0, spans[2 * k] if k < count else n):
                if s[i] > maxchar:
                    maxchar = s[i]
    out = PyUnicode_New(size, maxchar)
    cdef int kind = PyUnicode_KIND(out)
    cdef void* data = PyUnicode_DATA(out)
    cdef Py_ssize_t width
    cdef unsigned long long v
    for k in range(count):
        at = _copy(s, spans[2 * k - 1] if k else 0, spans[2 * k], kind, data, at)
        PyUnicode_WRITE(kind, data, at, 36)  # $
        v = base + k + 1
        width = _digits(v)
        for i in range(width, 0, -1):
            PyUnicode_WRITE(kind, data, at + i, <uint32_t>(48 + v % 10))
            v //= 10
        at += 1 + width
    _copy(s, spans[2 * count - 1], n, kind, data, at)
    return out


cdef str _big_template(str sql, Py_ssize_t* spans, Py_ssize_t count, object base):
    """_template for a base too large for C integers."""
    parts = []
    cdef Py_ssize_t k, start = 0
    for k in range(count):
        parts.append(sql[start:spans[2 * k]])
        parts.append(f"${base + k + 1}")
        start = spans[2 * k + 1]
    parts.append(sql[start:])
    return "".join(parts)


cdef object _normalise(const uchar* s, str sql, object number):
    cdef Py_ssize_t n = len(sql)
    base = _param_base(s, n, sql)
    if base is None:
        return None
    literals = []
    cdef Py_ssize_t stack[2 * _SPANS]
    cdef Py_ssize_t* spans = stack
    cdef Py_ssize_t* grown
    cdef Py_ssize_t room = _SPANS, count = 0, i = 0, end
    cdef uint32_t c
    cdef bint doubled, unclosed = False
    try:
        while i < n:
            c = s[i]
            if c == 39:  # '
                doubled = False
                end = _quoted(s, n, i, &doubled)
                if end < 0:
                    i += 1
                    continue
                if i and (s[i - 1] == 36 or s[i - 1] == 38 or _word(s[i - 1])):  # E'', U&'', $1'' ...
                    i = end
                    continue
                value = PyUnicode_Substring(sql, i + 1, end - 1)
                literals.append(value.replace("''", "'") if doubled else value)
            elif c == 34:  # "
                doubled = False
                end = _quoted(s, n, i, &doubled)
                i = end if end >= 0 else i + 1
                continue
            elif c == 45:  # -
                if i + 1 < n and s[i + 1] == 45:
                    i += 2
                    while i < n and s[i] != 10:
                        i += 1
                else:
                    i += 1
                continue
            elif c == 47:  # /
                end = -1
                if i + 1 < n and s[i + 1] == 42 and not unclosed:
                    for end in range(i + 3, n):
                        if s[end] == 47 and s[end - 1] == 42:
                            break
                    else:
                        end = -1
                        unclosed = True  # nor will any later /* be: no rescanning to the end
                i = end + 1 if end >= 0 else i + 1
                continue
            elif c == 46 or _digit(c):
                end = _number_end(s, n, i)
                if end < 0:
                    i += 1
                    continue
                literals.append(_number_value(s, i, end, sql, number))
            else:
                i += 1
                continue
            if count == room:
                grown = <Py_ssize_t*>PyMem_Malloc(4 * room * sizeof(Py_ssize_t))
                if grown == NULL:
                    raise MemoryError()
                memcpy(grown, spans, 2 * room * sizeof(Py_ssize_t))
                if spans != stack:
                    PyMem_Free(spans)
                spans = grown
                room *= 2
            spans[2 * count] = i
            spans[2 * count + 1] = end
            count += 1
            i = end
        if not count:
            return sql, base, literals
        if base < _SMALL_BASE:
            return _template(s, n, sql, spans, count, <long long>base), base, literals
        return _big_template(sql, spans, count, base), base, literals
    finally:
        if spans != stack:
            PyMem_Free(spans)


def normalise(str sql not None, number) -> tuple[str, int, list] | None:
    """(template, base, literals) of a simple-protocol text, or None to plan it as written.

    base is the text's highest ``$n`` (0 if none); literal k (from 0) becomes ``$(base + k + 1)`` in
    the template, and literals holds its value: a string with '' undoubled, or a number as
    number(text) gives it (ASCII digit strings are turned into ints here). Texts with a backslash or a
    dollar quote are None; texts without literals are their own template.
    """
    cdef unsigned int kind = PyUnicode_KIND(sql)
    cdef void* data = PyUnicode_DATA(sql)
    if kind == PyUnicode_1BYTE_KIND:
        return _normalise(<const uint8_t*>data, sql, number)
    if kind == PyUnicode_2BYTE_KIND:
        return _normalise(<const uint16_t*>data, sql, number)
    return _normalise(<const uint32_t*>data, sql, number)
