"""AWS IoT SQL (version 2016-03-23), parsed by hand and compiled to Python closures.

A rule's statement is ``SELECT [VALUE] <items> FROM '<topic filter>' [WHERE <condition>]``.
:func:`parse` reads it once into a :class:`Statement` whose SELECT items and WHERE are nested
closures ``f(ctx) -> value``; evaluating a message is then only calls, no tree walking. The same
expression compiler reads the action's substitution templates (``cmd/meters/${topic(4)}/receipt``,
:func:`template`).

Values are JSON's, as the AWS reference's data-type table has them: Int (``int``), Decimal
(``float``; with SQL V2 a whole number such as ``10.0`` is the Int ``10``, in the payload and in
results), Boolean, String, Array (``list``), Object (``dict``), Null (``None``) and
:data:`UNDEFINED`, which is not a value: a field the message does not have, a function given
the wrong types, a comparison with Undefined. An Undefined SELECT item is left out of the
output; an Undefined WHERE is false.

Operators follow the reference's tables: ``AND``/``OR``/``NOT`` take Booleans or the strings
"true"/"false" (anything else is Undefined); ``=``/``<>`` compare numbers numerically, values of
one type by value, values of different types as unequal, Undefined as Undefined; ``<``, ``<=``,
``>``, ``>=`` convert both sides to Decimal (strings matching ``^-?\\d+(\\.\\d+)?(E-?\\d+)?$``)
or are Undefined; ``+`` adds numbers and concatenates two strings, ``-``, ``*``, ``/``, ``%``
take numbers (or numeric strings); Int / Int is an Int (truncated), a zero divisor Undefined;
``||`` concatenates the string forms. Also: ``CASE`` (both forms), ``IN``, dotted paths and
``[index]``, object and array literals (``{'a': b}``, ``[1, x]``), ``cast(x AS Int|Decimal|
Boolean|String)`` and the functions of :data:`FUNCTIONS` (``topic(n)``, ``timestamp()``,
``clientid()``, ``newuuid()``, ``get()``, ``parse_time()``, ...).
"""

from __future__ import annotations

import base64
import json
import math
import re
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable

from gateway.topics import topic_matches

__all__ = ["UNDEFINED", "SqlError", "Context", "Statement", "parse", "template", "topic_matches",
           "loads", "dumps", "FUNCTIONS"]


class _Undefined:
    """The SQL's Undefined: not a value (see the module doc)."""

    _instance = None

    def __new__(cls):
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "Undefined"

    def __bool__(self) -> bool:
        return False


UNDEFINED: Any = _Undefined()


class SqlError(ValueError):
    """A statement the parser refuses, with the position and what was expected."""


# ------------------------------------------------------------------------------------ values

def _parse_float(text: str) -> int | float:
    f = float(text)
    return int(f) if f.is_integer() and abs(f) < 1e300 else f  # SQL V2: 10.0 is the Int 10


_decoder = json.JSONDecoder(parse_float=_parse_float)
_encoder = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def loads(payload: bytes) -> Any:
    """The payload as SQL V2 values, or :data:`UNDEFINED` when it is not JSON."""
    try:
        return _decoder.decode(payload.decode() if isinstance(payload, (bytes, bytearray)) else payload)
    except (ValueError, UnicodeDecodeError):
        return UNDEFINED


def dumps(value: Any) -> bytes:
    """A rule's output as the bytes an action sends: JSON, Undefined members left out."""
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if value is UNDEFINED:
        return b""
    return _encoder.encode(value).encode()


def _is_num(v: Any) -> bool:
    return (type(v) is int or type(v) is float)


_DECIMAL = re.compile(r"^-?\d+(\.\d+)?([eE]-?\d+)?$")


def _norm(x: int | float) -> int | float:
    if type(x) is float and x.is_integer() and abs(x) < 1e300:
        return int(x)
    return x


def to_decimal(v: Any) -> Any:
    """The reference's conversion to Decimal: numbers as they are, numeric strings parsed,
    Null stays Null, anything else Undefined."""
    if _is_num(v):
        return v
    if type(v) is str and _DECIMAL.match(v):
        return _parse_float(v) if ("." in v or "e" in v or "E" in v) else int(v)
    if v is None:
        return None
    return UNDEFINED


def to_bool(v: Any) -> Any:
    if type(v) is bool:
        return v
    if type(v) is str:
        low = v.lower()
        if low == "true":
            return True
        if low == "false":
            return False
    return UNDEFINED


