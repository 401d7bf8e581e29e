"""The expression language of IoT Analytics' ``filter`` and ``math`` pipeline activities.

A filter is "an expression that looks like a SQL WHERE clause that must return a Boolean value";
a math activity computes "an arithmetic expression using the message's attributes". Both read
the message's attributes by name (``value``, dotted for nested objects: ``device.temp``). This
is a small hand-written recursive-descent parser for that language, following the IoT SQL
operator tables (which IoT Analytics reused), with the same notion of *Undefined*: an attribute
the message does not have, a type that does not fit an operator, or a division by zero gives
Undefined, which spreads through arithmetic and comparisons, and a filter keeps a message only
when its expression is exactly ``true``::

    expr = compile_expression("value >= 0 AND NOT meter_type = 'steam'")
    expr({"value": 3, "meter_type": "electricity"})   # True
    expr({"meter_type": "electricity"})               # UNDEFINED: the filter drops it

Grammar, loosest first::

    or      := and ( OR and )*
    and     := not ( AND not )*
    not     := NOT not | compare
    compare := sum ( ( = | <> | != | < | <= | > | >= ) sum | IS [NOT] NULL )?
    sum     := product ( ( + | - ) product )*
    product := unary ( ( * | / | % ) unary )*
    unary   := - unary | + unary | primary
    primary := number | 'string' | TRUE | FALSE | NULL | name ( . name )*
             | function ( expr, ... ) | ( expr )

Functions: abs, ceil, floor, round, sqrt, power, exp, ln, log (base 10), mod, sign.
Int / Int is Int (truncated toward zero), as in IoT SQL; Int and Decimal mixed give Decimal.
"""

from __future__ import annotations

import math
import re
from typing import Any, Callable

from emulator.rules.sql import UNDEFINED

__all__ = ["UNDEFINED", "ExpressionError", "compile_expression"]


# IoT SQL's Undefined (not null, not false: the value of what cannot be evaluated), the rules
# engine's own, so one sentinel means it everywhere in the emulation.


class ExpressionError(ValueError):
    """An expression that does not parse; ``str(err)`` names the expression and the position."""

    def __init__(self, expression: str, position: int, message: str):
        self.expression = expression
        self.position = position
        super().__init__(f"{message} at position {position} of {expression!r}")


_TOKEN = re.compile(r"""
    \s*(?:
      (?P<number>(?:\d+\.\d*|\.\d+|\d+)(?:[eE][+-]?\d+)?)
    | '(?P<string>(?:[^']|'')*)'
    | (?P<name>[A-Za-z_][A-Za-z0-9_]*)
    | (?P<op><>|!=|<=|>=|=|<|>|\+|-|\*|/|%|\(|\)|,|\.)
    )""", re.VERBOSE)

_KEYWORDS = {"AND", "OR", "NOT", "TRUE", "FALSE", "NULL", "IS"}

Evaluator = Callable[[dict], Any]


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _numeric(v):
    """A number for arithmetic and ordering: numbers as they are, numeric strings converted
    (IoT SQL converts a String operand that holds a number); anything else is Undefined."""
    if _is_number(v):
        return v
    if isinstance(v, str):
        try:
            return int(v)
        except ValueError:
            try:
                return float(v)
            except ValueError:
                return UNDEFINED
    return UNDEFINED


def _arith(op: str, a, b):
    if a is UNDEFINED or b is UNDEFINED or a is None or b is None:
        return UNDEFINED
    a, b = _numeric(a), _numeric(b)
    if a is UNDEFINED or b is UNDEFINED:
        return UNDEFINED
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op == "*":
        return a * b
    if b == 0:
        return UNDEFINED
    if op == "/":
        if isinstance(a, int) and isinstance(b, int):
            q = abs(a) // abs(b)
            return q if (a >= 0) == (b >= 0) else -q
        return a / b
    # "%": the remainder keeps the dividend's sign, as in IoT SQL
    if isinstance(a, int) and isinstance(b, int):
        r = abs(a) % abs(b)
        return r if a >= 0 else -r
    return math.fmod(a, b)


