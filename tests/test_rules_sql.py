"""The IoT SQL of the rules engine: statements, a message, and the output AWS documents.

Each case is (SQL, topic, payload, expected output); None means the WHERE did not take the
message. Cases follow the AWS IoT SQL reference's examples and operator tables.
"""

from __future__ import annotations

import json
import re

import pytest

from emulator.rules.sql import UNDEFINED, Context, SqlError, parse, template, topic_matches

TOPIC = "dt/meters/15/gw-1/raw"
MSG = {"color": "red", "temperature": 100, "batch": "9f2c61d0a4b7e311", "n": 2, "s": "5", "t": "true",
       "a": {"b": {"c": 3}, "list": [10, 20, 30]}, "nul": None, "f": 2.5, "whole": 10.0,
       "readings": [["1433:electricity", 1483246800000, 41.35], ["1433:steam", 1483246800000, 2.0]]}


def run(sql: str, payload=MSG, topic: str = TOPIC, client_id: str | None = "gw-1", ts: int = 1_700_000_000_000):
    raw = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    out = parse(sql).evaluate(Context.of(topic, raw, client_id, ts))
    return None if out is None else out.value


CASES = [
    # SELECT basics
    ("SELECT color AS rgb FROM 'dt/#' WHERE temperature > 50", {"rgb": "red"}),
    ("SELECT color AS rgb FROM 'dt/#' WHERE temperature > 150", None),
    ("SELECT * FROM 'dt/#'", MSG | {"whole": 10}),
    ("SELECT *, topic(5) AS kind FROM 'dt/#'", MSG | {"whole": 10, "kind": "raw"}),
    ("SELECT batch, topic() AS topic FROM 'dt/#'", {"batch": "9f2c61d0a4b7e311", "topic": TOPIC}),
    ("SELECT a.b.c, a.list[1] AS second FROM 'dt/#'", {"c": 3, "second": 20}),
    ("SELECT get(a.list, 2) AS g, get(a, 'b') AS o, get(a.list, 9) AS missing FROM 'dt/#'", {"g": 30, "o": {"c": 3}}),
    ("SELECT VALUE readings FROM 'dt/#'", MSG["readings"]),
    ("SELECT VALUE n * 2 FROM 'dt/#'", 4),
    ("SELECT value FROM 'dt/#'", {}),  # a field named value, not SELECT VALUE; missing -> omitted
    ("SELECT {'c': color, 'x': nothing} AS obj, [n, nothing, 1] AS arr FROM 'dt/#'", {"obj": {"c": "red"}, "arr": [2, 1]}),
    # Undefined: a missing field is left out; WHERE on it is false; Null is a value
    ("SELECT nothing, color FROM 'dt/#'", {"color": "red"}),
    ("SELECT color FROM 'dt/#' WHERE nothing = 1", None),
    ("SELECT color FROM 'dt/#' WHERE nothing <> 1", None),
    ("SELECT color FROM 'dt/#' WHERE NOT nothing", None),
    ("SELECT color FROM 'dt/#' WHERE nothing > 1 OR n = 2", None),  # OR of Undefined is Undefined
    ("SELECT nul, isNull(nul) AS isn, isUndefined(nothing) AS isu FROM 'dt/#'", {"nul": None, "isn": True, "isu": True}),
    ("SELECT nothing + 1 AS x, nothing.deeper AS y, color.deeper AS z FROM 'dt/#'", {}),
    # arithmetic (Int / Int is an Int, a zero divisor Undefined, whole Decimals are Ints in V2)
    ("SELECT n + 1 AS a, n - 5 AS b, n * f AS c, 7 / 2 AS d, -7 / 2 AS e, 7 % 3 AS m, -7 % 3 AS nm FROM 'dt/#'",
     {"a": 3, "b": -3, "c": 5, "d": 3, "e": -3, "m": 1, "nm": -1}),
    ("SELECT 1 / 0 AS z, f / 2 AS h, whole AS w, 1.5 + 1.5 AS three FROM 'dt/#'", {"h": 1.25, "w": 10, "three": 3}),
    ("SELECT s + 1 AS num, 'a' + 'b' AS cat, color || n AS bars, 'x' - 1 AS bad FROM 'dt/#'",
     {"num": 6, "cat": "ab", "bars": "red2"}),
    ("SELECT 1 + 2 * 3 AS p, (1 + 2) * 3 AS q FROM 'dt/#'", {"p": 7, "q": 9}),
    # comparison: numbers by value (strings converted for < >), mismatched types unequal
    ("SELECT s > 4 AS gt, s = 5 AS eq_mixed, n = 2.0 AS eq_num, color = 'red' AS eq_str, color < 'z' AS lt_str FROM 'dt/#'",
     {"gt": True, "eq_mixed": False, "eq_num": True, "eq_str": True}),
    ("SELECT t AND true AS a, t OR nothing AS b, NOT t AS c, n AND true AS d FROM 'dt/#'", {"a": True, "c": False}),
    ("SELECT color FROM 'dt/#' WHERE topic(5) = 'raw' OR topic(5) = 'scored'", {"color": "red"}),
    ("SELECT color FROM 'dt/#' WHERE n IN [1, 2, 3] AND NOT color IN ['blue']", {"color": "red"}),
    # CASE, both forms; no ELSE and no match is Undefined
    ("SELECT CASE topic(3) WHEN '0' THEN 0.29307107 ELSE 1 END AS u FROM 'dt/#'", {"u": 1}),
    ("SELECT CASE WHEN n > 1 THEN 'many' ELSE 'one' END AS k, CASE color WHEN 'blue' THEN 1 END AS none FROM 'dt/#'",
     {"k": "many"}),
    # cast
    ("SELECT cast(s AS Int) AS i, cast('2.7' AS Int) AS fl, cast(f AS String) AS str, cast(t AS Boolean) AS b, "
     "cast(true AS Decimal) AS d, cast(color AS Int) AS bad FROM 'dt/#'",
     {"i": 5, "fl": 2, "str": "2.5", "b": True, "d": 1}),
    # functions
    ("SELECT topic(1) AS t1, topic(4) AS thing, topic(6) AS out_of_range, clientid() AS c, timestamp() AS ms FROM 'dt/#'",
     {"t1": "dt", "thing": "gw-1", "c": "gw-1", "ms": 1_700_000_000_000}),
    ("SELECT parse_time('yyyy-MM-dd', timestamp()) AS day, "
     "parse_time(\"yyyy-MM-dd'T'HH:mm:ss.SSSZ\", 1483246800123) AS iso FROM 'dt/#'",
     {"day": "2023-11-14", "iso": "2017-01-01T05:00:00.123+0000"}),
    ("SELECT concat(color, '-', n) AS c, lower('AbC') AS l, upper(color) AS u, abs(-3) AS a, floor(f) AS fl, "
     "substring(batch, 0, 4) AS sub FROM 'dt/#'", {"c": "red-2", "l": "abc", "u": "RED", "a": 3, "fl": 2, "sub": "9f2c"}),
]