def to_string(v: Any) -> Any:
    if type(v) is str:
        return v
    if v is UNDEFINED:
        return UNDEFINED
    if type(v) is bool:
        return "true" if v else "false"
    if v is None:
        return "null"
    if _is_num(v):
        return repr(v) if type(v) is float else str(v)
    return _encoder.encode(v)


# ----------------------------------------------------------------------------------- context

@dataclass
class Context:
    """One message as the SQL sees it: its topic, JSON body (Undefined when not JSON), raw
    payload, sender, and the time the rules engine received it (``timestamp()``, the same for
    every rule and action of the message)."""

    topic: str
    payload: bytes
    client_id: str | None = None
    timestamp_ms: int = 0
    doc: Any = UNDEFINED
    levels: list[str] = field(default_factory=list)
    account_id: str = "000000000000"
    trace_id: str = ""

    @classmethod
    def of(cls, topic: str, payload: bytes, client_id: str | None, timestamp_ms: int, **kw) -> "Context":
        return cls(topic=topic, payload=payload, client_id=client_id, timestamp_ms=timestamp_ms,
                   doc=loads(payload), levels=topic.split("/"), **kw)


# -------------------------------------------------------------------------------- the tokenizer

_TOKEN = re.compile(r"""
    (?P<ws>\s+)
  | (?P<num>\d+\.\d*(?:[eE][-+]?\d+)?|\.\d+(?:[eE][-+]?\d+)?|\d+(?:[eE][-+]?\d+)?)
  | (?P<str>'(?:[^'\\]|\\.|'')*'|"(?:[^"\\]|\\.)*")
  | (?P<bq>`[^`]*`)
  | (?P<name>[A-Za-z_$][A-Za-z0-9_$]*)
  | (?P<op><>|!=|<=|>=|\|\||[=<>+\-*/%(),.\[\]{}:])
""", re.X)

_KEYWORDS = {"SELECT", "AS", "FROM", "WHERE", "AND", "OR", "NOT", "CASE", "WHEN", "THEN", "ELSE",
             "END", "TRUE", "FALSE", "NULL", "IN"}


@dataclass
class _Tok:
    kind: str  # num, str, name, kw, op, eof
    text: str
    pos: int
    value: Any = None


def _unquote(text: str) -> str:
    body = text[1:-1]
    if text[0] == "'":
        body = body.replace("''", "'")
    return re.sub(r"\\(.)", lambda m: {"n": "\n", "t": "\t", "r": "\r"}.get(m.group(1), m.group(1)), body)


def _tokens(sql: str) -> list[_Tok]:
    out, pos = [], 0
    while pos < len(sql):
        m = _TOKEN.match(sql, pos)
        if m is None:
            raise SqlError(f"unexpected character {sql[pos]!r} at position {pos}: {sql!r}")
        kind, text = m.lastgroup, m.group()
        if kind == "num":
            out.append(_Tok("num", text, pos, _parse_float(text) if any(c in text for c in ".eE") else int(text)))
        elif kind == "str":
            out.append(_Tok("str", text, pos, _unquote(text)))
        elif kind == "bq":
            out.append(_Tok("name", text[1:-1], pos))
        elif kind == "name":
            up = text.upper()
            out.append(_Tok("kw", up, pos) if up in _KEYWORDS else _Tok("name", text, pos))
        elif kind == "op":
            out.append(_Tok("op", text, pos))
        pos = m.end()
    out.append(_Tok("eof", "", len(sql)))
    return out


# ------------------------------------------------------------------------------ the operators

def _eq(a: Any, b: Any) -> Any:
    if a is UNDEFINED or b is UNDEFINED:
        return UNDEFINED
    if _is_num(a) and _is_num(b):
        return a == b
    if type(a) is not type(b):
        return False
    return a == b


def _ne(a: Any, b: Any) -> Any:
    r = _eq(a, b)
    return r if r is UNDEFINED else not r


def _ordering(op: Callable[[Any, Any], bool]) -> Callable[[Any, Any], Any]:
    def compare(a: Any, b: Any) -> Any:
        a, b = to_decimal(a), to_decimal(b)
        if a is UNDEFINED or b is UNDEFINED or a is None or b is None:
            return UNDEFINED
        return op(a, b)
    return compare