def _compare(op: str, a, b):
    if a is UNDEFINED or b is UNDEFINED or a is None or b is None:
        return UNDEFINED
    if isinstance(a, bool) or isinstance(b, bool):
        if not (isinstance(a, bool) and isinstance(b, bool)) or op not in ("=", "<>", "!="):
            return UNDEFINED
    elif isinstance(a, str) and isinstance(b, str):
        pass
    else:
        a, b = _numeric(a), _numeric(b)
        if a is UNDEFINED or b is UNDEFINED:
            return UNDEFINED
    if op == "=":
        return a == b
    if op in ("<>", "!="):
        return a != b
    if op == "<":
        return a < b
    if op == "<=":
        return a <= b
    if op == ">":
        return a > b
    return a >= b


def _and(a, b):
    if a is False or b is False:
        return False
    if a is True and b is True:
        return True
    return UNDEFINED


def _or(a, b):
    if a is True or b is True:
        return True
    if a is False and b is False:
        return False
    return UNDEFINED


def _not(a):
    return (not a) if isinstance(a, bool) else UNDEFINED


def _num_fn(fn: Callable, arity: int) -> Callable:
    def call(*args):
        if len(args) != arity:
            return UNDEFINED
        nums = [_numeric(a) if a is not None else UNDEFINED for a in args]
        if any(n is UNDEFINED for n in nums):
            return UNDEFINED
        try:
            return fn(*nums)
        except (ValueError, ZeroDivisionError, OverflowError):
            return UNDEFINED
    return call


def _round(x):
    return int(math.floor(x + 0.5)) if x >= 0 else -int(math.floor(-x + 0.5))


FUNCTIONS: dict[str, Callable] = {
    "abs": _num_fn(abs, 1),
    "ceil": _num_fn(lambda x: int(math.ceil(x)), 1),
    "floor": _num_fn(lambda x: int(math.floor(x)), 1),
    "round": _num_fn(_round, 1),
    "sqrt": _num_fn(math.sqrt, 1),
    "power": _num_fn(lambda x, y: float(x) ** y, 2),
    "exp": _num_fn(math.exp, 1),
    "ln": _num_fn(math.log, 1),
    "log": _num_fn(math.log10, 1),
    "mod": lambda *a: _arith("%", *a) if len(a) == 2 else UNDEFINED,
    "sign": _num_fn(lambda x: (x > 0) - (x < 0), 1),
}


def attribute(message: dict, path: tuple[str, ...]):
    """The value at ``path`` (top-level name, then nested keys) or Undefined."""
    value: Any = message
    for key in path:
        if not isinstance(value, dict) or key not in value:
            return UNDEFINED
        value = value[key]
    return value