@pytest.mark.parametrize("sql, expected", CASES, ids=[c[0][:60] for c in CASES])
def test_statement_output(sql, expected):
    assert run(sql) == expected


def test_newuuid_is_a_fresh_uuid_each_time():
    a, b = run("SELECT newuuid() AS u FROM 'dt/#'")["u"], run("SELECT newuuid() AS u FROM 'dt/#'")["u"]
    assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[0-9a-f]{4}-[0-9a-f]{12}", a) and a != b


def test_a_payload_that_is_not_json():
    assert run("SELECT * FROM 'dt/#'", b"\x00binary") == b"\x00binary"  # passed through as it is
    assert run("SELECT batch, topic() AS topic FROM 'dt/#'", b"not json") == {"topic": TOPIC}
    assert run("SELECT VALUE batch FROM 'dt/#'", b"not json") is UNDEFINED


def test_unnamed_items_are_named_after_their_path_or_text():
    assert run("SELECT a.b, topic(3) FROM 'dt/#'") == {"b": {"c": 3}, "topic(3)": "15"}


@pytest.mark.parametrize("filt, topic, match", [
    ("dt/meters/+/+/raw", "dt/meters/15/gw-1/raw", True),
    ("dt/meters/+/+/raw", "dt/meters/15/gw-1/scored", False),
    ("dt/meters/+/+/raw", "dt/meters/15/gw-1/raw/x", False),
    ("dt/#", "dt", True),
    ("dt/#", "dt/a/b", True),
    ("#", "$aws/rules/x", False),
    ("+/rules/#", "$aws/rules/x", False),
    ("$aws/rules/#", "$aws/rules/x/y", True),
])
def test_from_topic_filters(filt, topic, match):
    assert topic_matches(filt, topic) is match
    assert parse(f"SELECT * FROM '{filt}'").matches(topic) is match


@pytest.mark.parametrize("sql, message", [
    ("SELECT * FROM dt/meters", r"FROM takes a topic filter in single quotes"),
    ("SELECT * FROM \"dt/meters\"", r"FROM takes a topic filter in single quotes"),
    ("SELECT * FROM 'dt/me+/x'", r"not a valid topic filter"),
    ("SELECT * FROM 'dt/#/x'", r"not a valid topic filter"),
    ("SELECT a b FROM 'x'", r"expected the end of the statement at position 9"),
    ("SELECT nope(1) FROM 'x'", r"unknown function nope\(\)"),
    ("SELECT cast(a AS Date) FROM 'x'", r"cast to 'Date'"),
    ("SELECT VALUE a, b FROM 'x'", r"SELECT VALUE takes exactly one expression"),
    ("SELECT (a FROM 'x'", r"expected \)"),
    ("SELECT a FROM 'x' WHERE", r"expected an expression at position 23, found the end of the statement"),
])
def test_refused_statements_say_where(sql, message):
    with pytest.raises(SqlError, match=message):
        parse(sql)


def test_substitution_templates():
    ctx = Context.of(TOPIC, json.dumps(MSG).encode(), "gw-1", 1_700_000_000_000)
    assert template("cmd/meters/${topic(4)}/receipt")(ctx) == "cmd/meters/gw-1/receipt"
    assert template("errors/${parse_time(\"yyyy-MM-dd\", timestamp())}/${color}-${nothing}.json")(ctx) == \
        "errors/2023-11-14/red-.json"
    assert template("no/substitution")(ctx) == "no/substitution"
    with pytest.raises(SqlError, match="unclosed"):
        template("cmd/${topic(4)")