def _numeric(a: Any, b: Any) -> tuple[Any, Any] | None:
    a, b = to_decimal(a), to_decimal(b)
    if a is UNDEFINED or b is UNDEFINED or a is None or b is None:
        return None
    return a, b


def _add(a: Any, b: Any) -> Any:
    if type(a) is str and type(b) is str:
        return a + b
    if type(a) is int and type(b) is int:
        return a + b
    ab = _numeric(a, b)
    return UNDEFINED if ab is None else _norm(ab[0] + ab[1])


def _sub(a: Any, b: Any) -> Any:
    ab = _numeric(a, b)
    return UNDEFINED if ab is None else _norm(ab[0] - ab[1])


def _mul(a: Any, b: Any) -> Any:
    ab = _numeric(a, b)
    return UNDEFINED if ab is None else _norm(ab[0] * ab[1])


def _div(a: Any, b: Any) -> Any:
    ab = _numeric(a, b)
    if ab is None or ab[1] == 0:
        return UNDEFINED
    x, y = ab
    if type(x) is int and type(y) is int:
        q = abs(x) // abs(y)  # truncated toward zero, as Java's integer division
        return q if (x >= 0) == (y >= 0) else -q
    return _norm(x / y)


def _mod(a: Any, b: Any) -> Any:
    ab = _numeric(a, b)
    if ab is None or ab[1] == 0:
        return UNDEFINED
    x, y = ab
    if type(x) is int and type(y) is int:
        r = abs(x) % abs(y)  # the sign of the dividend, as Java's remainder
        return r if x >= 0 else -r
    return _norm(math.fmod(x, y))


def _concat2(a: Any, b: Any) -> Any:
    a, b = to_string(a), to_string(b)
    if a is UNDEFINED or b is UNDEFINED:
        return UNDEFINED
    return a + b


def _and(a: Any, b: Any) -> Any:
    a, b = to_bool(a), to_bool(b)
    if a is UNDEFINED or b is UNDEFINED:
        return UNDEFINED
    return a and b


def _or(a: Any, b: Any) -> Any:
    a, b = to_bool(a), to_bool(b)
    if a is UNDEFINED or b is UNDEFINED:
        return UNDEFINED
    return a or b


def _in(a: Any, b: Any) -> Any:
    if a is UNDEFINED or type(b) is not list:
        return UNDEFINED
    return any(_eq(a, x) is True for x in b)


_BINARY = {
    "=": _eq, "<>": _ne, "!=": _ne,
    "<": _ordering(lambda a, b: a < b), "<=": _ordering(lambda a, b: a <= b),
    ">": _ordering(lambda a, b: a > b), ">=": _ordering(lambda a, b: a >= b),
    "+": _add, "-": _sub, "*": _mul, "/": _div, "%": _mod, "||": _concat2,
    "AND": _and, "OR": _or, "IN": _in,
}


def _member(v: Any, key: Any) -> Any:
    """``v.key`` / ``v[key]`` / ``get(v, key)``: Undefined when it is not there."""
    if type(v) is dict:
        if type(key) is str:
            return v.get(key, UNDEFINED)
        return UNDEFINED
    if type(v) is list and type(key) is int and not isinstance(key, bool):
        return v[key] if 0 <= key < len(v) else UNDEFINED
    return UNDEFINED


# ------------------------------------------------------------------------------- the functions

def _f_topic(ctx: Context, *args: Any) -> Any:
    if not args:
        return ctx.topic
    n = to_decimal(args[0])
    if type(n) is not int or n < 1 or n > len(ctx.levels):
        return UNDEFINED
    return ctx.levels[n - 1]


def _f_get(ctx: Context, v: Any = UNDEFINED, key: Any = UNDEFINED, *rest: Any) -> Any:
    return _member(v, key)


def _f_concat(ctx: Context, *args: Any) -> Any:
    if any(a is UNDEFINED for a in args):
        return UNDEFINED
    if args and all(type(a) is list for a in args):
        return [x for a in args for x in a]
    parts = [to_string(a) for a in args]
    return "".join(parts)


def _string_fn(fn: Callable[[str], Any]) -> Callable[..., Any]:
    def call(ctx: Context, v: Any = UNDEFINED, *rest: Any) -> Any:
        s = to_string(v) if v is not None else UNDEFINED
        return UNDEFINED if s is UNDEFINED else fn(s)
    return call