class _Parser:
    def __init__(self, text: str):
        self.text = text
        self.tokens: list[tuple[str, Any, int]] = []
        pos = 0
        while pos < len(text):
            if text[pos:].strip() == "":
                break
            m = _TOKEN.match(text, pos)
            if not m or m.end() == pos:
                at = len(text) - len(text[pos:].lstrip())
                raise ExpressionError(text, at, f"unexpected character {text[at]!r}")
            kind = m.lastgroup
            value = m.group(kind)
            start = m.start(kind) - (1 if kind == "string" else 0)
            if kind == "name" and value.upper() in _KEYWORDS:
                kind, value = "kw", value.upper()
            elif kind == "string":
                value = value.replace("''", "'")
            elif kind == "number":
                value = float(value) if any(c in value for c in ".eE") else int(value)
            self.tokens.append((kind, value, start))
            pos = m.end()
        self.i = 0

    # -- token helpers
    def peek(self, kind: str, value=None) -> bool:
        if self.i >= len(self.tokens):
            return False
        k, v, _ = self.tokens[self.i]
        return k == kind and (value is None or v == value)

    def take(self, kind: str, value=None):
        if not self.peek(kind, value):
            where = self.tokens[self.i][2] if self.i < len(self.tokens) else len(self.text)
            want = value if value is not None else kind
            raise ExpressionError(self.text, where, f"expected {want}")
        tok = self.tokens[self.i]
        self.i += 1
        return tok[1]

    def parse(self) -> Evaluator:
        if not self.tokens:
            raise ExpressionError(self.text, 0, "empty expression")
        node = self.or_()
        if self.i != len(self.tokens):
            raise ExpressionError(self.text, self.tokens[self.i][2], "unexpected token "
                                  f"{self.tokens[self.i][1]!r}")
        return node

    # -- grammar
    def or_(self) -> Evaluator:
        left = self.and_()
        while self.peek("kw", "OR"):
            self.i += 1
            right = self.and_()
            left = (lambda l, r: lambda m: _or(l(m), r(m)))(left, right)
        return left

    def and_(self) -> Evaluator:
        left = self.not_()
        while self.peek("kw", "AND"):
            self.i += 1
            right = self.not_()
            left = (lambda l, r: lambda m: _and(l(m), r(m)))(left, right)
        return left

    def not_(self) -> Evaluator:
        if self.peek("kw", "NOT"):
            self.i += 1
            inner = self.not_()
            return lambda m: _not(inner(m))
        return self.compare()

    def compare(self) -> Evaluator:
        left = self.sum()
        for op in ("=", "<>", "!=", "<=", ">=", "<", ">"):
            if self.peek("op", op):
                self.i += 1
                right = self.sum()
                return lambda m: _compare(op, left(m), right(m))
        if self.peek("kw", "IS"):
            self.i += 1
            negate = self.peek("kw", "NOT")
            if negate:
                self.i += 1
            self.take("kw", "NULL")

            def is_null(m):
                v = left(m)
                if v is UNDEFINED:
                    return UNDEFINED
                return (v is not None) if negate else (v is None)
            return is_null
        return left

    def sum(self) -> Evaluator:
        left = self.product()
        while self.peek("op", "+") or self.peek("op", "-"):
            op = self.take("op")
            right = self.product()
            left = (lambda o, l, r: lambda m: _arith(o, l(m), r(m)))(op, left, right)
        return left

    def product(self) -> Evaluator:
        left = self.unary()
        while self.peek("op", "*") or self.peek("op", "/") or self.peek("op", "%"):
            op = self.take("op")
            right = self.unary()
            left = (lambda o, l, r: lambda m: _arith(o, l(m), r(m)))(op, left, right)
        return left

    def unary(self) -> Evaluator:
        if self.peek("op", "-"):
            self.i += 1
            inner = self.unary()
            return lambda m: _arith("-", 0, inner(m))
        if self.peek("op", "+"):
            self.i += 1
            inner = self.unary()
            return lambda m: _arith("+", 0, inner(m))
        return self.primary()

    def primary(self) -> Evaluator:
        if self.peek("number") or self.peek("string"):
            value = self.tokens[self.i][1]
            self.i += 1
            return lambda m: value
        if self.peek("kw", "TRUE") or self.peek("kw", "FALSE") or self.peek("kw", "NULL"):
            value = {"TRUE": True, "FALSE": False, "NULL": None}[self.take("kw")]
            return lambda m: value
        if self.peek("op", "("):
            self.i += 1
            inner = self.or_()
            self.take("op", ")")
            return inner
        if self.peek("name"):
            where = self.tokens[self.i][2]
            name = self.take("name")
            if self.peek("op", "("):
                fn = FUNCTIONS.get(name.lower())
                if fn is None:
                    raise ExpressionError(self.text, where, f"unknown function {name!r} "
                                          f"(known: {', '.join(sorted(FUNCTIONS))})")
                self.i += 1
                args: list[Evaluator] = []
                if not self.peek("op", ")"):
                    args.append(self.or_())
                    while self.peek("op", ","):
                        self.i += 1
                        args.append(self.or_())
                self.take("op", ")")
                return lambda m: fn(*(a(m) for a in args))
            path = [name]
            while self.peek("op", "."):
                self.i += 1
                path.append(self.take("name"))
            key = tuple(path)
            if len(key) == 1:
                return lambda m: m.get(name, UNDEFINED)
            return lambda m: attribute(m, key)
        where = self.tokens[self.i][2] if self.i < len(self.tokens) else len(self.text)
        raise ExpressionError(self.text, where, "expected a value, an attribute or '('")


def compile_expression(text: str) -> Evaluator:
    """Parse ``text`` once; the result evaluates it against a message (a dict)."""
    return _Parser(text).parse()