def _number_fn(fn: Callable[[Any], Any]) -> Callable[..., Any]:
    def call(ctx: Context, v: Any = UNDEFINED, *rest: Any) -> Any:
        n = to_decimal(v)
        return UNDEFINED if n is UNDEFINED or n is None else _norm(fn(n))
    return call


def _f_substring(ctx: Context, s: Any = UNDEFINED, start: Any = UNDEFINED, end: Any = None) -> Any:
    s, start = to_string(s), to_decimal(start)
    if s is UNDEFINED or type(start) is not int:
        return UNDEFINED
    if end is None:
        return s[max(start, 0):]
    end = to_decimal(end)
    return UNDEFINED if type(end) is not int else s[max(start, 0):max(end, 0)]


# Java DateTimeFormatter letters the templates use, as strftime (S, a fraction, by hand).
_JAVA_TIME = re.compile(r"'([^']*)'|(y+|M+|d+|H+|h+|m+|s+|S+|a|E+|Z+|X+|z+|D+|u+)|([^'A-Za-z]+|[A-Za-z])")
_STRFTIME = {"yyyy": "%Y", "yy": "%y", "y": "%Y", "MMMM": "%B", "MMM": "%b", "MM": "%m", "M": "%-m",
             "dd": "%d", "d": "%-d", "HH": "%H", "H": "%-H", "hh": "%I", "h": "%-I", "mm": "%M",
             "m": "%-M", "ss": "%S", "s": "%-S", "a": "%p", "EEEE": "%A", "EEE": "%a", "E": "%a",
             "DDD": "%j", "u": "%u"}


def _java_format(pattern: str, dt: datetime) -> str:
    out = []
    for m in _JAVA_TIME.finditer(pattern):
        literal, letters, other = m.groups()
        if literal is not None:
            out.append(literal if literal else "'")
        elif other is not None:
            out.append(other)
        elif letters[0] == "S":
            out.append(f"{dt.microsecond:06d}"[:len(letters)].ljust(len(letters), "0"))
        elif letters[0] in "ZX":
            off = dt.strftime("%z") or "+0000"
            if letters[0] == "X" and off == "+0000":
                out.append("Z")
            else:
                out.append(off if len(letters) < 2 or letters[0] == "Z" and len(letters) < 3 else off[:3] + ":" + off[3:])
        elif letters[0] == "z":
            out.append(dt.tzname() or "UTC")
        elif letters in _STRFTIME:
            fmt = _STRFTIME[letters]
            text = dt.strftime(fmt.replace("%-", "%"))
            out.append(text.lstrip("0") or "0" if "%-" in fmt else text)
        else:
            out.append(dt.strftime(_STRFTIME.get(letters[:4], letters)))
    return "".join(out)


def _f_parse_time(ctx: Context, pattern: Any = UNDEFINED, ts: Any = UNDEFINED, tz: Any = "UTC") -> Any:
    ts = to_decimal(ts)
    if type(pattern) is not str or ts is UNDEFINED or ts is None:
        return UNDEFINED
    zone: Any = timezone.utc
    if tz not in ("UTC", "Z", None):
        try:
            from zoneinfo import ZoneInfo
            zone = ZoneInfo(str(tz))
        except Exception:  # an unknown zone: Undefined, as for any invalid argument
            return UNDEFINED
    try:
        dt = datetime.fromtimestamp(ts / 1000, tz=zone)
    except (OverflowError, OSError, ValueError):
        return UNDEFINED
    return _java_format(pattern, dt)


def _f_encode(ctx: Context, v: Any = UNDEFINED, scheme: Any = UNDEFINED) -> Any:
    if type(scheme) is not str or scheme.lower() != "base64":
        return UNDEFINED
    if type(v) is str and v == "*":
        return base64.b64encode(ctx.payload).decode()
    s = to_string(v)
    return UNDEFINED if s is UNDEFINED else base64.b64encode(s.encode()).decode()


def _round(n: Any) -> Any:
    return math.floor(n + 0.5) if n >= 0 else -math.floor(-n + 0.5)


#: name -> f(ctx, *args); each returns Undefined for arguments it cannot take.
FUNCTIONS: dict[str, Callable[..., Any]] = {
    "topic": _f_topic,
    "timestamp": lambda ctx: ctx.timestamp_ms,
    "clientid": lambda ctx: ctx.client_id if ctx.client_id is not None else UNDEFINED,
    "newuuid": lambda ctx: str(uuid.uuid4()),
    "accountid": lambda ctx: ctx.account_id,
    "traceid": lambda ctx: ctx.trace_id or UNDEFINED,
    "get": _f_get,
    "concat": _f_concat,
    "lower": _string_fn(str.lower),
    "upper": _string_fn(str.upper),
    "trim": _string_fn(str.strip),
    "ltrim": _string_fn(str.lstrip),
    "rtrim": _string_fn(str.rstrip),
    "length": _string_fn(len),
    "substring": _f_substring,
    "startswith": lambda ctx, s=UNDEFINED, p=UNDEFINED: (s.startswith(p) if type(s) is str and type(p) is str
                                                        else UNDEFINED),
    "endswith": lambda ctx, s=UNDEFINED, p=UNDEFINED: (s.endswith(p) if type(s) is str and type(p) is str
                                                      else UNDEFINED),
    "abs": _number_fn(abs),
    "ceil": _number_fn(math.ceil),
    "floor": _number_fn(math.floor),
    "round": _number_fn(_round),
    "sqrt": _number_fn(lambda n: math.sqrt(n) if n >= 0 else UNDEFINED),
    "mod": lambda ctx, a=UNDEFINED, b=UNDEFINED: _mod(a, b),
    "power": lambda ctx, a=UNDEFINED, b=UNDEFINED: (lambda ab: UNDEFINED if ab is None else _norm(float(ab[0]) ** ab[1]))(_numeric(a, b)),
    "isundefined": lambda ctx, v=UNDEFINED: v is UNDEFINED,
    "isnull": lambda ctx, v=UNDEFINED: v is None,
    "isstring": lambda ctx, v=UNDEFINED: type(v) is str,
    "isnumber": lambda ctx, v=UNDEFINED: _is_num(v),
    "isboolean": lambda ctx, v=UNDEFINED: type(v) is bool,
    "isarray": lambda ctx, v=UNDEFINED: type(v) is list,
    "isobject": lambda ctx, v=UNDEFINED: type(v) is dict,
    "parse_time": _f_parse_time,
    "encode": _f_encode,
}


def _cast(v: Any, to: str) -> Any:
    if v is UNDEFINED:
        return UNDEFINED
    if to == "int":
        if type(v) is bool:
            return int(v)
        n = to_decimal(v)
        return n if n is UNDEFINED or n is None else math.floor(n)
    if to == "decimal":
        if type(v) is bool:
            return 1 if v else 0
        return to_decimal(v)
    if to in ("boolean", "bool"):
        if _is_num(v):
            return v != 0
        return to_bool(v)
    if to == "string":
        return to_string(v)
    return UNDEFINED


# ---------------------------------------------------------------------------------- the parser

Expr = Callable[[Context], Any]


def _const(v: Any) -> Expr:
    return lambda ctx: v


class _Parser:
    def __init__(self, sql: str):
        self.sql = sql
        self.toks = _tokens(sql)
        self.i = 0

    # -- helpers
    @property
    def tok(self) -> _Tok:
        return self.toks[self.i]

    def take(self) -> _Tok:
        t = self.toks[self.i]
        self.i += 1
        return t

    def at(self, kind: str, text: str | None = None) -> bool:
        t = self.tok
        return t.kind == kind and (text is None or t.text == text)

    def accept(self, kind: str, text: str | None = None) -> _Tok | None:
        return self.take() if self.at(kind, text) else None

    def expect(self, kind: str, text: str | None = None, what: str | None = None) -> _Tok:
        if not self.at(kind, text):
            t = self.tok
            got = "the end of the statement" if t.kind == "eof" else repr(t.text)
            raise SqlError(f"expected {what or text or kind} at position {t.pos}, found {got}: {self.sql!r}")
        return self.take()

    # -- statement
    def statement(self) -> "Statement":
        self.expect("kw", "SELECT")
        value = self._value_keyword()
        items = [self.item()]
        while self.accept("op", ","):
            items.append(self.item())
        if value and (len(items) != 1 or items[0][0] == "*"):
            raise SqlError(f"SELECT VALUE takes exactly one expression: {self.sql!r}")
        topic_filter = None
        if self.accept("kw", "FROM"):
            t = self.tok
            if t.kind != "str" or not t.text.startswith("'"):
                raise SqlError(f"FROM takes a topic filter in single quotes (FROM 'a/+/b'), found "
                               f"{t.text or 'nothing'!r} at position {t.pos}: {self.sql!r}")
            topic_filter = self.take().value
            _check_filter(topic_filter, self.sql)
        where = None
        if self.accept("kw", "WHERE"):
            where = self.expr()
        self.expect("eof", what="the end of the statement")
        return Statement(self.sql, value, items, topic_filter, where)

    def _value_keyword(self) -> bool:
        """``SELECT VALUE x``, told apart from a field named value (``SELECT value, ts``)."""
        t, nxt = self.tok, self.toks[self.i + 1]
        if t.kind != "name" or t.text.upper() != "VALUE":
            return False
        if nxt.kind in ("eof",) or (nxt.kind == "kw" and nxt.text in ("FROM", "AS", "AND", "OR", "IN")):
            return False
        if nxt.kind == "op" and nxt.text not in ("(", "{", "[", "-", "*"):
            return False
        self.take()
        return True

    def item(self) -> tuple[str, Any]:
        if self.accept("op", "*"):
            return ("*", None)
        start = self.tok.pos
        expr, path_name = self.expr_named()
        end = self.tok.pos
        if self.accept("kw", "AS"):
            t = self.take()
            if t.kind not in ("name", "str", "kw"):
                raise SqlError(f"expected a name after AS at position {t.pos}: {self.sql!r}")
            return ("expr", (t.value if t.kind == "str" else t.text, expr))
        name = path_name or self.sql[start:end].strip()  # unnamed: its own text
        return ("expr", (name, expr))

    def expr_named(self) -> tuple[Expr, str | None]:
        """An expression, and its output name when it is a plain path (``a.b`` -> ``b``)."""
        start = self.i
        expr = self.expr()
        toks = self.toks[start:self.i]
        if toks and toks[-1].kind == "name" and all(
                t.kind == "name" if k % 2 == 0 else t.text == "." for k, t in enumerate(toks)):
            return expr, toks[-1].text
        return expr, None

    # -- expressions, loosest first
    def expr(self) -> Expr:
        return self.or_()

    def _chain(self, sub: Callable[[], Expr], ops: tuple[str, ...], kind: str = "op") -> Expr:
        left = sub()
        while self.tok.text in ops and self.tok.kind in (kind, "op", "kw"):
            fn = _BINARY[self.take().text]
            right = sub()
            left = (lambda f, l, r: lambda ctx: f(l(ctx), r(ctx)))(fn, left, right)
        return left

    def or_(self) -> Expr:
        return self._chain(self.and_, ("OR",), "kw")

    def and_(self) -> Expr:
        return self._chain(self.not_, ("AND",), "kw")

    def not_(self) -> Expr:
        if self.accept("kw", "NOT"):
            inner = self.not_()

            def negate(ctx: Context) -> Any:
                b = to_bool(inner(ctx))
                return b if b is UNDEFINED else not b
            return negate
        return self.comparison()

    def comparison(self) -> Expr:
        left = self.additive()
        t = self.tok
        if (t.kind == "op" and t.text in ("=", "<>", "!=", "<", "<=", ">", ">=")) or (t.kind == "kw" and t.text == "IN"):
            fn = _BINARY[self.take().text]
            right = self.additive()
            return lambda ctx: fn(left(ctx), right(ctx))
        if t.kind == "kw" and t.text == "NOT" and self.toks[self.i + 1].text == "IN":
            self.i += 2
            right = self.additive()

            def not_in(ctx: Context) -> Any:
                r = _in(left(ctx), right(ctx))
                return r if r is UNDEFINED else not r
            return not_in
        return left

    def additive(self) -> Expr:
        return self._chain(self.multiplicative, ("+", "-", "||"))

    def multiplicative(self) -> Expr:
        return self._chain(self.unary, ("*", "/", "%"))

    def unary(self) -> Expr:
        if self.accept("op", "-"):
            inner = self.unary()
            return lambda ctx: _sub(0, inner(ctx))
        if self.accept("op", "+"):
            return self.unary()
        return self.postfix(self.primary())

    def postfix(self, expr: Expr) -> Expr:
        while True:
            if self.accept("op", "."):
                t = self.take()
                if t.kind not in ("name", "kw"):
                    raise SqlError(f"expected a field name after '.' at position {t.pos}: {self.sql!r}")
                key = t.text
                expr = (lambda e, k: lambda ctx: _member(e(ctx), k))(expr, key)
            elif self.accept("op", "["):
                index = self.expr()
                self.expect("op", "]")
                expr = (lambda e, ix: lambda ctx: _member(e(ctx), ix(ctx)))(expr, index)
            else:
                return expr

    def primary(self) -> Expr:
        t = self.tok
        if t.kind in ("num", "str"):
            self.take()
            return _const(t.value)
        if t.kind == "kw" and t.text in ("TRUE", "FALSE", "NULL"):
            self.take()
            return _const({"TRUE": True, "FALSE": False, "NULL": None}[t.text])
        if t.kind == "kw" and t.text == "CASE":
            return self.case()
        if self.accept("op", "("):
            inner = self.expr()
            self.expect("op", ")")
            return inner
        if self.accept("op", "{"):
            return self.object_literal()
        if self.accept("op", "["):
            return self.array_literal()
        if t.kind == "name":
            self.take()
            if self.at("op", "("):
                return self.call(t)
            key = t.text
            return lambda ctx: _member(ctx.doc, key)
        got = "the end of the statement" if t.kind == "eof" else repr(t.text)
        raise SqlError(f"expected an expression at position {t.pos}, found {got}: {self.sql!r}")

    def call(self, name: _Tok) -> Expr:
        self.expect("op", "(")
        fname = name.text.lower()
        if fname == "cast":
            inner = self.expr()
            self.expect("kw", "AS")
            to = self.take()
            if to.text.lower() not in ("int", "decimal", "boolean", "bool", "string"):
                raise SqlError(f"cast to {to.text!r} at position {to.pos}: the types are Int, Decimal, "
                               f"Boolean and String: {self.sql!r}")
            self.expect("op", ")")
            target = to.text.lower()
            return lambda ctx: _cast(inner(ctx), target)
        fn = FUNCTIONS.get(fname)
        if fn is None:
            raise SqlError(f"unknown function {name.text}() at position {name.pos} (this emulation has "
                           f"{', '.join(sorted(FUNCTIONS))}): {self.sql!r}")
        args: list[Expr] = []
        if fname == "encode" and self.at("op", "*"):  # encode(*, 'base64'): the whole payload
            self.take()
            args.append(_const("*"))
            if self.accept("op", ","):
                args.append(self.expr())
        elif not self.at("op", ")"):
            args.append(self.expr())
            while self.accept("op", ","):
                args.append(self.expr())
        self.expect("op", ")")
        if not args:
            return lambda ctx: fn(ctx)
        if len(args) == 1:
            a0 = args[0]
            return lambda ctx: fn(ctx, a0(ctx))
        return lambda ctx: fn(ctx, *[a(ctx) for a in args])

    def case(self) -> Expr:
        self.expect("kw", "CASE")
        subject = None if self.at("kw", "WHEN") else self.expr()
        whens: list[tuple[Expr, Expr]] = []
        while self.accept("kw", "WHEN"):
            cond = self.expr()
            self.expect("kw", "THEN")
            whens.append((cond, self.expr()))
        if not whens:
            raise SqlError(f"CASE needs at least one WHEN at position {self.tok.pos}: {self.sql!r}")
        otherwise = self.expr() if self.accept("kw", "ELSE") else _const(UNDEFINED)
        self.expect("kw", "END")

        if subject is None:
            def searched(ctx: Context) -> Any:
                for cond, result in whens:
                    if to_bool(cond(ctx)) is True:
                        return result(ctx)
                return otherwise(ctx)
            return searched

        def simple(ctx: Context) -> Any:
            v = subject(ctx)
            for cond, result in whens:
                if _eq(v, cond(ctx)) is True:
                    return result(ctx)
            return otherwise(ctx)
        return simple

    def object_literal(self) -> Expr:
        members: list[tuple[str, Expr]] = []
        if not self.accept("op", "}"):
            while True:
                k = self.take()
                if k.kind not in ("str", "name"):
                    raise SqlError(f"expected a key in an object literal at position {k.pos}: {self.sql!r}")
                self.expect("op", ":")
                members.append((k.value if k.kind == "str" else k.text, self.expr()))
                if self.accept("op", "}"):
                    break
                self.expect("op", ",", what="',' or '}'")

        def build(ctx: Context) -> dict:
            out = {}
            for k, e in members:
                v = e(ctx)
                if v is not UNDEFINED:
                    out[k] = v
            return out
        return build

    def array_literal(self) -> Expr:
        elements: list[Expr] = []
        if not self.accept("op", "]"):
            elements.append(self.expr())
            while self.accept("op", ","):
                elements.append(self.expr())
            self.expect("op", "]", what="',' or ']'")
        return lambda ctx: [v for v in (e(ctx) for e in elements) if v is not UNDEFINED]


def _check_filter(topic_filter: str, sql: str) -> None:
    levels = topic_filter.split("/")
    for i, level in enumerate(levels):
        if ("#" in level and (level != "#" or i != len(levels) - 1)) or ("+" in level and level != "+"):
            raise SqlError(f"FROM '{topic_filter}' is not a valid topic filter ('+' stands for a whole "
                           f"level, '#' for the last one): {sql!r}")


# ------------------------------------------------------------------------------- the statement

class Statement:
    """A parsed rule statement. :meth:`evaluate` gives the SELECT's :class:`Output` for one
    message, or None when the WHERE does not take it."""

    def __init__(self, sql: str, value: bool, items: list, topic_filter: str | None, where: Expr | None):
        self.sql = sql
        self.value = value
        self.topic_filter = topic_filter
        self.where = where
        self._select = self._compile(value, items)

    @staticmethod
    def _compile(value: bool, items: list) -> Callable[[Context], Any]:
        if value:
            return items[0][1][1]
        if len(items) == 1 and items[0][0] == "*":
            # SELECT * passes a payload that is not JSON through as it is (binary payloads)
            return lambda ctx: ctx.doc if ctx.doc is not UNDEFINED else ctx.payload
        star = any(kind == "*" for kind, _ in items)
        named = [pair for kind, pair in items if kind == "expr"]

        def select(ctx: Context) -> dict:
            out = dict(ctx.doc) if star and type(ctx.doc) is dict else {}
            for name, expr in named:
                v = expr(ctx)
                if v is not UNDEFINED:
                    out[name] = v
                else:
                    out.pop(name, None)
            return out
        return select

    def matches(self, topic: str) -> bool:
        return self.topic_filter is not None and topic_matches(self.topic_filter, topic)

    def evaluate(self, ctx: Context) -> "Output | None":
        if self.where is not None and to_bool(self.where(ctx)) is not True:
            return None
        return Output(self._select(ctx))

    def __repr__(self) -> str:
        return f"Statement({self.sql!r})"


@dataclass(frozen=True)
class Output:
    """A rule's SELECT result: ``value`` is a dict, or any value for SELECT VALUE (Undefined
    included, which actions send as an empty payload)."""

    value: Any

    def payload(self) -> bytes:
        return dumps(self.value)


def parse(sql: str) -> Statement:
    """Parse one rule statement; :class:`SqlError` says where and what was expected."""
    if not isinstance(sql, str) or not sql.strip():
        raise SqlError("a rule needs an SQL statement")
    return _Parser(sql).statement()


_TEMPLATE = re.compile(r"\$\{")


def template(text: str) -> Callable[[Context], str]:
    """A substitution template (``cmd/meters/${topic(4)}/receipt``) as ``f(ctx) -> str``: each
    ``${expression}`` is evaluated on the message and replaced by its string form (Undefined by
    nothing)."""
    parts: list[Any] = []
    pos = 0
    while (m := _TEMPLATE.search(text, pos)) is not None:
        parts.append(text[pos:m.start()])
        end, depth, quote = m.end(), 1, None
        while end < len(text):
            c = text[end]
            if quote:
                if c == quote:
                    quote = None
            elif c in "'\"":
                quote = c
            elif c == "{":
                depth += 1
            elif c == "}":
                depth -= 1
                if depth == 0:
                    break
            end += 1
        if end >= len(text):
            raise SqlError(f"unclosed ${{ in the substitution template {text!r}")
        p = _Parser(text[m.end():end])
        expr = p.expr()
        p.expect("eof", what="'}'")
        parts.append(expr)
        pos = end + 1
    parts.append(text[pos:])
    parts = [p for p in parts if not (isinstance(p, str) and p == "")]
    if all(isinstance(p, str) for p in parts):
        constant = "".join(parts)
        return lambda ctx: constant

    def render(ctx: Context) -> str:
        out = []
        for part in parts:
            if isinstance(part, str):
                out.append(part)
            else:
                s = to_string(part(ctx))
                out.append("" if s is UNDEFINED else s)
        return "".join(out)
    return render
